"""Pallas kernel for speculative rejection sampling (semantics: bebop_jax/decode/rejection.py).

One program per batch row (grid = (B,)). The row's vocabulary axis is viewed as
[R, L] (L = the largest power of two <= 128 dividing V, a free reshape) and walked
in chunks of `BlockSizes.chunk_rows` rows:
  pass 1 reads every target and draft position once: online max / sum-exp
    normalisers, the logits at the draft tokens (or the running argmax when
    temperature == 0), from which the number of accepted drafts n follows;
  pass 2 reads only position n (target, and draft for method="rejection") and
    runs the two-level Gumbel-max draw of rejection.py over the residual (or bonus)
    weights, block by block, alongside the same draw from p itself for the
    empty-residual fallback.
The kernel handles temperature (sampling.scale_logits on each loaded chunk);
top-k / top-p, when on, are applied before the kernel by the shared sampling
function (rejection.py), which hands the kernel processed logits and temperature 1.

The per-row block is the whole [K+1, V] target (and [K, V] draft) row: on TPU it is
DMA'd to VMEM (HBM read once; vmem_limit_bytes is raised to fit it double-buffered,
~12 MB for K=4, V=151,936, f32), on GPU (Triton) the refs stay in global memory and
only the loads in the two passes touch it. Chunks and the tail of R are loaded in
power-of-two row counts, so Triton needs no masks. Randomness (uniforms, Gumbel) is
drawn outside and passed in, so kernel, reference and XLA path agree token for token.

Small per-row inputs/outputs travel as [B, 1, 128] lane vectors: draft tokens and
uniforms in lanes 0..K-1; the output holds the final token in lane 0 and n in lane 1.
The Gumbel noise [B, R + L] is split into block noise [B, R, 1] and lane noise [B, 1, L].
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from bebop_jax import sampling
from bebop_jax.decode.rejection_common import assemble_tokens, noise_size, validate_rejection_inputs, vocab_view

LANES = 128  # width of the small per-row in/out vectors
_BIG_INDEX = 2**31 - 1
_NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """chunk_rows: rows of the [R, L] vocabulary view per loop step (power of two)."""

    chunk_rows: int = 32

    def __post_init__(self):
        r = self.chunk_rows
        if not isinstance(r, int) or r < 1 or r & (r - 1):
            raise ValueError(f"chunk_rows must be a positive power of two, got {r!r}")


def _chunk_plan(rows: int, chunk_rows: int):
    """(number of full chunks, [(static row offset, rows)] power-of-two tail pieces)."""
    num_full = rows // chunk_rows
    pieces, offset, rest = [], num_full * chunk_rows, rows % chunk_rows
    size = chunk_rows // 2
    while size:
        if rest & size:
            pieces.append((offset, size))
            offset += size
        size //= 2
    return num_full, pieces


# ----------------------------------------------------------------------------- kernel


def _rmax(x):  # [r, c] -> [1, 1]
    return jnp.max(jnp.max(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _rmin(x):
    return jnp.min(jnp.min(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _rsum(x):
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _lane(vec_1xN, j):
    """Element j of a [1, 128] vector as a [1, 1] vector (exact: adds zeros)."""
    lane_1xN = jax.lax.broadcasted_iota(jnp.int32, vec_1xN.shape, 1)
    return jnp.sum(jnp.where(lane_1xN == j, vec_1xN, jnp.zeros_like(vec_1xN)), axis=1,
                   keepdims=True)


def _argmax_update(best, best_idx, score, idx):
    """Running first-argmax: a later chunk wins only if strictly larger."""
    cmax = _rmax(score)
    cidx = _rmin(jnp.where(score == cmax, idx, _BIG_INDEX))
    better = cmax > best
    return jnp.where(better, cmax, best), jnp.where(better, cidx, best_idx)


def _rejection_kernel(tokens_ref, uniforms_ref, target_ref, *refs, num_draft, rows,
                      lanes, chunk_rows, temperature, method):
    """One batch row. tokens/uniforms/out: [1, 128]; target [K+1, R, L];
    draft [K, R, L] (rejection, temperature > 0); block noise [R, 1] and lane noise
    [1, L] (temperature > 0)."""
    k = num_draft
    greedy_target = temperature == 0
    use_draft = method == "rejection" and not greedy_target
    refs = list(refs)
    draft_ref = refs.pop(0) if use_draft else None
    g_block_ref, g_lane_ref = (None, None) if greedy_target else (refs.pop(0), refs.pop(0))
    (out_ref,) = refs

    tokens_1xN = tokens_ref[...]
    uniforms_1xN = uniforms_ref[...]
    tok = [_lane(tokens_1xN, j) for j in range(k)]  # [1, 1] int32 each
    num_full, tail = _chunk_plan(rows, chunk_rows)

    def load(ref, j, r0, size):  # [size, L] float32, temperature applied
        return sampling.scale_logits(ref[j, pl.ds(r0, size), :], temperature)

    def vocab_index(r0, size):
        row = jax.lax.broadcasted_iota(jnp.int32, (size, lanes), 0)
        col = jax.lax.broadcasted_iota(jnp.int32, (size, lanes), 1)
        return (row + r0) * lanes + col

    def walk(update, state):
        """Applies update(state, r0, size) over the full chunks and the tail pieces."""
        def body(i, state):
            r0 = pl.multiple_of(i * chunk_rows, chunk_rows)
            return update(state, r0, chunk_rows)
        if num_full:
            state = jax.lax.fori_loop(0, num_full, body, state)
        for r0, size in tail:
            state = update(state, r0, size)
        return state

    def f32(value):
        return jnp.full((1, 1), value, jnp.float32)

    def i32(value):
        return jnp.full((1, 1), value, jnp.int32)

    # ---- pass 1: normalisers / argmax over every position
    if greedy_target:
        def update1(state, r0, size):
            idx = vocab_index(r0, size)
            return tuple(_argmax_update(*state[j], load(target_ref, j, r0, size), idx)
                         for j in range(k + 1))
        stats = walk(update1, tuple((f32(_NEG_INF), i32(0)) for _ in range(k + 1)))
        argmax = [s[1] for s in stats]
    else:
        def lse_update(m, s, x):
            m_new = jnp.maximum(m, _rmax(x))
            m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
            return m_new, s * jnp.exp(m - m_safe) + _rsum(jnp.exp(x - m_safe))

        def rows_update(ref, state, r0, size, idx, num_rows):
            new = []
            for j in range(num_rows):
                m, s, at_tok = state[j]
                x = load(ref, j, r0, size)
                m, s = lse_update(m, s, x)
                if j < k:
                    at_tok = jnp.maximum(at_tok, _rmax(jnp.where(idx == tok[j], x, _NEG_INF)))
                new.append((m, s, at_tok))
            return tuple(new)

        def update1(state, r0, size):
            idx = vocab_index(r0, size)
            tstate, dstate = state
            tstate = rows_update(target_ref, tstate, r0, size, idx, k + 1)
            if use_draft:
                dstate = rows_update(draft_ref, dstate, r0, size, idx, k)
            return tstate, dstate

        init = (f32(_NEG_INF), f32(0.0), f32(_NEG_INF))
        tstats, dstats = walk(update1, (tuple(init for _ in range(k + 1)),
                                        tuple(init for _ in range(k)) if use_draft else ()))

        def lse(m, s):
            return jnp.where(m == _NEG_INF, 0.0, m) + jnp.log(s)
        lse_p = [lse(m, s) for m, s, _ in tstats]
        lse_q = [lse(m, s) for m, s, _ in dstats]

    # ---- acceptance: n = number of leading accepted drafts
    n = i32(0)
    alive = i32(1)
    for j in range(k):
        if greedy_target:
            accept = argmax[j] == tok[j]
        else:
            p = jnp.exp(tstats[j][2] - lse_p[j])
            u = _lane(uniforms_1xN, j)
            if use_draft:
                q = jnp.exp(dstats[j][2] - lse_q[j])
                accept = u * q < p
            else:
                accept = u < p
        alive = alive * accept.astype(jnp.int32)
        n = n + alive

    lane_1xN = jax.lax.broadcasted_iota(jnp.int32, (1, LANES), 1)

    def write(token):
        out_ref[...] = jnp.where(lane_1xN == 0, token, jnp.where(lane_1xN == 1, n, 0))

    if greedy_target:
        token = i32(0)
        for j in range(k + 1):
            token = jnp.where(n == j, argmax[j], token)
        write(token)
        return

    # ---- pass 2: draw from the residual (or bonus) at position n only. The position
    # axis of the refs is a leading (untiled) one, so the dynamic index is cheap.
    def pick(values, default):
        out = default
        for j, value in enumerate(values):
            out = jnp.where(n == j, value, out)
        return out

    lse_p_n = pick(lse_p, f32(0.0))
    n_scalar = jnp.squeeze(n)
    g_lane_1xL = g_lane_ref[...]

    def draw_update(state, logw, w, r0, size):
        """Two-level Gumbel-max over the blocks (rows) of one chunk, merged into state."""
        best, best_tok = state
        mass = jnp.sum(w, axis=1, keepdims=True)  # [size, 1]
        g_block = g_block_ref[pl.ds(r0, size), :]  # [size, 1]
        block_score = jnp.where(mass > 0, jnp.log(mass) + g_block, _NEG_INF)
        lane_score = logw + g_lane_1xL  # [size, L]
        lane_best = jnp.max(lane_score, axis=1, keepdims=True)
        lane = jax.lax.broadcasted_iota(jnp.int32, (size, lanes), 1)
        lane_idx = jnp.min(jnp.where(lane_score == lane_best, lane, _BIG_INDEX), axis=1,
                           keepdims=True)
        row = jax.lax.broadcasted_iota(jnp.int32, (size, 1), 0)
        token = (row + r0) * lanes + lane_idx  # [size, 1]: each block's candidate
        chunk_best = _rmax(block_score)
        chunk_tok = _rmin(jnp.where(block_score == chunk_best, token, _BIG_INDEX))
        better = chunk_best > best
        return jnp.where(better, chunk_best, best), jnp.where(better, chunk_tok, best_tok)

    def draw(bonus):
        if not bonus:
            tok_n = pick(tok, i32(-1))
            lse_q_n = pick(lse_q, f32(0.0))
        def update2(state, r0, size):
            resid, from_p = state
            logp = load(target_ref, k if bonus else n_scalar, r0, size) - lse_p_n
            p = jnp.exp(logp)
            from_p = draw_update(from_p, logp, p, r0, size)
            if bonus:
                return resid, from_p
            if use_draft:
                logq = load(draft_ref, n_scalar, r0, size) - lse_q_n
                w = jnp.maximum(p - jnp.exp(logq), 0.0)
                logw = jnp.log(w)
            else:
                hit = vocab_index(r0, size) == tok_n
                w = jnp.where(hit, 0.0, p)
                logw = jnp.where(hit, _NEG_INF, logp)
            return draw_update(resid, logw, w, r0, size), from_p
        init = (f32(_NEG_INF), i32(0))
        (resid_best, resid_tok), (_, p_tok) = walk(update2, (init, init))
        if bonus:
            write(p_tok)
        else:
            # Empty residual (p == q): draw from p itself (rejection.py explains why).
            write(jnp.where(resid_best == _NEG_INF, p_tok, resid_tok))

    pl.when(n_scalar < k)(lambda: draw(bonus=False))
    pl.when(n_scalar == k)(lambda: draw(bonus=True))


# ------------------------------------------------------------------ pallas_call wrapper


def _vmem_tile_bytes(shape, dtype):
    """Bytes of one block in TPU VMEM: the last two dims padded to (8, 128) tiles."""
    *lead, sub, lane = shape
    padded = math.prod(lead) * (-(-sub // 8) * 8) * (-(-lane // 128) * 128)
    return padded * jnp.dtype(dtype).itemsize


def _rejection_call(tokens_Bx1xN, uniforms_Bx1xN, target_BxK1xRxL, draft_BxKxRxL,
                    g_block_BxRx1, g_lane_Bx1xL, *, temperature, method, block_sizes,
                    backend):
    """pallas_call over grid (B,). backend: "tpu" (Mosaic), "triton" or "interpret"."""
    b, k1, rows, lanes = target_BxK1xRxL.shape
    k = k1 - 1
    greedy_target = temperature == 0
    use_draft = method == "rejection" and not greedy_target
    small_spec = pl.BlockSpec((None, 1, LANES), lambda i: (i, 0, 0))
    operands = [tokens_Bx1xN, uniforms_Bx1xN, target_BxK1xRxL]
    in_specs = [small_spec, small_spec,
                pl.BlockSpec((None, k1, rows, lanes), lambda i: (i, 0, 0, 0))]
    if use_draft:
        operands.append(draft_BxKxRxL)
        in_specs.append(pl.BlockSpec((None, k, rows, lanes), lambda i: (i, 0, 0, 0)))
    if not greedy_target:
        operands += [g_block_BxRx1, g_lane_Bx1xL]
        in_specs += [pl.BlockSpec((None, rows, 1), lambda i: (i, 0, 0)),
                     pl.BlockSpec((None, 1, lanes), lambda i: (i, 0, 0))]

    row_bytes = sum(x.size // b * x.dtype.itemsize for x in operands[2:])
    if backend == "tpu":
        # Whole-row blocks (VMEM tiles pad to [8, 128]), double-buffered, plus room for
        # the chunk temporaries. Past ~100 MB the row does not fit: see the module doc.
        vmem_row = sum(_vmem_tile_bytes(x.shape[1:], x.dtype) for x in operands)
        vmem = min(max(2 * vmem_row + (8 << 20), 32 << 20), 100 << 20)
        compiler_params = pltpu.CompilerParams(dimension_semantics=("parallel",),
                                               vmem_limit_bytes=vmem)
    elif backend == "triton":
        compiler_params = pltriton.CompilerParams(num_warps=4, num_stages=2)
    elif backend == "interpret":
        compiler_params = None
    else:
        raise ValueError(f"backend must be 'tpu', 'triton' or 'interpret', got {backend!r}")

    elems = b * rows * lanes * (k1 + (k if use_draft else 0))
    kernel = functools.partial(
        _rejection_kernel, num_draft=k, rows=rows, lanes=lanes,
        chunk_rows=block_sizes.chunk_rows, temperature=temperature, method=method)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, 1, LANES), jnp.int32),
        grid=(b,),
        in_specs=in_specs,
        out_specs=small_spec,
        compiler_params=compiler_params,
        interpret=backend == "interpret",
        cost_estimate=pl.CostEstimate(flops=8 * elems, transcendentals=elems,
                                      bytes_accessed=b * row_bytes),
        name="rejection_sample",
    )(*operands)


# ------------------------------------------------------------------- public function


def _pack_lanes(x_BxK, dtype):
    b, k = x_BxK.shape
    return jnp.zeros((b, 1, LANES), dtype).at[:, 0, :k].set(x_BxK.astype(dtype))


@functools.partial(jax.jit, static_argnames=("temperature", "method", "interpret",
                                             "block_sizes"))
def rejection_pallas(target_logits, draft_logits, draft_tokens, uniforms, gumbel, *,
                     temperature=1.0, method="rejection", interpret=None,
                     block_sizes=BlockSizes()):
    """Rejection sampling with the Pallas kernel (no top-k / top-p: see module doc).

    target_logits [B, K+1, V], draft_logits [B, K, V] (f32 or bf16), draft_tokens
    [B, K] int, uniforms [B, K] f32, gumbel [B, R + L] f32 (rejection.draw_randomness).
    interpret: None picks per platform when lowering (Mosaic on TPU, Triton on GPU,
    the interpreter on CPU); True always interprets; False never does.
    Returns (tokens [B, K+1] int32 padded with -1, num_accepted [B] int32).
    """
    validate_rejection_inputs(target_logits, draft_logits, draft_tokens,
                              temperature=temperature, top_k=0, top_p=1.0, method=method,
                              impl="pallas")
    b, k1, v = target_logits.shape
    k = k1 - 1
    if k + 1 > LANES:
        raise ValueError(f"draft_tokens: at most {LANES - 1} draft tokens, got K={k}")
    if uniforms.shape != (b, k) or gumbel.shape != (b, noise_size(v)):
        raise ValueError(f"uniforms / gumbel must be [B, K] = {(b, k)} / [B, R + L] = "
                         f"{(b, noise_size(v))}, got {uniforms.shape} / {gumbel.shape}")
    rows, lanes = vocab_view(v)
    gumbel = gumbel.astype(jnp.float32)
    args = (_pack_lanes(draft_tokens, jnp.int32), _pack_lanes(uniforms, jnp.float32),
            target_logits.reshape(b, k1, rows, lanes),
            draft_logits.reshape(b, k, rows, lanes),
            gumbel[:, :rows].reshape(b, rows, 1), gumbel[:, rows:].reshape(b, 1, lanes))
    call = functools.partial(_rejection_call, temperature=temperature, method=method,
                             block_sizes=block_sizes)
    if interpret:
        out = call(*args, backend="interpret")
    else:
        per_platform = dict(tpu=functools.partial(call, backend="tpu"),
                            cuda=functools.partial(call, backend="triton"),
                            rocm=functools.partial(call, backend="triton"))
        if interpret is None:
            per_platform["default"] = functools.partial(call, backend="interpret")
        out = jax.lax.platform_dependent(*args, **per_platform)
    final_B, n_B = out[:, 0, 0], out[:, 0, 1]
    return assemble_tokens(draft_tokens, n_B, final_B), n_B


# ------------------------------------------------------------------------- reference


def rejection_pallas_reference(target_logits, draft_logits, draft_tokens, uniforms,
                               gumbel, *, temperature=1.0, method="rejection"):
    """Plain-jnp statement of what the kernel computes (same inputs and outputs).

    Written from the definitions with full probability tensors, a loop over the K+1
    positions and the two-level Gumbel-max spelled out, for clarity rather than speed.
    """
    b, k1, v = target_logits.shape
    k = k1 - 1
    rows, lanes = vocab_view(v)
    tokens_BxK = draft_tokens.astype(jnp.int32)
    vocab_V = jnp.arange(v)
    tl = sampling.scale_logits(target_logits, temperature)
    dl = sampling.scale_logits(draft_logits, temperature)
    logp = jax.nn.log_softmax(tl, axis=-1)  # [B, K+1, V]
    logq = jax.nn.log_softmax(dl, axis=-1)  # [B, K, V]

    def at(x_BxV, tok_B):
        return jnp.max(jnp.where(vocab_V[None, :] == tok_B[:, None], x_BxV, -jnp.inf), -1)

    def draw(w_BxV):
        """Two-level Gumbel-max: block by log mass + block noise, lane by log w + lane noise."""
        w_BxRxL = w_BxV.reshape(b, rows, lanes)
        block_score = jnp.log(w_BxRxL.sum(-1)) + gumbel[:, :rows]
        block_score = jnp.where(w_BxRxL.sum(-1) > 0, block_score, -jnp.inf)
        block_B = jnp.argmax(block_score, -1)
        w_chosen_BxL = w_BxRxL[jnp.arange(b), block_B]
        lane_B = jnp.argmax(jnp.log(w_chosen_BxL) + gumbel[:, rows:], -1)
        return (block_B * lanes + lane_B).astype(jnp.int32)

    alive_B = jnp.ones((b,), bool)
    n_B = jnp.zeros((b,), jnp.int32)
    final_B = jnp.zeros((b,), jnp.int32)
    for j in range(k1):
        # The token drawn at position j, used if the row is still alive and stops here.
        if temperature == 0:
            argmax_B = jnp.argmax(tl[:, j], axis=-1).astype(jnp.int32)
            accept_B = (argmax_B == tokens_BxK[:, j]) if j < k else jnp.zeros((b,), bool)
            drawn_B = argmax_B
        else:
            p_BxV = jnp.exp(logp[:, j])
            if j == k:
                accept_B = jnp.zeros((b,), bool)
                w_BxV = p_BxV
            else:
                p_B = jnp.exp(at(logp[:, j], tokens_BxK[:, j]))
                if method == "rejection":
                    q_B = jnp.exp(at(logq[:, j], tokens_BxK[:, j]))
                    accept_B = uniforms[:, j] * q_B < p_B
                    w_BxV = jnp.maximum(p_BxV - jnp.exp(logq[:, j]), 0.0)
                else:
                    accept_B = uniforms[:, j] < p_B
                    w_BxV = jnp.where(vocab_V[None, :] == tokens_BxK[:, j, None], 0.0, p_BxV)
            empty_B = jnp.all(w_BxV == 0, axis=-1)
            drawn_B = draw(jnp.where(empty_B[:, None], p_BxV, w_BxV))
        stops_here_B = alive_B & ~accept_B
        final_B = jnp.where(stops_here_B, drawn_B, final_B)
        alive_B = alive_B & accept_B
        n_B = n_B + alive_B.astype(jnp.int32)
    pos = jnp.arange(k1)[None, :]
    out = jnp.where(pos < n_B[:, None], jnp.pad(tokens_BxK, ((0, 0), (0, 1))), -1)
    out = jnp.where(pos == n_B[:, None], final_B[:, None], out)
    return out, n_B
