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

from bebop_jax.ops import pallas_sweeps as ps
from bebop_jax.ops.chunks import (OpSettings, check_inputs, chunk_logits, chunking, combine, local_ids,
                                   online_update, varying, vocab_shards, vocab_sum)

F32 = jnp.float32


def _stats(hidden_NxH, lm_head_HxV, chunks, temperature, axis, kernel):
    """Per row: lse and E_p[z] of z = hidden @ lm_head / T, in one pass over the chunks."""
    n = hidden_NxH.shape[0]
    if kernel is not None:
        def body(blocks, head, cols, fresh, carry):
            z = chunk_logits(blocks[0], head, fresh, temperature)
            return online_update(carry[0], carry[1], z, (carry[2], z))

        m, s, sz = (x[:, 0] for x in kernel.rows(body, [hidden_NxH], lm_head_HxV,
                                                   [(1, F32, -jnp.inf), (1, F32, 0.0), (1, F32, 0.0)]))
        m, s, sz = combine(axis, m, s, sz)
        return m + jnp.log(s), sz / s

    def body(i, carry):
        fresh = chunks.fresh(i)
        z = chunk_logits(hidden_NxH, chunks.head(lm_head_HxV, i), fresh, temperature)
        return tuple(online_update(*carry[:2], z, (carry[2], z)))

    init = (jnp.full((n,), -jnp.inf, F32), jnp.zeros((n,), F32), jnp.zeros((n,), F32))
    m, s, sz = combine(axis, *jax.lax.fori_loop(0, chunks.num_chunks, body, varying(axis, init)))
    return m + jnp.log(s), sz / s


def _token_logit(hidden_NxH, lm_head_HxV, tokens_N, temperature, axis):
    local, held = local_ids(axis, tokens_N, lm_head_HxV.shape[1])
    cols_HxN = jnp.take(lm_head_HxV, local, axis=1)
    z = jnp.einsum("nh,hn->n", hidden_NxH, cols_HxN, preferred_element_type=jnp.float32) / temperature
    return vocab_sum(axis, jnp.where(held, z, 0.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _token_logprobs(hidden_NxH, lm_head_HxV, tokens_N, st: OpSettings):
    return _fwd(hidden_NxH, lm_head_HxV, tokens_N, st)[0]


def _fwd(hidden_NxH, lm_head_HxV, tokens_N, st: OpSettings):
    def core(hidden_NxH, lm_head_HxV, tokens_N, axis):
        chunks = chunking(lm_head_HxV.shape[1], st.chunk)
        lse, mean_z = _stats(hidden_NxH, lm_head_HxV, chunks, st.temperature, axis, st.kernel)
        logp = _token_logit(hidden_NxH, lm_head_HxV, tokens_N, st.temperature, axis) - lse
        return logp, lse - mean_z, lse, mean_z

    logp, ent, lse, mean_z = st.run(core, "rvr", ("r",) * 4)(hidden_NxH, lm_head_HxV, tokens_N)
    return (logp, ent), (hidden_NxH, lm_head_HxV, tokens_N, lse, mean_z)


def _dz(z, fresh, lse, mean_z, g_logp, g_ent):
    """dL/dz of a chunk but for the one-hot term (0 on columns that are not fresh)."""
    p = jnp.exp(z - lse)
    return -g_logp * p - g_ent * p * jnp.where(fresh, z - mean_z, 0.0)


def _grads_pallas(hidden_NxH, lm_head_HxV, lse, mean_z, g_logp, g_ent, temperature, kernel):
    rows = [hidden_NxH, lse[:, None], mean_z[:, None], g_logp[:, None], g_ent[:, None]]

    def dz_of(blocks, head, fresh):
        h, lse_b, mz, gl, ge = blocks
        return _dz(chunk_logits(h, head, fresh, temperature), fresh, lse_b, mz, gl, ge)

    def dh_body(blocks, head, cols, fresh, carry):
        return [carry[0] + ps.rows_times_head_t(dz_of(blocks, head, fresh), head) / temperature]

    def dw_body(blocks, head, cols, fresh):
        return ps.hidden_t_times(blocks[0], dz_of(blocks, head, fresh)) / temperature

    (dh,) = kernel.rows(dh_body, rows, lm_head_HxV, [(hidden_NxH.shape[1], F32, 0.0)])
    return dh, kernel.cols(dw_body, rows, lm_head_HxV)


def _bwd(st: OpSettings, res, grads):
    g_logp, g_ent = (g.astype(F32) for g in grads)
    dh, dw = st.run(functools.partial(_bwd_core, st), "rvrrrrr", ("r", "v"))(*res, g_logp, g_ent)
    return dh, dw, None


def _bwd_core(st: OpSettings, hidden_NxH, lm_head_HxV, tokens_N, lse, mean_z, g_logp, g_ent, axis):
    temperature, kernel = st.temperature, st.kernel
    chunks = chunking(lm_head_HxV.shape[1], st.chunk)
    h32 = hidden_NxH.astype(F32)

    if kernel is not None:
        dh, dw = _grads_pallas(hidden_NxH, lm_head_HxV, lse, mean_z, g_logp, g_ent, temperature, kernel)
    else:
        def body(i, carry):
            dh, dw = carry
            head = chunks.head(lm_head_HxV, i)
            fresh = chunks.fresh(i)
            z = chunk_logits(hidden_NxH, head, fresh, temperature)
            dz = _dz(z, fresh[None, :], lse[:, None], mean_z[:, None], g_logp[:, None], g_ent[:, None])
            dh = dh + jnp.dot(dz, head.T.astype(F32)) / temperature
            dw = chunks.add_to(dw, jnp.dot(h32.T, dz) / temperature, i)
            return dh, dw

        init = (jnp.zeros(hidden_NxH.shape, F32), jnp.zeros(lm_head_HxV.shape, F32))
        dh, dw = jax.lax.fori_loop(0, chunks.num_chunks, body, varying(axis, init))
    # the one-hot part of d logp / dz: + g_logp at each row's token
    local, held = local_ids(axis, tokens_N, lm_head_HxV.shape[1])
    g_held = jnp.where(held, g_logp, 0.0)
    cols_HxN = jnp.take(lm_head_HxV, local, axis=1).astype(F32)
    dh = vocab_sum(axis, dh + g_held[:, None] * cols_HxN.T / temperature)
    dw = dw.at[:, local].add(h32.T * g_held[None, :] / temperature)
    return dh.astype(hidden_NxH.dtype), dw.astype(lm_head_HxV.dtype)


_token_logprobs.defvjp(_fwd, _bwd)


def token_logprobs(hidden, lm_head, tokens, *, temperature: float = 1.0, chunk_size: int | None = None,
                   impl: str = "auto", mesh=None, interpret: str | None = None):
    """(logp [N], entropy [N]) float32: log softmax(hidden @ lm_head / T) at ``tokens`` and the
    entropy of that softmax, computed over vocabulary chunks of ``chunk_size`` columns (default
    ``ops.chunks.DEFAULT_CHUNK``), never as [N, V] logits. ``hidden`` [N, H] (any float dtype),
    ``lm_head`` [H, V], ``tokens`` int [N] in [0, V). Differentiable w.r.t. hidden and lm_head.
    With ``mesh`` whose model axis has n > 1 devices, the LM head is split along V over it: each
    device walks its own V / n columns and the per-row maxima and sums are combined across the
    axis (same values and gradients as one device). ``impl``: "xla" (and "auto") loops in XLA,
    "pallas" runs the Pallas kernels (``chunk_size`` then rounds down to a power of two; see
    ``ops.pallas_sweeps.kernel_for``; ``interpret`` "grid" | "loop" runs a kernel structure in the
    Pallas interpreter, as the tests do on CPU)."""
    hidden, lm_head, tokens = jnp.asarray(hidden), jnp.asarray(lm_head), jnp.asarray(tokens)
    check_inputs("token_logprobs", {"hidden": hidden}, lm_head, {"tokens": tokens},
                 temperature=temperature, chunk_size=chunk_size, impl=impl, interpret=interpret)
    vocab_shards(mesh, lm_head.shape[1], "token_logprobs")
    st = OpSettings(float(temperature), chunk_size, ps.kernel_for(impl, chunk_size, interpret), mesh)
    return _token_logprobs(hidden, lm_head, tokens.astype(jnp.int32), st)


def token_logprobs_reference(hidden, lm_head, tokens, *, temperature: float = 1.0):
    """The dense formula, [N, V] logits and all: what ``token_logprobs`` must equal."""
    z = jnp.dot(hidden, lm_head, preferred_element_type=jnp.float32) / temperature
    logp_all = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(logp_all, tokens[:, None], axis=-1)[:, 0]
    return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
