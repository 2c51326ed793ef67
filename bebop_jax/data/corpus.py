"""Training corpora from tasks: worked solutions (base SFT) and self-distillation.

Tasks speak text; this module is where their text meets a tokenizer. Single-turn
tasks give ``prompt`` + ``solution``; multi-turn ones a scripted conversation of
``Turn``s whose environment turns get loss mask 0.
"""

from __future__ import annotations

import random
from typing import Sequence

from bebop_jax.data.pipeline import Example, encode_example, encode_turns
from bebop_jax.data.tokenizer import Tokenizer


def solution_examples(tokenizer: Tokenizer, task, examples: Sequence, *, solutions_per_example: int,
                      seed: int) -> list[Example]:
    """Tokenized worked solutions: ``solutions_per_example`` independently drawn styles each."""
    if solutions_per_example < 1:
        raise ValueError(f"solutions_per_example must be >= 1, got {solutions_per_example}")
    rng = random.Random(seed)
    out = []
    for ex in examples:
        for _ in range(solutions_per_example):
            if task.multi_turn:
                turns = [("user", ex.prompt, False)] + [
                    (t.role, t.text, t.trainable) for t in task.solution_turns(ex, rng)]
                out.append(encode_turns(tokenizer, turns))
            else:
                out.append(encode_example(tokenizer, ex.prompt, task.solution(ex, rng)))
    return out


def rollout_examples(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> list[Example]:
    """(tokens, loss_mask) for sampled responses: mask 1 on the response, 0 on the prompt."""
    return [(list(p) + list(r), [0.0] * len(p) + [1.0] * len(r)) for p, r in zip(prompt_ids, response_ids)]
