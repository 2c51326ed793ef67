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
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from bebop_jax.config import GRPOConfig, ModelConfig, OptimizerConfig, RLConfig, SpecConfig
from bebop_jax.data.tokenizer import Tokenizer
from bebop_jax.rl.batch import RolloutBatch
from bebop_jax.rl.evaluate import heldout_accuracy
from bebop_jax.rl.loss import grpo_loss, policy_logprobs
from bebop_jax.rl.prompts import PromptSchedule
from bebop_jax.model.params import head_params, shard_params_for
from bebop_jax.rl.producer import RolloutProducer
from bebop_jax.rl.rollout import Rollout, RolloutWorker
from bebop_jax.rl.weights import WeightStore
from bebop_jax.rl.strategies import STRATEGIES
from bebop_jax.sampling import SamplingConfig
from bebop_jax.tasks import Task
from bebop_jax.train.checkpoint import Checkpointer
from bebop_jax.train.loop import abstract_like
from bebop_jax.run.metrics import MetricLogger
from bebop_jax.run.progress import Progress
from bebop_jax.train.step import make_step, train_state_for


def has_mtp_heads(params) -> bool:
    return bool(head_params(params))


@dataclasses.dataclass
class RLResult:
    state: object
    history: list[dict]
    evals: dict[str, dict]  # step (as a string) -> held-out accuracy
    counters: dict          # dropped_batches (older than max_staleness: never trained on), max_policy_lag


def _template(n_rows: int, seq_len: int, with_old: bool, with_ref: bool) -> RolloutBatch:
    """A batch's structure (for its shardings)."""
    z = np.zeros((n_rows, seq_len), np.float32)
    return RolloutBatch(tokens=z.astype(np.int32), loss_mask=z, advantages=z[:, 0], behaviour_logp=z,
                        version=np.zeros((), np.int32), old_logp=z if with_old else None,
                        ref_logp=z if with_ref else None)


def run_grpo(params, model_config: ModelConfig, tokenizer: Tokenizer, tasks: list[Task], *, rl: RLConfig,
             grpo: GRPOConfig, spec: SpecConfig, optimizer: OptimizerConfig, mesh: Mesh, run_dir,
             logger: MetricLogger | None, config: dict, rollout_mesh: Mesh | None = None, log=print) -> RLResult:
    """Train ``params`` (placed on the train ``mesh``) with GRPO for ``rl.num_steps`` steps, resuming
    from RUN_DIR. With ``rl.async_rollouts`` a producer thread samples on ``rollout_mesh``
    (default: the train mesh) up to ``rl.max_staleness`` policy versions ahead."""
    strategy = STRATEGIES[rl.mtp_strategy]
    if (spec.drafts or strategy.mtp_loss) and not has_mtp_heads(params):
        raise ValueError(f"spec.method={spec.method!r}, rl.mtp_strategy={strategy.name!r}: the policy has no MTP "
                         "heads; use --spec_method none with the frozen strategy, or a policy trained by pretrain_mtp")
    rollout_mesh = mesh if rollout_mesh is None else rollout_mesh
    trainable, frozen = strategy.split(params)
    opt = strategy.optimizer(optimizer, rl.mtp_learning_rate, trainable)
    state = train_state_for(trainable, frozen, opt, mesh)
    worker = RolloutWorker(model_config, tokenizer, max_new_tokens=rl.max_new_tokens, prompt_len=rl.prompt_len,
                           sampling=SamplingConfig(temperature=rl.temperature), spec=spec,
                           decode_batch=rl.decode_batch, max_turns=rl.max_turns, mesh=rollout_mesh)
    n_rows = rl.prompts_per_step * grpo.group_size

    with_ref = grpo.kl_coef > 0  # the k3 KL to the starting policy, held as a frozen copy
    ref_params = jax.tree.map(jnp.copy, params) if with_ref else None

    def step_for(decoupled: bool, with_old: bool):
        template = _template(n_rows, worker.seq_len, with_old, with_ref)
        return make_step(grpo_loss(model_config, grpo, rl.temperature, decoupled=decoupled,
                                   mtp_loss=strategy.mtp_loss), opt, state, mesh,
                         batch_shardings=template.shardings(mesh),
                         validate=lambda b: b.validate(model_config, grpo.group_size, mesh))

    several = grpo.updates_per_batch > 1
    on_policy_step = step_for(decoupled=False, with_old=several)
    stale_step = step_for(decoupled=True, with_old=True)  # compiled only if a stale batch comes
    schedule = PromptSchedule(tasks, rl.prompts_per_step, seed=rl.seed)
    eval_sets = [(t, t.examples("test", rl.eval_prompts, seed=rl.seed)) for t in tasks] if rl.eval_prompts else []
    worker.check_prompts([e for pool in schedule.pools for e in pool] + [e for _, ex in eval_sets for e in ex])
    eval_worker = worker.variant(worker.sampling, worker.spec, mesh=mesh)
    key, eval_key = jax.random.key(rl.seed), jax.random.key(rl.seed + 1)

    def sample(index: int, version: int, rollout_params) -> Rollout:
        return worker.sample(rollout_params, schedule.at(index), jax.random.fold_in(key, index),
                             group_size=grpo.group_size, version=version, std_normalize=grpo.std_normalize)

    def evaluate(step: int) -> dict:
        acc = heldout_accuracy(state.all_params, eval_worker, eval_sets, eval_key, samples=rl.eval_samples)
        if logger is not None:
            logger.log(step, {"greedy": acc["greedy"], "T1": acc["T1"]}, prefix="eval/accuracy")
        return acc

    history: list[dict] = []
    evals: dict[str, dict] = {}
    counters = {"dropped_batches": 0, "max_policy_lag": 0}
    start = 0
    with Checkpointer(Path(run_dir) / "checkpoints", keep=2, save_interval_steps=rl.ckpt_every) as ckpt:
        restored = ckpt.restore_latest(abstract_like(state), config=config)
        if restored is not None:
            state, start = restored.state, restored.step
            history, evals, counters = restored.extra["history"], restored.extra["evals"], restored.extra["counters"]
            if worker.controller is not None:
                worker.controller.load_state_dict(restored.extra["controller"])
            log(f"resumed from step {start} of {rl.num_steps} ({ckpt.directory})")
        if eval_sets and "0" not in evals:
            evals["0"] = evaluate(0)
            log(f"held-out accuracy before RL: greedy {evals['0']['greedy']:.3f}, T=1 {evals['0']['T1']:.3f}")

        def extra() -> dict:
            return {"history": history, "evals": evals, "config": config, "counters": counters,
                    "controller": worker.controller.state_dict() if worker.controller is not None else None}

        source = _BatchSource(rl, sample, shard_params_for(model_config, rollout_mesh), start,
                              lambda: state.all_params)
        with source, Progress(rl.num_steps - start, "rl", unit="step") as bar:
            step = start
            last_version = -1
            t_prev = time.perf_counter()
            while step < rl.num_steps:
                t_wait = time.perf_counter()
                index, version, ro = source.next()
                wait_seconds = time.perf_counter() - t_wait
                if version < last_version:
                    raise RuntimeError(f"policy versions went backwards: batch {index} has version {version} "
                                       f"after {last_version}")
                last_version, lag = version, step - version
                if lag > rl.max_staleness:
                    counters["dropped_batches"] += 1  # never trained on
                    continue
                counters["max_policy_lag"] = max(counters["max_policy_lag"], lag)
                t0 = time.perf_counter()
                placed = ro.batch.trimmed().on(mesh)
                if lag or several:  # the proximal policy (this learner's), fixed over the batch's updates
                    old = policy_logprobs(state.all_params, placed.tokens, model_config=model_config,
                                          temperature=rl.temperature)
                    placed = dataclasses.replace(placed, old_logp=jax.device_put(old, placed.loss_mask.sharding))
                if with_ref:
                    ref = policy_logprobs(ref_params, placed.tokens, model_config=model_config,
                                          temperature=rl.temperature)
                    placed = dataclasses.replace(placed, ref_logp=jax.device_put(ref, placed.loss_mask.sharding))
                step_fn = stale_step if lag else on_policy_step
                for _ in range(grpo.updates_per_batch):
                    state, metrics = step_fn(state, placed)
                metrics = {k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()  # per-depth MTP metrics
                           for k, v in jax.device_get(metrics).items()}
                step += 1
                train_seconds = time.perf_counter() - t0
                if eval_sets and (step % rl.eval_every == 0 or step == rl.num_steps):
                    evals[str(step)] = evaluate(step)
                source.quiesce(step)
                entry = _entry(step, ro, metrics, train_seconds)
                entry.update(policy_version=version, policy_lag=lag, wait_seconds=wait_seconds)
                history.append(entry)
                if ckpt.save(step, state, extra(), force=step == rl.num_steps) and source.multi_process:
                    ckpt.wait()  # orbax's commit barriers must not run beside the producer's collectives
                source.published(step, state.all_params)
                entry["step_seconds"] = time.perf_counter() - t_prev  # wall time of the step (the first compiles)
                t_prev = time.perf_counter()
                if logger is not None:
                    logger.log(step, _scalars(entry), prefix="rl")
                shown = {"acc_T1": evals[max(evals, key=int)]["T1"]} if evals else {}
                bar.update(1, reward=entry["reward"], k=entry["draft_length"], **shown)
        ckpt.wait()
    return RLResult(state=state, history=history, evals=evals, counters=counters)


class _BatchSource:
    """Where the learner's batches come from: sampled inline with the current policy
    (synchronous RL), or by a ``RolloutProducer`` on the rollout mesh (async RL)."""

    def __init__(self, rl: RLConfig, sample, rollout_shardings, start: int, current_params):
        self._sample, self._current = sample, current_params
        self._index = start
        self.producer = None
        if rl.async_rollouts:
            self.weights = WeightStore(rollout_shardings)
            self.weights.publish(start, current_params())
            self.producer = RolloutProducer(sample, self.weights, start=start, max_staleness=rl.max_staleness,
                                            first_version=start, stop=rl.num_steps)
        self.multi_process = self.producer is not None and jax.process_count() > 1

    def next(self) -> tuple[int, int, Rollout]:
        if self.producer is not None:
            return self.producer.get()
        index, self._index = self._index, self._index + 1
        return index, index, self._sample(index, index, self._current())

    def quiesce(self, version: int) -> None:
        """Multi-process async: wait until the producer has sampled all it can before ``version``,
        so the collectives over both meshes that follow (checkpoint barriers, weight sync) run
        while it is parked, in the same order on every process."""
        if self.multi_process:
            self.weights.wait_parked(version, lambda: self.producer.finished)

    def published(self, version: int, params) -> None:
        """The learner finished update ``version``: make those weights available to the producer."""
        if self.producer is not None:
            self.weights.publish(version, params)

    def __enter__(self) -> "_BatchSource":
        if self.producer is not None:
            self.producer.start_thread()
        return self

    def __exit__(self, *exc) -> None:
        if self.producer is not None:
            self.producer.close()


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
