"""Held-out accuracy during RL: greedy (one sample) and at T = 1 (several samples per prompt)."""

from __future__ import annotations

import jax
import numpy as np

from bebop_jax.rl.rollout import RolloutWorker
from bebop_jax.sampling import SamplingConfig
from bebop_jax.tasks import Example, Task


def heldout_accuracy(params, worker: RolloutWorker, eval_sets: list[tuple[Task, list[Example]]], key: jax.Array, *,
                     samples: int) -> dict:
    """{"greedy": acc, "T1": acc, "by_task": {name: {"greedy", "T1"}}}, means over tasks.

    Episodes run like the RL rollouts of ``worker`` (multi-turn included), at
    temperature 0 once per prompt and at temperature 1 ``samples`` times per prompt.
    The draft length only changes the speed: decoding is exact.
    """
    spec = worker.spec.with_draft(worker.spec.num_draft) if worker.spec.adaptive else worker.spec
    by_task = {}
    for i, (task, examples) in enumerate(eval_sets):
        out = {}
        for name, temp, n in (("greedy", 0.0, 1), ("T1", 1.0, samples)):
            w = worker.variant(SamplingConfig(temperature=temp), spec)  # on the worker's mesh
            rows, _, _ = w.episodes(params, [(task, e) for e in examples for _ in range(n)], jax.random.fold_in(key, i))
            out[name] = float(np.mean([r.reward for r in rows]))
        by_task[task.name] = out
    return {"greedy": float(np.mean([v["greedy"] for v in by_task.values()])),
            "T1": float(np.mean([v["T1"] for v in by_task.values()])), "by_task": by_task}
