"""How well a draft agrees with its target, from hidden states, without [N, V] logits.

With ``p = softmax(target_hidden @ lm_head / T)`` (the target, read through stop_gradient)
and ``q = softmax(draft_hidden @ lm_head / T)`` (the draft), per row:
- ``alpha = sum_v min(p_v, q_v) = 1 - TV(p, q)``, the rejection-sampling acceptance;
- ``kl = KL(p || q) = sum_v p_v (z^p_v - z^q_v) - lse_p + lse_q``;
- ``ce = -log q(label) = lse_q - z^q_label``;
and, as metrics without gradient, ``greedy_alpha = p(argmax q)`` (the acceptance of a greedy
draft), ``target_entropy = H(p)`` and ``accuracy = [argmax q == label]`` (argmax: the first
maximal column, as ``jnp.argmax``).

Forward: pass 1 over vocabulary chunks keeps both online log-sum-exps and
``sum exp(z^p - m_p) (z^p - z^q)``; pass 2 sums ``min(p, q)`` and ``S = sum_{q < p} q`` with
both normalisers known. Backward (gradient to ``draft_hidden``, and with ``head_grad`` to
the draft side's use of ``lm_head``; residuals: the inputs, ``lse_p``, ``lse_q`` and ``S``)
recomputes each chunk:
``dL/dz^q_v = g_alpha q_v ([q_v < p_v] - S) + g_kl (q_v - p_v) + g_ce (q_v - onehot_v)``.
Memory is O(N x chunk); sums in float32. ``impl="pallas"`` runs both passes and the backward as
Pallas sweeps (``ops.pallas_sweeps``) with the same per-chunk formulas.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bebop_jax.ops import pallas_sweeps as ps
from bebop_jax.ops.chunks import (OpSettings, check_inputs, chunk_logits, chunking, combine, local_ids,
                                   online_update, varying, vocab_shards, vocab_sum)

F32 = jnp.float32
BIG = jnp.iinfo(jnp.int32).max


def _pass1_step(carry, zp, zq, fresh, cols):
    """One chunk of pass 1: both online log-sum-exps, E_p[z^p - z^q] and E_p[z^p] unnormalised,
    and the first maximal draft column so far. Per-row values are [N] (XLA loop) or [N, 1] (kernel)."""
    mp, sp, sd, se, mq, sq, top = carry
    keep = mq.ndim == zq.ndim
    mp, sp, sd, se = online_update(mp, sp, zp, (sd, zp - jnp.where(fresh, zq, 0.0)), (se, zp))
    cmax = jnp.max(zq, axis=-1, keepdims=keep)
    first = jnp.min(jnp.where(zq == (cmax if keep else cmax[:, None]), cols, BIG), axis=-1, keepdims=keep)
    top = jnp.where(cmax > mq, first, top)  # strictly greater: an earlier chunk keeps a tie
    mq, sq = online_update(mq, sq, zq)
    return mp, sp, sd, se, mq, sq, top


def _pass1(th, dh, w, chunks, temperature, axis, kernel):
    """Per row: lse_p, lse_q, E_p[z^p - z^q], E_p[z^p], and the argmax of z^q (a global column id)."""
    if kernel is not None:
        def kbody(blocks, head, cols, fresh, carry):
            zp, zq = (chunk_logits(x, head, fresh, temperature) for x in blocks)
            return list(_pass1_step(carry, zp, zq, fresh, cols))

        inits = [(1, F32, -jnp.inf), (1, F32, 0.0), (1, F32, 0.0), (1, F32, 0.0), (1, F32, -jnp.inf),
                 (1, F32, 0.0), (1, jnp.int32, 0)]
        mp, sp, sd, se, mq, sq, top = (x[:, 0] for x in kernel.rows(kbody, [th, dh], w, inits))
    else:
        def body(i, carry):
            fresh, head = chunks.fresh(i), chunks.head(w, i)
            zp, zq = chunk_logits(th, head, fresh, temperature), chunk_logits(dh, head, fresh, temperature)
            return _pass1_step(carry, zp, zq, fresh, chunks.start(i) + jnp.arange(chunks.chunk, dtype=jnp.int32))

        n = th.shape[0]
        ninf, zero = jnp.full((n,), -jnp.inf, F32), jnp.zeros((n,), F32)
        init = (ninf, zero, zero, zero, ninf, zero, jnp.zeros((n,), jnp.int32))
        mp, sp, sd, se, mq, sq, top = jax.lax.fori_loop(0, chunks.num_chunks, body, varying(axis, init))
    if axis is not None:  # the first maximal column over all shards
        top = top + jax.lax.axis_index(axis) * w.shape[1]
        top = jax.lax.pmin(jnp.where(mq == jax.lax.pmax(mq, axis), top, BIG), axis)
    mp, sp, sd, se = combine(axis, mp, sp, sd, se)
    mq, sq = combine(axis, mq, sq)
    return mp + jnp.log(sp), mq + jnp.log(sq), sd / sp, se / sp, top


def _probs(th, dh, head, fresh, lse_p, lse_q, temperature):
    """(p, q) [N, C] of a chunk; ``lse_p`` / ``lse_q`` as [N, 1] columns."""
    return (jnp.exp(chunk_logits(th, head, fresh, temperature) - lse_p),
            jnp.exp(chunk_logits(dh, head, fresh, temperature) - lse_q))


def _pass2_step(carry, p, q):
    """One chunk of pass 2: sum min(p, q) and S = sum_{q < p} q (per-row values [N] or [N, 1])."""
    keep = carry[0].ndim == p.ndim
    return [carry[0] + jnp.sum(jnp.minimum(p, q), axis=-1, keepdims=keep),
            carry[1] + jnp.sum(jnp.where(q < p, q, 0.0), axis=-1, keepdims=keep)]


def _pass2(th, dh, w, chunks, temperature, lse_p, lse_q, axis, kernel):
    if kernel is not None:
        kbody = lambda blocks, head, cols, fresh, carry: _pass2_step(carry, *_probs(*blocks[:2], head, fresh,
                                                                                    *blocks[2:4], temperature))
        rows = [th, dh, lse_p[:, None], lse_q[:, None]]
        return tuple(vocab_sum(axis, x[:, 0]) for x in kernel.rows(kbody, rows, w, [(1, F32, 0.0)] * 2))

    def body(i, carry):
        return tuple(_pass2_step(carry, *_probs(th, dh, chunks.head(w, i), chunks.fresh(i), lse_p[:, None],
                                                lse_q[:, None], temperature)))

    zero = jnp.zeros((th.shape[0],), F32)
    return tuple(vocab_sum(axis, x) for x in jax.lax.fori_loop(0, chunks.num_chunks, body, varying(axis, (zero, zero))))


def _dz(p, q, s, g_a, g_kl, g_ce):
    """dL/dz^q of a chunk but for the one-hot term of ce (all [rows, 1] but p, q)."""
    return g_a * q * (jnp.where(q < p, 1.0, 0.0) - s) + g_kl * (q - p) + g_ce * q


def _logit_at(hidden, w, ids, temperature, axis):
    """[N] (hidden @ lm_head / T) at one global column id per row."""
    local, held = local_ids(axis, ids, w.shape[1])
    z = jnp.einsum("nh,hn->n", hidden, jnp.take(w, local, axis=1), preferred_element_type=jnp.float32) / temperature
    return vocab_sum(axis, jnp.where(held, z, 0.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _agreement(target_hidden, draft_hidden, lm_head, labels, st: OpSettings, head_grad: bool):
    return _fwd(target_hidden, draft_hidden, lm_head, labels, st, head_grad)[0]


def _fwd(target_hidden, draft_hidden, lm_head, labels, st: OpSettings, head_grad: bool):
    def core(target_hidden, draft_hidden, lm_head, labels, axis):
        temperature = st.temperature
        chunks = chunking(lm_head.shape[1], st.chunk)
        lse_p, lse_q, mean_gap, mean_zp, top = _pass1(target_hidden, draft_hidden, lm_head, chunks, temperature,
                                                      axis, st.kernel)
        alpha, s = _pass2(target_hidden, draft_hidden, lm_head, chunks, temperature, lse_p, lse_q, axis, st.kernel)
        out = {"alpha": alpha, "kl": mean_gap - lse_p + lse_q,
               "ce": lse_q - _logit_at(draft_hidden, lm_head, labels, temperature, axis),
               "greedy_alpha": jnp.exp(_logit_at(target_hidden, lm_head, top, temperature, axis) - lse_p),
               "target_entropy": lse_p - mean_zp,
               "accuracy": (top == labels).astype(jnp.float32)}
        return out, (lse_p, lse_q, s)

    out, stats = st.run(core, "rrvr", (dict.fromkeys(OUTPUTS, "r"), ("r",) * 3))(
        target_hidden, draft_hidden, lm_head, labels)
    return out, (target_hidden, draft_hidden, lm_head, labels, *stats)


def _bwd(st: OpSettings, head_grad: bool, res, grads):
    g_a, g_kl, g_ce = (grads[k].astype(jnp.float32) for k in ("alpha", "kl", "ce"))
    d_dh, d_w = st.run(functools.partial(_bwd_core, st, head_grad), "rrvrrrrrrr", ("r", "v"))(*res, g_a, g_kl, g_ce)
    return jnp.zeros_like(res[0]), d_dh, d_w, None


def _bwd_core(st: OpSettings, head_grad: bool, th, dh, w, labels, lse_p, lse_q, s, g_a, g_kl, g_ce, axis):
    temperature, kernel = st.temperature, st.kernel
    chunks = chunking(w.shape[1], st.chunk)
    dh32 = dh.astype(jnp.float32)

    if kernel is not None:
        rows = [th, dh] + [x[:, None] for x in (lse_p, lse_q, s, g_a, g_kl, g_ce)]

        def dz_of(blocks, head, fresh):
            return _dz(*_probs(*blocks[:2], head, fresh, *blocks[2:4], temperature), *blocks[4:])

        def dh_body(blocks, head, cols, fresh, carry):
            return [carry[0] + ps.rows_times_head_t(dz_of(blocks, head, fresh), head) / temperature]

        (d_dh,) = kernel.rows(dh_body, rows, w, [(dh.shape[1], F32, 0.0)])
        d_w = kernel.cols(lambda blocks, head, cols, fresh: ps.hidden_t_times(blocks[1], dz_of(blocks, head, fresh))
                          / temperature, rows, w) if head_grad else None
    else:
        def body(i, carry):
            d_dh, d_w = carry
            head = chunks.head(w, i)
            fresh = chunks.fresh(i)
            p, q = _probs(th, dh, head, fresh, lse_p[:, None], lse_q[:, None], temperature)
            dz = _dz(p, q, s[:, None], g_a[:, None], g_kl[:, None], g_ce[:, None])
            if head_grad:
                d_w = chunks.add_to(d_w, jnp.dot(dh32.T, dz) / temperature, i)
            return d_dh + jnp.dot(dz, head.T.astype(jnp.float32)) / temperature, d_w

        init = (jnp.zeros(dh.shape, jnp.float32), jnp.zeros(w.shape if head_grad else (0,), jnp.float32))
        d_dh, d_w = jax.lax.fori_loop(0, chunks.num_chunks, body, varying(axis, init))
    local, held = local_ids(axis, labels, w.shape[1])
    g_held = jnp.where(held, g_ce, 0.0)
    d_dh = vocab_sum(axis, d_dh - g_held[:, None] * jnp.take(w, local, axis=1).astype(jnp.float32).T / temperature)
    d_w = d_w.at[:, local].add(-dh32.T * g_held[None, :] / temperature).astype(w.dtype) if head_grad else jnp.zeros_like(w)
    return d_dh.astype(dh.dtype), d_w


_agreement.defvjp(_fwd, _bwd)


OUTPUTS = ("alpha", "kl", "ce", "greedy_alpha", "target_entropy", "accuracy")


def draft_agreement(target_hidden, draft_hidden, lm_head, labels, *, temperature: float = 1.0,
                    chunk_size: int | None = None, impl: str = "auto", mesh=None, head_grad: bool = False,
                    interpret: str | None = None) -> dict:
    """``{"alpha", "kl", "ce"}``, each float32 [N]: ``sum_v min(p, q)``, ``KL(p || q)`` and
    ``-log q(label)`` for ``p = softmax(target_hidden @ lm_head / T)`` and ``q = softmax(draft_hidden
    @ lm_head / T)``, over vocabulary chunks (never [N, V] logits); plus the metrics
    ``greedy_alpha``, ``target_entropy`` and ``accuracy`` (no gradient). The target side is read
    through stop_gradient, and so is ``lm_head`` unless ``head_grad`` (joint training, where the
    draft's gradient also trains the shared LM head): gradients reach ``draft_hidden`` (and
    the head). With ``mesh``, the LM head is split along V over its model axis; ``impl`` and
    ``interpret`` as in ``token_logprobs``."""
    target_hidden, draft_hidden = jnp.asarray(target_hidden), jnp.asarray(draft_hidden)
    lm_head, labels = jnp.asarray(lm_head), jnp.asarray(labels)
    check_inputs("draft_agreement", {"target_hidden": target_hidden, "draft_hidden": draft_hidden}, lm_head,
                 {"labels": labels}, temperature=temperature, chunk_size=chunk_size, impl=impl, interpret=interpret)
    vocab_shards(mesh, lm_head.shape[1], "draft_agreement")
    st = OpSettings(float(temperature), chunk_size, ps.kernel_for(impl, chunk_size, interpret), mesh)
    out = _agreement(jax.lax.stop_gradient(target_hidden), draft_hidden,
                     lm_head if head_grad else jax.lax.stop_gradient(lm_head), labels.astype(jnp.int32), st,
                     bool(head_grad))
    return {k: v if k in ("alpha", "kl", "ce") else jax.lax.stop_gradient(v) for k, v in out.items()}


def draft_agreement_reference(target_hidden, draft_hidden, lm_head, labels, *, temperature: float = 1.0,
                              head_grad: bool = False) -> dict:
    """The dense formulas, [N, V] logits and all: what ``draft_agreement`` must equal."""
    draft_head = lm_head if head_grad else jax.lax.stop_gradient(lm_head)
    zp = jnp.dot(jax.lax.stop_gradient(target_hidden), jax.lax.stop_gradient(lm_head),
                 preferred_element_type=jnp.float32) / temperature
    zq = jnp.dot(draft_hidden, draft_head, preferred_element_type=jnp.float32) / temperature
    logp, logq = jax.nn.log_softmax(zp, axis=-1), jax.nn.log_softmax(zq, axis=-1)
    p, q = jnp.exp(logp), jnp.exp(logq)
    top = jnp.argmax(zq, axis=-1)
    return {"alpha": jnp.sum(jnp.minimum(p, q), axis=-1),
            "kl": jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1),
            "ce": -jnp.take_along_axis(logq, labels[:, None], axis=-1)[:, 0],
            "greedy_alpha": jax.lax.stop_gradient(jnp.take_along_axis(p, top[:, None], axis=-1)[:, 0]),
            "target_entropy": -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1),
            "accuracy": jax.lax.stop_gradient((top == labels).astype(jnp.float32))}
