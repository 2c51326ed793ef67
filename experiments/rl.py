"""GRPO with speculative rollouts, from a pretrain_mtp policy (or a Qwen3 checkpoint).

    python experiments/rl.py                           # small defaults (2-core CPU), after pretrain_mtp
    python experiments/rl.py --spec_method none        # the same run with vanilla rollouts
    python experiments/rl.py --rl.async-rollouts       # rollouts of the next batch overlap training
    python experiments/rl.py --rl.async-rollouts --rl.rollout-devices 4   # on a mesh of their own
    python experiments/rl.py --policy_dir QWEN3_HF_DIR --tasks gsm_symbolic --mesh.fsdp -1
    python experiments/rl.py --help

The rollouts go through the speculative decoder with the policy's pre-RL MTP heads
(frozen: no online MTP update). Writes RUN_DIR/results.json (history per step, held-out
accuracy before / after), the trained policy (RUN_DIR/policy), TensorBoard scalars,
metrics.jsonl and checkpoints: rerun the same command after a crash to resume.
The stage itself is bebop_jax.rl.stage.
"""

from bebop_jax.rl.stage import RLArgs, run_rl
from bebop_jax.run import parse, run_main

if __name__ == "__main__":
    run_main(lambda: run_rl(parse(RLArgs)))
