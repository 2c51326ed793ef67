"""GRPO advantages, aggregations and policy loss pinned to hand-computed numbers.

Expected values come from the formulas evaluated by hand (or with `math` on plain
floats), never from the code under test.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bebop_jax.config import GRPOConfig
from bebop_jax.rl import AGGREGATIONS, group_advantages, policy_loss

LN = math.log
CFG2 = GRPOConfig(group_size=2)  # clip_low 0.2, clip_high 0.28, is_cap 2, token-mean
loss_fn = jax.jit(policy_loss, static_argnames="config")  # one compile per case, not per op


def _f32(x):
    return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------- advantages

REWARDS = [1.0, 0.0, 0.0, 1.0,  0.1, 0.1, 0.1, 0.1,  0.0, 0.0, 0.0, 1.0]


def test_group_advantages_grpo_sample_std():
    adv = np.asarray(group_advantages(_f32(REWARDS), 4))
    assert adv.dtype == np.float32
    # Group 0: mean 0.5, centred +-0.5, sample std sqrt(1/3) -> +-sqrt(3)/2 (population std
    # would give +-1). Group 1: all equal -> exactly 0. Group 2: mean 0.25, centred
    # [-.25, -.25, -.25, .75], sample var 0.75/3 -> std 0.5 -> [-.5, -.5, -.5, 1.5].
    h = math.sqrt(3) / 2
    np.testing.assert_allclose(adv[[0, 1, 2, 3]], [h, -h, -h, h], rtol=1e-5)
    assert np.all(adv[4:8] == 0.0)  # exact, and no NaN from 0 / (0 + eps)
    np.testing.assert_allclose(adv[8:], [-0.5, -0.5, -0.5, 1.5], rtol=1e-5)


def test_group_advantages_tie_is_exactly_zero():
    # float32 mean of [0.1] * 3 is off by one ulp; without a tie guard GRPO turns that
    # round-off into A ~ -0.007 (it is divided by std + eps ~ 1e-6).
    adv = np.asarray(group_advantages(_f32([0.1, 0.1, 0.1, 1.0, 0.0, 0.0]), 3))
    assert np.all(adv[:3] == 0.0)
    np.testing.assert_allclose(adv[3:], [2 / 3 / math.sqrt(1 / 3), -1 / 3 / math.sqrt(1 / 3),
                                         -1 / 3 / math.sqrt(1 / 3)], rtol=1e-5)


def test_group_advantages_dr_grpo_and_jit():
    fn = jax.jit(group_advantages, static_argnames=("group_size", "std_normalize"))
    adv = np.asarray(fn(_f32(REWARDS), group_size=4, std_normalize=False))
    np.testing.assert_allclose(adv, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.25, -0.25, -0.25, 0.75],
                               atol=1e-7)
    assert np.all(adv[4:8] == 0.0)


@pytest.mark.parametrize("rewards,group_size,pattern", [
    (np.zeros(4), 1, "group_size"),
    (np.zeros(6), 4, r"group_size.*N=6|N=6.*group_size"),
    (np.zeros((2, 4)), 4, "rewards"),
])
def test_group_advantages_bad_input(rewards, group_size, pattern):
    with pytest.raises(ValueError, match=pattern):
        group_advantages(rewards, group_size)


# ----------------------------------------------------------------------- aggregations

TERM = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0], [7.0, 8.0, 9.0, 10.0]]
MASK = [[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]  # rows of 3, 1, 0 tokens


@pytest.mark.parametrize("name,expected", [
    ("token-mean", (1 + 2 + 3 + 5) / 4),             # 2.75
    ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 5) / 2),  # 3.5: the empty row is not a row
    ("seq-mean-token-sum-norm", (1 + 2 + 3 + 5) / (3 * 4)),  # 0.91667: B*T, T padded
])
def test_aggregations(name, expected):
    assert sorted(AGGREGATIONS) == ["seq-mean-token-mean", "seq-mean-token-sum-norm", "token-mean"]
    assert float(AGGREGATIONS[name](_f32(TERM), _f32(MASK))) == pytest.approx(expected, rel=1e-6)
    empty = float(AGGREGATIONS[name](_f32(TERM), jnp.zeros((3, 4))))
    assert empty == 0.0  # all masked: 0, not NaN


@pytest.mark.parametrize("name,expected", [
    # r = 1 everywhere: term = -A per token. A = [1, -2, 0.5, 3], rows of 3, 1, 2, 0 tokens.
    ("token-mean", -(1 * 3 - 2 * 1 + 0.5 * 2) / 6),
    ("seq-mean-token-mean", -(1 - 2 + 0.5) / 3),
    ("seq-mean-token-sum-norm", -(1 * 3 - 2 * 1 + 0.5 * 2) / (4 * 3)),
])
def test_policy_loss_uses_configured_aggregation(name, expected):
    mask = _f32([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
    logp = _f32(np.full((4, 3), -1.3))
    cfg = dataclasses.replace(CFG2, aggregation=name)
    loss, metrics = loss_fn(logp, logp, _f32([1.0, -2.0, 0.5, 3.0]), mask, cfg)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------- clipping

# Row 0 has A = +1, row 1 A = -1; ratios r per token, the last token of each row masked
# (its ratio 10 must not show up anywhere).
RATIOS = [[1.5, 0.5, 1.1, 10.0], [0.5, 1.5, 0.7, 10.0]]
CLIP_MASK = [[1, 1, 1, 0], [1, 1, 1, 0]]


def _clip_case():
    old = _f32(np.full((2, 4), -2.0))
    logp = old + _f32(np.log(RATIOS))
    return logp, old, _f32([1.0, -1.0]), _f32(CLIP_MASK)


def test_clipping_both_sides_loss_and_metrics():
    logp, old, adv, mask = _clip_case()
    loss, m = loss_fn(logp, old, adv, mask, CFG2)
    # A=+1: r=1.5 -> clip 1.28 -> -1.28; r=0.5 -> min(0.5, 0.8) -> -0.5; r=1.1 -> -1.1.
    # A=-1: r=0.5 -> min(-0.5, -0.8) -> 0.8; r=1.5 -> min(-1.5, -1.28) -> 1.5;
    #       r=0.7 -> min(-0.7, -0.8) -> 0.8.
    terms = [-1.28, -0.5, -1.1, 0.8, 1.5, 0.8]
    assert float(loss) == pytest.approx(sum(terms) / 6, rel=1e-5)  # 0.036667
    assert float(m["clip_frac_high"]) == pytest.approx(1 / 6)  # (A>0, r=1.5)
    assert float(m["clip_frac_low"]) == pytest.approx(2 / 6)   # (A<0, r=0.5), (A<0, r=0.7)
    assert float(m["ratio_mean"]) == pytest.approx(5.8 / 6, rel=1e-6)
    assert float(m["ratio_max"]) == pytest.approx(1.5, rel=1e-6)
    assert float(m["kl"]) == 0.0 and float(m["is_weight_mean"]) == 1.0
    assert float(m["adv_mean"]) == 0.0 and float(m["adv_std"]) == pytest.approx(1.0)
    assert float(m["zero_adv_group_frac"]) == 0.0
    assert set(m) == {"clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_max", "kl",
                      "is_weight_mean", "adv_mean", "adv_std", "zero_adv_group_frac", "loss"}
    assert all(v.dtype == jnp.float32 and v.shape == () for v in m.values())


def test_gradient_sign_and_masked_tokens():
    logp, old, adv, mask = _clip_case()
    grad = np.asarray(jax.grad(lambda lp: loss_fn(lp, old, adv, mask, CFG2)[0])(logp))
    # d(-r A)/d logp = -r A on unclipped tokens, / 6 tokens; 0 where the clip is active.
    expected = [[0.0, -0.5 / 6, -1.1 / 6, 0.0], [0.0, 1.5 / 6, 0.0, 0.0]]
    np.testing.assert_allclose(grad, expected, atol=1e-7, rtol=1e-5)
    assert grad[0, 2] < 0  # A > 0 inside the clip range: descent raises logp
    assert np.all(grad[:, 3] == 0.0)  # masked tokens get no gradient


def test_garbage_at_masked_tokens_is_harmless():
    logp, old, adv, mask = _clip_case()
    logp, old = logp.at[:, 3].set(jnp.nan), old.at[:, 3].set(jnp.inf)
    loss, grad = jax.value_and_grad(lambda lp: loss_fn(lp, old, adv, mask, CFG2)[0])(logp)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))


# ----------------------------------------------------------------------- KL, behaviour weights

def _k3(x):  # x = ref - logp
    return math.exp(x) - x - 1


def test_kl_term():
    logp = _f32(np.full((2, 3), -1.0))
    ref = logp + _f32([[LN(2), 0.0, 5.0], [LN(4), 5.0, 5.0]])  # masked tokens: 5.0
    mask = _f32([[1, 1, 0], [1, 0, 0]])
    adv = _f32([1.0, -1.0])
    k3_sum = _k3(LN(2)) + _k3(0.0) + _k3(LN(4))  # 0.306853 + 0 + 1.613706
    cfg = dataclasses.replace(CFG2, kl_coef=0.1)
    loss, m = loss_fn(logp, logp, adv, mask, cfg, ref_logp=ref)
    assert float(m["kl"]) == pytest.approx(k3_sum / 3, rel=1e-5)  # 0.640186
    assert float(loss) == pytest.approx((-1 - 1 + 1 + 0.1 * k3_sum) / 3, rel=1e-5)
    # kl_coef = 0: the KL is reported but not added.
    loss0, m0 = loss_fn(logp, logp, adv, mask, CFG2, ref_logp=ref)
    assert float(loss0) == pytest.approx(-1 / 3, rel=1e-6)
    assert float(m0["kl"]) == pytest.approx(k3_sum / 3, rel=1e-5)
    # d/dlogp of 0.1 k3 = 0.1 (1 - exp(ref - logp)); token (0, 0): (-1 + 0.1 (1 - 2)) / 3.
    grad = jax.grad(lambda lp: loss_fn(lp, logp, adv, mask, cfg, ref_logp=ref)[0])(logp)
    assert float(grad[0, 0]) == pytest.approx((-1 - 0.1) / 3, rel=1e-5)


def test_behaviour_weights_with_cap():
    logp = _f32(np.full((2, 3), -0.7))
    # w = exp(old - behaviour) = [[0.5, 3 -> capped 2, masked 100], [1.5, masked, masked]].
    behaviour = logp - _f32(np.log([[0.5, 3.0, 100.0], [1.5, 100.0, 100.0]]))
    mask = _f32([[1, 1, 0], [1, 0, 0]])
    adv = _f32([1.0, -1.0])
    loss, m = loss_fn(logp, logp, adv, mask, CFG2, behaviour_logp=behaviour)
    assert float(loss) == pytest.approx((-0.5 - 2.0 + 1.5) / 3, rel=1e-5)  # uncapped: -2/3
    assert float(m["is_weight_mean"]) == pytest.approx((0.5 + 2.0 + 1.5) / 3, rel=1e-5)
    assert float(m["ratio_mean"]) == pytest.approx(1.0)
    # The weight is a constant: no gradient reaches behaviour_logp.
    g = jax.grad(lambda b: loss_fn(logp, logp, adv, mask, CFG2, behaviour_logp=b)[0])(behaviour)
    assert np.all(np.asarray(g) == 0.0)


def test_behaviour_equal_to_old_gives_weight_one():
    rng = np.random.default_rng(0)
    old = _f32(-rng.uniform(0.1, 3.0, (4, 5)))
    logp = old + _f32(0.3 * rng.standard_normal((4, 5)))
    mask = _f32(np.tri(4, 5, 1))
    adv = _f32([0.7, -0.2, 1.1, -1.6])
    plain, _ = loss_fn(logp, old, adv, mask, CFG2)
    weighted, m = loss_fn(logp, old, adv, mask, CFG2, behaviour_logp=old)
    assert float(m["is_weight_mean"]) == 1.0
    assert float(weighted) == float(plain)


# ----------------------------------------------------------------------- advantage metrics

def test_advantage_metrics_and_zero_groups():
    adv = _f32([0.0, 0.0, 0.5, -1.5, 0.0, 2.0])  # groups of 2: [0, 0] | [.5, -1.5] | [0, 2]
    logp = _f32(np.zeros((6, 2)))
    _, m = loss_fn(logp, logp, adv, jnp.ones((6, 2)), CFG2)
    assert float(m["zero_adv_group_frac"]) == pytest.approx(1 / 3)  # [0, 2] is not all zero
    assert float(m["adv_mean"]) == pytest.approx(1.0 / 6, rel=1e-6)
    var = sum((a - 1 / 6) ** 2 for a in [0, 0, 0.5, -1.5, 0, 2]) / 6
    assert float(m["adv_std"]) == pytest.approx(math.sqrt(var), rel=1e-5)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(old_logp=np.zeros((2, 3))), "old_logp"),
    (dict(mask=np.ones((2, 3))), "mask"),
    (dict(advantages=np.zeros(3)), "advantages"),
    (dict(ref_logp=np.zeros((4, 2))), "ref_logp"),
    (dict(behaviour_logp=np.zeros((2, 5))), "behaviour_logp"),
    (dict(logp=np.zeros(8), old_logp=np.zeros(8), mask=np.ones(8)), "logp"),
    (dict(logp=np.zeros((3, 4)), old_logp=np.zeros((3, 4)), mask=np.ones((3, 4)),
          advantages=np.zeros(3)), "group_size"),  # B=3 not divisible by group_size 2
])
def test_policy_loss_bad_shapes(kwargs, pattern):
    args = dict(logp=np.zeros((2, 4)), old_logp=np.zeros((2, 4)), advantages=np.zeros(2),
                mask=np.ones((2, 4)), config=CFG2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        policy_loss(**args)


# ----------------------------------------------------------------------- config

def test_unknown_aggregation_error_lists_the_registered_names():
    """(The other GRPOConfig field checks are in test_config.py's table.)"""
    with pytest.raises(ValueError, match=r"^GRPOConfig\.aggregation: ") as err:
        GRPOConfig(aggregation="sequence-mean")
    for name in AGGREGATIONS:
        assert name in str(err.value)


def test_grpo_config_accepts_every_registered_aggregation():
    cfg = GRPOConfig()
    assert (cfg.group_size, cfg.clip_low, cfg.clip_high, cfg.is_cap) == (8, 0.2, 0.28, 2.0)
    for name in AGGREGATIONS:
        assert GRPOConfig(aggregation=name).aggregation == name
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.group_size = 4
    hash(cfg)  # static argument of jit
