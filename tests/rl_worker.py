"""``python tests/rl_worker.py ARGS``: experiments/rl.py with the toy task ``ascii_first`` registered."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments"), str(ROOT / "tests")]

import toy_tasks  # noqa: E402,F401  (registers ascii_first)
import rl  # noqa: E402

from bebop_jax.run import parse, run_main  # noqa: E402

if __name__ == "__main__":
    run_main(lambda: rl.main(parse(rl.RLArgs)))
