"""Benchmark: the MTP train step (mode mtp_only) for each loss, at several model sizes.

    python experiments/bench_train_step.py                    # sizes mini and small, B=8, T=128
    python experiments/bench_train_step.py --sizes tiny mini small --timed_steps 9 --batch_size 16
    python experiments/bench_train_step.py --vocab_size 32768 # loss cost grows with V

For every (size, loss): tokens/s, CPU time per step, compile time and the memory XLA
plans for the step, with ratios to ce measured in the same run (the steps of the losses
interleaved). The work is ``bebop_jax.bench.train_step``. Writes RUN_DIR/results.json.
"""

from bebop_jax.bench.train_step import BenchTrainStepArgs, bench_train_step
from bebop_jax.run import parse, run_main

if __name__ == "__main__":
    run_main(lambda: bench_train_step(parse(BenchTrainStepArgs)))
