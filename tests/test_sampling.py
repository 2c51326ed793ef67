"""Tests for bebop_jax.sampling: temperature, top-k, top-p, their order, validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from bebop_jax import sampling

ALPHA = 1e-3  # significance level of the statistical tests


def kept(logits, **kw):
    """Indices kept by process_logits for a 1-D logits vector."""
    out = np.asarray(sampling.process_logits(jnp.asarray(logits, jnp.float32), **kw))
    return set(np.flatnonzero(np.isfinite(out)).tolist())


def test_temperature_scales_logits_in_float32():
    x = jnp.array([[1.0, -2.0, 3.5]], jnp.bfloat16)
    out = sampling.process_logits(x, temperature=2.0)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, np.array([[0.5, -1.0, 1.75]]), rtol=0, atol=0)
    p = sampling.probs(x, temperature=2.0)
    want = np.exp([0.5, -1.0, 1.75]) / np.exp([0.5, -1.0, 1.75]).sum()
    np.testing.assert_allclose(p[0], want, rtol=1e-6)
    np.testing.assert_allclose(sampling.log_probs(x, temperature=2.0)[0], np.log(want),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        sampling.log_probs(x, temperature=0.0)


def test_temperature_zero_is_greedy():
    x = jnp.array([[0.1, 2.0, 2.0, -1.0], [5.0, 0.0, 4.9, 1.0]])
    np.testing.assert_array_equal(sampling.process_logits(x, temperature=0.0), x)
    # Greedy ignores the key and picks the first maximum.
    toks = sampling.sample(jax.random.key(0), x, temperature=0.0, top_k=2, top_p=0.5)
    np.testing.assert_array_equal(toks, [1, 0])
    assert toks.dtype == jnp.int32
    np.testing.assert_array_equal(sampling.probs(x, temperature=0.0),
                                  [[0, 1, 0, 0], [1, 0, 0, 0]])


def test_top_k_keeps_exactly_k_lower_index_wins_ties():
    x = [0.0, 3.0, 1.0, 3.0, 3.0, 2.0]
    assert kept(x, top_k=1) == {1}
    assert kept(x, top_k=2) == {1, 3}          # three-way tie at 3.0: lowest indices
    assert kept(x, top_k=4) == {1, 3, 4, 5}
    assert kept(x, top_k=6) == set(range(6))   # k >= V is off
    assert kept(x, top_k=100) == set(range(6))
    assert kept(x, top_k=0) == set(range(6))   # 0 is off
    # Random rows: always exactly k kept, and they are the k largest.
    rng = np.random.default_rng(0)
    xs = rng.integers(0, 5, size=(50, 40)).astype(np.float32)  # many ties
    out = np.asarray(sampling.process_logits(jnp.asarray(xs), top_k=7))
    keep = np.isfinite(out)
    assert (keep.sum(-1) == 7).all()
    for row, k_row in zip(xs, keep):
        order = sorted(range(40), key=lambda i: (-row[i], i))
        assert set(np.flatnonzero(k_row)) == set(order[:7])
    np.testing.assert_array_equal(out[keep], xs[keep])  # kept logits unchanged


def test_top_p_keeps_smallest_prefix_with_mass_at_least_p():
    logp = np.log(np.array([0.1, 0.5, 0.25, 0.15]))
    assert kept(logp, top_p=0.3) == {1}
    assert kept(logp, top_p=0.5) == {1}           # mass before token 2 is 0.5, not < 0.5
    assert kept(logp, top_p=0.7) == {1, 2}
    assert kept(logp, top_p=0.8) == {1, 2, 3}
    assert kept(logp, top_p=0.95) == {0, 1, 2, 3}
    assert kept(logp, top_p=1.0) == {0, 1, 2, 3}
    # Ties: ranked by index, so exactly the prefix the rule asks for.
    assert kept([1.0, 1.0, 1.0, 1.0], top_p=0.4) == {0, 1}
    # Random rows: kept mass >= p, and dropping the least likely kept token goes below p.
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(200, 30)).astype(np.float32) * 2
    for top_p in (0.3, 0.9):
        out = np.asarray(sampling.process_logits(jnp.asarray(xs), top_p=top_p))
        pr = np.exp(xs - xs.max(-1, keepdims=True))
        pr = pr / pr.sum(-1, keepdims=True)
        keep = np.isfinite(out)
        mass = (pr * keep).sum(-1)
        smallest_kept = np.where(keep, pr, np.inf).min(-1)
        assert (mass >= top_p - 1e-6).all()
        assert (mass - smallest_kept < top_p + 1e-6).all()
        # The kept set is a top set: every kept prob >= every dropped prob.
        largest_dropped = np.where(keep, -np.inf, pr).max(-1)
        assert (smallest_kept >= largest_dropped).all()


def test_order_is_temperature_then_top_k_then_top_p_on_renormalised():
    logp = np.log(np.array([0.4, 0.25, 0.2, 0.15]))
    # top-k 2 renormalises to [0.615, 0.385]: top-p 0.6 then keeps only token 0.
    # (top-p first on the raw distribution would keep {0, 1}: mass before 1 is 0.4.)
    assert kept(logp, top_k=2, top_p=0.6) == {0}
    assert kept(logp, top_p=0.6) == {0, 1}
    # Temperature is applied before top-p: flattening (T=3) needs more tokens,
    # sharpening (T=0.2) fewer.
    assert kept(logp, temperature=1.0, top_p=0.6) == {0, 1}
    assert kept(logp, temperature=3.0, top_p=0.6) == {0, 1, 2}
    assert kept(logp, temperature=0.2, top_p=0.6) == {0}
    want = np.array([0.4, 0.25]) ** (1 / 0.5)
    got = sampling.probs(jnp.asarray(logp, jnp.float32), temperature=0.5, top_k=2)
    np.testing.assert_allclose(got, np.r_[want / want.sum(), 0, 0], rtol=1e-5)


def test_batched_shapes_and_jit():
    x = np.random.default_rng(0).normal(size=(2, 3, 50)).astype(np.float32)
    f = jax.jit(sampling.process_logits, static_argnames=("temperature", "top_k", "top_p"))
    out = f(x, temperature=0.7, top_k=5, top_p=0.9)
    assert out.shape == (2, 3, 50)
    assert (np.isfinite(np.asarray(out)).sum(-1) <= 5).all()
    toks = sampling.sample(jax.random.key(1), x, temperature=0.7, top_k=5)
    assert toks.shape == (2, 3) and toks.dtype == jnp.int32


def test_sample_matches_processed_distribution_chi_squared():
    logits = jnp.log(jnp.array([0.3, 0.25, 0.2, 0.15, 0.1]))
    n = 200_000
    toks = sampling.sample(jax.random.key(42), jnp.broadcast_to(logits, (n, 5)),
                           temperature=0.8, top_k=4, top_p=0.8)
    counts = np.bincount(np.asarray(toks), minlength=5)
    # By hand: p^(1/0.8), keep the top 4, renormalise, keep the prefix with mass >= 0.8.
    w = np.array([0.3, 0.25, 0.2, 0.15]) ** 1.25
    w = w / w.sum()                      # [0.355, 0.283, 0.214, 0.149]
    want = np.r_[w[:3] / w[:3].sum(), 0, 0]  # mass before token 3 is 0.851 >= 0.8
    assert counts[3] == 0 and counts[4] == 0
    assert stats.chisquare(counts[:3], n * want[:3]).pvalue > ALPHA


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="1.0"), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.1), "top_p"),
])
def test_bad_settings_raise_value_error_naming_argument(kwargs, name):
    full = dict(temperature=1.0, top_k=0, top_p=1.0) | kwargs
    with pytest.raises(ValueError, match=name):
        sampling.validate_sampling(**full)
    with pytest.raises(ValueError, match=name):
        sampling.SamplingConfig(**full)
    with pytest.raises(ValueError, match=name):
        sampling.process_logits(jnp.zeros((3,)), **full)


def test_sampling_config_is_frozen_with_defaults_off():
    cfg = sampling.SamplingConfig()
    assert (cfg.temperature, cfg.top_k, cfg.top_p) == (1.0, 0, 1.0)
    assert not cfg.greedy and sampling.SamplingConfig(temperature=0).greedy
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.temperature = 2.0
    assert dataclasses.replace(cfg, top_k=3).top_k == 3
