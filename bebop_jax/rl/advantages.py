"""Group-relative advantages: GRPO (std-normalised) and Dr. GRPO (mean-centred only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def group_advantages(rewards, group_size: int, *, std_normalize: bool = True,
                     eps: float = 1e-6) -> jax.Array:
    """Advantages float32 [N] for rewards [N]; rows g*G..g*G+G-1 are prompt g's group.

    A = r - mean_g, divided by (std_g with ddof=1, + eps) when ``std_normalize`` (GRPO);
    without it, Dr. GRPO. A group whose rewards are all equal gets exactly 0 (no float
    round-off from the mean leaking through the division). ``group_size`` is static.
    """
    shape = jnp.shape(rewards)
    if len(shape) != 1:
        raise ValueError(f"rewards: must be 1-D [N], got shape {shape}")
    if (not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool)
            or group_size < 2):
        raise ValueError(f"group_size: must be an int >= 2, got {group_size!r}")
    n = shape[0]
    if n % group_size:
        raise ValueError(f"group_size: N={n} rewards do not split into groups of "
                         f"group_size={group_size}")
    r_PxG = jnp.asarray(rewards, jnp.float32).reshape(n // group_size, group_size)
    centred_PxG = r_PxG - jnp.mean(r_PxG, axis=1, keepdims=True)
    tied_Px1 = jnp.all(r_PxG == r_PxG[:, :1], axis=1, keepdims=True)
    centred_PxG = jnp.where(tied_Px1, 0.0, centred_PxG)
    if std_normalize:
        std_Px1 = jnp.std(r_PxG, axis=1, keepdims=True, ddof=1)
        centred_PxG = centred_PxG / (std_Px1 + eps)
    return centred_PxG.reshape(n).astype(jnp.float32)
