"""Tests for bebop_jax.decode.rejection (XLA path) and rejection_pallas (kernel).

Statistical claims use chi-squared / binomial tests at significance ALPHA with fixed
seeds. Distributions are written down by hand in numpy, independently of the code
under test.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from bebop_jax.decode import rejection
from bebop_jax.decode import rejection_pallas

ALPHA = 1e-3  # significance level of every statistical test in this file
N = 200_000   # rows (independent verify calls) per statistical test


def log(p):
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(p, np.float64)).astype(np.float32)


def processed(p, temperature=1.0, top_k=0, top_p=1.0):
    """Hand-written temperature -> top-k -> top-p on a probability vector (no ties)."""
    p = np.asarray(p, np.float64)
    w = np.where(p > 0, p, 0.0) ** (1.0 / temperature)
    w = w / w.sum()
    order = np.argsort(-w, kind="stable")
    keep = np.zeros(len(w), bool)
    keep[order[:top_k] if top_k else order] = True
    keep &= w > 0
    w = np.where(keep, w, 0.0) / np.where(keep, w, 0.0).sum()
    if top_p < 1.0:
        before = np.cumsum(w[order]) - w[order]
        keep_sorted = before < top_p
        keep = np.zeros(len(w), bool)
        keep[order[keep_sorted]] = True
        w = np.where(keep, w, 0.0) / np.where(keep, w, 0.0).sum()
    return w


def chi2_pvalue(tokens, want):
    """Asserts zero-probability tokens never occur; returns the chi-squared p-value."""
    counts = np.bincount(np.asarray(tokens), minlength=len(want))
    assert counts.sum() == len(tokens)
    assert (counts[want == 0] == 0).all(), (counts, want)
    return stats.chisquare(counts[want > 0], len(tokens) * want[want > 0]).pvalue


def call(*args, **kw):
    return jax.device_get(rejection.rejection_sample(*args, **kw))


# --------------------------------------------------------------- distributional tests

P0 = np.array([0.3, 0.25, 0.2, 0.15, 0.1, 0.0])
# q puts no mass on token 0 (p > 0 there) and mass on token 5 (p = 0 there).
Q0 = np.array([0.0, 0.35, 0.1, 0.2, 0.05, 0.3])


@pytest.mark.parametrize("method", ["rejection", "greedy"])
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.8, 4, 0.8)])
def test_first_token_is_distributed_as_target(method, temperature, top_k, top_p):
    rng = np.random.default_rng(0)
    p_want = processed(P0, temperature, top_k, top_p)
    q_used = processed(Q0, temperature, top_k, top_p)
    if top_k:  # the hand computation in the test name: p keeps {0,1,2}, q keeps {1,3,5}
        np.testing.assert_array_equal(p_want > 0, [1, 1, 1, 0, 0, 0])
        np.testing.assert_array_equal(q_used > 0, [0, 1, 0, 1, 0, 1])
    k, v = 2, len(P0)
    if method == "rejection":
        x0 = rng.choice(v, size=N, p=q_used)
    else:
        x0 = np.full(N, np.argmax(q_used))
    drafts = np.stack([x0, rng.integers(0, v, N)], 1).astype(np.int32)
    target = np.broadcast_to(log(P0), (N, k + 1, v))
    draft = np.broadcast_to(log(Q0), (N, k, v))
    tokens, n = call(target, draft, drafts, jax.random.key(1), temperature=temperature,
                     top_k=top_k, top_p=top_p, method=method)
    assert chi2_pvalue(tokens[:, 0], p_want) > ALPHA
    # Acceptance at depth 1: 1 - TV(p, q) for rejection, p(argmax q) for greedy.
    alpha = (np.minimum(p_want, q_used).sum() if method == "rejection"
             else p_want[np.argmax(q_used)])
    assert stats.binomtest(int((n >= 1).sum()), N, alpha).pvalue > ALPHA
    # Emitted prefix and padding.
    assert ((tokens[:, 0] == x0) | (n == 0)).all()
    assert (tokens[n == 0, 1:] == -1).all()


def test_joint_of_first_two_tokens_is_target_chain():
    """t0 ~ p0 and t1 ~ p1(. | t0), where t1 comes from the same call whenever the call
    emits two tokens (accepted draft, residual at depth 2, or bonus) and from a fresh
    target sample otherwise (what the decoder's next step does)."""
    rng = np.random.default_rng(2)
    v = 5
    p0 = np.array([0.35, 0.25, 0.2, 0.15, 0.05])
    q0 = np.array([0.1, 0.4, 0.0, 0.3, 0.2])
    p1 = rng.dirichlet(np.ones(v), size=v)          # p1[a] = target after token a
    q1 = rng.dirichlet(np.ones(v) * 0.5, size=v)    # q1[a] = draft after token a
    x0 = rng.choice(v, size=N, p=q0)
    x1 = (q1[x0].cumsum(-1) < rng.random(N)[:, None]).sum(-1).clip(0, v - 1)  # ~ q1[x0]
    target = np.stack([np.broadcast_to(log(p0), (N, v)), log(p1[x0]),
                       np.zeros((N, v), np.float32)], 1)
    draft = np.stack([np.broadcast_to(log(q0), (N, v)), log(q1[x0])], 1)
    drafts = np.stack([x0, x1], 1).astype(np.int32)
    tokens, n = call(target, draft, drafts, jax.random.key(3))
    assert {0, 1, 2} <= set(np.unique(n).tolist())  # every path is exercised
    t0 = tokens[:, 0]
    fresh = (p1[t0].cumsum(-1) < rng.random(N)[:, None]).sum(-1).clip(0, v - 1)
    t1 = np.where(n >= 1, tokens[:, 1], fresh)
    want = (p0[:, None] * p1).ravel()
    assert chi2_pvalue(t0 * v + t1, want) > ALPHA


def test_residual_is_exactly_the_leftover_mass():
    """p = [.5, .5, 0], q = [1, 0, 0]: the draft 0 is accepted half the time, and the
    residual max(p - q, 0) is a point mass on token 1."""
    v, k = 3, 1
    target = np.broadcast_to(log([0.5, 0.5, 0.0]), (N, k + 1, v))
    draft = np.broadcast_to(log([1.0, 0.0, 0.0]), (N, k, v))
    drafts = np.zeros((N, k), np.int32)
    for method in ("rejection", "greedy"):
        tokens, n = call(target, draft, drafts, jax.random.key(4), method=method)
        np.testing.assert_array_equal(tokens[:, 0], np.where(n == 1, 0, 1))
        assert stats.binomtest(int(n.sum()), N, 0.5).pvalue > ALPHA


def test_empty_residual_falls_back_to_target_without_nan():
    """p == q but the acceptance test is forced to reject (u = 1): the residual is all
    zero, so the token must come from p itself."""
    v, k = 6, 2
    p = np.array([0.05, 0.4, 0.0, 0.3, 0.25, 0.0])
    target = np.broadcast_to(log(p), (N, k + 1, v))
    draft = target[:, :k]
    drafts = np.ones((N, k), np.int32)
    gumbel = np.random.default_rng(5).gumbel(size=(N, rejection.noise_size(v)))
    tokens, n = jax.device_get(rejection.rejection_sample_with_noise(
        target, draft, drafts, np.ones((N, k), np.float32), gumbel, impl="xla"))
    assert (n == 0).all()
    assert chi2_pvalue(tokens[:, 0], p) > ALPHA


def test_randomness_is_uniform_and_gumbel():
    draw = jax.jit(rejection.draw_randomness, static_argnums=(1, 2, 3))
    u, g = jax.device_get(draw(jax.random.key(14), 500, 4, 4096))
    assert u.shape == (500, 4) and g.shape == (500, rejection.noise_size(4096))
    assert rejection.noise_size(4096) == 32 + 128
    assert ((u >= 0) & (u < 1)).all() and np.isfinite(g).all()
    assert stats.kstest(u.ravel(), "uniform").pvalue > ALPHA
    assert stats.kstest(g.ravel(), "gumbel_r").pvalue > ALPHA


# ----------------------------------------------------------------- deterministic cases


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 50)])
def test_identical_target_and_draft_accept_everything(temperature, top_k):
    b, k, v = 512, 4, 300
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(b, k + 1, v)).astype(np.float32) * 3
    bonus = 7
    logits[:, k] = np.where(np.arange(v) == bonus, 0.0, -np.inf)
    # Drafts from the processed draft distribution (here: the target's), by Gumbel-max.
    scaled = logits[:, :k] / temperature
    if top_k:
        kth = np.sort(scaled, axis=-1)[..., -top_k, None]  # continuous: no ties
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    drafts = np.argmax(scaled + rng.gumbel(size=scaled.shape), -1).astype(np.int32)
    tokens, n = call(logits, logits[:, :k], drafts, jax.random.key(3),
                     temperature=temperature, top_k=top_k)
    assert (n == k).all()
    np.testing.assert_array_equal(tokens[:, :k], drafts)
    assert (tokens[:, k] == bonus).all()  # bonus drawn from the one-hot p_K


@pytest.mark.parametrize("method", ["rejection", "greedy"])
def test_disjoint_supports_accept_nothing(method):
    """Also: draft tokens outside [0, V) are rejected (rows 0 and 1)."""
    b, k, v = 512, 3, 40
    rng = np.random.default_rng(7)
    low = np.arange(v) < v // 2
    target = np.where(low, rng.normal(size=(b, k + 1, v)), -np.inf).astype(np.float32)
    draft = np.where(~low, rng.normal(size=(b, k, v)), -np.inf).astype(np.float32)
    drafts = np.argmax(draft + rng.gumbel(size=draft.shape), -1).astype(np.int32)
    drafts[0, 0], drafts[1, 0] = -1, v
    tokens, n = call(target, draft, drafts, jax.random.key(8), method=method)
    assert (n == 0).all()
    assert (tokens[:, 0] < v // 2).all() and (tokens[:, 0] >= 0).all()
    assert (tokens[:, 1:] == -1).all()


@pytest.mark.parametrize("method", ["rejection", "greedy"])
def test_temperature_zero_is_exact_greedy(method):
    """One-hot targets force the outcome: accept while the draft equals the argmax, then
    emit the argmax (first index on ties). An out-of-range draft is never accepted."""
    b, k, v = 7, 3, 10
    argmax = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4],
                       [0, 0, 0, 0], [9, 8, 7, 6], [1, 2, 3, 4]])
    drafts = np.array([[1, 2, 3], [1, 2, 0], [1, 0, 3], [5, 2, 3], [0, 0, 0],
                       [9, 8, 6], [1, 2 + v, 3]], np.int32)
    want_n = np.array([3, 2, 1, 0, 3, 2, 1])
    target = np.where(np.arange(v) == argmax[..., None], 5.0, 0.0).astype(np.float32)
    target[4, :, 3] = 5.0  # tie with token 0: the first index (0) is the argmax
    draft = np.random.default_rng(0).normal(size=(b, k, v)).astype(np.float32)
    tokens, n = call(target, draft, drafts, jax.random.key(0), temperature=0.0,
                     method=method, impl="xla")
    np.testing.assert_array_equal(n, want_n)
    for row in range(b):
        m = want_n[row]
        np.testing.assert_array_equal(tokens[row, :m], drafts[row, :m])
        assert tokens[row, m] == argmax[row, m]
        assert (tokens[row, m + 1:] == -1).all()


@pytest.mark.parametrize("kwargs, name", [
    (dict(method="sample"), "method"),
    (dict(impl="cuda"), "impl"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p"),
])
def test_bad_options_raise_value_error_naming_argument(kwargs, name):
    t, d, x = np.zeros((2, 3, 5)), np.zeros((2, 2, 5)), np.zeros((2, 2), np.int32)
    with pytest.raises(ValueError, match=name):
        rejection.rejection_sample(t, d, x, jax.random.key(0), **kwargs)


@pytest.mark.parametrize("shapes, name", [
    (((2, 3, 5), (2, 2, 6), (2, 2)), "draft_logits"),
    (((2, 3, 5), (3, 2, 5), (2, 2)), "draft_logits"),
    (((2, 3, 5), (2, 2, 5), (2, 3)), "draft_tokens"),
    (((2, 1, 5), (2, 0, 5), (2, 0)), "target_logits"),
    (((3, 5), (2, 2, 5), (2, 2)), "target_logits"),
])
def test_bad_shapes_raise_value_error_naming_argument(shapes, name):
    t, d, x = (np.zeros(s, np.float32) for s in shapes)
    with pytest.raises(ValueError, match=name):
        rejection.rejection_sample(t, d, x.astype(np.int32), jax.random.key(0))


def test_float_draft_tokens_and_int_logits_are_rejected():
    t, d = np.zeros((2, 3, 5), np.float32), np.zeros((2, 2, 5), np.float32)
    with pytest.raises(ValueError, match="draft_tokens"):
        rejection.rejection_sample(t, d, np.zeros((2, 2), np.float32), jax.random.key(0))
    with pytest.raises(ValueError, match="target_logits"):
        rejection.rejection_sample(t.astype(np.int32), d, np.zeros((2, 2), np.int32),
                                   jax.random.key(0))
    with pytest.raises(ValueError, match="gumbel"):
        rejection.rejection_sample_with_noise(t, d, np.zeros((2, 2), np.int32),
                                              np.zeros((2, 2)), np.zeros((2, 5)))


# ---------------------------------------------------- XLA path vs reference vs kernel


def random_case(seed, b, k, v, dtype=jnp.float32, method="rejection", spread=3.0):
    """Target/draft logits close enough that several acceptance counts occur, and
    randomness drawn outside (numpy: no compiles). Greedy drafts are argmax q, as the
    method defines.

    Row 0 has p == q uniform on 4 tokens (normalisers exact in any summation order)
    and u = 1, which forces a rejection with an empty residual: the fallback path.
    """
    rng = np.random.default_rng(seed)
    target = rng.normal(size=(b, k + 1, v)).astype(np.float32) * spread
    target[:, :, : v // 4] += 4.0  # peaked: acceptances happen
    draft = target[:, :k] + rng.normal(size=(b, k, v)).astype(np.float32) * 0.7
    uniform4 = np.full(v, -np.inf, np.float32)
    uniform4[[3, 5, v // 2, v - 1]] = 0.0
    target[0], draft[0] = uniform4, uniform4
    target, draft = np.asarray(jnp.asarray(target, dtype)), np.asarray(jnp.asarray(draft, dtype))
    logits = draft.astype(np.float32)
    if method == "greedy":
        drafts = np.argmax(logits, -1)
    else:
        drafts = np.argmax(logits + rng.gumbel(size=logits.shape), -1)  # ~ softmax(draft)
    uniforms = rng.random((b, k)).astype(np.float32)
    uniforms[0] = 1.0
    gumbel = rng.gumbel(size=(b, rejection.noise_size(v))).astype(np.float32)
    return (target, draft, drafts.astype(np.int32), uniforms, gumbel)


def xla_tokens(case, **kw):
    return jax.device_get(rejection.rejection_sample_with_noise(*case, impl="xla", **kw))


@pytest.mark.parametrize("method, temperature, v, dtype", [
    ("rejection", 1.0, 1000, jnp.float32),
    ("rejection", 0.6, 2048, jnp.bfloat16),
    ("greedy", 0.6, 1000, jnp.float32),
    ("greedy", 0.0, 2048, jnp.bfloat16),
])
def test_reference_matches_xla_path(method, temperature, v, dtype):
    case = random_case(10, 64, 3, v, dtype, method)
    want = xla_tokens(case, temperature=temperature, method=method)
    reference = jax.jit(functools.partial(rejection_pallas.rejection_pallas_reference,
                                          temperature=temperature, method=method))
    got = jax.device_get(reference(*case))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    if temperature:
        assert len(np.unique(want[1])) >= 3  # the comparison covers several outcomes


class KernelCases:
    """Kernel vs XLA path, token for token. Subclasses pick INTERPRET. Shapes are kept
    small (the interpreter's compile time grows with the unrolled chunk code)."""

    INTERPRET = True

    def run(self, case, **kw):
        out = rejection_pallas.rejection_pallas(*case, interpret=self.INTERPRET or None,
                                                **kw)
        return jax.device_get(out)

    @pytest.mark.parametrize("method, temperature, v, k, dtype, chunk_rows", [
        ("rejection", 1.0, 4096, 2, jnp.float32, 16),  # 2 chunks in the fori_loop
        ("greedy", 0.7, 1024, 2, jnp.bfloat16, 32),
        ("rejection", 1.3, 776, 2, jnp.bfloat16, 32),  # L = 8 lanes: 3 chunks + 1 row
        ("rejection", 0.0, 1024, 3, jnp.float32, 32),
    ])
    def test_kernel_matches_xla_path(self, method, temperature, v, k, dtype, chunk_rows):
        case = random_case(11, 8, k, v, dtype, method)
        want = xla_tokens(case, temperature=temperature, method=method)
        got = self.run(case, temperature=temperature, method=method,
                       block_sizes=rejection_pallas.BlockSizes(chunk_rows))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        if temperature:
            assert want[1][0] == 0 and len(np.unique(want[1])) >= 2

    def test_public_api_with_top_k_top_p_matches_xla_path(self):
        case = random_case(12, 8, 2, 1024)
        kw = dict(temperature=0.8, top_k=100, top_p=0.9)
        want = xla_tokens(case, **kw)
        got = jax.device_get(rejection.rejection_sample_with_noise(*case, impl="pallas", **kw))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


class TestKernelInterpret(KernelCases):
    INTERPRET = True


if jax.default_backend() != "cpu":
    class TestKernelCompiled(KernelCases):
        INTERPRET = False


# ------------------------------------------------------------------ lowering for TPU/GPU


def lowered_text(fn, platform, dtype=jnp.float32, b=8, k=2, v=151936):
    args = (jax.ShapeDtypeStruct((b, k + 1, v), dtype), jax.ShapeDtypeStruct((b, k, v), dtype),
            jax.ShapeDtypeStruct((b, k), jnp.int32), jax.ShapeDtypeStruct((b, k), jnp.float32),
            jax.ShapeDtypeStruct((b, rejection.noise_size(v)), jnp.float32))
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def custom_calls(text):
    return set(re.findall(r"custom_call @([\w$.]+)", text))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("method, temperature", [("rejection", 1.0), ("greedy", 0.5),
                                                 ("rejection", 0.0)])
def test_kernel_lowers_to_mosaic_and_triton(dtype, method, temperature):
    fn = functools.partial(rejection_pallas.rejection_pallas, temperature=temperature,
                           method=method)
    tpu = lowered_text(fn, "tpu", dtype)
    assert "tpu_custom_call" in custom_calls(tpu)
    cuda = lowered_text(fn, "cuda", dtype)
    assert "__gpu$xla.gpu.triton" in custom_calls(cuda)
    for text in (tpu, cuda):  # the real kernel, not the interpreter's grid loop
        assert "stablehlo.while" not in text


def test_auto_impl_picks_kernel_on_accelerators_and_xla_on_cpu():
    def fn(t, d, x, u, g):
        return rejection.rejection_sample_with_noise(t, d, x, u, g, impl="auto")
    assert "tpu_custom_call" in custom_calls(lowered_text(fn, "tpu", v=4096))
    assert "__gpu$xla.gpu.triton" in custom_calls(lowered_text(fn, "cuda", v=4096))
    cpu = lowered_text(fn, "cpu", v=4096)
    assert not custom_calls(cpu) & {"tpu_custom_call", "__gpu$xla.gpu.triton"}
    assert "stablehlo.while" not in cpu  # XLA path, not the kernel interpreter
    case = random_case(13, 16, 2, 512)
    got = jax.device_get(rejection.rejection_sample_with_noise(*case, impl="auto"))
    want = xla_tokens(case)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
