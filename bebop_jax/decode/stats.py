"""``DecodeStats``: what one or more decode calls measured, as raw counts that pool exactly.

A call of ``generate`` / ``continue_generate`` returns one in ``GenerateResult.stats``;
``DecodeStats.merge`` pools several (the batches of a rollout, the calls of an RL step,
the rounds of a benchmark) by summing the counts, so every derived rate is the pooled
one: per-depth acceptance = accepted / attempted summed over calls, depth by depth;
mean accepted drafts = drafts accepted / verify steps; tokens per forward = tokens /
(verify steps + prefills); tokens per second = tokens / seconds. An unweighted mean of
the calls' ratios would weight a short call like a long one.

``to_dict()`` gives the JSON-able dict with the keys the stats dicts always had
(``per_depth_acceptance``, ``mean_accepted``, ``tokens_per_forward``, ...), and
``stats["key"]`` reads it, for code written against those dicts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import numpy as np


@dataclasses.dataclass(frozen=True)
class DecodeStats:
    method: str                        # "none" | "greedy" | "rejection" (after a merge: the one that drafted)
    num_draft: int                     # drafts per verify step (after a merge: the longest)
    accepted_counts: tuple[int, ...]   # [K] verify steps whose depth j was accepted (A >= j), summed over rows
    attempted_counts: tuple[int, ...]  # [K] verify steps that reached depth j (A >= j - 1), summed over rows
    drafts_accepted: int               # drafts accepted, summed over rows' verify steps
    row_steps: int                     # verify steps summed over live rows
    rows: int                          # rows decoded (each row's prefill is one target forward)
    tokens_generated: int
    target_forwards: int               # decode-loop steps + 1 (the prefill), summed over calls
    seconds: float = 0.0               # wall time of the calls (compile excluded)
    draft_lengths: tuple[int, ...] = ()  # num_draft of each call (default: (num_draft,), one call)
    adaptive: dict | None = None       # the DraftController's report after the (last) call, when adaptive

    def __post_init__(self):
        acc, att = tuple(int(x) for x in self.accepted_counts), tuple(int(x) for x in self.attempted_counts)
        if len(acc) != len(att):
            raise ValueError(f"DecodeStats: accepted_counts ({len(acc)}) and attempted_counts ({len(att)}) "
                             "need one entry per depth each")
        object.__setattr__(self, "accepted_counts", acc)
        object.__setattr__(self, "attempted_counts", att)
        object.__setattr__(self, "draft_lengths", tuple(int(k) for k in self.draft_lengths) or (self.num_draft,))

    @classmethod
    def from_output(cls, out: Any, *, num_draft: int, method: str, seconds: float = 0.0) -> "DecodeStats":
        """The stats of one fetched ``DecodeOutput`` (host numpy arrays), run with ``num_draft`` drafts."""
        lengths = np.asarray(out.lengths)
        return cls(method=method, num_draft=num_draft,
                   accepted_counts=tuple(np.asarray(out.depth_accepted).sum(axis=0)[:num_draft].tolist()),
                   attempted_counts=tuple(np.asarray(out.depth_attempted).sum(axis=0)[:num_draft].tolist()),
                   drafts_accepted=int(np.asarray(out.accepted).sum()) if num_draft else 0,
                   row_steps=int(np.asarray(out.verify_steps).sum()), rows=len(lengths),
                   tokens_generated=int(lengths.sum()), target_forwards=int(out.steps) + 1,
                   seconds=float(seconds))

    @classmethod
    def merge(cls, stats: Iterable["DecodeStats"], *, depths: int = 0) -> "DecodeStats":
        """Pool several calls' stats by summing their counts (see the module docstring).

        Calls of an adaptive spec may run different draft lengths: the per-depth counts are
        padded with zeros to the longest (or to ``depths``, when that is longer, so that a
        run's per-depth lists keep one length), and ``draft_lengths`` lists every call's.
        The merge of one is that one.
        """
        stats = list(stats)
        if not stats:
            raise ValueError("DecodeStats.merge: need at least one DecodeStats")
        if len(stats) == 1 and len(stats[0].accepted_counts) >= depths:
            return stats[0]
        drafting = {s.method for s in stats} - {"none"}  # an adaptive call that chose k = 0 ran "none"
        if len(drafting) > 1:
            raise ValueError(f"DecodeStats.merge: stats of different verification methods {sorted(drafting)}")
        k = max([depths] + [len(s.accepted_counts) for s in stats])
        pad = lambda counts: np.pad(np.asarray(counts, np.int64), (0, k - len(counts)))
        return cls(method=drafting.pop() if drafting else "none",
                   num_draft=max(s.num_draft for s in stats),
                   accepted_counts=tuple(sum((pad(s.accepted_counts) for s in stats), np.zeros(k, np.int64))),
                   attempted_counts=tuple(sum((pad(s.attempted_counts) for s in stats), np.zeros(k, np.int64))),
                   drafts_accepted=sum(s.drafts_accepted for s in stats),
                   row_steps=sum(s.row_steps for s in stats), rows=sum(s.rows for s in stats),
                   tokens_generated=sum(s.tokens_generated for s in stats),
                   target_forwards=sum(s.target_forwards for s in stats),
                   seconds=sum(s.seconds for s in stats),
                   draft_lengths=tuple(k_ for s in stats for k_ in s.draft_lengths),
                   adaptive=next((s.adaptive for s in reversed(stats) if s.adaptive is not None), None))

    # -- derived ------------------------------------------------------------------------------
    @property
    def per_depth_acceptance(self) -> list[float]:
        """[K] conditional acceptance of depth j given depths < j were accepted (pooled)."""
        return [a / max(n, 1) for a, n in zip(self.accepted_counts, self.attempted_counts)]

    @property
    def mean_accepted(self) -> float:
        """Accepted drafts per live verify step (0 for vanilla decoding)."""
        return self.drafts_accepted / max(self.row_steps, 1) if self.num_draft else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens each row got per target forward it took part in (its prefill emits one)."""
        return self.tokens_generated / max(self.row_steps + self.rows, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_generated / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        """JSON-able, with the keys of the stats dicts the decoder used to return."""
        out = {
            "method": self.method,
            "num_draft": self.num_draft,
            "per_depth_acceptance": self.per_depth_acceptance,
            "mean_accepted": self.mean_accepted,
            "target_forwards": self.target_forwards,
            "tokens_per_forward": self.tokens_per_forward,
            "tokens_generated": self.tokens_generated,
            "row_steps": self.row_steps,
            "accepted_counts": list(self.accepted_counts),
            "attempted_counts": list(self.attempted_counts),
            "drafts_accepted": self.drafts_accepted,
            "rows": self.rows,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            "draft_lengths": list(self.draft_lengths),
        }
        if self.adaptive is not None:
            out["adaptive"] = self.adaptive
        return out

    def __getitem__(self, key: str):
        """``stats["mean_accepted"]``: ``to_dict()[key]``, for code written against the old dicts."""
        return self.to_dict()[key]
