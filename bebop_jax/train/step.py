"""The pure, jitted, sharded MTP training step.

Batches are ``{"tokens": int32 [B,T], "loss_mask": float32 [B,T]}`` where
``loss_mask[b, t]`` weights the prediction OF token t (0 on prompts, padding
and environment turns; any non-negative weight otherwise, e.g. RL weights).
Packed batches (``make_dataset(..., pack=True)``, trunk_only mode) add
``positions`` and ``segment_ids`` (int32 [B,T]): several examples share a row,
each attending only to itself; a segment's first token has loss_mask 0, so no
prediction crosses a boundary.

Modes (``MTPConfig.mode``):
- ``mtp_only``: the trunk, embedding and LM head are frozen. They live in
  ``TrainState.frozen``, are read through stop_gradient, receive no gradient,
  are never updated, and the optimizer keeps no state for them.
- ``joint``: every parameter trains on next-token CE plus
  ``mtp_weight`` times the MTP loss.
- ``trunk_only``: base pretraining; next-token CE on the trunk, the MTP modules
  are frozen and not run.

MTP targets (docs/DESIGN.md, "MTP indexing and masks"): depth k at position t is scored against the
trunk's distribution at position t+k (stop-gradient), label x_{t+k+1}, weight
``loss_mask[t+k+1]`` (0 where t+k+1 is past the sequence).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bebop_jax import losses
from bebop_jax.config import ModelConfig, MTPConfig, OptimizerConfig
from bebop_jax.model import Policy, is_trunk_param
from bebop_jax.parallel import batch_sharding

Array = jax.Array
Batch = dict[str, Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: Array        # int32 scalar
    params: Any        # trained parameters
    frozen: Any        # parameters held fixed (empty dict in joint mode)
    opt_state: Any     # optimizer state of ``params`` only

    @property
    def all_params(self) -> Any:
        return merge_params(self.params, self.frozen)


def split_params(params: dict, mode: str) -> tuple[dict, dict]:
    """(trainable, frozen) top-level split of a policy param dict for ``mode``."""
    if mode == "joint":
        return dict(params), {}
    train_trunk = mode == "trunk_only"
    trainable = {k: v for k, v in params.items() if is_trunk_param((k,)) == train_trunk}
    frozen = {k: v for k, v in params.items() if is_trunk_param((k,)) != train_trunk}
    return trainable, frozen


def merge_params(trainable: dict, frozen: dict) -> dict:
    return {**frozen, **trainable}


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """AdamW, linear warmup + cosine decay, global-norm clipping; no decay on norm scales."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=config.decay_steps, end_value=config.learning_rate * config.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=decay_mask))


def init_train_state(params: dict, mtp_config: MTPConfig, optimizer: optax.GradientTransformation,
                     mesh: Mesh) -> TrainState:
    """Split ``params`` by mode and build optimizer state for the trained part only.

    ``params`` should already be placed on ``mesh`` (``init_params(..., mesh=mesh)``).
    The state holds the caller's arrays and the jitted step donates them: after the
    first step, use ``state.all_params``, not the ``params`` passed in here.
    Each optimizer moment takes its parameter's sharding; scalars are replicated.
    """
    trainable, frozen = split_params(params, mtp_config.mode)
    return train_state_for(trainable, frozen, optimizer, mesh)


def _moment_shardings(abstract_opt_state: Any, params: dict, fallback: NamedSharding) -> Any:
    """Each optimizer-state leaf takes the sharding of the parameter it mirrors: the one whose
    key path ends its own path with the same shape (moments of ``multi_transform`` /
    ``masked`` groups included); anything else (counts) gets ``fallback``."""
    by_path = {tuple(str(k) for k in path): leaf
               for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}

    def sharding(path, leaf):
        keys = tuple(str(k) for k in path)
        for start in range(len(keys)):
            param = by_path.get(keys[start:])
            if param is not None and param.shape == leaf.shape:
                return param.sharding
        return fallback

    return jax.tree_util.tree_map_with_path(sharding, abstract_opt_state)


def train_state_for(trainable: dict, frozen: dict, optimizer: optax.GradientTransformation,
                    mesh: Mesh) -> TrainState:
    """A step-0 state training ``trainable`` with ``frozen`` held fixed (no optimizer state for it)."""
    replicated = NamedSharding(mesh, P())
    opt_sh = _moment_shardings(jax.eval_shape(optimizer.init, trainable), trainable, replicated)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(trainable)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    return TrainState(step=step, params=trainable, frozen=frozen, opt_state=opt_state)


def _shift(x: Array, k: int, fill=0) -> Array:
    """x[:, t + k] along axis 1, filled past the end."""
    if k == 0:
        return x
    pad = jnp.full((x.shape[0], k) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([x[:, k:], pad], axis=1) if x.shape[1] > k else pad[:, : x.shape[1]]


def mtp_targets(logits_BxTxV: Array, tokens_BxT: Array, mask_BxT: Array, num_depths: int):
    """Per-depth targets of the MTP heads.

    Returns target logits [B,T,K,V] (trunk logits at t+k), labels [B,T,K]
    (x_{t+k+1}) and weights [B,T,K] (loss_mask at t+k+1, 0 past the end).
    """
    ks = range(1, num_depths + 1)
    target = jnp.stack([_shift(logits_BxTxV, k) for k in ks], axis=2)
    labels = jnp.stack([_shift(tokens_BxT, k + 1) for k in ks], axis=2)
    weights = jnp.stack([_shift(mask_BxT.astype(jnp.float32), k + 1) for k in ks], axis=2)
    return target, labels, weights


def next_token_ce(logits_BxTxV: Array, tokens_BxT: Array, mask_BxT: Array) -> Array:
    """Weighted mean NLL of x_{t+1} under the trunk at t (weights = mask at t+1)."""
    w = mask_BxT[:, 1:]
    logp = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1e-6)


def mtp_head_loss(trunk_logits_BxTxV: Array, mtp_logits_BxTxKxV: Array, tokens_BxT: Array, loss_mask_BxT: Array,
                  loss: str, temperature: float) -> tuple[Array, dict]:
    """The MTP loss ``loss`` of the heads against the (stop-gradient) trunk; metrics prefixed ``mtp/``."""
    target, labels, weights = mtp_targets(trunk_logits_BxTxV, tokens_BxT, loss_mask_BxT,
                                          mtp_logits_BxTxKxV.shape[2])
    target = jax.lax.stop_gradient(target)
    if loss == "ce":
        value, metrics = losses.ce_loss(labels, mtp_logits_BxTxKxV, weights, temperature, target_logits=target)
    else:
        value, metrics = losses.LOSSES[loss](target, mtp_logits_BxTxKxV, weights, temperature)
    metrics = {f"mtp/{k}": v for k, v in metrics.items()}
    metrics["mtp/loss"] = value
    return value, metrics


def loss_fn(trainable: dict, frozen: dict, batch: Batch, *, model_config: ModelConfig,
            mtp_config: MTPConfig) -> tuple[Array, dict]:
    tokens, loss_mask = batch["tokens"], batch["loss_mask"].astype(jnp.float32)
    params = merge_params(trainable, frozen)
    if mtp_config.mode == "trunk_only":
        b, t = tokens.shape
        positions = batch.get("positions", jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
        _, logits, _ = Policy(model_config).apply({"params": params}, tokens, positions, None,
                                                  batch.get("segment_ids"), method=Policy.trunk)
        ce = next_token_ce(logits, tokens, loss_mask)
        return ce, {"trunk/ce": ce, "loss": ce}
    freeze = mtp_config.mode == "mtp_only"
    out = Policy(model_config).apply({"params": params}, tokens, freeze_trunk=freeze)
    mtp_loss, metrics = mtp_head_loss(out.logits, out.mtp_logits, tokens, loss_mask, mtp_config.loss,
                                      mtp_config.temperature)
    total = mtp_loss
    if mtp_config.mode == "joint":
        trunk_ce = next_token_ce(out.logits, tokens, loss_mask)
        metrics["trunk/ce"] = trunk_ce
        total = trunk_ce + mtp_config.mtp_weight * mtp_loss
    metrics["loss"] = total
    return total, metrics


LossFn = Callable[[dict, dict, Any], tuple[Array, dict]]  # (trainable, frozen, batch) -> (loss, metrics)


def mtp_loss(model_config: ModelConfig, mtp_config: MTPConfig) -> LossFn:
    """The loss of MTP / base training (``loss_fn``) for these configs."""
    return functools.partial(loss_fn, model_config=model_config, mtp_config=mtp_config)


def train_step(state: TrainState, batch: Any, *, loss: LossFn,
               optimizer: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """One optimizer step of ``loss`` on the trained parameters. Pure: jit it (see ``make_step``)."""
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, state.frozen, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = TrainState(step=state.step + 1, params=params, frozen=state.frozen, opt_state=opt_state)
    return new_state, metrics


PACKED_KEYS = ("positions", "segment_ids")


def validate_batch(batch: Batch, model_config: ModelConfig, mesh: Mesh | None = None,
                   mtp_config: MTPConfig | None = None) -> None:
    """Shape and dtype checks on a host batch, before anything is compiled."""
    if set(batch) not in ({"tokens", "loss_mask"}, {"tokens", "loss_mask", *PACKED_KEYS}):
        raise ValueError(f"batch: expected keys {{'tokens', 'loss_mask'}} (plus {set(PACKED_KEYS)} when packed), "
                         f"got {sorted(batch)}")
    if "segment_ids" in batch and mtp_config is not None and mtp_config.mode != "trunk_only":
        raise ValueError(f"batch: packed batches (segment_ids) are supported in mode 'trunk_only' only, "
                         f"not {mtp_config.mode!r}: the MTP targets would cross example boundaries")
    tokens, mask = batch["tokens"], batch["loss_mask"]
    for key in PACKED_KEYS:
        if key in batch and tuple(batch[key].shape) != tuple(tokens.shape):
            raise ValueError(f"batch[{key!r}]: shape {tuple(batch[key].shape)} does not match "
                             f"tokens {tuple(tokens.shape)}")
    if tokens.ndim != 2:
        raise ValueError(f"batch['tokens']: expected shape [B, T], got {tuple(tokens.shape)}")
    if tuple(mask.shape) != tuple(tokens.shape):
        raise ValueError(f"batch['loss_mask']: shape {tuple(mask.shape)} does not match "
                         f"tokens {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"batch['tokens']: expected an integer dtype, got {tokens.dtype}")
    if tokens.shape[1] > model_config.max_seq_len:
        raise ValueError(f"batch['tokens']: length {tokens.shape[1]} exceeds "
                         f"ModelConfig.max_seq_len={model_config.max_seq_len}")
    if mesh is not None:
        rows = mesh.shape["data"] * mesh.shape["fsdp"]
        if tokens.shape[0] % rows:
            raise ValueError(f"batch['tokens']: batch size {tokens.shape[0]} is not divisible by "
                             f"data*fsdp = {rows} of the mesh")


def make_step(loss: LossFn, optimizer: optax.GradientTransformation, state: TrainState, mesh: Mesh, *,
              batch_shardings: Any = None, validate: Callable[[Any], None] | None = None
              ) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """Jit ``train_step`` of ``loss`` with explicit shardings and the state donated.

    The state keeps the shardings it already has (parameters placed by the rules
    table, optimizer moments alongside them); ``batch_shardings`` (a pytree prefix of
    the batch; default: every array [B, T] with rows split over data x fsdp) places
    the batch; metrics come back replicated. ``validate(batch)`` runs on the host
    before each call. Every kind of training (MTP, base, RL) goes through this one
    program builder: what differs is the loss function.
    """
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    step = functools.partial(train_step, loss=loss, optimizer=optimizer)
    jitted = jax.jit(step, in_shardings=(state_shardings, batch_sharding(mesh) if batch_shardings is None
                                         else batch_shardings),
                     out_shardings=(state_shardings, NamedSharding(mesh, P())),
                     donate_argnums=(0,))

    def run(state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        if validate is not None:
            validate(batch)
        return jitted(state, batch)

    run.jitted = jitted  # for .lower(...).compile() / memory_analysis()
    return run


def make_train_step(model_config: ModelConfig, mtp_config: MTPConfig,
                    optimizer: optax.GradientTransformation, state: TrainState,
                    mesh: Mesh) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The MTP / base training step (``make_step`` of ``mtp_loss``), batches checked on the host."""
    return make_step(mtp_loss(model_config, mtp_config), optimizer, state, mesh,
                     validate=lambda batch: validate_batch(batch, model_config, mesh, mtp_config))
