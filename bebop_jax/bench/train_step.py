"""The training steps at several model sizes: the MTP step (mode mtp_only) for each loss and the
GRPO policy step, each with dense or vocabulary-chunked reductions (``ModelConfig.vocab_impl``).

For every (size, impl, loss) it reports tokens/s (batch_size * seq_len / median step time),
the median CPU time of this process per step, the compile time (wall; with
compile_threads=2 two compiles overlap), and the memory XLA plans for the step:
``memory_analysis()`` of the ahead-of-time compiled step, peak = argument bytes + temp
bytes (CPU has no device memory counters). Ratios: to ce of the same impl (MTP losses), and
to the dense row of the same loss, measured in the same run; on a shared machine compare
cpu_vs_* as well as speed_vs_*. With ``fit_gib`` > 0 each step is also compiled (not run) at
twice the sequence length, and the planned peak, linear in T at a fixed batch, is extrapolated
to the longest sequence that fits ``fit_gib`` GiB (``max_seq_len_fit``).

The steps are interleaved (dense ce, dense kl, ..., chunked ce, ...) so that load from other
processes hits all of them alike. Each timed call is the compiled ``make_step`` program
(state donated, batch split over the mesh); the batch is a fixed random one, so data
loading is not measured. The GRPO step trains the trunk (the heads frozen, as RL's default
strategy) on a rollout batch carrying old and reference log-probs (the k3 KL on).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax.config import LOSS_NAMES, GRPOConfig, MeshConfig, ModelConfig, MTPConfig, OptimizerConfig
from bebop_jax.model import head_params, init_params, shard_params_for
from bebop_jax.parallel import make_mesh
from bebop_jax.rl.batch import RolloutBatch
from bebop_jax.rl.loss import grpo_loss
from bebop_jax.run import config_dict, prepare_run_dir, print_table, write_results_json
from bebop_jax.train.step import init_train_state, make_optimizer, make_step, make_train_step, train_state_for

# Model sizes by name. "small" is the small-scale reproduction default; "mini" is half
# its width and depth; "tiny" is the test config.
SIZES = {
    "tiny": ModelConfig.tiny,
    "mini": lambda **kw: ModelConfig.small(hidden_size=128, num_layers=3, head_dim=32,
                                           intermediate_size=384, **kw),
    "small": ModelConfig.small,
}
MiB = 2.0 ** 20
STEPS = (*LOSS_NAMES, "grpo")  # the MTP step of each loss, and the GRPO policy step
IMPLS = ("dense", "chunked", "pallas")  # pallas: interpreted on CPU, for accelerators


@dataclasses.dataclass(frozen=True)
class BenchTrainStepArgs:
    run_dir: str = "runs/bench_train_step"
    sizes: tuple[str, ...] = ("mini", "small")
    losses: tuple[str, ...] = STEPS  # MTP losses and/or "grpo"
    impls: tuple[str, ...] = ("dense", "chunked")  # how the steps reduce over the vocabulary (IMPLS)
    vocab_chunk: int = 2048          # columns per chunk of the chunked impl
    fit_gib: float = 0.0             # > 0: also extrapolate the longest sequence that fits this many GiB
    timed_steps: int = 5     # timed steps per setup, after the warm-up step (0: compile only, memory rows)
    batch_size: int = 8
    seq_len: int = 128
    vocab_size: int = 0      # 0: the size's own vocabulary
    mesh: MeshConfig = MeshConfig()
    compile_threads: int = 2  # concurrent XLA compiles (wall time only; compile_s then overlaps)
    seed: int = 0

    def __post_init__(self):
        if not self.sizes or any(s not in SIZES for s in self.sizes):
            raise ValueError(f"sizes must be names from {sorted(SIZES)}, got {self.sizes!r}")
        if not self.losses or any(name not in STEPS for name in self.losses):
            raise ValueError(f"losses must be names from {STEPS}, got {self.losses!r}")
        if not self.impls or any(name not in IMPLS for name in self.impls):
            raise ValueError(f"impls must be names from {IMPLS}, got {self.impls!r}")
        if self.fit_gib < 0:
            raise ValueError(f"fit_gib must be >= 0, got {self.fit_gib}")
        if self.timed_steps < 0:
            raise ValueError(f"timed_steps must be >= 0, got {self.timed_steps}")
        for name in ("batch_size", "compile_threads", "vocab_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.vocab_size != 0 and self.vocab_size < 2:
            raise ValueError(f"vocab_size must be 0 (size default) or >= 2, got {self.vocab_size}")


def model_config(args: BenchTrainStepArgs, size: str, impl: str = "dense") -> ModelConfig:
    overrides = {"max_seq_len": max(2 * args.seq_len, SIZES[size]().max_seq_len), "vocab_impl": impl,
                 "vocab_chunk": args.vocab_chunk}
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    return SIZES[size](**overrides)


def _timed(step, state, batch):
    wall, cpu = time.perf_counter(), time.process_time()
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    return state, metrics, time.perf_counter() - wall, time.process_time() - cpu


def rows_of(args: BenchTrainStepArgs, loss: str) -> int:
    """Batch rows of a setup: batch_size, but at least one group of 2 for GRPO (a group compares
    samples of one prompt)."""
    return max(args.batch_size, 2) if loss == "grpo" else args.batch_size


def _batch(args: BenchTrainStepArgs, cfg: ModelConfig, loss: str, seq_len: int, key):
    k_tokens, k_adv = jax.random.split(key)
    shape = (rows_of(args, loss), seq_len)
    tokens = jax.random.randint(k_tokens, shape, 0, cfg.vocab_size, dtype=jnp.int32)
    mask = jnp.ones(shape, jnp.float32)
    if loss != "grpo":
        return {"tokens": tokens, "loss_mask": mask}
    logp = jnp.full(shape, -2.0, jnp.float32)
    return RolloutBatch(tokens=tokens, loss_mask=mask, advantages=jax.random.normal(k_adv, shape[:1]),
                        behaviour_logp=logp, version=jnp.int32(0), old_logp=logp, ref_logp=logp - 0.1)


def _step(args: BenchTrainStepArgs, cfg: ModelConfig, loss: str, host_params, optimizer, mesh):
    """(state, jitted step) of one setup, the state on its own copy of the parameters."""
    params = jax.device_put(host_params, shard_params_for(cfg, mesh))
    if loss == "grpo":
        state = train_state_for({k: v for k, v in params.items() if k not in head_params(params)},
                                head_params(params), optimizer, mesh)
        grpo = GRPOConfig(group_size=rows_of(args, loss), kl_coef=0.01)
        template = _batch(args, cfg, loss, 2, jax.random.key(0))
        return state, make_step(grpo_loss(cfg, grpo, 1.0), optimizer, state, mesh,
                                batch_shardings=template.shardings(mesh)).jitted
    mtp_config = MTPConfig(loss=loss, mode="mtp_only")
    state = init_train_state(params, mtp_config, optimizer, mesh)
    return state, make_train_step(cfg, mtp_config, optimizer, state, mesh).jitted


def _peak_bytes(compiled) -> int:
    mem = compiled.memory_analysis()
    return mem.argument_size_in_bytes + mem.temp_size_in_bytes


def bench_size(args: BenchTrainStepArgs, size: str, mesh) -> list[dict]:
    """Compile one step per (impl, loss), then time them interleaved."""
    optimizer = make_optimizer(OptimizerConfig())
    key_params, key_data = jax.random.split(jax.random.key(args.seed))
    # Steps donate their state, so each setup starts from its own copy of these.
    host_params = jax.device_get(init_params(model_config(args, size), key_params))
    num_params = sum(x.size for x in jax.tree.leaves(host_params))
    num_mtp = sum(x.size for x in jax.tree.leaves(head_params(host_params)))

    runs = {}
    for impl in args.impls:  # trace and lower in this thread
        cfg = model_config(args, size, impl)
        for loss in args.losses:
            state, jitted = _step(args, cfg, loss, host_params, optimizer, mesh)
            batch = _batch(args, cfg, loss, args.seq_len, key_data)
            lowered = [jitted.lower(state, batch)]
            if args.fit_gib:
                lowered.append(jitted.lower(state, _batch(args, cfg, loss, 2 * args.seq_len, key_data)))
            runs[impl, loss] = dict(state=state, batch=batch, lowered=lowered, times=[])

    def compile_one(setup):
        t0 = time.perf_counter()
        compiled = [lowered.compile() for lowered in runs[setup]["lowered"]]
        return setup, compiled, time.perf_counter() - t0

    # XLA compiles outside the GIL: two at a time keeps both cores of a laptop busy.
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.compile_threads) as pool:
        for setup, compiled, seconds in pool.map(compile_one, list(runs)):
            r = runs[setup]
            r.update(step=compiled[0], compile_s=seconds, mem=compiled[0].memory_analysis(),
                     peaks=[_peak_bytes(c) for c in compiled])
            del r["lowered"]
            print(f"[{size}] compiled {'/'.join(setup)} in {seconds:.1f} s", file=sys.stderr, flush=True)
    for setup, r in runs.items():
        if not args.timed_steps:
            break
        r["state"], metrics, _, _ = _timed(r["step"], r["state"], r["batch"])  # warm-up
        if not np.isfinite(float(metrics["loss"])):
            raise RuntimeError(f"{size}/{'/'.join(setup)}: non-finite loss at the warm-up step")

    for _ in range(args.timed_steps):
        for r in runs.values():
            r["state"], _, wall, cpu = _timed(r["step"], r["state"], r["batch"])
            r["times"].append((wall, cpu))

    rows = []
    for (impl, loss), r in runs.items():
        tokens = rows_of(args, loss) * args.seq_len
        timed = bool(r["times"])
        wall = float(np.median([t[0] for t in r["times"]])) if timed else None
        cpu = float(np.median([t[1] for t in r["times"]])) if timed else None
        mem = r["mem"]
        row = {
            "size": size, "impl": impl, "loss": loss, "batch_rows": rows_of(args, loss),
            "params_M": num_params / 1e6, "mtp_params_M": num_mtp / 1e6,
            "tokens_per_s": tokens / wall if timed else None, "step_ms": 1e3 * wall if timed else None,
            "cpu_ms": 1e3 * cpu if timed else None,
            "compile_s": r["compile_s"],
            "peak_MiB": r["peaks"][0] / MiB,
            "temp_MiB": mem.temp_size_in_bytes / MiB,
            "argument_MiB": mem.argument_size_in_bytes / MiB,
        }
        if args.fit_gib:
            per_token = (r["peaks"][1] - r["peaks"][0]) / args.seq_len  # planned bytes per position
            fixed = r["peaks"][0] - per_token * args.seq_len
            row["max_seq_len_fit"] = int((args.fit_gib * 2 ** 30 - fixed) // per_token) if per_token > 0 else None
        rows.append(row)
    for row in rows:
        ce = next((o for o in rows if o["impl"] == row["impl"] and o["loss"] == "ce"), None)
        timed = row["tokens_per_s"] is not None
        if ce is not None and row["loss"] != "grpo":
            if timed:
                row["speed_vs_ce"] = row["tokens_per_s"] / ce["tokens_per_s"]
                row["cpu_vs_ce"] = ce["cpu_ms"] / row["cpu_ms"]
            row["peak_vs_ce"] = row["peak_MiB"] / ce["peak_MiB"]
        dense = next((o for o in rows if o["impl"] == "dense" and o["loss"] == row["loss"]), None)
        if dense is not None:
            if timed:
                row["speed_vs_dense"] = row["tokens_per_s"] / dense["tokens_per_s"]
                row["cpu_vs_dense"] = dense["cpu_ms"] / row["cpu_ms"]
            row["peak_vs_dense"] = row["peak_MiB"] / dense["peak_MiB"]
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
        for impl in args.impls:
            model_config(args, size, impl)  # validate every size before compiling anything
    rows = []
    for size in args.sizes:
        rows += bench_size(args, size, mesh)
    columns = ["size", "impl", "loss", "batch_rows", "params_M", "tokens_per_s", "speed_vs_dense", "cpu_vs_dense", "speed_vs_ce",
               "step_ms", "compile_s", "peak_MiB", "peak_vs_dense", "peak_vs_ce"]
    if args.fit_gib:
        columns.append("max_seq_len_fit")
    print_table(rows, columns,
                title=(f"train steps (mtp_only per loss; grpo), B={args.batch_size} T={args.seq_len}, "
                       f"median of {args.timed_steps} steps, mesh {dict(mesh.shape)} "
                       f"({jax.devices()[0].platform})"),
                float_format="{:.3g}")
    results = {"config": config_dict(args), "rows": rows,
               "devices": [str(d) for d in jax.devices()]}
    write_results_json(args.run_dir, results)
    return results
