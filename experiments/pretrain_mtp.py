"""Pre-RL MTP training by self-distillation, and the loss comparison of the paper.

    python experiments/pretrain_mtp.py                  # everything, small defaults (laptop CPU)
    python experiments/pretrain_mtp.py --loss e2e_tv --policy_dir runs/pretrain_base
    python experiments/pretrain_mtp.py --policy_dir QWEN3_HF_DIR --tasks gsm_symbolic
    python experiments/pretrain_mtp.py --help

The base is --policy_dir (a pretrain_base run or policy directory, or a Qwen3 Hugging
Face directory, whose tokenizer and mtp.* heads are used), or, without one, a base
trained into RUN_DIR/base first. MTP heads are then trained with each loss (--loss
ce|kl|tv|e2e_tv|all) on the base's own responses, trunk frozen, and compared by
teacher-forced acceptance and real speculative decoding on held-out prompts. The small
default draft is one MTP layer with an 8-wide MLP (--base.model.mtp-intermediate-size,
or --mtp_intermediate_size for heads on a given base): like a real model's draft it
cannot match the target everywhere, and only then do the losses' optima differ.
The stage itself is bebop_jax.mtp.pretrain.

Everything is written to RUN_DIR: results.json, tensorboard/, per-loss checkpoints
(rerun the same command to resume after a crash).
"""

from bebop_jax.mtp.pretrain import MTPArgs, pretrain_mtp
from bebop_jax.run import parse, run_main

if __name__ == "__main__":
    run_main(lambda: pretrain_mtp(parse(MTPArgs)))
