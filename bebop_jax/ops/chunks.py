"""Walking the vocabulary in chunks: what the vocabulary-chunked ops share.

A chunk is ``C`` consecutive columns of the LM head ``[H, V]``. Chunk ``i`` starts at
``min(i * C, V - C)``: the last chunk is shifted left to stay inside the head (no padded
copy of a 151,936-column matrix), and its columns that an earlier chunk already covered
are masked (``fresh``), so every column is counted exactly once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

DEFAULT_CHUNK = 2048  # [N, 2048] f32 per live chunk buffer; at V = 151,936 an MTP step plans < 1/8 of dense
IMPLS = ("auto", "xla", "pallas")  # "auto": XLA until an accelerator run shows the kernels win
INTERPRET = ("grid", "loop")


@dataclasses.dataclass(frozen=True)
class Chunking:
    vocab_size: int
    chunk: int

    @property
    def num_chunks(self) -> int:
        return -(-self.vocab_size // self.chunk)

    def start(self, i):
        """First column of chunk ``i`` (traced ``i`` allowed)."""
        return jnp.minimum(i * self.chunk, self.vocab_size - self.chunk)

    def fresh(self, i):
        """[C] bool: which columns of chunk ``i`` no earlier chunk covered."""
        return self.start(i) + jnp.arange(self.chunk) >= i * self.chunk

    def head(self, lm_head_HxV, i):
        """[H, C] the columns of chunk ``i``."""
        return jax.lax.dynamic_slice_in_dim(lm_head_HxV, self.start(i), self.chunk, axis=1)

    def add_to(self, acc_HxV, update_HxC, i):
        """``acc`` with ``update`` added to chunk ``i``'s columns (masked columns must be 0 in ``update``)."""
        start = self.start(i)
        old = jax.lax.dynamic_slice_in_dim(acc_HxV, start, self.chunk, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(acc_HxV, old + update_HxC.astype(acc_HxV.dtype), start, axis=1)


def chunking(vocab_size: int, chunk_size: int | None) -> Chunking:
    return Chunking(vocab_size, min(vocab_size, DEFAULT_CHUNK if chunk_size is None else chunk_size))


def chunk_logits(hidden_NxH, head_HxC, fresh_C, temperature: float):
    """float32 [N, C] logits / temperature, -inf on columns an earlier chunk covered (``fresh``:
    [C], or [1, C] inside the Pallas kernels)."""
    z = jnp.dot(hidden_NxH, head_HxC, preferred_element_type=jnp.float32) / temperature
    return jnp.where(fresh_C, z, -jnp.inf)


def online_update(m_N, s_N, z_NxC, *weighted):
    """One step of an online log-sum-exp: the running max ``m``, ``s = sum exp(z - m)``, and any
    ``sum exp(z - m) * w`` (each ``(acc_N, w_NxC)`` in ``weighted``), rescaled to the new max.
    The per-row accumulators are [N] in the XLA loops and [N, 1] inside the Pallas kernels
    (2-D, as Mosaic and Triton want)."""
    keep = m_N.ndim == z_NxC.ndim
    row_sum = lambda x: jnp.sum(x, axis=-1, keepdims=keep)
    m_new = jnp.maximum(m_N, jnp.max(z_NxC, axis=-1, keepdims=keep))
    safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    scale = jnp.exp(jnp.where(jnp.isfinite(m_N), m_N - safe, -jnp.inf))
    e = jnp.exp(z_NxC - (safe if keep else safe[:, None]))
    out = [m_new, s_N * scale + row_sum(e)]
    for acc_N, w_NxC in weighted:
        out.append(acc_N * scale + row_sum(jnp.where(e > 0, e * w_NxC, 0.0)))
    return out


def combine(axis, m_N, s_N, *accs):
    """The online sums of each vocabulary shard combined over mesh axis ``axis`` (None: one
    shard): the global max, and every sum rescaled to it and added up."""
    if axis is None:
        return (m_N, s_N, *accs)
    m = jax.lax.pmax(m_N, axis)
    safe = jnp.where(jnp.isfinite(m), m, 0.0)
    scale = jnp.exp(jnp.where(jnp.isfinite(m_N), m_N - safe, -jnp.inf))
    return (m, *(jax.lax.psum(x * scale, axis) for x in (s_N, *accs)))


def local_ids(axis, ids_N, shard_vocab: int):
    """(column of each id in this device's vocabulary shard (clipped), whether the shard holds it)."""
    offset = 0 if axis is None else jax.lax.axis_index(axis) * shard_vocab
    local = ids_N - offset
    held = (local >= 0) & (local < shard_vocab)
    return jnp.clip(local, 0, shard_vocab - 1), held


def varying(axis, tree):
    """Loop-carry initial values marked as differing across the vocabulary shards (under
    ``shard_map``'s type checks, a carry must have one type before and after the body)."""
    return tree if axis is None else jax.tree.map(lambda x: jax.lax.pcast(x, axis, to="varying"), tree)


def vocab_sum(axis, x):
    """``x`` summed over the vocabulary shards (itself on one shard)."""
    return x if axis is None else jax.lax.psum(x, axis)


VOCAB_AXIS = "model"  # parallel.RULES puts the vocabulary on this mesh axis


def vocab_shards(mesh, vocab_size: int, name: str) -> int:
    """How many shards ``mesh``'s model axis splits the vocabulary into (1: no mesh or no split)."""
    shards = 1 if mesh is None else mesh.shape.get(VOCAB_AXIS, 1)
    if vocab_size % shards:
        raise ValueError(f"{name}: V={vocab_size} must be divisible by the mesh's {VOCAB_AXIS} axis ({shards})")
    return shards


def on_vocab_shards(core, mesh, arg_kinds: str, out_kinds, *, kernels: bool = False):
    """``core(*args, axis)`` run under ``shard_map`` over ``mesh``'s model axis, or directly (axis
    None) when the vocabulary is not split. ``arg_kinds`` has one letter per argument and
    ``out_kinds`` (a pytree) one per output: "r" replicated (rows, per-row values), "v" split along
    its last axis (the LM head and its gradient). The ops call it from inside their custom VJPs,
    so ``shard_map`` is never differentiated; with ``kernels`` (Pallas, whose operands its
    varying-axes checks cannot type) the checks are off, the specs being exact by construction."""
    if mesh is None or mesh.shape.get(VOCAB_AXIS, 1) == 1:
        return lambda *args: core(*args, None)
    spec = {"r": P(), "v": P(None, VOCAB_AXIS)}
    return jax.shard_map(lambda *args: core(*args, VOCAB_AXIS), mesh=mesh,
                         in_specs=tuple(spec[k] for k in arg_kinds), out_specs=jax.tree.map(spec.get, out_kinds),
                         check_vma=not kernels)


@dataclasses.dataclass(frozen=True)
class OpSettings:
    """The static settings of one call of a vocabulary-chunked op (hashable: custom_vjp's
    non-differentiable argument)."""

    temperature: float
    chunk: int | None
    kernel: object  # pallas_sweeps.Kernel, or None for the XLA loops
    mesh: object    # a Mesh splitting the vocabulary over its model axis, or None

    def run(self, core, arg_kinds: str, out_kinds):
        return on_vocab_shards(core, self.mesh, arg_kinds, out_kinds, kernels=self.kernel is not None)


def check_inputs(name: str, hiddens: dict, lm_head, ids: dict, *, temperature, chunk_size, impl,
                 interpret=None) -> None:
    """One ValueError naming the argument for shapes, dtypes, ids out of range and settings."""
    if lm_head.ndim != 2:
        raise ValueError(f"{name}: lm_head must be [H, V], got shape {tuple(lm_head.shape)}")
    h, v = lm_head.shape
    n = None
    for arg, x in hiddens.items():
        if x.ndim != 2 or x.shape[1] != h:
            raise ValueError(f"{name}: {arg} must be [N, H={h}] (lm_head is [H, V]), got {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: {arg} must be floating point, got {x.dtype}")
        if n is not None and x.shape[0] != n:
            raise ValueError(f"{name}: {arg} has {x.shape[0]} rows, the other hidden {n}")
        n = x.shape[0]
    for arg, x in ids.items():
        if x.shape != (n,) or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name}: {arg} must be integer [N={n}], got {x.dtype} {tuple(x.shape)}")
        if not isinstance(x, jax.core.Tracer):
            lo, hi = int(jnp.min(x)) if x.size else 0, int(jnp.max(x)) if x.size else 0
            if lo < 0 or hi >= v:
                raise ValueError(f"{name}: {arg} must lie in [0, V={v}), got values in [{lo}, {hi}]")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"{name}: temperature must be a number > 0, got {temperature!r}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"{name}: chunk_size must be an int >= 1 (or None), got {chunk_size!r}")
    if impl not in IMPLS:
        raise ValueError(f"{name}: impl must be one of {IMPLS}, got {impl!r}")
    if interpret is not None and (impl != "pallas" or interpret not in INTERPRET):
        raise ValueError(f"{name}: interpret must be None or one of {INTERPRET} with impl='pallas', "
                         f"got {interpret!r} with impl={impl!r}")
