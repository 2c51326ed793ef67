"""The RL update's loss as a ``LossFn`` for ``train.step.make_step``, and policy log-probs.

The learner's log-prob of token t is log softmax(logits[t-1] / temperature)[x_t], the
trunk's distribution at the rollout temperature (top-k / top-p are a sampler's
device, not the policy's: leave them off for RL rollouts so behaviour and learner
log-probs describe the same distribution). The MTP heads are not part of the policy:
they run only under an online MTP strategy, on detached inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bebop_jax.config import GRPOConfig, ModelConfig
from bebop_jax.model import Policy, readout
from bebop_jax.model.policy import PolicyFeatures
from bebop_jax.rl.batch import RolloutBatch
from bebop_jax.rl.objective import policy_loss, token_mean
from bebop_jax.model.params import merge_params
from bebop_jax.mtp.objective import mtp_features_loss

Array = jax.Array


def _positions(tokens_BxT: Array) -> Array:
    b, t = tokens_BxT.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def trunk_features(params, model_config: ModelConfig, tokens_BxT: Array) -> tuple[Array, Array, Array]:
    """(hidden [B,T,H] before the final norm, final-normed hidden [B,T,H], LM head [H,V]) of the trunk."""
    policy = Policy(model_config)
    hidden, normed, _ = policy.apply({"params": params}, tokens_BxT, _positions(tokens_BxT), None,
                                     method=Policy.trunk_features)
    return hidden, normed, policy.apply({"params": params}, method=Policy.head_weight)


@functools.partial(jax.jit, static_argnames=("model_config", "temperature"))
def policy_logprobs(params, tokens_BxT: Array, *, model_config: ModelConfig, temperature: float) -> Array:
    """[B, T] log-probs of ``tokens`` under ``params`` (old / reference log-probs on the train mesh)."""
    _, normed, head = trunk_features(params, model_config, tokens_BxT)
    return readout.next_token_stats(model_config, normed, head, tokens_BxT, temperature)[0]


def loss_from_logprobs(logp_BxT: Array, ent_BxT: Array, batch: RolloutBatch, grpo: GRPOConfig, *,
                       decoupled: bool) -> tuple[Array, dict]:
    """``policy_loss`` of a batch given the policy's token log-probs and entropies."""
    old = jax.lax.stop_gradient(logp_BxT) if batch.old_logp is None else batch.old_logp
    loss, metrics = policy_loss(logp_BxT, old, batch.advantages, batch.loss_mask, grpo, ref_logp=batch.ref_logp,
                                behaviour_logp=batch.behaviour_logp if decoupled else None)
    metrics = {f"policy/{k}": v for k, v in metrics.items()}
    metrics["policy/entropy"] = jax.lax.stop_gradient(token_mean(ent_BxT, batch.loss_mask))
    metrics["loss"] = loss
    return loss, metrics


def loss_from_logits(logits_BxTxV: Array, batch: RolloutBatch, grpo: GRPOConfig, temperature: float, *,
                     decoupled: bool) -> tuple[Array, dict]:
    """``policy_loss`` of a batch given the policy's logits (so tests can differentiate w.r.t. them)."""
    logp, ent = readout.next_token_stats_from_logits(logits_BxTxV, batch.tokens, temperature)
    return loss_from_logprobs(logp, ent, batch, grpo, decoupled=decoupled)


def grpo_loss(model_config: ModelConfig, grpo: GRPOConfig, temperature: float, *, decoupled: bool = False,
              mtp_loss: str | None = None):
    """``(trainable, frozen, batch) -> (loss, metrics)``: the GRPO policy loss of the trunk.

    ``decoupled``: weight tokens by min(exp(old - behaviour), is_cap) (async RL, where the
    behaviour policy lags the proximal one); off for synchronous RL. ``mtp_loss`` (an
    online MTP strategy): add that loss of the MTP heads on the rollout tokens, their
    inputs detached from the trunk, so it trains the heads and nothing else. Log-probs,
    entropies and the heads' loss reduce over the vocabulary as ``model_config.vocab_impl`` says.
    """
    if not temperature > 0:
        raise ValueError(f"temperature: RL needs a sampling distribution (> 0), got {temperature}")

    def loss(trainable, frozen, batch: RolloutBatch):
        params = merge_params(trainable, frozen)
        hidden, normed, head = trunk_features(params, model_config, batch.tokens)
        logp, ent = readout.next_token_stats(model_config, normed, head, batch.tokens, temperature)
        value, metrics = loss_from_logprobs(logp, ent, batch, grpo, decoupled=decoupled)
        if mtp_loss is None:
            return value, metrics
        mtp_normed = Policy(model_config).apply({"params": params}, hidden, batch.tokens, _positions(batch.tokens),
                                                frozen=True, method=Policy.mtp_stack_features)
        features = PolicyFeatures(hidden=hidden, normed=jax.lax.stop_gradient(normed), mtp_normed=mtp_normed,
                                  head=jax.lax.stop_gradient(head))
        head_loss, head_metrics = mtp_features_loss(features, batch.tokens, batch.loss_mask, mtp_loss, temperature,
                                                    model_config)
        metrics.update(head_metrics)
        metrics["loss"] = value + head_loss
        return value + head_loss, metrics

    return loss
