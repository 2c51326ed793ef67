"""Micro-benchmark: ``rejection_sample``'s XLA path against a plain copy of the same bytes.

Verification is bandwidth-bound: it must read the [B, K+1, V] target and [B, K, V]
draft logits. The benchmark reports achieved GB/s (bytes of logits read / median
wall time) for
  copy              a jitted copy of those arrays (reads and writes every byte),
  rejection_sample  the public call (XLA path), randomness drawn from the key inside,
  with_noise        the same with the randomness drawn beforehand,
and the ratio to copy. Runs are interleaved (copy, sampler, copy, ...) so that load
from other processes hits all of them alike; the CPU time of this process is
reported too.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax.decode import rejection
from bebop_jax.run import config_dict, prepare_run_dir, print_table, write_results_json

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class BenchRejectionArgs:
    run_dir: str = "runs/bench_rejection"
    batch: int = 64
    num_draft: int = 4
    vocab_size: int = 151_936
    dtype: str = "float32"
    method: str = "rejection"
    temperature: float = 1.0
    repeats: int = 9
    seed: int = 0

    def __post_init__(self):
        for name in ("batch", "num_draft", "vocab_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.method not in rejection.METHODS:
            raise ValueError(f"method must be one of {rejection.METHODS}, got {self.method!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (the sampled path), got {self.temperature}")


def _time_once(fn, args) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - wall, time.process_time() - cpu


def run_benchmark(args: BenchRejectionArgs = BenchRejectionArgs()) -> dict:
    """Times copy / rejection_sample / with_noise; returns results.json's content (rows, bytes_read, config)."""
    b, k, v = args.batch, args.num_draft, args.vocab_size
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(args.seed), 4)
    target = (jax.random.normal(keys[0], (b, k + 1, v)) * 3).astype(dtype)
    draft = (target[:, :k].astype(jnp.float32)
             + jax.random.normal(keys[1], (b, k, v))).astype(dtype)
    drafts = jax.random.categorical(keys[2], draft.astype(jnp.float32)).astype(jnp.int32)
    uniforms, gumbel = rejection.draw_randomness(keys[3], b, k, v)
    reads_draft = args.method == "rejection"
    read = (target, draft) if reads_draft else (target,)
    nbytes = sum(x.size * x.dtype.itemsize for x in read)

    kw = dict(temperature=args.temperature, method=args.method, impl="xla")
    fns = {
        "copy": (jax.jit(lambda *xs: tuple(jnp.copy(x) for x in xs)), read),
        "rejection_sample": (functools.partial(rejection.rejection_sample, **kw),
                             (target, draft, drafts, keys[3])),
        "with_noise": (functools.partial(rejection.rejection_sample_with_noise, **kw),
                       (target, draft, drafts, uniforms, gumbel)),
    }
    for fn, fn_args in fns.values():  # compile and warm up
        jax.block_until_ready(fn(*fn_args))
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, (fn, fn_args) in fns.items():
            times[name].append(_time_once(fn, fn_args))

    rows = []
    copy_wall = float(np.median([t[0] for t in times["copy"]]))
    copy_cpu = float(np.median([t[1] for t in times["copy"]]))
    for name, ts in times.items():
        wall = float(np.median([t[0] for t in ts]))
        cpu = float(np.median([t[1] for t in ts]))
        rows.append({
            "name": name,
            "median_ms": 1e3 * wall,
            "cpu_ms": 1e3 * cpu,
            "GB/s": nbytes / wall / 1e9,
            "vs_copy": copy_wall / wall,
            "vs_copy_cpu": copy_cpu / cpu,
        })
    return {"config": config_dict(args), "bytes_read": nbytes, "rows": rows,
            "devices": [str(d) for d in jax.devices()]}


def bench_rejection(args: BenchRejectionArgs) -> dict:
    """Run the benchmark, print its table, write RUN_DIR/results.json."""
    prepare_run_dir(args.run_dir)
    results = run_benchmark(args)
    gb = results["bytes_read"] / 1e9
    print_table(results["rows"],
                ["name", "median_ms", "cpu_ms", "GB/s", "vs_copy", "vs_copy_cpu"],
                title=(f"rejection_sample (xla) B={args.batch} K={args.num_draft} "
                       f"V={args.vocab_size} {args.dtype} {args.method}: "
                       f"{gb:.3f} GB of logits, median of {args.repeats}"),
                float_format="{:.3g}")
    write_results_json(args.run_dir, results)
    return results
