"""From final-normed hidden states to what the losses reduce, dense or over vocabulary chunks.

``ModelConfig.vocab_impl`` chooses: dense builds float32 [.., V] logits and reduces them (the
reference, and the default for the byte-level small-scale models); chunked calls
``bebop_jax.ops`` and never holds more than [N, vocab_chunk] of them (the default from
``config.CHUNKED_VOCAB_FROM`` entries on); "pallas" runs the ops' Pallas kernels. All give the
same values and gradients.

Indexing (docs/DESIGN.md, "MTP indexing and masks"): the trunk at t predicts x_{t+1}; MTP
depth k at t drafts x_{t+k+1} against the trunk's distribution at t+k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bebop_jax.config import ModelConfig
from bebop_jax.ops import draft_agreement, token_logprobs

Array = jax.Array


def logits(normed_xH: Array, head_HxV: Array) -> Array:
    """float32 logits [..., V] of final-normed hiddens [..., H] under the LM head [H, V]."""
    return jnp.einsum("...h,hv->...v", normed_xH.astype(head_HxV.dtype), head_HxV, preferred_element_type=jnp.float32)


def shift(x: Array, k: int, fill=0) -> Array:
    """x[:, t + k] along axis 1, filled past the end."""
    if k == 0:
        return x
    pad = jnp.full((x.shape[0], k) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([x[:, k:], pad], axis=1) if x.shape[1] > k else pad[:, : x.shape[1]]


def next_token_stats(model_config: ModelConfig, normed_BxTxH: Array, head_HxV: Array, tokens_BxT: Array,
                     temperature: float) -> tuple[Array, Array]:
    """(log p(x_t | x_<t) [B,T], entropy of that distribution [B,T]) at ``temperature``, float32;
    column 0 is 0 (nothing predicts x_0). Differentiable w.r.t. ``normed`` and ``head``."""
    b, t, h = normed_BxTxH.shape
    if t < 2:
        return jnp.zeros((b, t), jnp.float32), jnp.zeros((b, t), jnp.float32)
    if model_config.chunked_vocab:
        logp, ent = token_logprobs(normed_BxTxH[:, :-1].reshape(-1, h), head_HxV, tokens_BxT[:, 1:].reshape(-1),
                                   temperature=temperature, chunk_size=model_config.vocab_chunk,
                                   impl=model_config.vocab_ops_impl)
        pad = jnp.zeros((b, 1), jnp.float32)
        return (jnp.concatenate([pad, logp.reshape(b, t - 1)], axis=1),
                jnp.concatenate([pad, ent.reshape(b, t - 1)], axis=1))
    return next_token_stats_from_logits(logits(normed_BxTxH, head_HxV), tokens_BxT, temperature)


def next_token_stats_from_logits(logits_BxTxV: Array, tokens_BxT: Array, temperature: float) -> tuple[Array, Array]:
    """``next_token_stats`` by the dense formula, from the trunk's logits [B,T,V]."""
    logp_all = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32) / jnp.float32(temperature), axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    pad = jnp.zeros_like(logp[:, :1])
    return jnp.concatenate([pad, logp], axis=1), jnp.concatenate([pad, ent], axis=1)


def next_token_ce(model_config: ModelConfig, normed_BxTxH: Array, head_HxV: Array, tokens_BxT: Array,
                  mask_BxT: Array) -> Array:
    """Weighted mean NLL of x_{t+1} under the trunk at t (weights = mask at t+1)."""
    logp, _ = next_token_stats(model_config, normed_BxTxH, head_HxV, tokens_BxT, 1.0)
    w = mask_BxT[:, 1:].astype(jnp.float32)
    return jnp.sum(-logp[:, 1:] * w) / jnp.maximum(jnp.sum(w), 1e-6)


def depth_agreement(model_config: ModelConfig, normed_BxTxH: Array, mtp_normed_BxTxKxH: Array, head_HxV: Array,
                    tokens_BxT: Array, temperature: float, *, head_grad: bool = False) -> dict:
    """``ops.draft_agreement`` of every depth against its target, each output [B,T,K]: depth k at t
    (``mtp_normed[:, t, k-1]``) against the trunk at t+k, label x_{t+k+1} (0 past the end, where
    the caller's weights are 0). The trunk side is read through stop_gradient; ``head_grad``: the
    drafts' gradient also reaches ``head`` (joint training)."""
    b, t, k, h = mtp_normed_BxTxKxH.shape
    target = jnp.stack([shift(normed_BxTxH, d) for d in range(1, k + 1)], axis=2)
    labels = jnp.stack([shift(tokens_BxT, d + 1) for d in range(1, k + 1)], axis=2)
    out = draft_agreement(target.reshape(-1, h), mtp_normed_BxTxKxH.reshape(-1, h), head_HxV, labels.reshape(-1),
                          temperature=temperature, chunk_size=model_config.vocab_chunk, head_grad=head_grad,
                          impl=model_config.vocab_ops_impl)
    return {name: v.reshape(b, t, k) for name, v in out.items()}
