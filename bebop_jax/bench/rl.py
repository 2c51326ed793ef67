"""Benchmark: RL wall time per step, synchronous vs async, vanilla vs speculative rollouts
(the library side of ``experiments/bench_rl.py``; its docstring says what is measured).

Async setups put rollouts and training on disjoint device sets when the program has two
or more devices (the script asks XLA for 2 CPU devices before importing jax).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import scipy.stats

from bebop_jax.analysis import plot_curves, save_figure
from bebop_jax.config import RL_OPTIMIZER, GRPOConfig, MeshConfig, OptimizerConfig, RLConfig, SpecConfig
from bebop_jax.model.source import DEFAULT_POLICY, PolicySource, find_policy
from bebop_jax.rl.loop import run_grpo
from bebop_jax.rl.meshes import rl_meshes
from bebop_jax.run.cli import config_dict, prepare_run_dir, refuse_flags
from bebop_jax.run.files import cached_json, write_results_json
from bebop_jax.run.metrics import MetricLogger
from bebop_jax.run.tables import print_table
from bebop_jax.tasks import check_task_names, get_task

# Flags every setup sets itself: refused rather than silently replaced.
REFUSED = {
    "rl.rollout_devices": "async setups put rollouts on one of two devices, sync setups share one",
    "rl.async_rollouts": "each setup sets it (sync-* off, async-* on); choose setups with --setups",
}

SETUPS = ("sync-vanilla", "sync-spec", "async-vanilla", "async-spec")


@dataclasses.dataclass(frozen=True)
class BenchRLArgs:
    run_dir: str = "runs/bench_rl"
    policy_dir: str = DEFAULT_POLICY
    tokenizer: str = "byte"
    tasks: tuple[str, ...] = ("arithmetic",)
    setups: tuple[str, ...] = SETUPS
    warmup: int = 2                      # first steps left out of the per-step medians (compiles)
    num_draft: int = 3                   # K of the spec setups
    reward_threshold: float = 0.22       # smoothed training reward to reach
    smooth: int = 8                      # running-mean window of the reward curve
    # --rl.num-steps: GRPO steps per setup; --rl.max-staleness: of the async setups
    rl: RLConfig = RLConfig(num_steps=40, eval_prompts=0, ckpt_every=5)
    grpo: GRPOConfig = GRPOConfig()
    optimizer: OptimizerConfig = RL_OPTIMIZER

    def __post_init__(self):
        bad = [s for s in self.setups if s not in SETUPS]
        if not self.setups or bad:
            raise ValueError(f"setups: must be a non-empty subset of {SETUPS}, got {self.setups!r}")
        check_task_names(self.tasks)
        if not self.rl.num_steps > self.warmup >= 0:
            raise ValueError(f"warmup: must be in [0, rl.num_steps={self.rl.num_steps}), got {self.warmup!r}")
        if self.smooth < 1:
            raise ValueError(f"smooth: must be >= 1, got {self.smooth}")


def setup_configs(args: BenchRLArgs, name: str) -> tuple[RLConfig, SpecConfig]:
    mode, decoding = name.split("-")
    rl = dataclasses.replace(args.rl, async_rollouts=mode == "async",
                             max_staleness=args.rl.max_staleness if mode == "async" else 0,
                             rollout_devices=1 if mode == "async" and jax.device_count() > 1 else 0)
    spec = SpecConfig("rejection", args.num_draft) if decoding == "spec" else SpecConfig("none")
    return rl, spec


def run_setup(args: BenchRLArgs, name: str, run_dir, source: PolicySource) -> dict:
    """One setup's summary, kept in RUN_DIR/<setup>/setup.json (a rerun after a crash reads it back)."""
    return cached_json(run_dir / name / "setup.json", lambda: _measure_setup(args, name, run_dir, source))


def _measure_setup(args: BenchRLArgs, name: str, run_dir, source: PolicySource) -> dict:
    rl, spec = setup_configs(args, name)
    devices = jax.devices()[:2] if rl.rollout_devices else jax.devices()[:1]
    rollout_mesh, mesh = rl_meshes(rl.rollout_devices, MeshConfig(data=-1), devices=devices)
    policy = source.load(mesh, tokenizer=args.tokenizer)
    tasks = [get_task(t) for t in args.tasks]
    config = {"setup": name, "rl": config_dict(rl), "spec": config_dict(spec), "grpo": config_dict(args.grpo),
              "optimizer": config_dict(args.optimizer), "tasks": list(args.tasks), "policy": source.path}
    print(f"--- {name}: {rl.num_steps} steps, spec={spec.method}, async={rl.async_rollouts}"
          f"{f', rollout mesh {rollout_mesh.devices.tolist()} / train mesh {mesh.devices.tolist()}' if rl.rollout_devices else ''}",
          flush=True)
    with MetricLogger(run_dir / name) as logger:
        result = run_grpo(policy.params, policy.model_config, policy.tokenizer, tasks, rl=rl, grpo=args.grpo, spec=spec,
                          optimizer=args.optimizer, mesh=mesh, rollout_mesh=rollout_mesh, run_dir=run_dir / name,
                          logger=logger, config=config)
    return summarise(args, result.history, result.counters, overlapped=rl.async_rollouts)


def summarise(args: BenchRLArgs, history: list[dict], counters: dict, *, overlapped: bool) -> dict:
    timed = history[args.warmup:]
    med = lambda key: float(np.median([h[key] for h in timed]))
    wall, rollout, train = med("step_seconds"), med("rollout_seconds"), med("train_seconds")
    reward = [h["reward"] for h in history]
    window = min(args.smooth, len(reward))
    smooth = np.convolve(reward, np.ones(window) / window, mode="valid")
    elapsed = np.cumsum([h["step_seconds"] for h in history])
    hit = np.flatnonzero(smooth >= args.reward_threshold)
    return {
        "seconds_per_step": wall, "rollout_seconds": rollout, "train_seconds": train,
        "wait_seconds": med("wait_seconds"),
        "overlap": (rollout + train - wall) / rollout if overlapped else None,
        "reward": reward, "elapsed_seconds": elapsed.tolist(),
        "reward_smoothed": smooth.tolist(), "max_policy_lag": counters["max_policy_lag"],
        "dropped_batches": counters["dropped_batches"],
        "mean_accepted": float(np.mean([h["mean_accepted"] for h in history])),
        "time_to_threshold": float(elapsed[hit[0] + window - 1]) if hit.size else None,
    }


def run_benchmark(args: BenchRLArgs) -> dict:
    refuse_flags(args, REFUSED)
    source = find_policy(args.policy_dir, heads_for="speculative rollouts"
                         if any(s.endswith("spec") for s in args.setups) else "",
                         hint="run `python experiments/pretrain_mtp.py` first, or pass --policy_dir",
                         without_heads="pass --setups sync-vanilla async-vanilla")
    run_dir = prepare_run_dir(args.run_dir)
    setups = {name: run_setup(args, name, run_dir, source) for name in args.setups}
    base = setups.get("sync-vanilla")
    rows = []
    for name, s in setups.items():
        p = None
        if base is not None and s is not base:
            p = float(scipy.stats.ttest_ind(s["reward"], base["reward"], equal_var=False).pvalue)
        s["reward_vs_sync_vanilla_pvalue"] = None if p is None or np.isnan(p) else p
        s["speedup_vs_sync_vanilla"] = base["seconds_per_step"] / s["seconds_per_step"] if base else None
        # a model, not a measurement: async on hardware where rollout and training do not share
        # compute would take the longer of the two synchronous phases per step
        twin = setups.get(name.replace("async", "sync"))
        s["disjoint_hardware_model_speedup"] = (base["seconds_per_step"] / max(twin["rollout_seconds"],
                                                                              twin["train_seconds"])
                                                if name.startswith("async") and base and twin else None)
        rows.append([name, s["seconds_per_step"], s["speedup_vs_sync_vanilla"], s["rollout_seconds"],
                     s["train_seconds"], s["overlap"], s["max_policy_lag"], s["mean_accepted"],
                     float(np.mean(s["reward"])), s["reward_vs_sync_vanilla_pvalue"], s["time_to_threshold"],
                     s["disjoint_hardware_model_speedup"]])
    print_table(rows, ["setup", "s/step", "speedup", "rollout s", "train s", "overlap", "max lag", "E[accepted]",
                       "mean reward", "p (reward)", f"s to reward {args.reward_threshold}", "model: disjoint hw"],
                title=f"GRPO, {args.rl.num_steps} steps per setup from {source.path} (medians over steps > {args.warmup}; "
                      f"speedup = sync-vanilla s/step over the setup's; p: Welch t-test of per-step rewards "
                      f"against sync-vanilla)", float_format="{:.3g}")
    fig = plot_curves({n: (s["elapsed_seconds"][len(s["elapsed_seconds"]) - len(s["reward_smoothed"]):],
                           s["reward_smoothed"]) for n, s in setups.items()},
                      xlabel="wall time (s)", ylabel=f"training reward (running mean of {args.smooth} steps)",
                      title=f"GRPO reward against wall time ({args.rl.num_steps} steps per setup)")
    plot = save_figure(fig, run_dir / "plots" / "reward_vs_wall_time.png")
    results = {"setups": setups, "config": config_dict(args), "plot": str(plot.relative_to(run_dir)),
               "devices": [str(d) for d in jax.devices()]}
    write_results_json(run_dir, results)
    return results
