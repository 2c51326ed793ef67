"""GRPO-family policy loss: clipped ratio, decoupled-PPO behaviour weights, k3 KL.

Terms are aggregated by ``bebop_jax.aggregations.AGGREGATIONS[config.aggregation]``
(``fn(term_BxT, mask_BxT) -> scalar``; re-exported here). Math runs in float32. Masked tokens are
zeroed before any compute, so padding log-probs (even inf) never reach the loss or
its gradient.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from bebop_jax.aggregations import AGGREGATIONS, token_mean  # noqa: F401  (AGGREGATIONS re-exported)
from bebop_jax.config import GRPOConfig

Metrics = dict[str, jax.Array]


def _check_shapes(logp, old_logp, advantages, mask, ref_logp, behaviour_logp,
                  group_size: int) -> None:
    shape = jnp.shape(logp)
    if len(shape) != 2:
        raise ValueError(f"logp: must be [B, T], got shape {shape}")
    named = {"old_logp": old_logp, "mask": mask, "ref_logp": ref_logp,
             "behaviour_logp": behaviour_logp}
    for name, x in named.items():
        if x is not None and jnp.shape(x) != shape:
            raise ValueError(f"{name}: shape {jnp.shape(x)} does not match logp {shape}")
    if jnp.shape(advantages) != shape[:1]:
        raise ValueError(f"advantages: must be [B] = {shape[:1]}, got {jnp.shape(advantages)}")
    if shape[0] % group_size:
        raise ValueError(f"group_size: B={shape[0]} rows do not split into groups of "
                         f"GRPOConfig.group_size={group_size}")


def policy_loss(logp, old_logp, advantages, mask, config: GRPOConfig, *,
                ref_logp=None, behaviour_logp=None) -> tuple[jax.Array, Metrics]:
    """Clipped GRPO loss over logp/old_logp/mask [B, T] and advantages [B].

    term_t = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), r = exp(logp - old_logp);
    times stop_gradient(min(exp(old_logp - behaviour_logp), is_cap)) when behaviour_logp is
    given (decoupled PPO, AReaL: old_logp is the proximal policy); plus kl_coef * k3 KL to
    ref_logp when given and kl_coef > 0; aggregated by ``AGGREGATIONS[config.aggregation]``.
    Jittable with ``config`` static. Metrics are float32 scalars under stop_gradient.
    """
    _check_shapes(logp, old_logp, advantages, mask, ref_logp, behaviour_logp, config.group_size)
    mask_BxT = jnp.asarray(mask, jnp.float32)
    on_BxT = mask_BxT != 0

    def tokens(x):  # float32, 0 at masked tokens (so r = 1 and k3 = 0 there)
        return jnp.where(on_BxT, jnp.asarray(x, jnp.float32), 0.0)

    logp_BxT, old_BxT = tokens(logp), tokens(old_logp)
    adv_B = jnp.asarray(advantages, jnp.float32)
    adv_Bx1 = adv_B[:, None]
    ratio_BxT = jnp.exp(logp_BxT - old_BxT)
    clipped_BxT = jnp.clip(ratio_BxT, 1.0 - config.clip_low, 1.0 + config.clip_high)
    term_BxT = -jnp.minimum(ratio_BxT * adv_Bx1, clipped_BxT * adv_Bx1)

    is_weight_mean = jnp.float32(1.0)
    if behaviour_logp is not None:
        weight_BxT = jax.lax.stop_gradient(
            jnp.minimum(jnp.exp(old_BxT - tokens(behaviour_logp)), config.is_cap))
        term_BxT = term_BxT * weight_BxT
        is_weight_mean = token_mean(weight_BxT, mask_BxT)

    kl = jnp.float32(0.0)
    if ref_logp is not None:
        log_ref_ratio_BxT = tokens(ref_logp) - logp_BxT
        k3_BxT = jnp.exp(log_ref_ratio_BxT) - log_ref_ratio_BxT - 1.0
        kl = token_mean(k3_BxT, mask_BxT)
        if config.kl_coef > 0:
            term_BxT = term_BxT + config.kl_coef * k3_BxT

    loss = AGGREGATIONS[config.aggregation](term_BxT, mask_BxT)
    low_BxT = (adv_Bx1 < 0) & (ratio_BxT < 1.0 - config.clip_low)
    high_BxT = (adv_Bx1 > 0) & (ratio_BxT > 1.0 + config.clip_high)
    zero_P = jnp.all(adv_B.reshape(-1, config.group_size) == 0, axis=1)
    metrics = {
        "clip_frac_low": token_mean(low_BxT, mask_BxT),
        "clip_frac_high": token_mean(high_BxT, mask_BxT),
        "ratio_mean": token_mean(ratio_BxT, mask_BxT),
        "ratio_max": jnp.max(jnp.where(on_BxT, ratio_BxT, 0.0)),  # r > 0: 0 only if all masked
        "kl": kl,
        "is_weight_mean": is_weight_mean,
        "adv_mean": jnp.mean(adv_B),
        "adv_std": jnp.std(adv_B),
        "zero_adv_group_frac": jnp.mean(zero_P.astype(jnp.float32)),
        "loss": loss,
    }
    metrics = {k: jax.lax.stop_gradient(jnp.asarray(v, jnp.float32)) for k, v in metrics.items()}
    return loss.astype(jnp.float32), metrics
