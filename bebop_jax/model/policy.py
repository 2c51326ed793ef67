"""The policy: a Qwen3-style decoder trunk with K multi-token-prediction depths.

Indexing (docs/DESIGN.md, "MTP indexing and masks"): the trunk at position t gives ``hidden[t]`` (the residual
stream before the final norm) and the distribution of x_{t+1}. MTP depth k
(k = 1..K) at position t takes the previous depth's hidden (``hidden[t]`` for
k = 1) and the embedding of x_{t+k}, and drafts x_{t+k+1}:

    h_k = layer_k(fc_k(concat[norm_e(embed(x_{t+k})), norm_h(h_{k-1})]))
    mtp_logits[t, k-1] = lm_head(norm_k(h_k))

Each depth is a causal sequence of its own (depth k at t attends to depth k at
positions <= t), so depth k at t sees tokens <= t+k and nothing later.
With ``freeze_trunk=True`` the MTP path reads the trunk's hidden state, the
embedding table and the LM head through ``stop_gradient``: no gradient reaches
them (pre-RL MTP training).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from bebop_jax.config import ModelConfig
from bebop_jax.model.layers import DecoderLayer, KVCache, RMSNorm, _dense_init, _param, maybe_stop

Array = jax.Array

# Top-level parameter keys: decoder layer i of the trunk, MTP module m (read them through
# bebop_jax.model.params: trunk_params / head_params / is_trunk_param).
LAYER_PREFIX = "layers_"
HEAD_PREFIX = "mtp_"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PolicyOutput:
    logits: Array      # [B, T, V] float32: trunk distribution of x_{t+1}
    hidden: Array      # [B, T, H]: trunk residual stream before the final norm
    mtp_logits: Array  # [B, T, K, V] float32: depth k drafts x_{t+k+1}


def shift_tokens(tokens_BxT: Array, k: int, pad_id: int = 0) -> Array:
    """tokens[:, t + k], padded with ``pad_id`` past the end."""
    if k == 0:
        return tokens_BxT
    b, t = tokens_BxT.shape
    pad = jnp.full((b, k), pad_id, tokens_BxT.dtype)
    return jnp.concatenate([tokens_BxT, pad], axis=1)[:, k:k + t]


class MTPModule(nn.Module):
    """fc(concat[norm_e(embed), norm_h(hidden)]) -> one decoder layer -> final norm."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        h = cfg.hidden_size
        self.pre_fc_norm_embedding = RMSNorm(cfg, h)
        self.pre_fc_norm_hidden = RMSNorm(cfg, h)
        self.fc = self.param("fc", nn.with_logical_partitioning(_dense_init(2 * h), ("mtp_in", "embed")),
                             (2 * h, h), jnp.dtype(cfg.param_dtype))
        self.layer = DecoderLayer(cfg, cfg.mtp_mlp_size)
        self.norm = RMSNorm(cfg, h)

    def __call__(self, emb_BxTxH: Array, hidden_BxTxH: Array, positions_BxT: Array,
                 cache: KVCache | None = None):
        dt = jnp.dtype(self.config.dtype)
        x = jnp.concatenate([self.pre_fc_norm_embedding(emb_BxTxH),
                             self.pre_fc_norm_hidden(hidden_BxTxH.astype(emb_BxTxH.dtype))], axis=-1)
        x = x.astype(dt) @ self.fc.astype(dt)
        h, new_cache = self.layer(x, positions_BxT, cache)
        return h, self.norm(h), new_cache  # hidden for the next depth, normed for the head


class Policy(nn.Module):
    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embedding = _param(self, "embed_tokens", nn.initializers.normal(stddev=cfg.hidden_size ** -0.5),
                                (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        self.layers = [DecoderLayer(cfg, name=f"{LAYER_PREFIX}{i}") for i in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg, cfg.hidden_size)
        if not cfg.tie_embeddings:
            self.lm_head = _param(self, "lm_head", _dense_init(cfg.hidden_size),
                                  (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))
        self.mtp = [MTPModule(cfg, name=f"{HEAD_PREFIX}{m}") for m in range(cfg.num_mtp_modules)]

    # -- pieces the decoder calls one by one ---------------------------------------------------
    def embed(self, tokens: Array, frozen: bool = False) -> Array:
        table = maybe_stop(self.embedding, frozen)
        return jnp.take(table, tokens, axis=0).astype(jnp.dtype(self.config.dtype))

    def head(self, normed_BxTxH: Array, frozen: bool = False) -> Array:
        """Shared LM head -> float32 logits."""
        dt = jnp.dtype(self.config.dtype)
        if self.config.tie_embeddings:
            w = maybe_stop(self.embedding, frozen).astype(dt)
            return jnp.einsum("bth,vh->btv", normed_BxTxH.astype(dt), w, preferred_element_type=jnp.float32)
        w = maybe_stop(self.lm_head, frozen).astype(dt)
        return jnp.einsum("bth,hv->btv", normed_BxTxH.astype(dt), w, preferred_element_type=jnp.float32)

    def trunk(self, tokens_BxT: Array, positions_BxT: Array, caches: list[KVCache] | None = None,
              segment_ids_BxT: Array | None = None):
        """Trunk forward -> (hidden [B,T,H] before the final norm, logits [B,T,V], new caches).

        ``segment_ids`` marks packed examples (no caches): attention stays inside a
        segment, and ``positions`` restart at 0 in each one.
        """
        x = self.embed(tokens_BxT)
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, positions_BxT, None if caches is None else caches[i], segment_ids_BxT)
            new_caches.append(c)
        logits = self.head(self.norm(x))
        return x, logits, (None if caches is None else new_caches)

    def mtp_depth(self, depth: int, hidden_BxTxH: Array, tokens_BxT: Array, positions_BxT: Array,
                  cache: KVCache | None = None, frozen: bool = False, last_only: bool = False):
        """One MTP depth (1-based). ``tokens`` are x_{t+depth} at each position t.

        Returns (hidden for the next depth [B,T,H], logits [B,T,V] (or [B,1,V] with
        ``last_only``: the decoder needs only the frontier's draft), new cache).
        ``frozen`` reads the embedding and LM head through stop_gradient; the caller
        detaches the trunk hidden itself (depth >= 2 hiddens must keep their gradient).
        """
        module = self.mtp[self.config.mtp_module_for_depth[depth - 1]]
        h, normed, new_cache = module(self.embed(tokens_BxT, frozen), hidden_BxTxH, positions_BxT, cache)
        if last_only:
            normed = normed[:, -1:]
        return h, self.head(normed, frozen), new_cache

    # -- the teacher-forced forward used for training -------------------------------------------
    def __call__(self, tokens_BxT: Array, *, freeze_trunk: bool = False) -> PolicyOutput:
        b, t = tokens_BxT.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        hidden, logits, _ = self.trunk(tokens_BxT, positions)
        if freeze_trunk:
            logits = jax.lax.stop_gradient(logits)
        mtp_logits = self.mtp_stack(hidden, tokens_BxT, positions, frozen=freeze_trunk)
        return PolicyOutput(logits=logits, hidden=hidden, mtp_logits=mtp_logits)

    def mtp_stack(self, hidden_BxTxH: Array, tokens_BxT: Array, positions_BxT: Array, frozen: bool = False) -> Array:
        """Every depth's teacher-forced drafts [B,T,K,V] from the trunk hidden; ``frozen`` detaches the
        trunk (hidden, embedding, LM head) so no MTP gradient reaches it."""
        h = maybe_stop(hidden_BxTxH, frozen)  # detach the trunk; depths still chain gradients
        mtp_logits = []
        for k in range(1, self.config.num_mtp_depths + 1):
            h, lg, _ = self.mtp_depth(k, h, shift_tokens(tokens_BxT, k), positions_BxT, frozen=frozen)
            mtp_logits.append(lg)
        return jnp.stack(mtp_logits, axis=2)
