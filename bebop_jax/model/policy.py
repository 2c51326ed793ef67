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
from bebop_jax.model.readout import logits as apply_head, shift

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PolicyFeatures:
    """The teacher-forced forward up to the LM head: what a vocabulary-chunked loss reads
    instead of logits (``logits = normed @ head``, ``mtp_logits = mtp_normed @ head``)."""
    hidden: Array      # [B, T, H]: trunk residual stream before the final norm
    normed: Array      # [B, T, H]: the trunk's final-normed hidden (its LM-head input)
    mtp_normed: Array  # [B, T, K, H]: depth k's final-normed hidden (its LM-head input)
    head: Array        # [H, V]: the shared LM head in the compute dtype


def shift_tokens(tokens_BxT: Array, k: int, pad_id: int = 0) -> Array:
    """tokens[:, t + k], padded with ``pad_id`` past the end."""
    return shift(tokens_BxT, k, pad_id)


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

    def head_weight(self, frozen: bool = False) -> Array:
        """The shared LM head as [H, V] in the compute dtype (the embedding's transpose when tied)."""
        dt = jnp.dtype(self.config.dtype)
        if self.config.tie_embeddings:
            return maybe_stop(self.embedding, frozen).astype(dt).T
        return maybe_stop(self.lm_head, frozen).astype(dt)

    def head(self, normed_BxTxH: Array, frozen: bool = False) -> Array:
        """Shared LM head -> float32 logits."""
        return apply_head(normed_BxTxH, self.head_weight(frozen))

    def trunk(self, tokens_BxT: Array, positions_BxT: Array, caches: list[KVCache] | None = None,
              segment_ids_BxT: Array | None = None):
        """Trunk forward -> (hidden [B,T,H] before the final norm, logits [B,T,V], new caches).

        ``segment_ids`` marks packed examples (no caches): attention stays inside a
        segment, and ``positions`` restart at 0 in each one.
        """
        x, normed, new_caches = self.trunk_features(tokens_BxT, positions_BxT, caches, segment_ids_BxT)
        return x, self.head(normed), new_caches

    def trunk_features(self, tokens_BxT: Array, positions_BxT: Array, caches: list[KVCache] | None = None,
                       segment_ids_BxT: Array | None = None):
        """``trunk`` without the LM head -> (hidden before the final norm, final-normed hidden [B,T,H], caches)."""
        x = self.embed(tokens_BxT)
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, positions_BxT, None if caches is None else caches[i], segment_ids_BxT)
            new_caches.append(c)
        return x, self.norm(x), (None if caches is None else new_caches)

    def mtp_depth(self, depth: int, hidden_BxTxH: Array, tokens_BxT: Array, positions_BxT: Array,
                  cache: KVCache | None = None, frozen: bool = False, last_only: bool = False):
        """One MTP depth (1-based). ``tokens`` are x_{t+depth} at each position t.

        Returns (hidden for the next depth [B,T,H], logits [B,T,V] (or [B,1,V] with
        ``last_only``: the decoder needs only the frontier's draft), new cache).
        ``frozen`` reads the embedding and LM head through stop_gradient; the caller
        detaches the trunk hidden itself (depth >= 2 hiddens must keep their gradient).
        """
        h, normed, new_cache = self.mtp_depth_features(depth, hidden_BxTxH, tokens_BxT, positions_BxT, cache, frozen)
        if last_only:
            normed = normed[:, -1:]
        return h, self.head(normed, frozen), new_cache

    def mtp_depth_features(self, depth: int, hidden_BxTxH: Array, tokens_BxT: Array, positions_BxT: Array,
                           cache: KVCache | None = None, frozen: bool = False):
        """``mtp_depth`` without the LM head -> (hidden for the next depth, final-normed hidden [B,T,H], cache)."""
        module = self.mtp[self.config.mtp_module_for_depth[depth - 1]]
        return module(self.embed(tokens_BxT, frozen), hidden_BxTxH, positions_BxT, cache)

    # -- the teacher-forced forward used for training -------------------------------------------
    def __call__(self, tokens_BxT: Array, *, freeze_trunk: bool = False) -> PolicyOutput:
        f = self.features(tokens_BxT, freeze_trunk=freeze_trunk)
        logits = apply_head(f.normed, f.head)
        if freeze_trunk:
            logits = jax.lax.stop_gradient(logits)
        return PolicyOutput(logits=logits, hidden=f.hidden, mtp_logits=apply_head(f.mtp_normed, f.head))

    def features(self, tokens_BxT: Array, *, freeze_trunk: bool = False, with_mtp: bool = True) -> PolicyFeatures:
        """The teacher-forced forward without logits; ``freeze_trunk`` as in ``__call__`` (the
        returned ``head`` is then detached too). ``with_mtp=False`` skips the MTP depths
        (``mtp_normed`` is then [B, T, 0, H])."""
        b, t = tokens_BxT.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        hidden, normed, _ = self.trunk_features(tokens_BxT, positions)
        if with_mtp:
            mtp_normed = self.mtp_stack_features(hidden, tokens_BxT, positions, frozen=freeze_trunk)
        else:
            mtp_normed = jnp.zeros((b, t, 0, normed.shape[-1]), normed.dtype)
        return PolicyFeatures(hidden=hidden, normed=maybe_stop(normed, freeze_trunk), mtp_normed=mtp_normed,
                              head=self.head_weight(freeze_trunk))

    def mtp_stack(self, hidden_BxTxH: Array, tokens_BxT: Array, positions_BxT: Array, frozen: bool = False) -> Array:
        """Every depth's teacher-forced drafts [B,T,K,V] from the trunk hidden; ``frozen`` detaches the
        trunk (hidden, embedding, LM head) so no MTP gradient reaches it."""
        normed = self.mtp_stack_features(hidden_BxTxH, tokens_BxT, positions_BxT, frozen)
        return apply_head(normed, self.head_weight(frozen))

    def mtp_stack_features(self, hidden_BxTxH: Array, tokens_BxT: Array, positions_BxT: Array,
                           frozen: bool = False) -> Array:
        """``mtp_stack`` without the LM head: every depth's final-normed hidden [B,T,K,H]."""
        h = maybe_stop(hidden_BxTxH, frozen)  # detach the trunk; depths still chain gradients
        normed = []
        for k in range(1, self.config.num_mtp_depths + 1):
            h, n, _ = self.mtp_depth_features(k, h, shift_tokens(tokens_BxT, k), positions_BxT, frozen=frozen)
            normed.append(n)
        return jnp.stack(normed, axis=2)

