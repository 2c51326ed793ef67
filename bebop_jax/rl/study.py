"""The Bebop study at small scale (the library side of ``experiments/study.py``): the paper's
four findings, measured, with plots and a report.

(d) RL with each MTP strategy (``--strategies``) from the same starting policy
    (``--policy_dir``), same prompts and seeds: acceptance through RL and each strategy's
    train-step cost relative to frozen (finding 4).
(a) An entropy sweep: held-out prompts decoded at several temperatures by the starting
    policy and by the frozen strategy's policy after RL; per batch, mean token entropy
    against acceptance, with least-squares fits (finding 1).
(b) Greedy against rejection verification across that sweep: the gap against entropy
    (finding 2).
(c) The losses compared: the table of the pretrain_mtp run ``--pretrain_mtp_dir``, reused;
    e2e_tv - ce and e2e_tv - kl with paired tests over its held-out prompts' teacher-forced
    E[accepted] (finding 3).

Each part is cached as JSON in RUN_DIR (``cached_json``): a rerun reads finished parts
back, and a killed RL run resumes from its checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from bebop_jax.analysis import (
    entropy_law,
    gap_summary,
    gap_vs_entropy,
    losses_summary,
    plot_acceptance_through_training,
    plot_entropy_law,
    plot_gap_vs_entropy,
    save_figure,
    strategies_summary,
    write_report,
)
from bebop_jax.config import (
    LOSS_NAMES,
    RL_OPTIMIZER,
    GRPOConfig,
    MeshConfig,
    OptimizerConfig,
    RLConfig,
    SpecConfig,
)
from bebop_jax.decode.sweep import acceptance_sweep
from bebop_jax.model.params_io import load_policy, save_policy
from bebop_jax.model.source import DEFAULT_POLICY, PolicySource, find_policy
from bebop_jax.mtp import teacher_forced_acceptance
from bebop_jax.mtp.pretrain import held_out_batches
from bebop_jax.rl.loop import run_grpo
from bebop_jax.rl.meshes import rl_meshes
from bebop_jax.rl.strategies import STRATEGIES
from bebop_jax.run import (
    MetricLogger,
    UserError,
    cached_json,
    config_dict,
    prepare_run_dir,
    refuse_flags,
    write_results_json,
)
from bebop_jax.tasks import check_task_names, get_task

TEMPERATURE = "1.0"  # the losses are compared at pretrain_mtp's T = 1 evaluation (rejection)

# Flags the study sets itself, per RL arm: refused rather than silently replaced.
REFUSED = {"rl.mtp_strategy": "study.py runs one RL arm per --strategies entry"}


@dataclasses.dataclass(frozen=True)
class StudyArgs:
    run_dir: str = "runs/study"
    policy_dir: str = DEFAULT_POLICY          # the starting policy of every RL arm and of the pre-RL sweep
    pretrain_mtp_dir: str = "runs/pretrain_mtp"  # the pretrain_mtp run the losses are compared from
    tokenizer: str = "byte"                   # with a policy directory (an HF directory brings its own)
    tasks: tuple[str, ...] = ("arithmetic",)
    strategies: tuple[str, ...] = ("frozen", "online_ce", "online_kl", "online_e2e_tv")
    temperatures: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9, 1.1, 1.3)
    sweep_prompts: int = 64                   # held-out prompts per task in the entropy sweep
    sweep_batch: int = 32                     # one sweep record per batch
    num_draft: int = 3
    alpha: float = 0.05                       # significance level of the tests
    rl: RLConfig = RLConfig(num_steps=50, eval_prompts=0, ckpt_every=10)
    grpo: GRPOConfig = GRPOConfig()
    optimizer: OptimizerConfig = RL_OPTIMIZER

    def __post_init__(self):
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if not self.strategies or bad:
            raise ValueError(f"strategies: unknown {bad}; valid: {sorted(STRATEGIES)}")
        check_task_names(self.tasks)
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise ValueError(f"temperatures: need values > 0, got {self.temperatures}")
        if self.sweep_batch > self.sweep_prompts:
            raise ValueError(f"sweep_batch: must be <= sweep_prompts ({self.sweep_prompts}), got {self.sweep_batch}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha: must be in (0, 1), got {self.alpha}")


def tokenizer_name(args: StudyArgs, source: PolicySource) -> str:
    """The tokenizer of the starting policy (and of every policy trained from it)."""
    return source.path if source.hf else args.tokenizer


# ----------------------------------------------------------------------------- (d) strategies

def study_meshes(args: StudyArgs):
    """(rollout mesh, train mesh): each RL arm trains on one device; with ``--rl.rollout-devices N``
    (async) its rollouts run on N devices of their own, else on the train device."""
    need, have = 1 + args.rl.rollout_devices, len(jax.devices())
    if need > have:
        raise UserError(f"--rl.rollout-devices {args.rl.rollout_devices}: needs {need} devices (one trains), "
                        f"found {have}")
    return rl_meshes(args.rl.rollout_devices, MeshConfig(), jax.devices()[:need])


def run_strategy(args: StudyArgs, name: str, source: PolicySource, run_dir: Path, meshes) -> dict:
    """GRPO from ``source`` with MTP strategy ``name`` into RUN_DIR/rl_<name> (its policy/ too)."""
    out = run_dir / f"rl_{name}"
    rollout_mesh, mesh = meshes
    lp = source.load(mesh, tokenizer=args.tokenizer)
    rl = dataclasses.replace(args.rl, mtp_strategy=name)
    spec = SpecConfig("rejection", args.num_draft)
    config = {"strategy": name, "rl": config_dict(rl), "grpo": config_dict(args.grpo),
              "optimizer": config_dict(args.optimizer), "policy": source.path, "tasks": list(args.tasks)}
    print(f"--- RL with MTP strategy {name}: {rl.num_steps} steps", flush=True)
    with MetricLogger(out) as logger:
        result = run_grpo(lp.params, lp.model_config, lp.tokenizer, [get_task(t) for t in args.tasks], rl=rl,
                          grpo=args.grpo, spec=spec, optimizer=args.optimizer, mesh=mesh,
                          rollout_mesh=rollout_mesh, run_dir=out, logger=logger, config=config)
    heads = True if STRATEGIES[name].mtp_loss is not None else lp.heads_trained
    save_policy(out / "policy", lp.model_config, result.state.all_params, mtp_heads_trained=heads)
    return {"history": result.history}


# ----------------------------------------------------------------------------- (a, b) entropy sweep

def entropy_sweep(args: StudyArgs, label: str, source: PolicySource, tokenizer: str) -> list[dict]:
    """``acceptance_sweep`` of ``source`` over each task's held-out prompts: one record per batch."""
    lp = source.load(tokenizer=tokenizer)
    records = []
    for i, name in enumerate(args.tasks):
        exs = get_task(name).examples("test", args.sweep_prompts, seed=args.rl.seed)
        records += acceptance_sweep(lp.params, lp.model_config, lp.tokenizer, [e.prompt for e in exs],
                                    jax.random.key(100 + i), temperatures=args.temperatures,
                                    num_draft=args.num_draft, max_new_tokens=args.rl.max_new_tokens,
                                    batch_size=args.sweep_batch, label=label, task=name)
    print(f"--- entropy sweep of {label}: {len(records)} records", flush=True)
    return records


# ----------------------------------------------------------------------------- (c) losses

def read_pretrain_mtp(args: StudyArgs) -> dict:
    """The pretrain_mtp run's results.json, checked to hold what the losses comparison reads."""
    path = Path(args.pretrain_mtp_dir) / "results.json"
    if not path.is_file():
        raise UserError(f"--pretrain_mtp_dir {args.pretrain_mtp_dir!r} has no results.json: run "
                        "`python experiments/pretrain_mtp.py` first, or pass --pretrain_mtp_dir")
    results = json.loads(path.read_text())
    if TEMPERATURE not in results["acceptance"].get("e2e_tv", {}).get("rejection", {}):
        raise UserError(f"--pretrain_mtp_dir: {path} has no T={TEMPERATURE} evaluation of e2e_tv; "
                        "rerun pretrain_mtp with it")
    return results


def per_prompt_accepted(pretrain: Path, results: dict) -> dict[str, list[float]]:
    """Each loss's teacher-forced E[accepted] per held-out prompt (rejection, T = 1), as
    pretrain_mtp recorded it, or recomputed from its policy for an older run."""
    per_row = {}
    for loss in LOSS_NAMES:
        tf = results["teacher_forced"].get(loss, {}).get(TEMPERATURE, {})
        rows = tf.get("per_row_mean_accepted", {}).get("rejection")
        if rows is None and (pretrain / f"mtp_{loss}" / "policy").is_dir():
            rows = teacher_forced_rows(pretrain, loss, float(TEMPERATURE), results)
        if rows is not None:
            per_row[loss] = rows
    return per_row


def teacher_forced_rows(pretrain: Path, loss: str, temp: float, results: dict) -> list[float]:
    cfg, params = load_policy(pretrain / f"mtp_{loss}" / "policy")
    ro = json.loads((pretrain / "rollouts_test.json").read_text())
    train = results["config"]["train"]
    batches = held_out_batches(ro, seq_len=train["seq_len"], batch_size=train["batch_size"], seed=train["seed"],
                               vocab_size=cfg.vocab_size)
    return teacher_forced_acceptance(params, cfg, batches, temp)["per_row_mean_accepted"]["rejection"]


# ----------------------------------------------------------------------------- the study

def run_study(args: StudyArgs) -> dict:
    """Every part (cached in RUN_DIR), then RUN_DIR/results.json, report.md and plots/*.png."""
    refuse_flags(args, REFUSED)
    pretrain = Path(args.pretrain_mtp_dir)
    pretrain_results = read_pretrain_mtp(args)
    source = find_policy(args.policy_dir, heads_for="speculative rollouts",
                         hint="run `python experiments/pretrain_mtp.py` first")
    tokenizer = tokenizer_name(args, source)
    meshes = study_meshes(args)  # too few devices for --rl.rollout-devices: refused before anything is written
    run_dir = prepare_run_dir(args.run_dir)
    runs = {name: cached_json(run_dir / f"rl_{name}" / "summary.json",
                              lambda name=name: run_strategy(args, name, source, run_dir, meshes))
            for name in args.strategies}
    records = cached_json(run_dir / "sweep_pre_rl.json", lambda: entropy_sweep(args, "pre-RL", source, tokenizer))
    if "frozen" in runs:
        records = records + cached_json(run_dir / "sweep_after_rl.json", lambda: entropy_sweep(
            args, "after RL (frozen)", find_policy(run_dir / "rl_frozen" / "policy"), tokenizer))
    law = entropy_law(records)
    gaps = gap_vs_entropy(records)
    history = {name: r["history"] for name, r in runs.items()}
    results = {
        "entropy_law": {m: law[m] for m in ("rejection", "greedy")},
        "entropy_law_by_task": law.get("by_task", {}),
        "gap_vs_entropy": gaps, "gap_summary": gap_summary(gaps),
        "sweep": records,
        "strategies": strategies_summary(history, args.num_draft),
        "losses": losses_summary(pretrain_results, per_prompt_accepted(pretrain, pretrain_results), TEMPERATURE),
        "config": config_dict(args),
    }
    plots = run_dir / "plots"
    figures = {"entropy_law": plot_entropy_law(records, law), "gap_vs_entropy": plot_gap_vs_entropy(gaps),
               "acceptance_through_rl": plot_acceptance_through_training(history)}
    results["plots"] = {name: str(save_figure(fig, plots / f"{name}.png").relative_to(run_dir))
                        for name, fig in figures.items()}
    write_results_json(run_dir, results)
    print(write_report(results, run_dir))
    return results
