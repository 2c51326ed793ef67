"""The pure, jitted, sharded training step (MTP heads, base, and, with its own loss, RL).

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

The loss of each mode is ``bebop_jax.mtp.objective.mtp_loss``; RL passes its own
loss to the same ``make_step``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bebop_jax.config import ModelConfig, MTPConfig, OptimizerConfig
from bebop_jax.model.params import head_params, merge_params, trunk_params
from bebop_jax.mtp.objective import mtp_loss
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
    if mode == "trunk_only":
        return trunk_params(params), head_params(params)
    return head_params(params), trunk_params(params)


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


LossFn = Callable[[dict, dict, Any], tuple[Array, dict]]  # (trainable, frozen, batch) -> (loss, metrics)


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
