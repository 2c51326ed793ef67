"""Compiled decode loops, kept in a small LRU: each holds a whole while_loop executable.

``generate`` / ``continue_generate`` and the adaptive draft length's cost calibration
compile through ``compiled``, so a calibration and a benchmark that time the same
fixed-step loops compile them once.
"""

from __future__ import annotations

import collections

import jax

MAX_COMPILED = 16
_COMPILED: collections.OrderedDict = collections.OrderedDict()


def compiled(sig: tuple, build, donate: tuple = ()):
    """``jax.jit(build())`` kept once per ``sig`` (LRU of MAX_COMPILED).

    A jitted function, not an ahead-of-time ``Compiled``: its calls take jax's C++ dispatch
    path (a few microseconds, against hundreds for ``Compiled.__call__`` with a
    parameter tree), and it compiles on first use per input shape and placement.
    """
    fn = _COMPILED.get(sig)
    if fn is None:
        fn = jax.jit(build(), donate_argnums=donate)
        _COMPILED[sig] = fn
        while len(_COMPILED) > MAX_COMPILED:
            _COMPILED.popitem(last=False)
    else:
        _COMPILED.move_to_end(sig)
    return fn
