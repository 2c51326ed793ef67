"""Log-probability of given tokens and entropy, from hidden states, without [N, V] logits.

With ``z = hidden @ lm_head / T`` and ``p = softmax(z)``:
``logp[n] = z[n, token[n]] - lse[n]`` and ``entropy[n] = lse[n] - sum_v p[n, v] z[n, v]``.

Forward: one pass over vocabulary chunks keeps, per row, the running max, ``sum exp(z - m)``
and ``sum exp(z - m) z`` (an online log-sum-exp), so memory is O(N x chunk). Backward
(a hand-written VJP whose residuals are the inputs and the per-row ``lse`` and ``E_p[z]``)
recomputes each chunk's logits:
``dL/dz_v = g_logp (onehot_v - p_v) - g_ent p_v (z_v - E_p[z])``, then
``dL/dhidden = dL/dz @ lm_head^T / T`` and ``dL/dlm_head = hidden^T @ dL/dz / T`` chunk by
chunk. Sums run in float32 whatever the input dtype; gradients come back in the inputs' dtypes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bebop_jax.ops.chunks import (check_inputs, chunk_logits, chunking, combine, local_ids, on_vocab_shards,
                                   online_update, varying, vocab_sum)


def _stats(hidden_NxH, lm_head_HxV, chunks, temperature, axis):
    """Per row: lse and E_p[z] of z = hidden @ lm_head / T, in one pass over the chunks."""
    n = hidden_NxH.shape[0]

    def body(i, carry):
        fresh = chunks.fresh(i)
        z = chunk_logits(hidden_NxH, chunks.head(lm_head_HxV, i), fresh, temperature)
        return tuple(online_update(*carry[:2], z, (carry[2], z)))

    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    m, s, sz = combine(axis, *jax.lax.fori_loop(0, chunks.num_chunks, body, varying(axis, init)))
    return m + jnp.log(s), sz / s


def _token_logit(hidden_NxH, lm_head_HxV, tokens_N, temperature, axis):
    local, held = local_ids(axis, tokens_N, lm_head_HxV.shape[1])
    cols_HxN = jnp.take(lm_head_HxV, local, axis=1)
    z = jnp.einsum("nh,hn->n", hidden_NxH, cols_HxN, preferred_element_type=jnp.float32) / temperature
    return vocab_sum(axis, jnp.where(held, z, 0.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _token_logprobs(hidden_NxH, lm_head_HxV, tokens_N, temperature, chunk, axis):
    out, _ = _fwd(hidden_NxH, lm_head_HxV, tokens_N, temperature, chunk, axis)
    return out


def _fwd(hidden_NxH, lm_head_HxV, tokens_N, temperature, chunk, axis):
    chunks = chunking(lm_head_HxV.shape[1], chunk)
    lse, mean_z = _stats(hidden_NxH, lm_head_HxV, chunks, temperature, axis)
    logp = _token_logit(hidden_NxH, lm_head_HxV, tokens_N, temperature, axis) - lse
    return (logp, lse - mean_z), (hidden_NxH, lm_head_HxV, tokens_N, lse, mean_z)


def _bwd(temperature, chunk, axis, res, grads):
    hidden_NxH, lm_head_HxV, tokens_N, lse, mean_z = res
    g_logp, g_ent = (g.astype(jnp.float32) for g in grads)
    chunks = chunking(lm_head_HxV.shape[1], chunk)
    h32 = hidden_NxH.astype(jnp.float32)

    def body(i, carry):
        dh, dw = carry
        head = chunks.head(lm_head_HxV, i)
        fresh = chunks.fresh(i)
        z = chunk_logits(hidden_NxH, head, fresh, temperature)
        p = jnp.exp(z - lse[:, None])                                      # 0 on masked columns
        dz = -g_logp[:, None] * p - g_ent[:, None] * p * jnp.where(fresh[None, :], z - mean_z[:, None], 0.0)
        dh = dh + jnp.dot(dz, head.T.astype(jnp.float32)) / temperature
        dw = chunks.add_to(dw, jnp.dot(h32.T, dz) / temperature, i)
        return dh, dw

    init = (jnp.zeros(hidden_NxH.shape, jnp.float32), jnp.zeros(lm_head_HxV.shape, jnp.float32))
    dh, dw = jax.lax.fori_loop(0, chunks.num_chunks, body, varying(axis, init))
    # the one-hot part of d logp / dz: + g_logp at each row's token
    local, held = local_ids(axis, tokens_N, lm_head_HxV.shape[1])
    g_held = jnp.where(held, g_logp, 0.0)
    cols_HxN = jnp.take(lm_head_HxV, local, axis=1).astype(jnp.float32)
    dh = vocab_sum(axis, dh + g_held[:, None] * cols_HxN.T / temperature)
    dw = dw.at[:, local].add(h32.T * g_held[None, :] / temperature)
    return dh.astype(hidden_NxH.dtype), dw.astype(lm_head_HxV.dtype), None


_token_logprobs.defvjp(_fwd, _bwd)


def token_logprobs(hidden, lm_head, tokens, *, temperature: float = 1.0, chunk_size: int | None = None,
                   impl: str = "auto", mesh=None):
    """(logp [N], entropy [N]) float32: log softmax(hidden @ lm_head / T) at ``tokens`` and the
    entropy of that softmax, computed over vocabulary chunks of ``chunk_size`` columns (default
    ``ops.chunks.DEFAULT_CHUNK``), never as [N, V] logits. ``hidden`` [N, H] (any float dtype),
    ``lm_head`` [H, V], ``tokens`` int [N] in [0, V). Differentiable w.r.t. hidden and lm_head.
    With ``mesh`` whose model axis has n > 1 devices, the LM head is split along V over it: each
    device walks its own V / n columns and the per-row maxima and sums are combined across the
    axis (same values and gradients as one device)."""
    hidden, lm_head, tokens = jnp.asarray(hidden), jnp.asarray(lm_head), jnp.asarray(tokens)
    check_inputs("token_logprobs", {"hidden": hidden}, lm_head, {"tokens": tokens},
                 temperature=temperature, chunk_size=chunk_size, impl=impl)
    core = lambda h, w, t, axis: _token_logprobs(h, w, t, float(temperature), chunk_size, axis)
    run = on_vocab_shards(core, mesh, 1, (None, None), lm_head.shape[1], "token_logprobs")
    return run(hidden, lm_head, tokens.astype(jnp.int32))


def token_logprobs_reference(hidden, lm_head, tokens, *, temperature: float = 1.0):
    """The dense formula, [N, V] logits and all: what ``token_logprobs`` must equal."""
    z = jnp.dot(hidden, lm_head, preferred_element_type=jnp.float32) / temperature
    logp_all = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens[:, None], axis=-1)[:, 0]
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
