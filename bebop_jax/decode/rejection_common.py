"""What the XLA verifier (rejection.py) and the Pallas kernel (rejection_pallas.py) share:
the input checks, the noise layout (uniforms and the two-level Gumbel over [R, L] vocabulary
blocks; see rejection.py's docstring) and the assembly of the emitted tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bebop_jax import sampling

METHODS = ("rejection", "greedy")
IMPLS = ("auto", "xla", "pallas")


def validate_rejection_inputs(target_logits, draft_logits, draft_tokens, *,
                              temperature, top_k, top_p, method, impl) -> None:
    """Checks shapes, dtypes and options; raises ValueError naming the argument."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    sampling.validate_sampling(temperature, top_k, top_p)
    t_shape = tuple(jnp.shape(target_logits))
    d_shape = tuple(jnp.shape(draft_logits))
    x_shape = tuple(jnp.shape(draft_tokens))
    if len(t_shape) != 3:
        raise ValueError(f"target_logits must be [B, K+1, V], got shape {t_shape}")
    if len(d_shape) != 3:
        raise ValueError(f"draft_logits must be [B, K, V], got shape {d_shape}")
    if len(x_shape) != 2:
        raise ValueError(f"draft_tokens must be [B, K], got shape {x_shape}")
    b, k1, v = t_shape
    if k1 < 2:
        raise ValueError(f"target_logits must have K+1 >= 2 positions, got shape {t_shape}")
    if d_shape != (b, k1 - 1, v):
        raise ValueError(
            f"draft_logits must have shape [B, K, V] = {(b, k1 - 1, v)} to match "
            f"target_logits {t_shape}, got {d_shape}")
    if x_shape != (b, k1 - 1):
        raise ValueError(
            f"draft_tokens must have shape [B, K] = {(b, k1 - 1)}, got {x_shape}")
    for name, arr in (("target_logits", target_logits), ("draft_logits", draft_logits)):
        if not jnp.issubdtype(jnp.result_type(arr), jnp.floating):
            raise ValueError(f"{name} must be a floating dtype, got {jnp.result_type(arr)}")
    if not jnp.issubdtype(jnp.result_type(draft_tokens), jnp.integer):
        raise ValueError(
            f"draft_tokens must have an integer dtype, got {jnp.result_type(draft_tokens)}")


def vocab_view(vocab_size: int) -> tuple[int, int]:
    """(R, L): the vocabulary as R blocks of L lanes, L the largest power of two <= 128
    dividing V (a free reshape; V % 128 == 0 is the fast case)."""
    lanes = 1
    while lanes < 128 and vocab_size % (2 * lanes) == 0:
        lanes *= 2
    return vocab_size // lanes, lanes


def noise_size(vocab_size: int) -> int:
    """Gumbel values per row: R block values, then L lane values."""
    rows, lanes = vocab_view(vocab_size)
    return rows + lanes


def draw_randomness(key, batch: int, num_draft: int, vocab_size: int):
    """Uniforms u [B, K] in [0, 1) and Gumbel noise g [B, R + L] (finite: -4.5 < g < 16).

    One `jax.random.bits` call feeds both (23-bit uniforms, as jax.random.uniform
    makes them); a single threefry instance also keeps the compile cheap on CPU.
    """
    bits = jax.random.bits(key, (batch, num_draft + noise_size(vocab_size)), jnp.uint32)
    mantissa = (bits >> 9) | jnp.uint32(0x3F800000)  # a float in [1, 2)
    unit = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0  # [0, 1)
    uniforms_BxK = unit[:, :num_draft]
    tiny = jnp.finfo(jnp.float32).tiny
    gumbel_BxN = -jnp.log(-jnp.log(jnp.maximum(unit[:, num_draft:], tiny)))
    return uniforms_BxK, gumbel_BxN


def assemble_tokens(draft_tokens_BxK, num_accepted_B, final_token_B):
    """tokens [B, K+1]: accepted drafts, then the final token, then -1 padding."""
    b, k = draft_tokens_BxK.shape
    pos_BxK1 = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    drafts_BxK1 = jnp.concatenate(
        [draft_tokens_BxK.astype(jnp.int32), jnp.full((b, 1), -1, jnp.int32)], axis=1)
    n_Bx1 = num_accepted_B[:, None]
    return jnp.where(pos_BxK1 < n_Bx1, drafts_BxK1,
                     jnp.where(pos_BxK1 == n_Bx1, final_token_B[:, None], -1))
