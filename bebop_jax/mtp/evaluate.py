"""Teacher-forced acceptance of the MTP heads, and the policy's entropy.

Teacher-forced acceptance is what the MTP losses optimise: on sequences the
base model sampled itself, depth k's draft q at position t is compared with the
trunk's p at t+k. Under rejection verification the per-depth acceptance is
``1 - TV(p, q)``; under greedy drafts it is ``p(argmax q)``. Because accepted
drafts are distributed as p, these equal the conditional acceptance rates of
real speculative decoding in expectation; both are reported.
"""

from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from bebop_jax.config import ModelConfig
from bebop_jax.model import readout
from bebop_jax.model.policy import Policy
from bebop_jax.mtp.objective import mtp_targets


def _per_depth_alphas(params, tokens, loss_mask, model_config: ModelConfig, temperature: float):
    """(rejection acceptance 1 - TV(p, q), greedy acceptance p(argmax q), weights), each [B,T,K],
    of each depth against its target, and the trunk's features; dense or over vocabulary chunks."""
    f = Policy(model_config).apply({"params": params}, tokens, method=Policy.features)
    if model_config.chunked_vocab:
        _, _, weights = mtp_targets(None, tokens, loss_mask, model_config.num_mtp_depths)
        terms = readout.depth_agreement(model_config, f.normed, f.mtp_normed, f.head, tokens, temperature)
        return terms["alpha"], terms["greedy_alpha"], weights, f
    target, _, weights = mtp_targets(readout.logits(f.normed, f.head), tokens, loss_mask,
                                     model_config.num_mtp_depths)
    p = jax.nn.softmax(target / temperature, axis=-1)                                # [B,T,K,V]
    q = jax.nn.softmax(readout.logits(f.mtp_normed, f.head) / temperature, axis=-1)
    alpha_greedy = jnp.take_along_axis(p, jnp.argmax(q, axis=-1)[..., None], axis=-1)[..., 0]
    return 1.0 - 0.5 * jnp.sum(jnp.abs(p - q), axis=-1), alpha_greedy, weights, f


@functools.partial(jax.jit, static_argnames=("model_config", "temperature"))
def _teacher_forced_sums(params, tokens, loss_mask, *, model_config: ModelConfig, temperature: float):
    alpha_rej, alpha_greedy, weights, f = _per_depth_alphas(params, tokens, loss_mask, model_config, temperature)
    # A position counts for E[A] only if all K depths are scored there.
    full = jnp.all(weights > 0, axis=-1)
    ea_rej = jnp.sum(jnp.cumprod(alpha_rej, axis=-1), axis=-1)
    ea_greedy = jnp.sum(jnp.cumprod(alpha_greedy, axis=-1), axis=-1)
    # Entropy of the trunk at this temperature where it predicts a scored (response) token.
    _, ent = readout.next_token_stats(model_config, f.normed, f.head, tokens, temperature)
    scored = (loss_mask > 0).at[:, 0].set(False)
    w = (weights > 0).astype(jnp.float32)
    return {
        "alpha_rejection": jnp.sum(alpha_rej * w, axis=(0, 1)),
        "alpha_greedy": jnp.sum(alpha_greedy * w, axis=(0, 1)),
        "depth_count": jnp.sum(w, axis=(0, 1)),
        "ea_rejection": jnp.sum(jnp.where(full, ea_rej, 0.0)),
        "ea_greedy": jnp.sum(jnp.where(full, ea_greedy, 0.0)),
        "full_count": jnp.sum(full.astype(jnp.float32)),
        "entropy": jnp.sum(jnp.where(scored, ent, 0.0)),
        "entropy_count": jnp.sum(scored.astype(jnp.float32)),
        # per row (one response each), for paired tests across prompts
        "row_ea_rejection": jnp.sum(jnp.where(full, ea_rej, 0.0), axis=1),
        "row_ea_greedy": jnp.sum(jnp.where(full, ea_greedy, 0.0), axis=1),
        "row_full_count": jnp.sum(full.astype(jnp.float32), axis=1),
    }


def teacher_forced_acceptance(params, model_config: ModelConfig, batches: Iterable[dict],
                              temperature: float = 1.0) -> dict:
    """Per-depth acceptance (rejection and greedy), E[accepted drafts], and entropy (nats); also
    each row's own E[accepted] (``per_row_mean_accepted``), for paired comparisons of heads."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for teacher-forced acceptance, got {temperature}")
    total, rows = None, []
    for batch in batches:
        sums = _teacher_forced_sums(params, batch["tokens"], batch["loss_mask"], model_config=model_config,
                                    temperature=float(temperature))
        rows.append({k: sums.pop(k) for k in [k for k in sums if k.startswith("row_")]})
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    if total is None:
        raise ValueError("batches: no batch to evaluate")
    t = jax.device_get(total)
    rows = {k: np.concatenate([np.asarray(r[k]) for r in rows]) for k in rows[0]}
    per_row = {m: (rows[f"row_ea_{m}"] / np.maximum(rows["row_full_count"], 1.0)).tolist()
               for m in ("rejection", "greedy")}
    dc = np.maximum(t["depth_count"], 1)
    fc = max(float(t["full_count"]), 1.0)
    return {
        "per_depth": {"rejection": (t["alpha_rejection"] / dc).tolist(), "greedy": (t["alpha_greedy"] / dc).tolist()},
        "mean_accepted": {"rejection": float(t["ea_rejection"]) / fc, "greedy": float(t["ea_greedy"]) / fc},
        "entropy": float(t["entropy"]) / max(float(t["entropy_count"]), 1.0),
        "per_row_mean_accepted": per_row,  # each row's mean E[accepted] over its fully scored positions
    }
