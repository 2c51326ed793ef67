"""Benchmarks, one module each; ``experiments/bench_*.py`` parse their args and call them.

- `decode`: ``bench_decode(BenchDecodeArgs)``: tokens/s and acceptance of vanilla vs speculative
  ``generate`` (greedy / rejection verification, fixed and adaptive draft lengths).
- `rl`: ``run_benchmark(BenchRLArgs)``: GRPO wall time per step, sync / async x vanilla / speculative.
- `rejection`: ``bench_rejection(BenchRejectionArgs)``: ``rejection_sample``'s bandwidth against a copy.
- `train_step`: ``bench_train_step(BenchTrainStepArgs)``: the mtp_only train step per loss and size.

Each writes RUN_DIR/results.json (keys in docs/DESIGN.md §3.8) and prints one table. The
modules are imported one by one (this package imports none of them), so a benchmark
loads only what it measures.
"""
