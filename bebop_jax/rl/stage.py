"""The RL stage: GRPO with speculative rollouts from a pretrain_mtp policy (or a Qwen3
checkpoint), held-out accuracy before and after, the trained policy saved. The library
side of ``experiments/rl.py``.

The rollouts go through the speculative decoder with the policy's pre-RL MTP heads
(frozen: no online MTP update, unless ``--rl.mtp-strategy`` names one). Writes
RUN_DIR/results.json (history per step, held-out accuracy before / after), the trained
policy (RUN_DIR/policy), TensorBoard scalars, metrics.jsonl and checkpoints: rerun the
same command after a crash to resume.
"""

from __future__ import annotations

import dataclasses

from bebop_jax.config import MTP_STRATEGIES, RL_OPTIMIZER, GRPOConfig, MeshConfig, OptimizerConfig, RLConfig, SpecConfig
from bebop_jax.model.params_io import save_policy
from bebop_jax.model.source import DEFAULT_POLICY, find_policy
from bebop_jax.parallel import maybe_initialize_distributed
from bebop_jax.rl.loop import run_grpo
from bebop_jax.rl.meshes import rl_meshes
from bebop_jax.run.cli import config_dict, prepare_run_dir, refuse_flags
from bebop_jax.run.files import write_results_json
from bebop_jax.run.metrics import MetricLogger
from bebop_jax.run.tables import print_table
from bebop_jax.tasks import check_task_names, get_task

# Flags the stage sets itself: refused rather than silently replaced.
REFUSED = {"optimizer.decay_steps": "the learning rate decays over --rl.num-steps"}


@dataclasses.dataclass(frozen=True)
class RLArgs:
    run_dir: str = "runs/rl"
    policy_dir: str = DEFAULT_POLICY     # a pretrain_mtp policy (or run) directory, or a Qwen3 HF directory
    tokenizer: str = "byte"              # of a policy directory (an HF directory brings its own)
    tasks: tuple[str, ...] = ("arithmetic",)
    difficulty: int = 1
    spec_method: str = "rejection"       # rollouts: none (vanilla) | greedy | rejection verification
    num_draft: int = 3                   # K, the drafts per verify step
    adaptive_draft: bool = False         # pick the draft length 0..K per decode call from measured costs
    rl: RLConfig = RLConfig()
    grpo: GRPOConfig = GRPOConfig()
    # RL_OPTIMIZER decaying to a tenth (cosine) over --rl.num-steps
    optimizer: OptimizerConfig = dataclasses.replace(RL_OPTIMIZER, min_lr_ratio=0.1)
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        check_task_names(self.tasks)
        if self.rl.eval_prompts < 1:
            raise ValueError("rl.eval_prompts: rl.py reports held-out accuracy before and after RL; use >= 1")
        self.spec  # validates spec_method / num_draft / adaptive_draft

    @property
    def spec(self) -> SpecConfig:
        return SpecConfig(self.spec_method, self.num_draft, adaptive=self.adaptive_draft)


def heads_needed_for(args: RLArgs) -> str:
    """What in this run needs trained MTP heads ('' if nothing)."""
    online = MTP_STRATEGIES[args.rl.mtp_strategy] is not None
    return " and ".join(what for what, needed in (("speculative rollouts", args.spec.drafts > 0),
                                                 (f"--rl.mtp-strategy {args.rl.mtp_strategy}", online)) if needed)


def run_rl(args: RLArgs) -> dict:
    refuse_flags(args, REFUSED)
    maybe_initialize_distributed()
    args = dataclasses.replace(args, optimizer=dataclasses.replace(
        args.optimizer, decay_steps=max(args.rl.num_steps, args.optimizer.warmup_steps + 1)))
    source = find_policy(args.policy_dir, heads_for=heads_needed_for(args),
                         hint="run `python experiments/pretrain_mtp.py` first, or pass --policy_dir",
                         without_heads="pass --spec_method none (and the frozen strategy)")
    run_dir = prepare_run_dir(args.run_dir)
    rollout_mesh, mesh = rl_meshes(args.rl.rollout_devices, args.mesh)
    policy = source.load(mesh, tokenizer=args.tokenizer)
    tasks = [get_task(name, difficulty=args.difficulty) for name in args.tasks]
    config = {k: v for k, v in config_dict(args).items() if k != "run_dir"}
    with MetricLogger(run_dir) as logger:
        result = run_grpo(policy.params, policy.model_config, policy.tokenizer, tasks, rl=args.rl, grpo=args.grpo,
                          spec=args.spec, optimizer=args.optimizer, mesh=mesh, rollout_mesh=rollout_mesh,
                          run_dir=run_dir, logger=logger, config=config)
    save_policy(run_dir / "policy", policy.model_config, result.state.all_params,
                mtp_heads_trained=policy.heads_trained)
    evals = result.evals
    results = {"history": result.history,
               "eval": {"before": evals["0"], "after": evals[str(args.rl.num_steps)]},
               "eval_curve": {int(s): v for s, v in evals.items()},
               "config": config}
    write_results_json(run_dir, results)
    print_summary(args, results)
    return results


def print_summary(args: RLArgs, results: dict) -> None:
    hist = results["history"]
    rows = []
    for step, acc in sorted(results["eval_curve"].items()):
        window = [h for h in hist if step - args.rl.eval_every < h["step"] <= step] if step else []
        mean = lambda key: sum(h[key] for h in window) / len(window) if window else None
        rows.append([step, acc["greedy"], acc["T1"], mean("reward"), mean("entropy"), mean("mean_accepted"),
                     sum(h["rollout_seconds"] for h in window) if window else None,
                     sum(h["train_seconds"] for h in window) if window else None])
    print_table(rows, ["step", "held-out greedy", "held-out T=1", "train reward", "entropy", "E[accepted]",
                       "rollout s", "train s"],
                title=f"GRPO on {', '.join(args.tasks)}: spec={args.spec_method} K={args.num_draft}"
                      f"{' adaptive' if args.adaptive_draft else ''}, {args.rl.prompts_per_step} prompts x "
                      f"{args.grpo.group_size} samples per step (train columns: means over the steps since "
                      f"the previous row)", float_format="{:.3f}")
    b, a = results["eval"]["before"], results["eval"]["after"]
    print(f"held-out accuracy: greedy {b['greedy']:.3f} -> {a['greedy']:.3f} ({100 * (a['greedy'] - b['greedy']):+.1f}"
          f" points), T=1 {b['T1']:.3f} -> {a['T1']:.3f} ({100 * (a['T1'] - b['T1']):+.1f} points)")
