"""Benchmark: vanilla vs speculative decoding (greedy / rejection verification), end to end.

    python experiments/bench_decode.py --quick                 # reduced grid, random init
    python experiments/bench_decode.py                         # K=1..4, batch 1/32, T=0/0.6/1.0
    python experiments/bench_decode.py --adversarial --quick   # spec overhead when nothing is accepted
    python experiments/bench_decode.py --policy_dir runs/pretrain_mtp/mtp_e2e_tv/policy --tasks arithmetic

One table: tokens/s of ``generate`` for none / greedy / rejection at each draft length
(``--num_draft``), batch size and temperature, the speedup over vanilla measured in the
same run, the measured acceptance, and the ideal and memory-bound-model speedups. Without
``--policy_dir`` the model is randomly initialised (acceptance ~0: the table then
measures the cost of speculating). The columns, the adversarial and agreeing-heads
rewrites and the timing method are described in ``bebop_jax.bench.decode``, which does
the work. Writes RUN_DIR/results.json.
"""

from bebop_jax.bench.decode import BenchDecodeArgs, bench_decode
from bebop_jax.run import parse, run_main

if __name__ == "__main__":
    run_main(lambda: bench_decode(parse(BenchDecodeArgs)))
