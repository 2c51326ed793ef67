"""Qwen3 building blocks in flax.linen: RMSNorm, RoPE, GQA attention, SwiGLU MLP.

Every parameter is created through ``_param`` with logical axis names, which
``bebop_jax.parallel.RULES`` maps to mesh axes. Norms, softmax and rotary
embeddings run in float32; matmul inputs are cast to ``config.dtype``.

Attention takes an optional per-layer KV cache ``{"k": [B,S,Nkv,D], "v": ...}``.
New keys/values are scattered at their absolute positions (out-of-range
positions are dropped), and a query at position p attends to the slots s <= p.
Slots past a row's current length may hold keys of rejected drafts; they are
never read, because a query only sees slots at or before its own position and
every such slot was written by this step or an accepted earlier one.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bebop_jax.config import ModelConfig

Array = jax.Array
KVCache = dict[str, Array]


def _param(module: nn.Module, name: str, init, shape: tuple[int, ...], axes: tuple[str | None, ...]):
    dtype = jnp.dtype(module.config.param_dtype)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _dense_init(fan_in: int):
    return nn.initializers.normal(stddev=fan_in ** -0.5)


def maybe_stop(x: Array, stop: bool) -> Array:
    return jax.lax.stop_gradient(x) if stop else x


class RMSNorm(nn.Module):
    config: ModelConfig
    dim: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", nn.initializers.ones, (self.dim,), ("norm",))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope(x_BxTxNxD: Array, positions_BxT: Array, theta: float) -> Array:
    """Rotary embedding, half-split layout (as Qwen3 / Hugging Face ``rotate_half``)."""
    d = x_BxTxNxD.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [D/2]
    angles = positions_BxT.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x = x_BxTxNxD.astype(jnp.float32)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxD.dtype)


def write_cache(cache_BxSxNxD: Array, new_BxTxNxD: Array, positions_BxT: Array) -> Array:
    """Scatter new entries at their absolute positions; positions < 0 or >= S are dropped."""
    s = cache_BxSxNxD.shape[1]
    pos = jnp.where((positions_BxT >= 0) & (positions_BxT < s), positions_BxT, s)
    rows = jnp.arange(pos.shape[0])[:, None]
    return cache_BxSxNxD.at[rows, pos].set(new_BxTxNxD.astype(cache_BxSxNxD.dtype), mode="drop")


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxH: Array, positions_BxT: Array, cache: KVCache | None = None,
                 segment_ids_BxT: Array | None = None):
        """``segment_ids`` (no cache only): packed rows, a query sees keys of its own segment only."""
        cfg = self.config
        h, n, nkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt = jnp.dtype(cfg.dtype)
        wq = _param(self, "q_proj", _dense_init(h), (h, n, d), ("embed", "heads", "head_dim"))
        wk = _param(self, "k_proj", _dense_init(h), (h, nkv, d), ("embed", "kv_heads", "head_dim"))
        wv = _param(self, "v_proj", _dense_init(h), (h, nkv, d), ("embed", "kv_heads", "head_dim"))
        wo = _param(self, "o_proj", _dense_init(n * d), (n, d, h), ("heads", "head_dim", "embed"))
        x = x_BxTxH.astype(dt)
        q = jnp.einsum("bth,hnd->btnd", x, wq.astype(dt))
        k = jnp.einsum("bth,hnd->btnd", x, wk.astype(dt))
        v = jnp.einsum("bth,hnd->btnd", x, wv.astype(dt))
        q = RMSNorm(cfg, d, name="q_norm")(q)
        k = RMSNorm(cfg, d, name="k_norm")(k)
        q = rope(q, positions_BxT, cfg.rope_theta)
        k = rope(k, positions_BxT, cfg.rope_theta)

        if cache is None:
            keys, values, key_pos = k, v, positions_BxT  # [B,T,Nkv,D], [B,T]
            new_cache = None
        elif segment_ids_BxT is not None:
            raise ValueError("segment_ids: packed rows are for training forwards, not with a KV cache")
        else:
            keys = write_cache(cache["k"], k, positions_BxT)
            values = write_cache(cache["v"], v, positions_BxT)
            new_cache = {"k": keys, "v": values}
            key_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), keys.shape[:2])

        b, t = q.shape[:2]
        qg = q.reshape(b, t, nkv, n // nkv, d)  # [B, T, Nkv, G, D]
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys.astype(dt),
                            preferred_element_type=jnp.float32) * (d ** -0.5)
        visible = key_pos[:, None, :] <= positions_BxT[:, :, None]  # [B, T, S]
        if segment_ids_BxT is not None:
            visible &= segment_ids_BxT[:, None, :] == segment_ids_BxT[:, :, None]
        scores = jnp.where(visible[:, None, None], scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, values.astype(dt)).reshape(b, t, n, d)
        y = jnp.einsum("btnd,ndh->bth", out, wo.astype(dt))
        return y, new_cache


class MLP(nn.Module):
    config: ModelConfig
    intermediate_size: int | None = None  # None: config.intermediate_size

    @nn.compact
    def __call__(self, x_BxTxH: Array) -> Array:
        cfg = self.config
        h, i = cfg.hidden_size, self.intermediate_size or cfg.intermediate_size
        dt = jnp.dtype(cfg.dtype)
        wg = _param(self, "gate_proj", _dense_init(h), (h, i), ("embed", "mlp"))
        wu = _param(self, "up_proj", _dense_init(h), (h, i), ("embed", "mlp"))
        wd = _param(self, "down_proj", _dense_init(i), (i, h), ("mlp", "embed"))
        x = x_BxTxH.astype(dt)
        gated = jax.nn.silu(x @ wg.astype(dt)) * (x @ wu.astype(dt))
        return gated @ wd.astype(dt)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)); then x + mlp(norm(x))."""

    config: ModelConfig
    intermediate_size: int | None = None  # the MLP's width (None: config.intermediate_size)

    @nn.compact
    def __call__(self, x_BxTxH: Array, positions_BxT: Array, cache: KVCache | None = None,
                 segment_ids_BxT: Array | None = None):
        cfg = self.config
        attn_out, new_cache = Attention(cfg, name="self_attn")(
            RMSNorm(cfg, cfg.hidden_size, name="input_layernorm")(x_BxTxH), positions_BxT, cache, segment_ids_BxT)
        x = x_BxTxH + attn_out.astype(x_BxTxH.dtype)
        mlp_out = MLP(cfg, self.intermediate_size, name="mlp")(RMSNorm(cfg, cfg.hidden_size, name="post_attention_layernorm")(x))
        return x + mlp_out.astype(x.dtype), new_cache


def empty_kv_cache(config: ModelConfig, batch: int, length: int, dtype: Any = None) -> KVCache:
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(config.dtype) if dtype is None else dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
