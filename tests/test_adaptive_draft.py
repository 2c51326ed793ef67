"""The adaptive draft length (``SpecConfig(adaptive=True)`` + ``DraftController``)."""

import jax
import numpy as np
import pytest

from bebop_jax.config import SpecConfig
from bebop_jax.decode import DecodeStats, DraftController, expected_tokens, generate
from bebop_jax.decode.synthetic import agreeing_params, never_accepted_params
from bebop_jax.sampling import SamplingConfig

from test_decoder import CFG, random_params

K = 3
SPEC = SpecConfig("rejection", K, adaptive=True)
PROMPTS = np.random.default_rng(3).integers(1, CFG.vocab_size, (4, 6)).astype(np.int32)  # no token 0
LENS = np.array([6, 4, 5, 2], np.int32)


def test_expected_tokens_formula():
    a = [0.9, 0.5, 0.2]
    assert expected_tokens(a, 0) == 1.0
    assert expected_tokens(a, 1) == pytest.approx(1.9)
    assert expected_tokens(a, 3) == pytest.approx(1 + 0.9 + 0.45 + 0.09)


def test_choice_maximises_expected_tokens_per_unit_cost():
    ctl = DraftController(SPEC)
    ctl.set_costs(4, [1.0, 1.5, 1.7, 2.6])
    np.testing.assert_allclose(ctl.alpha, [0.8] * K)  # the stated prior
    # prior 0.8: tokens/cost = 1, 1.8/1.5 = 1.2, 2.44/1.7 = 1.435, 2.952/2.6 = 1.135 -> k = 2
    np.testing.assert_allclose(ctl.speedups(4), [1.0, 1.2, 2.44 / 1.7, 2.952 / 2.6])
    assert ctl.choose(4) == 2
    # a call at k = 2 that accepted almost nothing: the running average falls, vanilla wins
    ctl.observe(DecodeStats("rejection", 2, accepted_counts=[1, 0], attempted_counts=[200, 1], drafts_accepted=1,
                            row_steps=200, rows=4, tokens_generated=205, target_forwards=51))
    assert ctl.alpha[0] < 0.05 and ctl.alpha[2] == pytest.approx(0.8)  # depth 3 was not run: kept
    assert ctl.choose(4) == 0
    with pytest.raises(ValueError, match="batch"):
        ctl.choose(8)  # no costs for another batch size


# step costs of a memory-bound accelerator's shape, where drafting pays if drafts are accepted
CHEAP_DRAFTS = [1.0, 1.15, 1.3, 1.45]


def test_never_accepted_heads_settle_on_vanilla():
    params = never_accepted_params(CFG, random_params(CFG, 0))
    ctl = DraftController(SPEC)
    ctl.set_costs(len(PROMPTS), CHEAP_DRAFTS)
    for i in range(4):
        res = generate(params, CFG, PROMPTS, LENS, jax.random.key(i), max_new_tokens=12,
                       sampling=SamplingConfig(temperature=1.0), spec=SPEC, controller=ctl)
        assert res.stats.num_draft == ctl.chosen[-1] == res.stats.adaptive["draft_length"]
    assert ctl.chosen[0] == K, ctl.chosen  # the prior (0.8) made it draft the most ...
    assert ctl.chosen[1:] == [0, 0, 0], (ctl.chosen, ctl.alpha)  # ... and one call showed it does not pay
    assert ctl.alpha[0] < 0.05


@pytest.mark.slow
def test_calibration_measures_step_costs_and_falls_back_where_drafting_does_not_pay():
    """Measured costs on this CPU: a k-draft step costs more than a vanilla one; with drafts
    that are never accepted, no k can pay for itself and every call runs vanilla."""
    params = never_accepted_params(CFG, random_params(CFG, 0))
    ctl = DraftController(SPEC, calibration_repeats=5)
    for i in range(2):
        generate(params, CFG, PROMPTS, LENS, jax.random.key(i), max_new_tokens=40,
                 sampling=SamplingConfig(temperature=1.0), spec=SPEC, controller=ctl)
    cost = ctl.costs[len(PROMPTS)]
    assert cost.shape == (K + 1,) and cost[0] == 1.0 and np.all(np.isfinite(cost)), cost
    assert cost[K] > 1.05, cost  # K drafts + a (K+1)-token verify: more work than one vanilla step
    assert ctl.chosen[-1] == 0, (ctl.chosen, cost, ctl.alpha)


def test_agreeing_heads_settle_on_the_largest_draft():
    params = agreeing_params(CFG, random_params(CFG, 0))
    ctl = DraftController(SPEC)
    ctl.set_costs(len(PROMPTS), CHEAP_DRAFTS)
    for i in range(3):
        res = generate(params, CFG, PROMPTS, LENS, jax.random.key(i), max_new_tokens=12,
                       sampling=SamplingConfig(temperature=0.0), spec=SPEC, controller=ctl)
    assert ctl.chosen == [K, K, K], ctl.chosen
    assert np.all(ctl.alpha > 0.5), ctl.alpha
    assert res.stats.mean_accepted > 1.5, res.stats


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="adaptive"):
        SpecConfig("none", 3, adaptive=True)
    for k in (0, -2):
        with pytest.raises(ValueError, match="num_draft"):
            SpecConfig("rejection", k, adaptive=True)
    with pytest.raises(ValueError, match="spec"):
        DraftController(SpecConfig("rejection", 3))  # not adaptive
    ctl = DraftController(SPEC)
    with pytest.raises(ValueError, match="prompts"):
        ctl.calibrate(None, CFG, np.zeros((0, 4), np.int32), np.zeros((0,), np.int32), jax.random.key(0))
    with pytest.raises(ValueError, match="max_new_tokens"):  # too short a call to time two step counts
        ctl.calibrate(None, CFG, PROMPTS, LENS, jax.random.key(0), max_new_tokens=4)
    with pytest.raises(ValueError, match="costs"):
        ctl.set_costs(4, [1.0, 2.0])
    with pytest.raises(ValueError, match="controller"):
        generate(None, CFG, PROMPTS, LENS, jax.random.key(0), max_new_tokens=4, spec=SPEC)
    with pytest.raises(ValueError, match="controller"):
        generate(None, CFG, PROMPTS, LENS, jax.random.key(0), max_new_tokens=4,
                 spec=SpecConfig("greedy", 3, adaptive=True), controller=ctl)
