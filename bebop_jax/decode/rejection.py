"""Exact speculative verification: rejection sampling of K draft tokens against the target.

Definitions (docs/DESIGN.md, "The math"). For row b, p_j is the processed target
distribution at position j (j = 0..K) and q_j the processed draft distribution
that proposed draft token x_j (j = 0..K-1); both go through
`bebop_jax.sampling.process_logits` with the same temperature / top-k / top-p.

method="rejection": accept x_j with probability min(1, p_j(x_j) / q_j(x_j)); at the
  first rejection j emit a token from norm(max(p_j - q_j, 0)); if all K drafts are
  accepted emit a bonus token from p_K. Every emitted token is then distributed
  exactly as the target would sample it, for any q.
method="greedy": the draft is the argmax of q, i.e. q_j is one-hot at x_j: accept with
  probability p_j(x_j); on rejection emit from norm(p_j with x_j zeroed).
temperature == 0 (greedy target, either method): accept iff x_j == argmax p_j; emit
  argmax p_j at the first rejection (or argmax p_K as the bonus).

Randomness is drawn up front (`draw_randomness`): uniforms u [B, K] for the
acceptance tests and ONE Gumbel noise vector per row for the single token drawn from
a residual or bonus weight vector w (whatever the position). The draw is a two-level
Gumbel-max over the vocabulary viewed as [R, L] blocks (`vocab_view`; L = 128 for
most vocabularies): block r is picked by argmax_r log(sum_l w[r, l]) + g_block[r],
and inside it lane l by argmax_l log w[r, l] + g_lane[l]. That is exact (P(r) P(l | r)
= w[r, l] / sum w) and needs R + L noise values per row instead of V (1,315 vs
151,936 for Qwen's vocabulary), which matters because generating V Gumbels per row
costs about as much as reading all the logits. One g_lane vector may serve every
block because only the chosen block's candidate is used and the block choice is
independent of g_lane. `rejection_sample_with_noise` takes (u, g) explicitly, so the
XLA path and the Pallas kernel can be compared token for token.

Acceptance is tested as `u * q < p` (equal to u < p / q for q > 0, no division; a
draft token that has p = 0 is always rejected). An all-zero residual max(p - q, 0)
means p_j == q_j; the acceptance probability is then 1, so the residual is drawn
with probability 0 and any choice keeps the sampler exact. Only a rounding-induced
(or, in tests, forced: u = 1) rejection reaches it; we then draw from p_j itself,
the distribution the step must produce, and never normalise a zero vector (no NaN).

Draft tokens must lie in [0, V); a token outside is treated as p = q = 0 (rejected).

Implementations: impl="xla" (below, vectorised jnp, the CPU path) and impl="pallas"
(rejection_pallas.py, Mosaic on TPU, Triton on GPU, the interpreter on CPU); "auto"
picks per platform when lowering. Both read the logits once for the normalisers
and then only the row at the position where the final token is drawn.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bebop_jax import sampling

from bebop_jax.decode import rejection_pallas
from bebop_jax.decode.rejection_common import (IMPLS, METHODS, assemble_tokens, draw_randomness,  # noqa: F401
                                               noise_size, validate_rejection_inputs, vocab_view)


def _lse(raw_BxKxV, transform):
    """logsumexp over V of transform(raw); NaN-free for all -inf rows (gives -inf).

    The max is taken on the raw logits (exact for bf16, and transform is monotone), so
    the only pass that converts to float32 is the sum, where the convert fuses.
    """
    m = transform(jnp.max(raw_BxKxV, axis=-1))
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    s = jnp.sum(jnp.exp(transform(raw_BxKxV) - m_safe[..., None]), axis=-1)
    return m_safe + jnp.log(s)


def _row_at(x_BxKxV, pos_B):
    """x[b, pos[b], :] -> [B, V] (reads only that row)."""
    return jnp.take_along_axis(x_BxKxV, pos_B[:, None, None], axis=1)[:, 0, :]


def _take(x, index_fn):
    """index_fn(x) (a gather) done on the bits of a non-float32 x. Otherwise XLA moves
    the later float32 convert in front of the gather, shares it with the normaliser pass
    and materialises a float32 copy of all the logits (1.5x slower for bf16 on CPU)."""
    if x.dtype == jnp.float32:
        return index_fn(x)
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    return jax.lax.bitcast_convert_type(index_fn(bits), x.dtype)


def _first_argmax(score_BxV):
    return jnp.argmax(score_BxV, axis=-1).astype(jnp.int32)


def _count_leading(accept_BxK):
    return jnp.sum(jnp.cumprod(accept_BxK.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)


def _xla_path(target_logits, draft_logits, draft_tokens, uniforms_BxK, gumbel_BxN, *,
              temperature, top_k, top_p, method):
    """Vectorised jnp implementation: reads the logits once for the normalisers and the
    values at the draft tokens, then only the row where the final token is drawn."""
    b, k1, v = target_logits.shape
    k = k1 - 1
    rejection_draft = method == "rejection"
    if temperature != 0 and sampling.is_filtering(top_k, top_p, v):
        # top-k / top-p need a sort: materialise the processed logits (float32).
        target = sampling.process_logits(target_logits, temperature, top_k, top_p)
        draft = (sampling.process_logits(draft_logits, temperature, top_k, top_p)
                 if rejection_draft else None)
        transform = lambda x: x
    else:
        # Elementwise only: keep the raw logits and apply sampling.scale_logits where they
        # are read, so bf16 inputs are never converted into a float32 copy.
        target, draft = target_logits, draft_logits
        transform = functools.partial(sampling.scale_logits, temperature=temperature)
    tokens_BxK = draft_tokens.astype(jnp.int32)
    valid_BxK = (tokens_BxK >= 0) & (tokens_BxK < v)
    safe_tokens_BxK = jnp.clip(tokens_BxK, 0, v - 1)

    def at_tokens(x_BxKxV):  # logits at the draft tokens, -inf for invalid tokens
        got = _take(x_BxKxV, lambda y: jnp.take_along_axis(
            y[:, :k], safe_tokens_BxK[..., None], axis=-1)[..., 0])
        return jnp.where(valid_BxK, transform(got), -jnp.inf)

    if temperature == 0:
        argmax_BxK1 = _first_argmax(target)
        num_accepted_B = _count_leading((argmax_BxK1[:, :k] == tokens_BxK) & valid_BxK)
        final_B = jnp.take_along_axis(argmax_BxK1, num_accepted_B[:, None], axis=1)[:, 0]
        return assemble_tokens(tokens_BxK, num_accepted_B, final_B), num_accepted_B

    lse_p_BxK1 = _lse(target, transform)
    p_BxK = jnp.exp(at_tokens(target) - lse_p_BxK1[:, :k])
    if rejection_draft:
        lse_q_BxK = _lse(draft, transform)
        q_BxK = jnp.exp(at_tokens(draft) - lse_q_BxK)
        accept_BxK = uniforms_BxK * q_BxK < p_BxK
    else:
        accept_BxK = uniforms_BxK < p_BxK
    num_accepted_B = _count_leading(accept_BxK)

    # Second read: only the row at the position where the final token is drawn, reduced
    # to block masses right away (nothing [B, V]-sized is kept), then one block of L
    # logits per row for the lane. Residual weights w; p itself for the bonus (n == K)
    # and for an empty residual (p == q, see module doc).
    rows, lanes = vocab_view(v)
    n_B = num_accepted_B
    pos_B = jnp.minimum(n_B, k - 1)
    x_B = jnp.take_along_axis(tokens_BxK, pos_B[:, None], axis=1)[:, 0]
    lse_p_B = jnp.take_along_axis(lse_p_BxK1, n_B[:, None], axis=1)[:, 0]
    if rejection_draft:
        lse_q_B = jnp.take_along_axis(lse_q_BxK, pos_B[:, None], axis=1)[:, 0]

    def weights(t_Bx_, d_Bx_, vocab_index):
        """(log p, p, log w, w) from raw logits of row n (any trailing shape)."""
        expand = (slice(None),) + (None,) * (t_Bx_.ndim - 1)
        logp = transform(t_Bx_) - lse_p_B[expand]
        p = jnp.exp(logp)
        if rejection_draft:
            logq = transform(d_Bx_) - lse_q_B[expand]
            w = jnp.maximum(p - jnp.exp(logq), 0.0)
            return logp, p, jnp.log(w), w
        hit = vocab_index == x_B[expand]
        return logp, p, jnp.where(hit, -jnp.inf, logp), jnp.where(hit, 0.0, p)

    def row_n(x_BxKxV, pos):
        return _take(x_BxKxV, lambda y: _row_at(y, pos).reshape(b, rows, lanes))

    vocab_1xRxL = jnp.arange(v, dtype=jnp.int32).reshape(1, rows, lanes)
    _, p_BxRxL, _, w_BxRxL = weights(
        row_n(target, n_B), row_n(draft, pos_B) if rejection_draft else None, vocab_1xRxL)
    mass_p_BxR = jnp.sum(p_BxRxL, axis=-1)
    mass_w_BxR = jnp.sum(w_BxRxL, axis=-1)
    use_p_B = (n_B == k) | (jnp.max(mass_w_BxR, axis=-1) == 0)
    mass_BxR = jnp.where(use_p_B[:, None], mass_p_BxR, mass_w_BxR)
    g_block_BxR, g_lane_BxL = gumbel_BxN[:, :rows], gumbel_BxN[:, rows:]
    block_score_BxR = jnp.where(mass_BxR > 0, jnp.log(mass_BxR) + g_block_BxR, -jnp.inf)
    block_B = _first_argmax(block_score_BxR)

    def block_of(x_BxKxV, pos):  # [B, L]
        return _take(x_BxKxV,
                     lambda y: y.reshape(b, -1, rows, lanes)[jnp.arange(b), pos, block_B])

    lane_1xL = jnp.arange(lanes, dtype=jnp.int32)[None, :]
    logp_BxL, _, logw_BxL, _ = weights(
        block_of(target, n_B), block_of(draft, pos_B) if rejection_draft else None,
        block_B[:, None] * lanes + lane_1xL)
    lane_score_BxL = jnp.where(use_p_B[:, None], logp_BxL, logw_BxL) + g_lane_BxL
    final_B = block_B * lanes + _first_argmax(lane_score_BxL)
    return assemble_tokens(tokens_BxK, num_accepted_B, final_B), num_accepted_B


def _pallas_path(target_logits, draft_logits, draft_tokens, uniforms_BxK, gumbel_BxN, *,
                 temperature, top_k, top_p, method):
    """Top-k / top-p (if on) are applied here by the shared sampling function; the
    kernel then handles temperature, normalisers, acceptance and the final draw."""
    v = target_logits.shape[-1]
    if temperature != 0 and sampling.is_filtering(top_k, top_p, v):
        target_logits = sampling.process_logits(target_logits, temperature, top_k, top_p)
        if method == "rejection":
            draft_logits = sampling.process_logits(draft_logits, temperature, top_k, top_p)
        temperature = 1.0
    return rejection_pallas.rejection_pallas(
        target_logits, draft_logits, draft_tokens, uniforms_BxK, gumbel_BxN,
        temperature=temperature, method=method)


def _dispatch(target_logits, draft_logits, draft_tokens, uniforms_BxK, gumbel_BxN, *,
              temperature, top_k, top_p, method, impl):
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, method=method)
    args = (target_logits, draft_logits, draft_tokens, uniforms_BxK, gumbel_BxN)
    if impl == "xla":
        return _xla_path(*args, **kwargs)
    if impl == "pallas":
        return _pallas_path(*args, **kwargs)
    # auto: decided when lowering, so a CPU host lowering for TPU/GPU gets the kernel.
    return jax.lax.platform_dependent(
        *args,
        cpu=functools.partial(_xla_path, **kwargs),
        default=functools.partial(_pallas_path, **kwargs))


_STATIC = ("temperature", "top_k", "top_p", "method", "impl")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _with_noise_jit(target_logits, draft_logits, draft_tokens, uniforms_BxK, gumbel_BxN,
                    *, temperature, top_k, top_p, method, impl):
    return _dispatch(target_logits, draft_logits, draft_tokens, uniforms_BxK, gumbel_BxN,
                     temperature=temperature, top_k=top_k, top_p=top_p, method=method,
                     impl=impl)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _with_key_jit(target_logits, draft_logits, draft_tokens, key, *, temperature, top_k,
                  top_p, method, impl):
    b, k1, v = target_logits.shape
    uniforms_BxK, gumbel_BxN = draw_randomness(key, b, k1 - 1, v)
    return _dispatch(target_logits, draft_logits, draft_tokens, uniforms_BxK, gumbel_BxN,
                     temperature=temperature, top_k=top_k, top_p=top_p, method=method,
                     impl=impl)


def rejection_sample_with_noise(target_logits, draft_logits, draft_tokens,
                                uniforms, gumbel, *, temperature=1.0, top_k=0,
                                top_p=1.0, method="rejection", impl="auto"):
    """`rejection_sample` with its randomness given (see `draw_randomness`):
    uniforms [B, K] in [0, 1), gumbel [B, R + L] Gumbel(0, 1) noise (`noise_size`)."""
    validate_rejection_inputs(target_logits, draft_logits, draft_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p,
                              method=method, impl=impl)
    b, k1, v = jnp.shape(target_logits)
    if tuple(jnp.shape(uniforms)) != (b, k1 - 1):
        raise ValueError(f"uniforms must have shape [B, K] = {(b, k1 - 1)}, "
                         f"got {tuple(jnp.shape(uniforms))}")
    if tuple(jnp.shape(gumbel)) != (b, noise_size(v)):
        raise ValueError(f"gumbel must have shape [B, R + L] = {(b, noise_size(v))}, "
                         f"got {tuple(jnp.shape(gumbel))}")
    return _with_noise_jit(
        target_logits, draft_logits, draft_tokens,
        jnp.asarray(uniforms, jnp.float32), jnp.asarray(gumbel, jnp.float32),
        temperature=temperature, top_k=top_k, top_p=top_p, method=method, impl=impl)


def rejection_sample(target_logits, draft_logits, draft_tokens, key, *,
                     temperature=1.0, top_k=0, top_p=1.0, method="rejection",
                     impl="auto"):
    """Verifies K draft tokens per row in one call.

    Args:
        target_logits: [B, K+1, V] target logits at the K+1 verified positions.
        draft_logits: [B, K, V] logits of the draft distributions that proposed
            draft_tokens (ignored for method="greedy", but shape-checked).
        draft_tokens: [B, K] int draft tokens.
        key: PRNG key.
        temperature, top_k, top_p: applied to target and draft alike (see sampling.py).
        method: "rejection" (draft sampled from q) or "greedy" (draft = argmax q).
        impl: "xla", "pallas", or "auto" (pallas on GPU/TPU, xla on CPU).

    Returns:
        tokens [B, K+1] int32 padded with -1 (tokens[b, :num_accepted[b] + 1] are
        emitted) and num_accepted [B] int32 in [0, K].
    """
    validate_rejection_inputs(target_logits, draft_logits, draft_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p,
                              method=method, impl=impl)
    return _with_key_jit(
        target_logits, draft_logits, draft_tokens, key,
        temperature=temperature, top_k=top_k, top_p=top_p, method=method, impl=impl)
