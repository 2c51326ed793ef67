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


def compiled(sig: tuple, build, args: tuple, donate: tuple = ()):
    """The executable of ``build()`` for ``args``, compiled once per ``sig`` and placement of the
    arguments (LRU of MAX_COMPILED)."""
    sig = sig + (tuple(getattr(x, "sharding", None) for x in jax.tree.leaves(args)),)
    exe = _COMPILED.get(sig)
    if exe is None:
        exe = jax.jit(build(), donate_argnums=donate).lower(*args).compile()
        _COMPILED[sig] = exe
        while len(_COMPILED) > MAX_COMPILED:
            _COMPILED.popitem(last=False)
    else:
        _COMPILED.move_to_end(sig)
    return exe
