"""Benchmark: vanilla vs speculative decoding (greedy / rejection verification), end to end.

    python experiments/bench_decode.py --quick                 # reduced grid, random init
    python experiments/bench_decode.py                         # K=1..4, batch 1/32, T=0/0.6/1.0
    python experiments/bench_decode.py --adversarial --quick   # spec overhead when nothing is accepted
    python experiments/bench_decode.py --params runs/pretrain_mtp/mtp_e2e_tv/policy --task arithmetic

One table: tokens/s of ``generate`` for method none / greedy / rejection at each
K, batch size and temperature, with the speedup over ``none`` measured in the same
run (same batch and temperature), the measured acceptance (mean accepted drafts per
verify step, per-depth conditional acceptance) and tokens per target forward.
Every configuration is compiled and warmed up first (``generate`` caches compiled
executables); then the configurations of one (batch, temperature) group run in
interleaved rounds, so load from other processes hits them alike, and the median
over rounds is reported (wall time and this process's CPU time).

Without ``--params`` the model is ``ModelConfig.small(num_mtp_depths=4)`` at random
initialisation: its MTP heads do not agree with its trunk, acceptance is near 0,
and the table then measures the cost of speculating, not its benefit. The output
says so loudly.

``--adversarial`` rewrites parameter values (never shapes, so the compute per step
is exactly that of the model) so that every draft is rejected: all token
embeddings (and untied LM-head columns) but token 0's get a large common offset
along one direction e and token 0's are zeroed, the trunk's layer outputs are
scaled down so its hidden state stays along e, and each MTP module passes the
(offset-dominated) token embedding through with a negated final norm. Then the
trunk gives every token but 0 a logit ~60 above token 0's (p(0) ~ 0), while the
MTP heads give token 0 a logit ~40 above every other (q(0) ~ 1): greedy drafts are
always token 0, sampled drafts almost always, and the target never accepts them.
Each verify step then emits exactly one token, as a vanilla step does, so
``overhead = (s / token, spec) / (s / token, none) - 1`` is the price of the
speculative path itself (drafting K tokens with the MTP window caches, a K+1-token
verify forward, rejection sampling); the issue's target is <= 15%.

On CPU, small matmuls with more than one row go to Eigen's multi-threaded GEMM,
whose thread hand-off dominates at batch 1: a (K+1)-token verify forward then costs
~1.7x a 1-token one (~1.3x with ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``,
which also made vanilla decoding ~2x faster on a 2-core machine). Set that flag
in the environment to measure single-threaded matmuls; the default is XLA's.

With trained heads (``--params``) or ``--agreeing_heads`` the same rounds also time
every spec configuration on the adversarial rewrite of the same model, which gives
the cost of one speculative step (K drafts + one K+1-token verify + rejection
sampling) in units of one vanilla step, ``cost``, independently of acceptance. The
table then shows the issue's ideal speedup ``(mean accepted + 1) / cost`` and the
achieved fraction of it (``of_ideal``): what is lost to rows idling in a batch after
their EOS, the prefill's share of short responses, and bookkeeping.

``--agreeing_heads`` (a synthetic upper range, also value-only): the trunk's layer
outputs are scaled down (a near-Markov chain on the current token) and each MTP
module passes the token embedding through, so drafts nearly equal the target and
acceptance is high: what the decoder gains when the heads are good.

``--task NAME`` takes held-out prompts of that task (byte tokenizer) instead of random
tokens, and stops rows at EOS, as a rollout does: what trained heads should be
measured on. Rows then end at different lengths, so speedups are ratios of tokens
per second, and the step cost is a ratio of seconds per token.

Writes RUN_DIR/results.json.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bebop_jax.config import ModelConfig, SpecConfig  # noqa: E402
from bebop_jax.model import init_params, load_hf_checkpoint, params_io  # noqa: E402
from bebop_jax.data.tokenizer import load_tokenizer  # noqa: E402
from bebop_jax.decode.rollout import encode_prompts, pad_prompts  # noqa: E402
from bebop_jax.sampling import SamplingConfig  # noqa: E402
from bebop_jax.decode import generate  # noqa: E402
from bebop_jax.decode.synthetic import agreeing_params, never_accepted_params  # noqa: E402
from bebop_jax.tasks import get_task, list_tasks  # noqa: E402
from bebop_jax.train.cli import UserError, config_dict, parse, prepare_run_dir, run_main  # noqa: E402
from bebop_jax.train.metrics_log import print_table, write_results_json  # noqa: E402

OVERHEAD_TARGET = 0.15  # the bound on extra wall time per emitted token when nothing is accepted
SPEC_METHODS = ("greedy", "rejection")


@dataclasses.dataclass(frozen=True)
class BenchArgs:
    run_dir: str = "runs/bench_decode"
    params: str | None = None            # a policy checkpoint (see load_policy); None: random init
    task: str | None = None              # held-out prompts of this task (stop at EOS); None: random tokens
    quick: bool = False                  # reduced grid: K in (1, 3), T in (0.0, 1.0)
    adversarial: bool = False            # drafts never accepted: the spec path's overhead
    agreeing_heads: bool = False         # synthetic high acceptance (value-only rewrite)
    num_drafts: tuple[int, ...] = (1, 2, 3, 4)
    batch_sizes: tuple[int, ...] = (1, 32)
    temperatures: tuple[float, ...] = (0.0, 0.6, 1.0)
    methods: tuple[str, ...] = SPEC_METHODS
    prompt_len: int = 32
    max_new_tokens: int = 128
    repeats: int = 5                     # timed rounds per (batch, temperature) group; median reported
    seed: int = 0

    def __post_init__(self):
        for name in ("prompt_len", "max_new_tokens", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not self.num_drafts or any(not isinstance(k, int) or k < 1 for k in self.num_drafts):
            raise ValueError(f"num_drafts must be ints >= 1, got {self.num_drafts!r}")
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be ints >= 1, got {self.batch_sizes!r}")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be >= 0, got {self.temperatures!r}")
        bad = [m for m in self.methods if m not in SPEC_METHODS]
        if not self.methods or bad:
            raise ValueError(f"methods must be a non-empty subset of {SPEC_METHODS}, got {self.methods!r}")
        if self.adversarial and self.agreeing_heads:
            raise ValueError("adversarial and agreeing_heads: choose at most one")
        if self.task is not None and self.task not in list_tasks():
            raise ValueError(f"task: unknown {self.task!r}; valid: {list_tasks()}")

    def grid(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(num_drafts, temperatures) after --quick."""
        if not self.quick:
            return self.num_drafts, self.temperatures
        ks = tuple(k for k in self.num_drafts if k in (1, 3)) or self.num_drafts[:1]
        ts = tuple(t for t in self.temperatures if t in (0.0, 1.0)) or self.temperatures[:1]
        return ks, ts


# ----------------------------------------------------------------------------- model


def load_policy(path: str) -> tuple[ModelConfig, dict]:
    """``(model_config, params)`` from a checkpoint directory.

    Accepts a small-scale policy directory (``model_config.json`` + ``params/``, as
    pretrain_base / pretrain_mtp write under ``<run>/policy``, or a run directory that
    holds ``policy/``) or a Hugging Face Qwen3 directory (``config.json`` +
    ``*.safetensors``). Raises UserError for a path that is neither format.
    """
    root = Path(path)
    if not root.exists():
        raise UserError(f"--params {path!r}: no such file or directory")
    candidates = [root, root / "policy"]
    for cand in candidates:
        if (cand / "model_config.json").is_file():
            return params_io.load_policy(cand)
    if (root / "config.json").is_file():
        return load_hf_checkpoint(root)
    raise UserError(f"--params {path!r}: neither a policy checkpoint (model_config.json + params/) "
                    "nor a Hugging Face directory (config.json + *.safetensors)")


# ----------------------------------------------------------------------------- timing


def task_prompts(name: str, batch: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(prompts [B, P] right-padded, lengths [B], eos id): held-out prompts of task ``name``."""
    tokenizer = load_tokenizer("byte")
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"--task needs the byte tokenizer's {tokenizer.vocab_size} ids; the model has {vocab_size}")
    ids = encode_prompts(tokenizer, [e.prompt for e in get_task(name).examples("test", batch, seed=0)])
    return (*pad_prompts(ids, max(len(i) for i in ids), tokenizer.pad_id), tokenizer.eos_id)


def _run(params, cfg, prompts, lens, key, max_new, sampling_cfg, spec, eos_id=None):
    wall, cpu = time.perf_counter(), time.process_time()
    res = generate(params, cfg, prompts, lens, key, max_new_tokens=max_new, sampling=sampling_cfg, spec=spec,
                   eos_id=eos_id)
    return time.perf_counter() - wall, time.process_time() - cpu, res


def run_benchmark(args: BenchArgs, log=print) -> dict:
    if args.params:
        cfg, params = load_policy(args.params)
        source = f"checkpoint {args.params}"
    else:
        cfg = ModelConfig.small(num_mtp_depths=max(args.num_drafts))
        params = init_params(cfg, jax.random.key(args.seed))
        source = "RANDOM INIT ModelConfig.small"
    cost_params = None  # the same shapes with drafts never accepted: a speculative step's cost
    if args.adversarial:
        params = never_accepted_params(cfg, params)
        source += " + adversarial rewrite (drafts never accepted)"
    else:
        if args.params or args.agreeing_heads:
            cost_params = jax.device_put(never_accepted_params(cfg, params))
        if args.agreeing_heads:
            params = agreeing_params(cfg, params)
            source += " + agreeing-heads rewrite (synthetic high acceptance)"
    params = jax.device_put(params)
    ks, temps = args.grid()
    skipped = [k for k in ks if k > cfg.num_mtp_depths]
    ks = tuple(k for k in ks if k <= cfg.num_mtp_depths)
    if not ks:
        raise UserError(f"num_drafts {args.num_drafts}: all exceed the model's num_mtp_depths={cfg.num_mtp_depths}")
    if args.prompt_len + args.max_new_tokens > cfg.max_seq_len:
        raise UserError(f"prompt_len + max_new_tokens = {args.prompt_len + args.max_new_tokens} exceeds the "
                        f"model's max_seq_len={cfg.max_seq_len}")

    if not args.params and not args.adversarial and not args.agreeing_heads:
        log("=" * 78)
        log("RANDOM INITIALISATION: no --params given. The MTP heads do not agree with the")
        log("trunk, so acceptance is ~0 and spec 'speedups' below measure overhead, not gains.")
        log("=" * 78)
    log(f"model: {source}: layers={cfg.num_layers} H={cfg.hidden_size} V={cfg.vocab_size} "
        f"K_max={cfg.num_mtp_depths} M={cfg.num_mtp_modules} dtype={cfg.dtype}")
    if skipped:
        log(f"skipping K={skipped}: above the model's num_mtp_depths={cfg.num_mtp_depths}")

    rng = np.random.default_rng(args.seed)
    rows = []
    for batch in args.batch_sizes:
        if args.task:
            prompts, lens, eos_id = task_prompts(args.task, batch, cfg.vocab_size)
        else:
            # Prompts avoid token 0 (the adversarial mode's draft token); full length, no EOS:
            # every row generates max_new_tokens, so all methods do the same useful work.
            prompts = rng.integers(1, cfg.vocab_size, (batch, args.prompt_len)).astype(np.int32)
            lens, eos_id = np.full((batch,), args.prompt_len, np.int32), None
        for temp in temps:
            sampling_cfg = SamplingConfig(temperature=float(temp))
            specs = [SpecConfig("none")] + [SpecConfig(m, k) for m in args.methods for k in ks]
            key = jax.random.key(args.seed + 1)
            t_compile = time.perf_counter()
            # (params, spec) pairs timed in each round; "cost" runs use the adversarial rewrite
            runs = [("model", s) for s in specs]
            if cost_params is not None:
                runs += [("cost", s) for s in specs[1:]]
            by_name = {"model": params, "cost": cost_params}
            for name, spec in runs:  # compile + warm up
                _run(by_name[name], cfg, prompts, lens, key, args.max_new_tokens, sampling_cfg, spec, eos_id)
            log(f"batch={batch} T={temp}: compiled {len(specs)} configs in {time.perf_counter() - t_compile:.0f}s")
            per_token = {run: [] for run in runs}  # (wall s, cpu s, stats) per emitted token, each round
            for r in range(args.repeats):
                for name, spec in runs:
                    wall, cpu, res = _run(by_name[name], cfg, prompts, lens, jax.random.fold_in(key, r),
                                          args.max_new_tokens, sampling_cfg, spec, eos_id)
                    n = res.stats["tokens_generated"]
                    per_token[name, spec].append((wall / n, cpu / n, res.stats))
            cost_of = {spec: float(np.median([t[0] for t in per_token[name, spec]]))
                       for name, spec in runs if name == "cost"}
            times = {spec: per_token["model", spec] for spec in specs}
            base_wall = float(np.median([t[0] for t in times[specs[0]]]))  # seconds per token
            base_cpu = float(np.median([t[1] for t in times[specs[0]]]))
            for spec in specs:
                walls = [t[0] for t in times[spec]]
                cpus = [t[1] for t in times[spec]]
                stats = [t[2] for t in times[spec]]
                wall, cpu = float(np.median(walls)), float(np.median(cpus))
                tokens = int(np.median([st["tokens_generated"] for st in stats]))
                k = spec.drafts
                per_depth = np.mean([s["per_depth_acceptance"] for s in stats], axis=0).tolist() if k else []
                row = {
                    "batch": batch, "temperature": float(temp), "method": spec.method, "K": k,
                    "tok/s": 1.0 / wall,
                    "speedup": base_wall / wall,          # ratio of wall time per emitted token
                    "cpu_speedup": base_cpu / cpu,
                    "overhead": wall / base_wall - 1.0,   # extra wall time per emitted token vs none
                    "mean_acc": float(np.mean([s["mean_accepted"] for s in stats])) if k else None,
                    "tok/fwd": float(np.mean([s["tokens_per_forward"] for s in stats])),
                    "per_depth": " ".join(f"{a:.2f}" for a in per_depth) if k else "",
                    "per_depth_acceptance": per_depth,
                    "wall_s_per_token": wall, "cpu_s_per_token": cpu, "wall_s_per_token_all": walls,
                    "tokens": tokens,
                }
                if spec in cost_of:  # adversarial run: one token per step, like vanilla
                    row["cost"] = cost_of[spec] / base_wall
                    row["ideal"] = (row["mean_acc"] + 1.0) / row["cost"]
                    row["of_ideal"] = row["speedup"] / row["ideal"]
                rows.append(row)
    return {"config": config_dict(args), "model_config": dataclasses.asdict(cfg), "source": source,
            "rows": rows, "devices": [str(d) for d in jax.devices()],
            "overhead_target": OVERHEAD_TARGET if args.adversarial else None}


def main(args: BenchArgs) -> dict:
    prepare_run_dir(args.run_dir)
    results = run_benchmark(args)
    cols = ["batch", "temperature", "method", "K", "tok/s", "speedup", "cpu_speedup", "mean_acc", "per_depth",
            "tok/fwd"]
    if any("ideal" in row for row in results["rows"]):
        cols += ["cost", "ideal", "of_ideal"]
    if args.adversarial:
        cols = ["batch", "temperature", "method", "K", "tok/s", "overhead", "within_target", "mean_acc", "tok/fwd"]
        for row in results["rows"]:
            row["within_target"] = None if row["method"] == "none" else bool(row["overhead"] <= OVERHEAD_TARGET)
    print_table(results["rows"], cols,
                title=(f"generate on {results['source']}: "
                       + (f"held-out {args.task} prompts, up to {args.max_new_tokens} new tokens/row (EOS stops)"
                          if args.task else f"prompt {args.prompt_len}, {args.max_new_tokens} new tokens/row")
                       + f", median of {args.repeats} interleaved rounds "
                       f"(speedup/overhead vs none at the same batch and temperature)"),
                float_format="{:.3g}")
    write_results_json(args.run_dir, results)
    return results


if __name__ == "__main__":
    run_main(lambda: main(parse(BenchArgs)))
