"""Which training prompts each RL step uses: a pure function of (seed, step).

A pool of distinct training examples per task is drawn once; tasks take turns
(prompt i of a step comes from task i mod #tasks), and each task's pool is walked in
a seeded permutation that is reshuffled every epoch. So a resumed run sees exactly
the prompts an uninterrupted one would, with nothing to checkpoint.
"""

from __future__ import annotations

import numpy as np

from bebop_jax.tasks import Example, Task


class PromptSchedule:
    def __init__(self, tasks: list[Task], per_step: int, *, pool_size: int = 2048, seed: int = 0):
        if not tasks:
            raise ValueError("tasks: need at least one task")
        if not (isinstance(per_step, int) and per_step >= 1):
            raise ValueError(f"per_step: must be an int >= 1, got {per_step!r}")
        self.tasks, self.per_step, self.seed = tasks, per_step, seed
        self.pools = [task.examples("train", pool_size, seed=seed) for task in tasks]

    def _order(self, t: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, t, epoch]).permutation(len(self.pools[t]))

    def at(self, step: int) -> list[tuple[Task, Example]]:
        """The (task, example) pairs of RL step ``step``."""
        n_tasks = len(self.tasks)
        out = []
        for i in range(self.per_step):
            t = i % n_tasks
            per_task = len(range(t, self.per_step, n_tasks))  # task t's prompts per step
            index = step * per_task + i // n_tasks  # position in task t's stream of prompts
            epoch, pos = divmod(index, len(self.pools[t]))
            out.append((self.tasks[t], self.pools[t][self._order(t, epoch)[pos]]))
        return out
