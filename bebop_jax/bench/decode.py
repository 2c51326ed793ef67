"""Vanilla vs speculative decoding (greedy / rejection verification), end to end.

One table: tokens/s of ``generate`` for method none / greedy / rejection at each
K, batch size and temperature, with the speedup over ``none`` measured in the same
run (same batch and temperature), the measured acceptance (mean accepted drafts per
verify step, per-depth conditional acceptance, both pooled over the rounds with
``DecodeStats.merge``) and tokens per target forward. Every configuration is compiled
and warmed up first (``generate`` caches compiled executables); then the
configurations of one (batch, temperature) group run in interleaved rounds, so load
from other processes hits them alike, and the median over rounds is reported (wall
time and this process's CPU time).

Without ``policy_dir`` the model is ``ModelConfig.small(num_mtp_depths=max K)`` at
random initialisation: its MTP heads do not agree with its trunk, acceptance is near
0, and the table then measures the cost of speculating, not its benefit. The output
says so loudly.

``adversarial`` rewrites parameter values (never shapes, so the compute per step is
exactly the model's: ``bebop_jax.decode.synthetic.never_accepted_params``) so that
every draft is rejected. Each verify step then emits exactly one token, as a vanilla
step does, so ``overhead = (s / token, spec) / (s / token, none) - 1`` is the price
of the speculative path itself (drafting K tokens with the MTP window caches, a
K+1-token verify forward, rejection sampling); the target is <= 15%.
``agreeing_heads`` (a synthetic upper range, also value-only): drafts nearly equal
the target (``agreeing_params``).

Columns next to the measured speedup:
- ``cost``: one k-draft step in vanilla steps, timed as decode loops of exactly n
  steps with every row live for two n (``decode.adaptive.measure_step_seconds``:
  the difference removes the prefill and the call's fixed costs). The same
  measurement calibrates the adaptive draft length.
- ``ideal`` = (1 + mean accepted) / cost, and ``of_ideal`` = speedup / ideal: what the
  end-to-end run loses to the prefill's share of a short response, rows idling in a
  batch after their EOS, the last step's tokens cut at EOS / max_new_tokens, and host
  work per call.
- ``mem_model`` = (1 + mean accepted) / (1 + K * draft/trunk weights per token): the
  speedup a memory-bound accelerator would give, where a step costs the weights it
  reads. A model, not a measurement.
- Adaptive rows (``K = adapt(k...)``: the draft lengths it chose): a ``DraftController``
  kept over the rounds of one (batch, temperature) group, calibrated at warm-up;
  ``vs_best`` = its tokens/s over the best of vanilla and every fixed K of its method.

On CPU, small matmuls with more than one row go to Eigen's multi-threaded GEMM,
whose thread hand-off dominates at batch 1: a (K+1)-token verify forward then costs
more than a 1-token one than its flops say (set
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`` to measure single-threaded matmuls;
the default is XLA's).

``tasks`` takes held-out prompts of those tasks (rows cycle through them; the policy's
tokenizer, byte for random init) instead of random tokens, and stops rows at EOS, as a
rollout does: what trained heads should be measured on. Rows then end at different
lengths, so speedups are ratios of tokens per second.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax.config import ModelConfig, SpecConfig
from bebop_jax.data.tokenizer import Tokenizer, load_tokenizer
from bebop_jax.decode import DecodeStats, DraftController, generate
from bebop_jax.decode.adaptive import measure_step_seconds
from bebop_jax.decode.rollout import encode_prompts, pad_prompts
from bebop_jax.decode.synthetic import agreeing_params, never_accepted_params
from bebop_jax.model import abstract_params, head_params, init_params, layer_params
from bebop_jax.model.source import find_policy
from bebop_jax.run import UserError, config_dict, prepare_run_dir, print_table, write_results_json
from bebop_jax.sampling import SamplingConfig
from bebop_jax.tasks import check_task_names, get_task

OVERHEAD_TARGET = 0.15  # the bound on extra wall time per emitted token when nothing is accepted
SPEC_METHODS = ("greedy", "rejection")


@dataclasses.dataclass(frozen=True)
class BenchDecodeArgs:
    run_dir: str = "runs/bench_decode"
    policy_dir: str | None = None        # a policy (bebop_jax.model.source.find_policy); None: random init
    tasks: tuple[str, ...] = ()          # held-out prompts of these tasks (stop at EOS); (): random tokens
    quick: bool = False                  # reduced grid: K in (1, 3), T in (0.0, 1.0)
    adversarial: bool = False            # drafts never accepted: the spec path's overhead
    agreeing_heads: bool = False         # synthetic high acceptance (value-only rewrite)
    num_draft: tuple[int, ...] = (1, 2, 3, 4)
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
        if not self.num_draft or any(not isinstance(k, int) or k < 1 for k in self.num_draft):
            raise ValueError(f"num_draft must be ints >= 1, got {self.num_draft!r}")
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be ints >= 1, got {self.batch_sizes!r}")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be >= 0, got {self.temperatures!r}")
        bad = [m for m in self.methods if m not in SPEC_METHODS]
        if not self.methods or bad:
            raise ValueError(f"methods must be a non-empty subset of {SPEC_METHODS}, got {self.methods!r}")
        if self.adversarial and self.agreeing_heads:
            raise ValueError("adversarial and agreeing_heads: choose at most one")
        if self.tasks:  # none: random-token prompts
            check_task_names(self.tasks)

    def grid(self) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(num_draft values, temperatures) after --quick."""
        if not self.quick:
            return self.num_draft, self.temperatures
        ks = tuple(k for k in self.num_draft if k in (1, 3)) or self.num_draft[:1]
        ts = tuple(t for t in self.temperatures if t in (0.0, 1.0)) or self.temperatures[:1]
        return ks, ts


def task_prompts(tasks: tuple[str, ...], batch: int, tokenizer: Tokenizer,
                 vocab_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(prompts [B, P] right-padded, lengths [B], eos id): held-out prompts, rows cycling through ``tasks``."""
    if tokenizer.vocab_size > vocab_size:
        raise UserError(f"--tasks needs the tokenizer's {tokenizer.vocab_size} ids; the model has {vocab_size}")
    per_task = -(-batch // len(tasks))
    examples = [get_task(name).examples("test", per_task, seed=0) for name in tasks]
    prompts = [examples[i % len(tasks)][i // len(tasks)].prompt for i in range(batch)]
    ids = encode_prompts(tokenizer, prompts)
    return (*pad_prompts(ids, max(len(i) for i in ids), tokenizer.pad_id), tokenizer.eos_id)


def flops_ratio(cfg: ModelConfig) -> float:
    """Matmul weights one draft depth reads per token over the trunk's (LM head in both): the
    memory-bound accelerator's cost of a draft relative to a verify position."""
    shapes = abstract_params(cfg)
    weights = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if x.ndim >= 2)
    head = cfg.vocab_size * cfg.hidden_size
    trunk = weights(layer_params(shapes)) + head
    draft = weights(head_params(shapes)) / cfg.num_mtp_modules + head
    return draft / trunk


def _timed(params, cfg, prompts, lens, key, max_new, sampling_cfg, spec, eos_id=None, controller=None):
    wall, cpu = time.perf_counter(), time.process_time()
    res = generate(params, cfg, prompts, lens, key, max_new_tokens=max_new, sampling=sampling_cfg, spec=spec,
                   eos_id=eos_id, controller=controller)
    return time.perf_counter() - wall, time.process_time() - cpu, res


def load_model(args: BenchDecodeArgs) -> tuple[ModelConfig, dict, Tokenizer, str]:
    """(model config, params on one device, tokenizer, a line saying where they came from)."""
    if args.policy_dir:
        loaded = find_policy(args.policy_dir).load()
        cfg, params, tokenizer = loaded.model_config, loaded.params, loaded.tokenizer
        source = f"checkpoint {args.policy_dir}"
    else:
        cfg = ModelConfig.small(num_mtp_depths=max(args.num_draft))
        params, tokenizer = init_params(cfg, jax.random.key(args.seed)), load_tokenizer("byte")
        source = "RANDOM INIT ModelConfig.small"
    if args.adversarial:
        params = never_accepted_params(cfg, params)
        source += " + adversarial rewrite (drafts never accepted)"
    elif args.agreeing_heads:
        params = agreeing_params(cfg, params)
        source += " + agreeing-heads rewrite (synthetic high acceptance)"
    return cfg, jax.device_put(params), tokenizer, source


def _row(spec: SpecConfig, batch: int, temp: float, timings: list, base: tuple[float, float]) -> dict:
    """One table row from a config's rounds: (wall s / token, cpu s / token, DecodeStats) each."""
    walls = [t[0] for t in timings]
    wall, cpu = float(np.median(walls)), float(np.median([t[1] for t in timings]))
    pooled = DecodeStats.merge(t[2] for t in timings)
    chosen = list(pooled.draft_lengths)
    return {
        "batch": batch, "temperature": float(temp), "method": spec.method,
        "K": f"adapt({'/'.join(map(str, sorted(set(chosen))))})" if spec.adaptive else spec.drafts,
        "tok/s": 1.0 / wall,
        "speedup": base[0] / wall,          # ratio of wall time per emitted token
        "cpu_speedup": base[1] / cpu,
        "overhead": wall / base[0] - 1.0,   # extra wall time per emitted token vs none
        "mean_acc": pooled.mean_accepted if spec.drafts else None,
        "tok/fwd": pooled.tokens_per_forward,
        "per_depth": " ".join(f"{a:.2f}" for a in pooled.per_depth_acceptance),
        "per_depth_acceptance": pooled.per_depth_acceptance,
        "wall_s_per_token": wall, "cpu_s_per_token": cpu, "wall_s_per_token_all": walls,
        "tokens": int(np.median([t[2].tokens_generated for t in timings])),
        "adaptive": spec.adaptive, "draft_lengths": chosen,
    }


def run_benchmark(args: BenchDecodeArgs, log=print) -> dict:
    """The measurements: results.json's content (``config``, ``model_config``, ``source``, ``rows``, ...)."""
    cfg, params, tokenizer, source = load_model(args)
    ks, temps = args.grid()
    skipped = [k for k in ks if k > cfg.num_mtp_depths]
    ks = tuple(k for k in ks if k <= cfg.num_mtp_depths)
    if not ks:
        raise UserError(f"--num_draft {args.num_draft}: all exceed the model's num_mtp_depths={cfg.num_mtp_depths}")
    if args.prompt_len + args.max_new_tokens > cfg.max_seq_len:
        raise UserError(f"prompt_len + max_new_tokens = {args.prompt_len + args.max_new_tokens} exceeds the "
                        f"model's max_seq_len={cfg.max_seq_len}")

    if not args.policy_dir and not args.adversarial and not args.agreeing_heads:
        log("=" * 78)
        log("RANDOM INITIALISATION: no --policy_dir given. The MTP heads do not agree with the")
        log("trunk, so acceptance is ~0 and spec 'speedups' below measure overhead, not gains.")
        log("=" * 78)
    ratio = flops_ratio(cfg)
    log(f"model: {source}: layers={cfg.num_layers} H={cfg.hidden_size} V={cfg.vocab_size} "
        f"K_max={cfg.num_mtp_depths} M={cfg.num_mtp_modules} dtype={cfg.dtype}; draft/trunk weights per token "
        f"{ratio:.3f}")
    if skipped:
        log(f"skipping K={skipped}: above the model's num_mtp_depths={cfg.num_mtp_depths}")

    rng = np.random.default_rng(args.seed)
    rows = []
    for batch in args.batch_sizes:
        if args.tasks:
            prompts, lens, eos_id = task_prompts(args.tasks, batch, tokenizer, cfg.vocab_size)
        else:
            # Prompts avoid token 0 (the adversarial mode's draft token); full length, no EOS:
            # every row generates max_new_tokens, so all methods do the same useful work.
            prompts = rng.integers(1, cfg.vocab_size, (batch, args.prompt_len)).astype(np.int32)
            lens, eos_id = np.full((batch,), args.prompt_len, np.int32), None
        for temp in temps:
            sampling_cfg = SamplingConfig(temperature=float(temp))
            fixed = [SpecConfig("none")] + [SpecConfig(m, k) for m in args.methods for k in ks]
            adaptive = [SpecConfig(m, max(ks), adaptive=True) for m in args.methods] if not args.adversarial else []
            controllers = {spec: DraftController(spec) for spec in adaptive}
            specs = fixed + adaptive
            key = jax.random.key(args.seed + 1)
            t_compile = time.perf_counter()
            for spec in specs:  # compile + warm up (the adaptive ones calibrate here)
                _timed(params, cfg, prompts, lens, key, args.max_new_tokens, sampling_cfg, spec, eos_id,
                       controllers.get(spec))
            # per-step costs of the fixed configs, prefill excluded: the ideal speedups' denominators
            step_s = dict(zip(fixed, measure_step_seconds(params, cfg, jnp.asarray(prompts), jnp.asarray(lens), key,
                                                          sampling_cfg, fixed, max_new_tokens=args.max_new_tokens,
                                                          repeats=args.repeats)))
            log(f"batch={batch} T={temp}: compiled and calibrated {len(specs)} configs in "
                f"{time.perf_counter() - t_compile:.0f}s")
            per_token = {spec: [] for spec in specs}  # (wall s, cpu s, stats) per emitted token, each round
            for r in range(args.repeats):
                for spec in specs:  # interleaved rounds: load from elsewhere hits every config alike
                    wall, cpu, res = _timed(params, cfg, prompts, lens, jax.random.fold_in(key, r),
                                            args.max_new_tokens, sampling_cfg, spec, eos_id, controllers.get(spec))
                    n = res.stats.tokens_generated
                    per_token[spec].append((wall / n, cpu / n, res.stats))
            base = (float(np.median([t[0] for t in per_token[fixed[0]]])),  # seconds per token of "none"
                    float(np.median([t[1] for t in per_token[fixed[0]]])))
            group = []
            for spec in specs:
                row = _row(spec, batch, temp, per_token[spec], base)
                k, mean_acc = spec.drafts, row["mean_acc"]
                if spec in step_s and k:
                    row["cost"] = step_s[spec] / step_s[fixed[0]]
                    row["ideal"] = (mean_acc + 1.0) / row["cost"]
                    row["of_ideal"] = row["speedup"] / row["ideal"]
                    row["mem_model"] = (mean_acc + 1.0) / (1.0 + k * ratio)
                if spec.adaptive:
                    rivals = [r for r in group if r["method"] in ("none", spec.method) and not r["adaptive"]]
                    best = max(rivals, key=lambda r: r["tok/s"])
                    row["vs_best"] = row["tok/s"] / best["tok/s"]
                    row["best_fixed"] = f"{best['method']} K={best['K']}"
                    row["controller"] = controllers[spec].report(batch)
                group.append(row)
            rows += group
    return {"config": config_dict(args), "model_config": dataclasses.asdict(cfg), "source": source,
            "rows": rows, "devices": [str(d) for d in jax.devices()], "draft_trunk_weight_ratio": ratio,
            "overhead_target": OVERHEAD_TARGET if args.adversarial else None}


def bench_decode(args: BenchDecodeArgs) -> dict:
    """Check the policy, run the benchmark, print its table, write RUN_DIR/results.json."""
    if args.policy_dir:
        find_policy(args.policy_dir)  # a bad path fails before the run directory is made
    prepare_run_dir(args.run_dir)
    results = run_benchmark(args)
    cols = ["batch", "temperature", "method", "K", "tok/s", "speedup", "cpu_speedup", "mean_acc", "per_depth",
            "tok/fwd", "cost", "ideal", "of_ideal", "mem_model", "vs_best"]
    if args.adversarial:
        cols = ["batch", "temperature", "method", "K", "tok/s", "overhead", "within_target", "mean_acc", "tok/fwd"]
        for row in results["rows"]:
            row["within_target"] = None if row["method"] == "none" else bool(row["overhead"] <= OVERHEAD_TARGET)
    prompts = (f"held-out {'/'.join(args.tasks)} prompts, up to {args.max_new_tokens} new tokens/row (EOS stops)"
               if args.tasks else f"prompt {args.prompt_len}, {args.max_new_tokens} new tokens/row")
    print_table(results["rows"], cols,
                title=(f"generate on {results['source']}: {prompts}, median of {args.repeats} interleaved rounds "
                       f"(speedup/overhead vs none at the same batch and temperature)"),
                float_format="{:.3g}")
    write_results_json(args.run_dir, results)
    return results
