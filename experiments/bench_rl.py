"""Benchmark: RL wall time per step, synchronous vs async, vanilla vs speculative rollouts.

    python experiments/bench_rl.py                  # 4 setups x 40 GRPO steps from the pretrain_mtp policy
    python experiments/bench_rl.py --steps 10       # a quick look

In one run, the same number of GRPO steps from the same start (same prompts, seeds
and hyperparameters) for four setups:

- sync-vanilla:  rollouts (vanilla decoding), then the update, one after the other;
- sync-spec:     the same with speculative rollouts (rejection sampling, K drafts);
- async-vanilla: a producer thread samples batch i+1 while the learner trains on
                 batch i (max_staleness 1, decoupled off-policy correction);
- async-spec:    both.

Async setups put rollouts and training on disjoint device sets when the program has
two or more devices: this script asks XLA for 2 CPU devices (before importing jax)
and gives the rollout mesh one and the train mesh the other; the two still share the
machine's cores. Sync setups run on one device.

Reported per setup (medians over the steps after --warmup, which compile): wall
seconds per step, its rollout / train split (rollout = the producer's sampling time),
the overlap achieved (the fraction of rollout time hidden behind training:
(rollout + train - wall) / rollout), the largest policy lag trained on, the wall time
until the smoothed training reward first reaches --reward_threshold, and the reward
curve (mean, and a Welch t-test of its per-step rewards against sync-vanilla's). The
speedups are ratios to sync-vanilla measured in this run. ``model: disjoint hw`` is a
model, not a measurement: the speedup an async setup would get where rollouts and
training do not share compute (sync-vanilla's s/step over the longer of its sync
twin's two phases). Writes RUN_DIR/results.json,
RUN_DIR/plots/reward_vs_wall_time.png and each setup's RL run under RUN_DIR/<setup>/
(rerun the same command after a crash: finished setups are kept, a killed one resumes
from its checkpoint, with its per-step timings resumed too).
"""

from __future__ import annotations

import dataclasses
import json
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import jax  # noqa: E402  (after XLA_FLAGS: two CPU devices for the async setups' two meshes)
import numpy as np
import scipy.stats

from bebop_jax.analysis import plot_curves, save_figure
from bebop_jax.config import (
    RL_OPTIMIZER,
    GRPOConfig,
    MeshConfig,
    OptimizerConfig,
    RLConfig,
    SpecConfig,
)
from bebop_jax.model import shard_params_for
from bebop_jax.rl.loop import run_grpo
from bebop_jax.rl.meshes import rl_meshes
from bebop_jax.rl.policy import DEFAULT_POLICY, load_rl_policy, resolve_policy
from bebop_jax.tasks import get_task, list_tasks
from bebop_jax.run import config_dict, parse, prepare_run_dir, run_main
from bebop_jax.run import MetricLogger, print_table, write_results_json

SETUPS = ("sync-vanilla", "sync-spec", "async-vanilla", "async-spec")


@dataclasses.dataclass(frozen=True)
class BenchRLArgs:
    run_dir: str = "runs/bench_rl"
    policy_dir: str = DEFAULT_POLICY
    tokenizer: str = "byte"
    tasks: tuple[str, ...] = ("arithmetic",)
    setups: tuple[str, ...] = SETUPS
    steps: int = 40                      # GRPO steps per setup
    warmup: int = 2                      # first steps left out of the per-step medians (compiles)
    num_draft: int = 3                   # K of the spec setups
    max_staleness: int = 1               # of the async setups
    reward_threshold: float = 0.22       # smoothed training reward to reach
    smooth: int = 8                      # running-mean window of the reward curve
    rl: RLConfig = RLConfig(eval_prompts=0, ckpt_every=5)
    grpo: GRPOConfig = GRPOConfig()
    optimizer: OptimizerConfig = RL_OPTIMIZER

    def __post_init__(self):
        bad = [s for s in self.setups if s not in SETUPS]
        if not self.setups or bad:
            raise ValueError(f"setups: must be a non-empty subset of {SETUPS}, got {self.setups!r}")
        unknown = [t for t in self.tasks if t not in list_tasks()]
        if unknown:
            raise ValueError(f"tasks: unknown {unknown}; valid: {list_tasks()}")
        if not (isinstance(self.steps, int) and self.steps > self.warmup >= 0):
            raise ValueError(f"steps: must be an int > warmup ({self.warmup}), got {self.steps!r}")
        if self.smooth < 1:
            raise ValueError(f"smooth: must be >= 1, got {self.smooth}")


def setup_configs(args: BenchRLArgs, name: str) -> tuple[RLConfig, SpecConfig]:
    mode, decoding = name.split("-")
    rl = dataclasses.replace(args.rl, num_steps=args.steps, async_rollouts=mode == "async",
                             max_staleness=args.max_staleness if mode == "async" else 0,
                             rollout_devices=1 if mode == "async" and jax.device_count() > 1 else 0)
    spec = SpecConfig("rejection", args.num_draft) if decoding == "spec" else SpecConfig("none")
    return rl, spec


def run_setup(args: BenchRLArgs, name: str, run_dir, source: str) -> dict:
    out_file = run_dir / name / "setup.json"
    if out_file.is_file():  # finished before a crash
        return json.loads(out_file.read_text())
    rl, spec = setup_configs(args, name)
    devices = jax.devices()[:2] if rl.rollout_devices else jax.devices()[:1]
    rollout_mesh, mesh = rl_meshes(rl.rollout_devices, MeshConfig(data=-1), devices=devices)
    model_config, params, tokenizer, _ = load_rl_policy(source, hf=False, tokenizer=args.tokenizer)
    params = jax.device_put(params, shard_params_for(model_config, mesh))
    tasks = [get_task(t) for t in args.tasks]
    config = {"setup": name, "rl": config_dict(rl), "spec": config_dict(spec), "grpo": config_dict(args.grpo),
              "optimizer": config_dict(args.optimizer), "tasks": list(args.tasks), "policy": source}
    print(f"--- {name}: {rl.num_steps} steps, spec={spec.method}, async={rl.async_rollouts}"
          f"{f', rollout mesh {rollout_mesh.devices.tolist()} / train mesh {mesh.devices.tolist()}' if rl.rollout_devices else ''}",
          flush=True)
    with MetricLogger(run_dir / name) as logger:
        result = run_grpo(params, model_config, tokenizer, tasks, rl=rl, grpo=args.grpo, spec=spec,
                          optimizer=args.optimizer, mesh=mesh, rollout_mesh=rollout_mesh, run_dir=run_dir / name,
                          logger=logger, config=config)
    summary = summarise(args, result.history, result.counters, overlapped=rl.async_rollouts)
    out_file.write_text(json.dumps(summary))
    return summary


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


def main(args: BenchRLArgs) -> dict:
    source = resolve_policy(args.policy_dir, None, heads_for="speculative rollouts"
                            if any(s.endswith("spec") for s in args.setups) else "")
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
                title=f"GRPO, {args.steps} steps per setup from {source} (medians over steps > {args.warmup}; "
                      f"speedup = sync-vanilla s/step over the setup's; p: Welch t-test of per-step rewards "
                      f"against sync-vanilla)", float_format="{:.3g}")
    fig = plot_curves({n: (s["elapsed_seconds"][len(s["elapsed_seconds"]) - len(s["reward_smoothed"]):],
                           s["reward_smoothed"]) for n, s in setups.items()},
                      xlabel="wall time (s)", ylabel=f"training reward (running mean of {args.smooth} steps)",
                      title=f"GRPO reward against wall time ({args.steps} steps per setup)")
    plot = save_figure(fig, run_dir / "plots" / "reward_vs_wall_time.png")
    results = {"setups": setups, "config": config_dict(args), "plot": str(plot.relative_to(run_dir)),
               "devices": [str(d) for d in jax.devices()]}
    write_results_json(run_dir, results)
    return results


if __name__ == "__main__":
    run_main(lambda: main(parse(BenchRLArgs)))
