"""Verifiable tasks: math, code (sandboxed execution) and agentic (multi-turn).

    from bebop_jax.tasks import get_task, list_tasks, execute
    task = get_task("arithmetic")              # difficulty 1: the small-scale default
    ex = task.examples("train", 3, seed=0)[0]
    task.grade(ex, task.solution(ex, random.Random(0)))   # Grade(reward=1.0, ...)

Small-scale tasks (short ASCII prompt + worked solution for the tiny byte-level
model): arithmetic, countdown, code_expr, calculator (tool use, multi-turn).
Real-model tasks: chain_sum, gsm_symbolic, humaneval, and the textarena games
guess_the_number, tower_of_hanoi, frozen_lake. ``python -m bebop_jax.tasks.show
--tasks NAME ...`` prints examples.
"""

from bebop_jax.tasks import agentic, code_tasks, math_tasks  # noqa: F401  (register tasks)
from bebop_jax.tasks.base import (Chooser, Env, Example, Grade, StepResult, Task, Turn,
                                  check_task_names, extract_answer, get_task, grade_all, join_turns,
                                  list_tasks)
from bebop_jax.tasks.code_tasks import extract_code
from bebop_jax.tasks.sandbox import (ExecResult, SandboxLimits, SandboxUnavailable, execute,
                                     execute_many)

SMALL_SCALE_TASKS = ("arithmetic", "countdown", "code_expr", "calculator")

__all__ = [
    "Chooser", "Env", "Example", "ExecResult", "Grade", "SMALL_SCALE_TASKS", "SandboxLimits",
    "SandboxUnavailable", "StepResult", "Task", "Turn", "check_task_names", "execute", "execute_many",
    "extract_answer", "extract_code", "get_task", "grade_all", "join_turns", "list_tasks",
]
