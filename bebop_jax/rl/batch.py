"""The one batch contract between rollouts and the update: ``RolloutBatch``.

Arrays are token-aligned: column t is token t of a row (prompt, response and
environment turns concatenated, right-padded). ``loss_mask[b, t]`` is 1 on tokens
the policy generated (its own response tokens, EOS included) and 0 on prompt,
environment and padding tokens; log-prob columns hold log p(token t | tokens < t)
(0 where the mask is 0). ``old_logp`` (the proximal policy) is None when the update
is on-policy and single-step: the loss then uses its own stop-gradient log-probs.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bebop_jax.config import ModelConfig
from bebop_jax.parallel import batch_sharding

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RolloutBatch:
    tokens: Array                  # [B, T] int32
    loss_mask: Array               # [B, T] float32
    advantages: Array              # [B] float32
    behaviour_logp: Array          # [B, T] float32: from the decoder that sampled the tokens
    version: Array                 # [] int32: the policy version the rollouts were sampled with
    old_logp: Array | None = None  # [B, T] float32: the proximal policy (recomputed on the train mesh)
    ref_logp: Array | None = None  # [B, T] float32: the reference policy (KL term)

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    def trimmed(self, multiple: int = 16) -> "RolloutBatch":
        """Host batch without the all-padding columns beyond the longest row (rounded up to
        ``multiple``, so few distinct shapes compile): the update costs what the tokens need."""
        used = np.flatnonzero(np.asarray(self.loss_mask).any(axis=0))
        width = min(self.tokens.shape[1], -(-(int(used[-1]) + 1 if used.size else 1) // multiple) * multiple)
        cut = lambda x: None if x is None or np.ndim(x) < 2 else np.asarray(x)[:, :width]
        return dataclasses.replace(self, tokens=cut(self.tokens), loss_mask=cut(self.loss_mask),
                                   behaviour_logp=cut(self.behaviour_logp), old_logp=cut(self.old_logp),
                                   ref_logp=cut(self.ref_logp))

    def shardings(self, mesh: Mesh) -> "RolloutBatch":
        """Rows split over data x fsdp of ``mesh``; the version replicated."""
        rows = lambda x: None if x is None else batch_sharding(mesh, np.ndim(x))
        return RolloutBatch(
            tokens=rows(self.tokens), loss_mask=rows(self.loss_mask), advantages=rows(self.advantages),
            behaviour_logp=rows(self.behaviour_logp), version=NamedSharding(mesh, P()),
            old_logp=rows(self.old_logp), ref_logp=rows(self.ref_logp))

    def on(self, mesh: Mesh) -> "RolloutBatch":
        """The host batch as global arrays on ``mesh``; every process holds the same whole batch
        (rollouts are gathered to all of them) and contributes its devices' rows."""
        place = lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i, x=np.asarray(x): x[i])
        return jax.tree.map(place, self, self.shardings(mesh))

    def validate(self, model_config: ModelConfig, group_size: int, mesh: Mesh | None = None) -> None:
        """Shape checks on the host before anything is compiled; ValueError naming the field."""
        tokens = np.asarray(self.tokens) if not isinstance(self.tokens, jax.Array) else self.tokens
        if tokens.ndim != 2:
            raise ValueError(f"RolloutBatch.tokens: expected [B, T], got shape {tuple(tokens.shape)}")
        b, t = tokens.shape
        if t > model_config.max_seq_len:
            raise ValueError(f"RolloutBatch.tokens: length {t} exceeds ModelConfig.max_seq_len="
                             f"{model_config.max_seq_len}")
        for name in ("loss_mask", "behaviour_logp", "old_logp", "ref_logp"):
            x = getattr(self, name)
            if x is not None and tuple(np.shape(x)) != (b, t):
                raise ValueError(f"RolloutBatch.{name}: shape {tuple(np.shape(x))} does not match tokens {(b, t)}")
        if tuple(np.shape(self.advantages)) != (b,):
            raise ValueError(f"RolloutBatch.advantages: expected [B] = ({b},), got {tuple(np.shape(self.advantages))}")
        if b % group_size:
            raise ValueError(f"group_size: {b} rows do not split into groups of {group_size}")
        if mesh is not None and b % (mesh.shape["data"] * mesh.shape["fsdp"]):
            raise ValueError(f"RolloutBatch.tokens: batch size {b} is not divisible by data*fsdp = "
                             f"{mesh.shape['data'] * mesh.shape['fsdp']} of the mesh")
