"""``python tests/rl_worker.py ARGS``: experiments/rl.py with the toy task ``ascii_first`` registered."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import toy_tasks  # noqa: E402,F401  (registers ascii_first)

from bebop_jax.rl.stage import RLArgs, run_rl  # noqa: E402
from bebop_jax.run import parse, run_main  # noqa: E402

if __name__ == "__main__":
    run_main(lambda: run_rl(parse(RLArgs)))
