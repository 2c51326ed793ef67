"""The MTP train step (mode mtp_only) for each loss, at several model sizes.

For every (size, loss) it reports tokens/s (batch_size * seq_len / median step time),
the median CPU time of this process per step, the compile time (wall; with
compile_threads=2 two compiles overlap), and the memory XLA plans for the step:
``memory_analysis()`` of the ahead-of-time compiled step, peak = argument bytes + temp
bytes (CPU has no device memory counters). Ratios are to ce at the same size, measured
in the same run; on a shared machine compare cpu_vs_ce as well as speed_vs_ce.

The steps of the four losses are interleaved (ce, kl, tv, e2e_tv, ce, ...) so that load
from other processes hits all of them alike. Each timed call is the compiled
``make_train_step`` program (state donated, batch split over the mesh); the batch is a
fixed random one, so data loading is not measured.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax.config import LOSS_NAMES, MeshConfig, ModelConfig, MTPConfig, OptimizerConfig
from bebop_jax.model import head_params, init_params, shard_params_for
from bebop_jax.parallel import make_mesh
from bebop_jax.run import config_dict, prepare_run_dir, print_table, write_results_json
from bebop_jax.train.step import init_train_state, make_optimizer, make_train_step

# Model sizes by name. "small" is the small-scale reproduction default; "mini" is half
# its width and depth; "tiny" is the test config.
SIZES = {
    "tiny": ModelConfig.tiny,
    "mini": lambda **kw: ModelConfig.small(hidden_size=128, num_layers=3, head_dim=32,
                                           intermediate_size=384, **kw),
    "small": ModelConfig.small,
}
MiB = 2.0 ** 20


@dataclasses.dataclass(frozen=True)
class BenchTrainStepArgs:
    run_dir: str = "runs/bench_train_step"
    sizes: tuple[str, ...] = ("mini", "small")
    losses: tuple[str, ...] = LOSS_NAMES
    timed_steps: int = 5     # timed steps per (size, loss), after the warm-up step
    batch_size: int = 8
    seq_len: int = 128
    vocab_size: int = 0      # 0: the size's own vocabulary
    mesh: MeshConfig = MeshConfig()
    compile_threads: int = 2  # concurrent XLA compiles (wall time only; compile_s then overlaps)
    seed: int = 0

    def __post_init__(self):
        if not self.sizes or any(s not in SIZES for s in self.sizes):
            raise ValueError(f"sizes must be names from {sorted(SIZES)}, got {self.sizes!r}")
        if not self.losses or any(name not in LOSS_NAMES for name in self.losses):
            raise ValueError(f"losses must be names from {LOSS_NAMES}, got {self.losses!r}")
        if "ce" not in self.losses:
            raise ValueError("losses must include 'ce' (the ratios are relative to it)")
        for name in ("timed_steps", "batch_size", "compile_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.vocab_size != 0 and self.vocab_size < 2:
            raise ValueError(f"vocab_size must be 0 (size default) or >= 2, got {self.vocab_size}")


def model_config(args: BenchTrainStepArgs, size: str) -> ModelConfig:
    overrides = {"max_seq_len": max(args.seq_len, SIZES[size]().max_seq_len)}
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    return SIZES[size](**overrides)


def _timed(step, state, batch):
    wall, cpu = time.perf_counter(), time.process_time()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    return state, metrics, time.perf_counter() - wall, time.process_time() - cpu


def bench_size(args: BenchTrainStepArgs, size: str, mesh) -> list[dict]:
    """Compile one mtp_only step per loss, then time them interleaved."""
    cfg = model_config(args, size)
    optimizer = make_optimizer(OptimizerConfig())
    key_params, key_data = jax.random.split(jax.random.key(args.seed))
    # Steps donate their state, so each loss starts from its own copy of these.
    host_params = jax.device_get(init_params(cfg, key_params))
    num_params = sum(x.size for x in jax.tree.leaves(host_params))
    num_mtp = sum(x.size for x in jax.tree.leaves(head_params(host_params)))
    batch = {"tokens": jax.random.randint(key_data, (args.batch_size, args.seq_len), 0,
                                          cfg.vocab_size, dtype=jnp.int32),
             "loss_mask": jnp.ones((args.batch_size, args.seq_len), jnp.float32)}

    runs = {}
    for loss in args.losses:  # trace and lower in this thread
        mtp_config = MTPConfig(loss=loss, mode="mtp_only")
        params = jax.device_put(host_params, shard_params_for(cfg, mesh))
        state = init_train_state(params, mtp_config, optimizer, mesh)
        run = make_train_step(cfg, mtp_config, optimizer, state, mesh)
        runs[loss] = dict(state=state, lowered=run.jitted.lower(state, batch), times=[])

    def compile_one(loss):
        t0 = time.perf_counter()
        compiled = runs[loss]["lowered"].compile()
        return loss, compiled, time.perf_counter() - t0

    # XLA compiles outside the GIL: two at a time keeps both cores of a laptop busy.
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.compile_threads) as pool:
        for loss, compiled, seconds in pool.map(compile_one, args.losses):
            runs[loss].update(step=compiled, compile_s=seconds, mem=compiled.memory_analysis())
            print(f"[{size}] compiled {loss} in {seconds:.1f} s", file=sys.stderr, flush=True)
    for loss, r in runs.items():
        r["state"], metrics, _, _ = _timed(r["step"], r["state"], batch)  # warm-up
        if not np.isfinite(float(metrics["loss"])):
            raise RuntimeError(f"{size}/{loss}: non-finite loss at the warm-up step")

    for _ in range(args.timed_steps):
        for loss, r in runs.items():
            r["state"], _, wall, cpu = _timed(r["step"], r["state"], batch)
            r["times"].append((wall, cpu))

    tokens = args.batch_size * args.seq_len
    rows = []
    for loss, r in runs.items():
        wall = float(np.median([t[0] for t in r["times"]]))
        cpu = float(np.median([t[1] for t in r["times"]]))
        mem = r["mem"]
        rows.append({
            "size": size, "loss": loss,
            "params_M": num_params / 1e6, "mtp_params_M": num_mtp / 1e6,
            "tokens_per_s": tokens / wall, "step_ms": 1e3 * wall, "cpu_ms": 1e3 * cpu,
            "compile_s": r["compile_s"],
            "peak_MiB": (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / MiB,
            "temp_MiB": mem.temp_size_in_bytes / MiB,
            "argument_MiB": mem.argument_size_in_bytes / MiB,
        })
    ce = next(row for row in rows if row["loss"] == "ce")
    for row in rows:
        row["speed_vs_ce"] = row["tokens_per_s"] / ce["tokens_per_s"]
        row["cpu_vs_ce"] = ce["cpu_ms"] / row["cpu_ms"]
        row["peak_vs_ce"] = row["peak_MiB"] / ce["peak_MiB"]
    return rows


def bench_train_step(args: BenchTrainStepArgs) -> dict:
    """Every size's rows, one table, RUN_DIR/results.json (``config``, ``rows``, ``devices``)."""
    prepare_run_dir(args.run_dir)
    mesh = make_mesh(args.mesh)
    rows_per_step = mesh.shape["data"] * mesh.shape["fsdp"]
    if args.batch_size % rows_per_step:
        raise ValueError(f"batch_size {args.batch_size} is not divisible by data*fsdp = "
                         f"{rows_per_step} of the mesh")
    for size in args.sizes:
        model_config(args, size)  # validate every size before compiling anything
    rows = []
    for size in args.sizes:
        rows += bench_size(args, size, mesh)
    print_table(rows, ["size", "loss", "params_M", "tokens_per_s", "speed_vs_ce", "step_ms",
                       "cpu_ms", "cpu_vs_ce", "compile_s", "peak_MiB", "peak_vs_ce", "temp_MiB"],
                title=(f"mtp_only train step, B={args.batch_size} T={args.seq_len}, "
                       f"median of {args.timed_steps} steps, mesh {dict(mesh.shape)} "
                       f"({jax.devices()[0].platform})"),
                float_format="{:.3g}")
    results = {"config": config_dict(args), "rows": rows,
               "devices": [str(d) for d in jax.devices()]}
    write_results_json(args.run_dir, results)
    return results
