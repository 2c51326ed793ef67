"""Pretrain the small policy (trunk + next-token head) on the tasks' worked solutions.

    python experiments/pretrain_base.py                 # defaults: a laptop-CPU run
    python experiments/pretrain_base.py --help          # every knob (model, optimizer, ...)

Writes to --run_dir: checkpoints/ (resumable: rerun the same command after a
crash), policy/ (the final model, what pretrain_mtp.py loads), tensorboard/,
metrics.jsonl and results.json (held-out accuracy per task). The work is
``bebop_jax.train.base.pretrain_base``.
"""

from bebop_jax.train.base import BaseArgs, pretrain_base
from bebop_jax.run import parse, run_main

if __name__ == "__main__":
    run_main(lambda: pretrain_base(parse(BaseArgs)))
