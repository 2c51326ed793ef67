"""Micro-benchmark: rejection_sample's XLA path against a plain copy of the same bytes.

    python experiments/bench_rejection.py                       # B=64, K=4, V=151,936, f32
    python experiments/bench_rejection.py --dtype bfloat16 --repeats 15

Reports achieved GB/s (bytes of logits read / median wall time) of a plain copy,
``rejection_sample`` and ``rejection_sample_with_noise``, and their ratio to the copy.
The work is ``bebop_jax.bench.rejection``. Writes RUN_DIR/results.json.
"""

from bebop_jax.bench.rejection import BenchRejectionArgs, bench_rejection
from bebop_jax.run import parse, run_main

if __name__ == "__main__":
    run_main(lambda: bench_rejection(parse(BenchRejectionArgs)))
