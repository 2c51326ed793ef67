"""GRPO with speculative rollouts, from a pretrain_mtp policy (or a Qwen3 checkpoint).

    python experiments/rl.py                           # small defaults (2-core CPU), after pretrain_mtp
    python experiments/rl.py --spec.method none        # the same run with vanilla rollouts
    python experiments/rl.py --rl.async-rollouts       # rollouts of the next batch overlap training
    python experiments/rl.py --rl.async-rollouts --rl.rollout-devices 4   # on a mesh of their own
    python experiments/rl.py --hf_checkpoint DIR --tasks gsm_symbolic --mesh.fsdp -1
    python experiments/rl.py --help

The rollouts go through the speculative decoder with the policy's pre-RL MTP heads
(frozen: no online MTP update). Writes RUN_DIR/results.json (history per step, held-out
accuracy before / after), the trained policy (RUN_DIR/policy), TensorBoard scalars,
metrics.jsonl and checkpoints: rerun the same command after a crash to resume.
"""

from __future__ import annotations

import dataclasses

from bebop_jax.config import (
    RL_OPTIMIZER,
    GRPOConfig,
    MeshConfig,
    OptimizerConfig,
    RLConfig,
    SpecConfig,
)
from bebop_jax.model.params_io import save_policy
from bebop_jax.parallel import maybe_initialize_distributed
from bebop_jax.rl.loop import run_grpo
from bebop_jax.rl.meshes import rl_meshes
from bebop_jax.rl.policy import DEFAULT_POLICY, load_rl_policy, resolve_policy
from bebop_jax.rl.strategies import STRATEGIES
from bebop_jax.tasks import get_task, list_tasks
from bebop_jax.run import config_dict, parse, prepare_run_dir, run_main
from bebop_jax.run import MetricLogger, print_table, write_results_json


@dataclasses.dataclass(frozen=True)
class RLArgs:
    run_dir: str = "runs/rl"
    policy_dir: str = DEFAULT_POLICY     # a pretrain_mtp (or pretrain_base) policy directory
    hf_checkpoint: str | None = None     # a Hugging Face Qwen3 directory instead (tokenizer read from it)
    tokenizer: str = "byte"              # with --policy_dir
    tasks: tuple[str, ...] = ("arithmetic",)
    difficulty: int = 1
    rl: RLConfig = RLConfig()
    grpo: GRPOConfig = GRPOConfig()
    spec: SpecConfig = SpecConfig(method="rejection", num_draft=3)
    # RL_OPTIMIZER decaying to a tenth (cosine); main sets decay_steps to --rl.num-steps (a given one is replaced)
    optimizer: OptimizerConfig = dataclasses.replace(RL_OPTIMIZER, min_lr_ratio=0.1)
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in list_tasks()]
        if unknown:
            raise ValueError(f"tasks: unknown {unknown}; valid: {list_tasks()}")
        if not self.tasks:
            raise ValueError("tasks: give at least one")
        if self.rl.eval_prompts < 1:
            raise ValueError("rl.eval_prompts: rl.py reports held-out accuracy before and after RL; use >= 1")


def heads_needed_for(args: RLArgs) -> str:
    """What in this run needs trained MTP heads ('' if nothing)."""
    online = STRATEGIES[args.rl.mtp_strategy].mtp_loss is not None
    return " and ".join(what for what, needed in (("speculative rollouts", args.spec.drafts > 0),
                                                 (f"--rl.mtp-strategy {args.rl.mtp_strategy}", online)) if needed)


def main(args: RLArgs) -> dict:
    maybe_initialize_distributed()
    args = dataclasses.replace(args, optimizer=dataclasses.replace(
        args.optimizer, decay_steps=max(args.rl.num_steps, args.optimizer.warmup_steps + 1)))
    source = resolve_policy(args.policy_dir, args.hf_checkpoint, heads_for=heads_needed_for(args))
    run_dir = prepare_run_dir(args.run_dir)
    rollout_mesh, mesh = rl_meshes(args.rl.rollout_devices, args.mesh)
    model_config, params, tokenizer, heads = load_rl_policy(source, hf=bool(args.hf_checkpoint),
                                                            tokenizer=args.tokenizer, mesh=mesh)
    tasks = [get_task(name, difficulty=args.difficulty) for name in args.tasks]
    config = {k: v for k, v in config_dict(args).items() if k != "run_dir"}
    with MetricLogger(run_dir) as logger:
        result = run_grpo(params, model_config, tokenizer, tasks, rl=args.rl, grpo=args.grpo, spec=args.spec,
                          optimizer=args.optimizer, mesh=mesh, rollout_mesh=rollout_mesh, run_dir=run_dir,
                          logger=logger, config=config)
    save_policy(run_dir / "policy", model_config, result.state.all_params, mtp_heads_trained=heads)
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
                title=f"GRPO on {', '.join(args.tasks)}: spec={args.spec.method} K={args.spec.num_draft}"
                      f"{' adaptive' if args.spec.adaptive else ''}, {args.rl.prompts_per_step} prompts x "
                      f"{args.grpo.group_size} samples per step (train columns: means over the steps since "
                      f"the previous row)", float_format="{:.3f}")
    b, a = results["eval"]["before"], results["eval"]["after"]
    print(f"held-out accuracy: greedy {b['greedy']:.3f} -> {a['greedy']:.3f} ({100 * (a['greedy'] - b['greedy']):+.1f}"
          f" points), T=1 {b['T1']:.3f} -> {a['T1']:.3f} ({100 * (a['T1'] - b['T1']):+.1f} points)")


if __name__ == "__main__":
    run_main(lambda: main(parse(RLArgs)))
