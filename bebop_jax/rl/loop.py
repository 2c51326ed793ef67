"""Synchronous GRPO with speculative rollouts: sample, score, update, evaluate, checkpoint.

Each step: the step's prompts (``PromptSchedule``, a function of the step), G episodes
each through the speculative decoder (key ``fold_in(seed, step)``), group advantages,
``updates_per_batch`` optimizer updates through the one jitted sharded train step,
metrics to TensorBoard / metrics.jsonl, held-out accuracy every ``eval_every`` steps,
and a checkpoint (train state + history + the draft controller's estimates). A run
killed at any point and restarted resumes from its last checkpoint and reproduces the
uninterrupted run (bitwise on CPU with a fixed draft length; an adaptive one re-times
nothing but picks k from measured costs, so its samples may differ).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from bebop_jax.config import GRPOConfig, ModelConfig, OptimizerConfig, RLConfig, SpecConfig
from bebop_jax.data.tokenizer import Tokenizer
from bebop_jax.rl.batch import RolloutBatch
from bebop_jax.rl.evaluate import heldout_accuracy
from bebop_jax.rl.loss import grpo_loss, policy_logprobs
from bebop_jax.rl.prompts import PromptSchedule
from bebop_jax.rl.rollout import RolloutWorker
from bebop_jax.rl.strategies import STRATEGIES
from bebop_jax.sampling import SamplingConfig
from bebop_jax.tasks import Task
from bebop_jax.train.checkpoint import Checkpointer
from bebop_jax.train.loop import abstract_like
from bebop_jax.train.metrics_log import MetricLogger, Progress
from bebop_jax.train.step import make_step, train_state_for


def has_mtp_heads(params) -> bool:
    return any(str(k).startswith("mtp_") for k in params)


@dataclasses.dataclass
class RLResult:
    state: object
    history: list[dict]
    evals: dict[str, dict]  # step (as a string) -> held-out accuracy


def _template(rl: RLConfig, grpo: GRPOConfig, seq_len: int) -> RolloutBatch:
    """The batch's structure (for its shardings): old_logp only with several updates per batch."""
    n = rl.prompts_per_step * grpo.group_size
    z = np.zeros((n, seq_len), np.float32)
    return RolloutBatch(tokens=z.astype(np.int32), loss_mask=z, advantages=z[:, 0], behaviour_logp=z,
                        version=np.zeros((), np.int32), old_logp=z if grpo.updates_per_batch > 1 else None)


def run_grpo(params, model_config: ModelConfig, tokenizer: Tokenizer, tasks: list[Task], *, rl: RLConfig,
             grpo: GRPOConfig, spec: SpecConfig, optimizer: OptimizerConfig, mesh: Mesh, run_dir,
             logger: MetricLogger | None, config: dict, log=print) -> RLResult:
    """Train ``params`` (placed on ``mesh``) with GRPO for ``rl.num_steps`` steps, resuming from RUN_DIR."""
    strategy = STRATEGIES[rl.mtp_strategy]
    if (spec.drafts or strategy.mtp_loss) and not has_mtp_heads(params):
        raise ValueError(f"spec.method={spec.method!r}, rl.mtp_strategy={strategy.name!r}: the policy has no MTP "
                         "heads; use --spec.method none with the frozen strategy, or a policy trained by pretrain_mtp")
    trainable, frozen = strategy.split(params)
    opt = strategy.optimizer(optimizer, rl.mtp_learning_rate, trainable)
    state = train_state_for(trainable, frozen, opt, mesh)
    worker = RolloutWorker(model_config, tokenizer, max_new_tokens=rl.max_new_tokens, prompt_len=rl.prompt_len,
                           sampling=SamplingConfig(temperature=rl.temperature), spec=spec,
                           decode_batch=rl.decode_batch, max_turns=rl.max_turns)
    template = _template(rl, grpo, worker.seq_len)
    step_fn = make_step(grpo_loss(model_config, grpo, rl.temperature, mtp_loss=strategy.mtp_loss), opt, state, mesh,
                        batch_shardings=template.shardings(mesh),
                        validate=lambda b: b.validate(model_config, grpo.group_size, mesh))
    schedule = PromptSchedule(tasks, rl.prompts_per_step, seed=rl.seed)
    eval_sets = [(t, t.examples("test", rl.eval_prompts, seed=rl.seed)) for t in tasks]
    worker.check_prompts([e for pool in schedule.pools for e in pool] + [e for _, ex in eval_sets for e in ex])
    key, eval_key = jax.random.key(rl.seed), jax.random.key(rl.seed + 1)

    def evaluate(step: int) -> dict:
        acc = heldout_accuracy(state.all_params, worker, eval_sets, eval_key, samples=rl.eval_samples)
        if logger is not None:
            logger.log(step, {"greedy": acc["greedy"], "T1": acc["T1"]}, prefix="eval/accuracy")
        return acc

    history: list[dict] = []
    evals: dict[str, dict] = {}
    start = 0
    with Checkpointer(Path(run_dir) / "checkpoints", keep=2, save_interval_steps=rl.ckpt_every) as ckpt:
        restored = ckpt.restore_latest(abstract_like(state), config=config)
        if restored is not None:
            state, start = restored.state, restored.step
            history, evals = restored.extra["history"], restored.extra["evals"]
            if worker.controller is not None:
                worker.controller.load_state_dict(restored.extra["controller"])
            log(f"resumed from step {start} of {rl.num_steps} ({ckpt.directory})")
        if "0" not in evals:
            evals["0"] = evaluate(0)
            log(f"held-out accuracy before RL: greedy {evals['0']['greedy']:.3f}, T=1 {evals['0']['T1']:.3f}")

        def extra() -> dict:
            return {"history": history, "evals": evals, "config": config,
                    "controller": worker.controller.state_dict() if worker.controller is not None else None}

        with Progress(rl.num_steps - start, "rl", unit="step") as bar:
            for step in range(start, rl.num_steps):
                ro = worker.sample(state.all_params, schedule.at(step), jax.random.fold_in(key, step),
                                   group_size=grpo.group_size, version=step, std_normalize=grpo.std_normalize)
                batch = ro.batch
                t0 = time.perf_counter()
                if grpo.updates_per_batch > 1:  # the proximal policy, fixed over this batch's updates
                    batch = dataclasses.replace(batch, old_logp=np.asarray(policy_logprobs(
                        state.all_params, batch.tokens, model_config=model_config, temperature=rl.temperature)))
                placed = batch.on(mesh)
                for _ in range(grpo.updates_per_batch):
                    state, metrics = step_fn(state, placed)
                metrics = {k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()  # per-depth MTP metrics
                           for k, v in jax.device_get(metrics).items()}
                train_seconds = time.perf_counter() - t0
                entry = _entry(step + 1, ro, metrics, train_seconds)
                history.append(entry)
                if logger is not None:
                    logger.log(step + 1, _scalars(entry), prefix="rl")
                if (step + 1) % rl.eval_every == 0 or step + 1 == rl.num_steps:
                    evals[str(step + 1)] = evaluate(step + 1)
                ckpt.save(step + 1, state, extra(), force=step + 1 == rl.num_steps)
                last = evals[max(evals, key=int)]
                bar.update(1, reward=entry["reward"], acc_T1=last["T1"], k=entry["draft_length"])
        ckpt.wait()
    return RLResult(state=state, history=history, evals=evals)


def _entry(step: int, ro, metrics: dict, train_seconds: float) -> dict:
    s = ro.stats
    by_task = {}
    for name, r in zip(ro.tasks, ro.rewards):
        by_task.setdefault(name, []).append(float(r))
    return {
        "step": step,
        "reward": float(np.mean(ro.rewards)),
        "reward_by_task": {k: float(np.mean(v)) for k, v in by_task.items()},
        "entropy": s["entropy"],
        "mean_accepted": s["mean_accepted"],
        "per_depth_acceptance": s["per_depth_acceptance"],
        "draft_length": s["draft_lengths"][-1],
        "response_tokens": s["response_tokens"],
        "tokens_per_second": s["tokens_generated"] / max(s["decode_seconds"], 1e-9),
        "rollout_seconds": s["rollout_seconds"],
        "train_seconds": train_seconds,
        "loss": metrics["loss"],
        "policy": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("policy/")},
        "grad_norm": metrics["grad_norm"],
        **({"mtp": mtp} if (mtp := {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("mtp/")})
           else {}),
    }


def _scalars(entry: dict) -> dict:
    out = {k: v for k, v in entry.items() if isinstance(v, (int, float)) and k != "step"}
    out.update({f"acceptance_depth_{i + 1}": a for i, a in enumerate(entry["per_depth_acceptance"])})
    out.update({f"policy/{k}": v for k, v in entry["policy"].items()})
    for k, v in entry.get("mtp", {}).items():
        out.update({f"mtp/{k}_{i + 1}": x for i, x in enumerate(v)} if isinstance(v, list) else {f"mtp/{k}": v})
    out.update({f"reward/{k}": v for k, v in entry["reward_by_task"].items()})
    return out
