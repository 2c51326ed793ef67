"""Pallas kernels that sweep the LM head in vocabulary chunks: the fused matmul + reduction
behind ``impl="pallas"`` of ``token_logprobs`` and ``draft_agreement``.

Two sweeps, each a kernel template filled in by a per-chunk ``body``:
- ``row_sweep``: per block of ``block_rows`` rows, walk every vocabulary chunk of ``chunk``
  columns and carry per-row accumulators ([rows, w] each): the online log-sum-exp passes,
  and the gradient with respect to the rows (``dhidden``). The logits of a chunk live only
  inside the kernel (VMEM on TPU, registers / shared memory on GPU).
- ``col_sweep``: per vocabulary chunk, walk every row block and accumulate a [H, chunk]
  block: the gradient with respect to the LM head.

Chunks are the same as the XLA path's (``ops.chunks.Chunking``): chunk ``j`` starts at
``min(j * C, V - C)`` and masks the columns an earlier chunk covered, so every load is a full
in-bounds [H, C] block (no masks, no padded copy of the head). Rows are padded to a multiple
of ``block_rows`` (padding rows carry zero gradients and are cut off).

Structure per backend: on TPU (Mosaic) and in the interpreter the sweep is a grid
(row blocks, chunks) whose last axis walks sequentially and accumulates into the resident
output block; Triton runs grid programs concurrently, so there the grid is over row blocks
(row sweep) or chunks (column sweep) and the kernel loops over the other axis itself.
Both structures run in interpret mode on CPU, which is how the tests check them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from bebop_jax.ops.chunks import Chunking

BACKENDS = ("tpu", "triton", "interpret_grid", "interpret_loop")


@dataclasses.dataclass(frozen=True)
class Tiles:
    """block_rows: rows per program; chunk: vocabulary columns per step. Powers of two (Triton's
    loads), block_rows >= 8 and chunk >= 128 on TPU (its (8, 128) tiles)."""

    block_rows: int = 64
    chunk: int = 512

    def __post_init__(self):
        for name in ("block_rows", "chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"Tiles.{name} must be a power of two >= 1, got {v!r}")


def chunk_for(vocab: int, chunk: int) -> int:
    """The chunk width used at this vocabulary: ``chunk``, or the largest power of two <= V."""
    return min(chunk, 1 << (vocab.bit_length() - 1))


def _pad_rows(x, n_pad):
    return x if x.shape[0] == n_pad else jnp.pad(x, [(0, n_pad - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _columns(chunks: Chunking, j):
    """([1, C] global column ids of chunk j, [1, C] whether each is fresh)."""
    start = chunks.start(j)
    cols = start + jax.lax.broadcasted_iota(jnp.int32, (1, chunks.chunk), 1)
    return cols, cols >= j * chunks.chunk


def _tpu_params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def row_sweep(body: Callable, rows: Sequence[jax.Array], head: jax.Array, inits: Sequence[tuple[int, object, float]],
              *, tiles: Tiles, backend: str) -> list[jax.Array]:
    """Per-row accumulators after every chunk: ``body(row_blocks, head_chunk [H, C], cols [1, C],
    fresh [1, C], carry) -> carry``, where ``row_blocks`` are [bn, w] blocks of ``rows`` (each [N, w])
    and ``carry`` holds one [bn, w] array per ``inits`` entry ``(w, dtype, initial value)``.
    Returns each accumulator as [N, w]."""
    n, (h, v) = rows[0].shape[0], head.shape
    chunks = Chunking(v, chunk_for(v, tiles.chunk))
    bn = tiles.block_rows
    nb, nv = -(-n // bn), chunks.num_chunks
    rows = [_pad_rows(r, nb * bn) for r in rows]
    out_shape = [jax.ShapeDtypeStruct((nb * bn, w), dt) for w, dt, _ in inits]
    nr = len(rows)

    def init(out_refs):
        for o, (w, dt, value) in zip(out_refs, inits):
            o[...] = jnp.full(o.shape, value, dt)

    if backend in ("tpu", "interpret_grid"):
        def kernel(*refs):
            row_refs, head_ref, out_refs = refs[:nr], refs[nr], refs[nr + 1:]
            j = pl.program_id(1)
            pl.when(j == 0)(lambda: init(out_refs))
            cols, fresh = _columns(chunks, j)
            carry = body([r[...] for r in row_refs], head_ref[...], cols, fresh, [o[...] for o in out_refs])
            for o, c in zip(out_refs, carry):
                o[...] = c

        spec = lambda w: pl.BlockSpec((bn, w), lambda i, j: (i, 0))
        out = pl.pallas_call(
            kernel, grid=(nb, nv), out_shape=out_shape,
            in_specs=[spec(r.shape[1]) for r in rows]
            + [pl.BlockSpec((pl.Element(h), pl.Element(chunks.chunk)), lambda i, j: (0, chunks.start(j)))],
            out_specs=[spec(w) for w, _, _ in inits],
            compiler_params=_tpu_params(("parallel", "arbitrary")) if backend == "tpu" else None,
            interpret=backend == "interpret_grid",
        )(*rows, head)
    else:
        def kernel(*refs):
            row_refs, head_ref, out_refs = refs[:nr], refs[nr], refs[nr + 1:]
            blocks = [r[...] for r in row_refs]

            def step(j, carry):
                cols, fresh = _columns(chunks, j)
                return tuple(body(blocks, head_ref[:, pl.ds(chunks.start(j), chunks.chunk)], cols, fresh, list(carry)))

            start = tuple(jnp.full((bn, w), value, dt) for w, dt, value in inits)
            for o, c in zip(out_refs, jax.lax.fori_loop(0, nv, step, start)):
                o[...] = c

        spec = lambda w: pl.BlockSpec((bn, w), lambda i: (i, 0))
        out = pl.pallas_call(
            kernel, grid=(nb,), out_shape=out_shape,
            in_specs=[spec(r.shape[1]) for r in rows] + [pl.BlockSpec((h, v), lambda i: (0, 0))],
            out_specs=[spec(w) for w, _, _ in inits],
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2) if backend == "triton" else None,
            interpret=backend == "interpret_loop",
        )(*rows, head)
    return [o[:n] for o in out]


def col_sweep(body: Callable, rows: Sequence[jax.Array], head: jax.Array, *, tiles: Tiles,
              backend: str) -> jax.Array:
    """float32 [H, V]: the sum over row blocks of ``body(row_blocks, head_chunk, cols, fresh) ->
    [H, C]`` per chunk (``body`` must give 0 on columns that are not fresh, and padded rows must
    contribute 0)."""
    n, (h, v) = rows[0].shape[0], head.shape
    chunks = Chunking(v, chunk_for(v, tiles.chunk))
    bn, c = tiles.block_rows, chunks.chunk
    nb, nv = -(-n // bn), chunks.num_chunks
    rows = [_pad_rows(r, nb * bn) for r in rows]
    nr = len(rows)
    out_shape = jax.ShapeDtypeStruct((h, nv * c), jnp.float32)  # chunk j's block at columns [j C, (j+1) C)

    if backend in ("tpu", "interpret_grid"):
        def kernel(*refs):
            row_refs, head_ref, out_ref = refs[:nr], refs[nr], refs[nr + 1]
            j, i = pl.program_id(0), pl.program_id(1)

            @pl.when(i == 0)
            def _():
                out_ref[...] = jnp.zeros(out_ref.shape, jnp.float32)

            cols, fresh = _columns(chunks, j)
            out_ref[...] += body([r[...] for r in row_refs], head_ref[...], cols, fresh)

        out = pl.pallas_call(
            kernel, grid=(nv, nb), out_shape=out_shape,
            in_specs=[pl.BlockSpec((bn, r.shape[1]), lambda j, i: (i, 0)) for r in rows]
            + [pl.BlockSpec((pl.Element(h), pl.Element(c)), lambda j, i: (0, chunks.start(j)))],
            out_specs=pl.BlockSpec((h, c), lambda j, i: (0, j)),
            compiler_params=_tpu_params(("parallel", "arbitrary")) if backend == "tpu" else None,
            interpret=backend == "interpret_grid",
        )(*rows, head)
    else:
        def kernel(*refs):
            row_refs, head_ref, out_ref = refs[:nr], refs[nr], refs[nr + 1]
            j = pl.program_id(0)
            cols, fresh = _columns(chunks, j)
            head_chunk = head_ref[:, pl.ds(chunks.start(j), c)]

            def step(i, acc):
                blocks = [r[pl.ds(i * bn, bn), :] for r in row_refs]
                return acc + body(blocks, head_chunk, cols, fresh)

            out_ref[...] = jax.lax.fori_loop(0, nb, step, jnp.zeros((h, c), jnp.float32))

        out = pl.pallas_call(
            kernel, grid=(nv,), out_shape=out_shape,
            in_specs=[pl.BlockSpec((nb * bn, r.shape[1]), lambda j: (0, 0)) for r in rows]
            + [pl.BlockSpec((h, v), lambda j: (0, 0))],
            out_specs=pl.BlockSpec((h, c), lambda j: (0, j)),
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2) if backend == "triton" else None,
            interpret=backend == "interpret_loop",
        )(*rows, head)
    # the last chunk starts at V - C, not at (nv - 1) C: its fresh columns sit d further right
    d = nv * c - v
    return jnp.concatenate([out[:, :(nv - 1) * c], out[:, (nv - 1) * c + d:]], axis=1)


def on_platform(fn: Callable, interpret: str | None):
    """``fn(backend)`` for the platform being lowered for (TPU: Mosaic, GPU: Triton) or, with
    ``interpret`` ("grid" | "loop"), that structure in the interpreter; CPU without
    ``interpret`` uses the grid structure interpreted."""
    if interpret is not None:
        return fn(f"interpret_{interpret}")
    return jax.lax.platform_dependent(tpu=lambda: fn("tpu"), cuda=lambda: fn("triton"), rocm=lambda: fn("triton"),
                                      default=lambda: fn("interpret_grid"))


# ------------------------------------------------------------------ helpers for kernel bodies
# (the logits and the online log-sum-exp are ops.chunks.chunk_logits / online_update)


def rows_times_head_t(dz, head):
    """[bn, C] @ head chunk [H, C]^T -> [bn, H] float32."""
    return jax.lax.dot_general(dz, head.astype(jnp.float32), (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def hidden_t_times(hidden, dz):
    """row block [bn, H]^T @ [bn, C] -> [H, C] float32."""
    return jax.lax.dot_general(hidden.astype(jnp.float32), dz, (((0,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """How an op runs its Pallas sweeps: tiles, and an interpreter structure ("grid" | "loop")
    or None (the platform's compiled kernel)."""

    tiles: Tiles = Tiles()
    interpret: str | None = None

    def rows(self, body, rows, head, inits):
        return on_platform(lambda backend: row_sweep(body, rows, head, inits, tiles=self.tiles, backend=backend),
                           self.interpret)

    def cols(self, body, rows, head):
        return on_platform(lambda backend: col_sweep(body, rows, head, tiles=self.tiles, backend=backend),
                           self.interpret)


def kernel_for(impl: str, chunk_size: int | None, interpret: str | None) -> Kernel | None:
    """The Pallas sweep settings of ``impl="pallas"`` (None for XLA): tiles of the default size,
    or with ``chunk_size`` the largest power of two not above it."""
    if impl != "pallas":
        return None
    tiles = Tiles() if chunk_size is None else Tiles(chunk=1 << (chunk_size.bit_length() - 1))
    return Kernel(tiles=tiles, interpret=interpret)
