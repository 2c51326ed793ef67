"""Print a few examples of a task: prompt, gold answer, graded solutions.

    python -m bebop_jax.tasks.show --tasks arithmetic -n 3
    python -m bebop_jax.tasks.show --tasks calculator countdown --split test --seed 1
    python -m bebop_jax.tasks.show --list
"""

from __future__ import annotations

import argparse
import random
import sys
import textwrap

from bebop_jax.tasks import get_task, list_tasks


def _block(label: str, text: str, width: int = 2000) -> str:
    if len(text) > width:
        text = text[:width] + f"... [{len(text) - width} more characters]"
    return f"{label}:\n{textwrap.indent(text, '  | ', lambda _: True)}"


def show(name: str, n: int = 3, split: str = "train", seed: int = 0, difficulty: int = 1,
         out=None) -> None:
    out = sys.stdout if out is None else out
    task = get_task(name, difficulty)
    rng = random.Random(seed)
    print(f"== task {task.name} (difficulty {difficulty}, {split} split, seed {seed}, "
          f"multi_turn={task.multi_turn}) ==", file=out)
    for i, ex in enumerate(task.examples(split, n, seed)):
        print(f"\n--- example {i} ---", file=out)
        print(_block("prompt", ex.prompt), file=out)
        print(_block("gold answer", ex.answer), file=out)
        if task.multi_turn:
            turns = task.solution_turns(ex, rng)
            lines = [f"[{t.role}{'' if t.trainable else ', masked'}] {t.text!r}"
                     for t in turns[1:]]
            print(_block("scripted conversation (env turns masked from the loss)",
                         "\n".join(lines)), file=out)
        solution = task.solution(ex, rng)
        grade = task.grade(ex, solution)
        print(_block(f"worked solution -> reward {grade.reward:g} ({grade.reason})", solution),
              file=out)
        wrong = task.corrupted(ex, rng)
        grade = task.grade(ex, wrong)
        print(_block(f"corrupted response -> reward {grade.reward:g} ({grade.reason})", wrong),
              file=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=[], help=f"any of: {', '.join(list_tasks())}")
    parser.add_argument("-n", type=int, default=3, help="number of examples")
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", type=int, default=1)
    parser.add_argument("--list", action="store_true", help="list the task names and exit")
    args = parser.parse_args(argv)
    if args.list or not args.tasks:
        print("\n".join(list_tasks()))
        return 0
    try:
        for name in args.tasks:
            show(name, args.n, args.split, args.seed, args.difficulty)
    except ValueError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
