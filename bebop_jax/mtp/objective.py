"""What the MTP heads are trained on: per-depth targets, the head loss, and the loss of each
training mode (``MTPConfig.mode``) for ``bebop_jax.train.step.make_step``.

MTP targets (docs/DESIGN.md, "MTP indexing and masks"): depth k at position t is scored
against the trunk's distribution at position t+k (stop-gradient), label x_{t+k+1}, weight
``loss_mask[t+k+1]`` (0 where t+k+1 is past the sequence).

Modes:
- ``mtp_only``: pre-RL MTP training; the trunk, embedding and LM head are read through
  stop_gradient (``freeze_trunk``) and sit in ``TrainState.frozen``.
- ``joint``: next-token CE plus ``mtp_weight`` times the MTP loss, every parameter trained.
- ``trunk_only``: base pretraining; next-token CE on the trunk, the MTP modules not run.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from bebop_jax import losses
from bebop_jax.config import ModelConfig, MTPConfig
from bebop_jax.model.params import merge_params
from bebop_jax.model import readout
from bebop_jax.model.policy import Policy, PolicyFeatures
from bebop_jax.model.readout import shift

Array = jax.Array


def mtp_targets(logits_BxTxV: Array | None, tokens_BxT: Array, mask_BxT: Array, num_depths: int):
    """Per-depth targets of the MTP heads.

    Returns target logits [B,T,K,V] (trunk logits at t+k; None without ``logits``), labels
    [B,T,K] (x_{t+k+1}) and weights [B,T,K] (loss_mask at t+k+1, 0 past the end).
    """
    ks = range(1, num_depths + 1)
    target = None if logits_BxTxV is None else jnp.stack([shift(logits_BxTxV, k) for k in ks], axis=2)
    labels = jnp.stack([shift(tokens_BxT, k + 1) for k in ks], axis=2)
    weights = jnp.stack([shift(mask_BxT.astype(jnp.float32), k + 1) for k in ks], axis=2)
    return target, labels, weights


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


def mtp_features_loss(features: PolicyFeatures, tokens_BxT: Array, loss_mask_BxT: Array, loss: str,
                      temperature: float, model_config: ModelConfig, *, head_grad: bool = False) -> tuple[Array, dict]:
    """``mtp_head_loss`` from the forward's hidden states: through logits (dense) or from each
    depth's per-token agreement over vocabulary chunks (``model_config.vocab_impl``); the same
    loss, metrics and gradients. ``head_grad``: the drafts' gradient also reaches the LM head
    (joint training; the dense path has it whenever ``features.head`` is not detached)."""
    if not model_config.chunked_vocab:
        return mtp_head_loss(jax.lax.stop_gradient(readout.logits(features.normed, features.head)),
                             readout.logits(features.mtp_normed, features.head), tokens_BxT, loss_mask_BxT,
                             loss, temperature)
    terms = readout.depth_agreement(model_config, features.normed, features.mtp_normed, features.head, tokens_BxT,
                                    temperature, head_grad=head_grad)
    _, _, weights = mtp_targets(None, tokens_BxT, loss_mask_BxT, features.mtp_normed.shape[2])
    value, metrics = losses.loss_from_terms(loss, weights, **terms)
    metrics = {f"mtp/{k}": v for k, v in metrics.items()}
    metrics["mtp/loss"] = value
    return value, metrics


def loss_fn(trainable: dict, frozen: dict, batch: dict, *, model_config: ModelConfig,
            mtp_config: MTPConfig) -> tuple[Array, dict]:
    tokens, loss_mask = batch["tokens"], batch["loss_mask"].astype(jnp.float32)
    params = merge_params(trainable, frozen)
    policy = Policy(model_config)
    if mtp_config.mode == "trunk_only":
        b, t = tokens.shape
        positions = batch.get("positions", jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
        _, normed, _ = policy.apply({"params": params}, tokens, positions, None, batch.get("segment_ids"),
                                    method=Policy.trunk_features)
        head = policy.apply({"params": params}, method=Policy.head_weight)
        ce = readout.next_token_ce(model_config, normed, head, tokens, loss_mask)
        return ce, {"trunk/ce": ce, "loss": ce}
    joint = mtp_config.mode == "joint"
    features = policy.apply({"params": params}, tokens, freeze_trunk=not joint, method=Policy.features)
    head_loss, metrics = mtp_features_loss(features, tokens, loss_mask, mtp_config.loss, mtp_config.temperature,
                                           model_config, head_grad=joint)
    total = head_loss
    if joint:
        trunk_ce = readout.next_token_ce(model_config, features.normed, features.head, tokens, loss_mask)
        metrics["trunk/ce"] = trunk_ce
        total = trunk_ce + mtp_config.mtp_weight * head_loss
    metrics["loss"] = total
    return total, metrics


def mtp_loss(model_config: ModelConfig, mtp_config: MTPConfig) -> Callable[[dict, dict, dict], tuple[Array, dict]]:
    """The loss of MTP / base training (``loss_fn``) for these configs: a ``train.step.LossFn``."""
    return functools.partial(loss_fn, model_config=model_config, mtp_config=mtp_config)
