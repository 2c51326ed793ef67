"""DecodeStats pools calls exactly: sums of counts, not means of ratios."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from bebop_jax.decode import DecodeStats


def _short() -> DecodeStats:
    # 4 rows, 10 verify steps, K = 2: depth 1 accepted 9 of 10, depth 2 accepted 3 of 9
    return DecodeStats(method="rejection", num_draft=2, accepted_counts=(9, 3), attempted_counts=(10, 9),
                       drafts_accepted=12, row_steps=10, rows=4, tokens_generated=26, target_forwards=4,
                       seconds=0.5)


def _long() -> DecodeStats:
    # 2 rows, 90 verify steps: depth 1 accepted 30 of 90, depth 2 accepted 10 of 30
    return DecodeStats(method="rejection", num_draft=2, accepted_counts=(30, 10), attempted_counts=(90, 30),
                       drafts_accepted=40, row_steps=90, rows=2, tokens_generated=132, target_forwards=46,
                       seconds=1.5)


def test_one_call_derived_values():
    s = _short()
    assert s.per_depth_acceptance == [0.9, pytest.approx(1 / 3)]
    assert s.mean_accepted == pytest.approx(1.2)
    assert s.tokens_per_forward == pytest.approx(26 / 14)
    assert s.tokens_per_second == pytest.approx(52.0)
    assert s.draft_lengths == (2,)


def test_merge_pools_counts_not_ratios():
    a, b = _short(), _long()
    m = DecodeStats.merge([a, b])
    # pooled: sums of counts over sums of counts
    assert m.per_depth_acceptance == [pytest.approx(39 / 100), pytest.approx(13 / 39)]
    assert m.mean_accepted == pytest.approx(52 / 100)
    assert m.tokens_per_forward == pytest.approx(158 / 106)
    assert m.tokens_per_second == pytest.approx(158 / 2.0)
    assert (m.accepted_counts, m.attempted_counts) == ((39, 13), (100, 39))
    assert (m.row_steps, m.rows, m.tokens_generated, m.target_forwards, m.seconds) == (100, 6, 158, 50, 2.0)
    assert m.draft_lengths == (2, 2) and m.method == "rejection" and m.num_draft == 2
    # golden values an unweighted mean of the two calls' ratios would not give
    assert m.per_depth_acceptance[0] == pytest.approx(0.39)
    assert np.mean([a.per_depth_acceptance[0], b.per_depth_acceptance[0]]) == pytest.approx(0.6166666)
    assert m.mean_accepted == pytest.approx(0.52)
    assert np.mean([a.mean_accepted, b.mean_accepted]) == pytest.approx(0.8222222)


def test_merge_of_one_is_identity():
    s = _short()
    assert DecodeStats.merge([s]) == s
    assert DecodeStats.merge(iter([s])).to_dict() == s.to_dict()


def test_merge_pads_shorter_draft_lengths_and_keeps_the_method():
    vanilla = DecodeStats(method="none", num_draft=0, accepted_counts=(), attempted_counts=(), drafts_accepted=0,
                          row_steps=8, rows=2, tokens_generated=10, target_forwards=5)
    k1 = DecodeStats(method="greedy", num_draft=1, accepted_counts=(2,), attempted_counts=(4,), drafts_accepted=2,
                     row_steps=4, rows=2, tokens_generated=8, target_forwards=3)
    m = DecodeStats.merge([vanilla, k1, dataclasses.replace(_short(), method="greedy")])
    assert m.method == "greedy" and m.num_draft == 2 and m.draft_lengths == (0, 1, 2)
    assert m.accepted_counts == (11, 3) and m.attempted_counts == (14, 9)
    assert m.mean_accepted == pytest.approx(14 / 22)
    padded = DecodeStats.merge([vanilla], depths=1)
    assert padded.per_depth_acceptance == [0.0] and padded.mean_accepted == 0.0
    with pytest.raises(ValueError, match="different verification methods"):
        DecodeStats.merge([k1, _short()])
    with pytest.raises(ValueError, match="at least one"):
        DecodeStats.merge([])


def test_to_dict_keeps_the_old_keys_and_is_json():
    d = _short().to_dict()
    for key in ("method", "num_draft", "per_depth_acceptance", "mean_accepted", "target_forwards",
                "tokens_per_forward", "tokens_generated", "row_steps", "accepted_counts", "attempted_counts",
                "seconds", "tokens_per_second", "draft_lengths"):
        assert key in d
    assert "adaptive" not in d
    assert json.loads(json.dumps(d)) == d
    assert _short()["mean_accepted"] == d["mean_accepted"]
    report = {"draft_length": 2}
    assert dataclasses.replace(_short(), adaptive=report).to_dict()["adaptive"] == report


def test_from_output_counts_a_fetched_decode_output():
    from types import SimpleNamespace
    out = SimpleNamespace(lengths=np.array([5, 3]), accepted=np.array([3, 1]), verify_steps=np.array([3, 2]),
                          steps=np.array(3), depth_accepted=np.array([[2, 1, 0], [1, 0, 0]]),
                          depth_attempted=np.array([[3, 2, 1], [2, 1, 0]]))
    s = DecodeStats.from_output(out, num_draft=2, method="rejection", seconds=2.0)
    assert (s.accepted_counts, s.attempted_counts) == ((3, 1), (5, 3))
    assert (s.drafts_accepted, s.row_steps, s.rows, s.tokens_generated, s.target_forwards) == (4, 5, 2, 8, 4)
    assert s.mean_accepted == pytest.approx(0.8) and s.tokens_per_forward == pytest.approx(8 / 7)
    assert s.tokens_per_second == pytest.approx(4.0)
    vanilla = DecodeStats.from_output(out, num_draft=0, method="none")
    assert vanilla.per_depth_acceptance == [] and vanilla.mean_accepted == 0.0
