"""Token aggregations of a per-token loss term over a mask: ``AGGREGATIONS[name](term_BxT, mask_BxT)``.

The one registry ``GRPOConfig.aggregation`` is validated against (config imports it; it imports
nothing from the package). Math runs in float32. Masked tokens are zeroed before any compute,
so padding values (even inf) never reach a loss or its gradient.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _div(num, den):
    """num / den with 0 where den == 0 (the numerator is then 0 too): no NaN."""
    return num / jnp.where(den > 0, den, 1.0)


def _masked(term_BxT, mask_BxT):
    term_BxT = jnp.asarray(term_BxT, jnp.float32)
    mask_BxT = jnp.asarray(mask_BxT, jnp.float32)
    return jnp.where(mask_BxT != 0, term_BxT * mask_BxT, 0.0), mask_BxT


def token_mean(term_BxT, mask_BxT) -> jax.Array:
    """sum(term * mask) / sum(mask): every token weighs the same (DAPO)."""
    tm_BxT, mask_BxT = _masked(term_BxT, mask_BxT)
    return _div(jnp.sum(tm_BxT), jnp.sum(mask_BxT))


def seq_mean_token_mean(term_BxT, mask_BxT) -> jax.Array:
    """Mean over rows with any mask of each row's token mean (original GRPO)."""
    tm_BxT, mask_BxT = _masked(term_BxT, mask_BxT)
    len_B = jnp.sum(mask_BxT, axis=1)
    row_B = _div(jnp.sum(tm_BxT, axis=1), len_B)
    return _div(jnp.sum(row_B), jnp.sum(len_B > 0).astype(jnp.float32))


def seq_mean_token_sum_norm(term_BxT, mask_BxT) -> jax.Array:
    """sum(term * mask) / (B * T), T the padded length (Dr. GRPO: no length bias)."""
    tm_BxT, _ = _masked(term_BxT, mask_BxT)
    return jnp.sum(tm_BxT) / max(tm_BxT.size, 1)


AGGREGATIONS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm,
}
