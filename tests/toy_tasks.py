"""A toy task whose reward a tiny random policy can earn, registered as ``ascii_first``.

Importing this module registers it, so tests (and ``tests/rl_worker.py``, which runs
``experiments/rl.py`` with it) can use it like any task.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from bebop_jax.tasks import Example, Grade, Task
from bebop_jax.tasks.base import register


@register("ascii_first")
class AsciiFirst(Task):
    """Prompt: three letters. Reward 1 iff the response starts with an ASCII character."""

    def _stream(self, seed: int) -> Iterator[Example]:
        rng = np.random.default_rng(seed)
        while True:
            yield Example(prompt="".join(chr(97 + c) for c in rng.integers(0, 26, 3)), answer="")

    def _grade(self, example: Example, response: str) -> Grade:
        ascii_first = ord(response[0]) < 128
        return Grade(float(ascii_first), "ASCII" if ascii_first else "not ASCII")
