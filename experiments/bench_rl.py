"""Benchmark: RL wall time per step, synchronous vs async, vanilla vs speculative rollouts.

    python experiments/bench_rl.py                  # 4 setups x 40 GRPO steps from the pretrain_mtp policy
    python experiments/bench_rl.py --rl.num-steps 10   # a quick look

In one run, the same number of GRPO steps from the same start (same prompts, seeds
and hyperparameters) for four setups:

- sync-vanilla:  rollouts (vanilla decoding), then the update, one after the other;
- sync-spec:     the same with speculative rollouts (rejection sampling, K drafts);
- async-vanilla: a producer thread samples batch i+1 while the learner trains on
                 batch i (max_staleness 1, decoupled off-policy correction);
- async-spec:    both.

Async setups put rollouts and training on disjoint device sets when the program has
two or more devices: this script asks XLA for 2 CPU devices (before importing jax)
and gives the rollout mesh one and the train mesh the other; the two still share the
machine's cores. Sync setups run on one device.

Reported per setup (medians over the steps after --warmup, which compile): wall
seconds per step, its rollout / train split (rollout = the producer's sampling time),
the overlap achieved (the fraction of rollout time hidden behind training:
(rollout + train - wall) / rollout), the largest policy lag trained on, the wall time
until the smoothed training reward first reaches --reward_threshold, and the reward
curve (mean, and a Welch t-test of its per-step rewards against sync-vanilla's). The
speedups are ratios to sync-vanilla measured in this run. ``model: disjoint hw`` is a
model, not a measurement: the speedup an async setup would get where rollouts and
training do not share compute (sync-vanilla's s/step over the longer of its sync
twin's two phases). Writes RUN_DIR/results.json,
RUN_DIR/plots/reward_vs_wall_time.png and each setup's RL run under RUN_DIR/<setup>/
(rerun the same command after a crash: finished setups are kept, a killed one resumes
from its checkpoint, with its per-step timings resumed too).
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

from bebop_jax.bench.rl import BenchRLArgs, run_benchmark  # noqa: E402  (after XLA_FLAGS: jax sees 2 devices)
from bebop_jax.run import parse, run_main  # noqa: E402

if __name__ == "__main__":
    run_main(lambda: run_benchmark(parse(BenchRLArgs)))
