"""Vocabulary-chunked ops against the dense formulas: values, gradients, dtypes, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bebop_jax.ops import draft_agreement, draft_agreement_reference, token_logprobs, token_logprobs_reference

N, H, V = 7, 16, 61  # N and V prime: no chunk size divides them


def _inputs(seed=0, scale=1.0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 4)
    target = (scale * jax.random.normal(k[0], (N, H))).astype(dtype)
    draft = (scale * jax.random.normal(k[1], (N, H))).astype(dtype)
    head = jax.random.normal(k[2], (H, V)) / np.sqrt(H)
    ids = jax.random.randint(k[3], (N,), 0, V)
    return target, draft, head, ids


# weights that make every output row matter differently in the scalar we differentiate
W1, W2, W3 = jnp.arange(1.0, N + 1), jnp.cos(jnp.arange(N)), jnp.linspace(-1.0, 2.0, N)


def _tl_scalar(fn, **kw):
    def f(hidden, head, ids):
        logp, ent = fn(hidden, head, ids, **kw)
        return jnp.sum(W1 * logp) + jnp.sum(W2 * ent)
    return f


def _da_scalar(fn, **kw):
    def f(target, draft, head, ids):
        out = fn(target, draft, head, ids, **kw)
        return jnp.sum(W1 * out["alpha"]) + jnp.sum(W2 * out["kl"]) + jnp.sum(W3 * out["ce"])
    return f


def _close(a, b, rtol, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("chunk_size", [None, 1, 8, 61, 100])
def test_token_logprobs_values_and_gradients_equal_the_dense_formula(temperature, chunk_size):
    hidden, _, head, ids = _inputs()
    kw = dict(temperature=temperature)
    logp, ent = token_logprobs(hidden, head, ids, chunk_size=chunk_size, **kw)
    ref_logp, ref_ent = token_logprobs_reference(hidden, head, ids, **kw)
    assert logp.dtype == ent.dtype == jnp.float32 and logp.shape == ent.shape == (N,)
    _close(logp, ref_logp, 1e-5)
    _close(ent, ref_ent, 1e-5)
    grads = jax.grad(_tl_scalar(token_logprobs, chunk_size=chunk_size, **kw), argnums=(0, 1))(hidden, head, ids)
    ref = jax.grad(_tl_scalar(token_logprobs_reference, **kw), argnums=(0, 1))(hidden, head, ids)
    for g, r in zip(grads, ref):
        _close(g, r, 1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("chunk_size", [None, 1, 8, 61, 100])
def test_draft_agreement_values_and_gradients_equal_the_dense_formulas(temperature, chunk_size):
    target, draft, head, ids = _inputs(1)
    kw = dict(temperature=temperature)
    out = draft_agreement(target, draft, head, ids, chunk_size=chunk_size, **kw)
    ref = draft_agreement_reference(target, draft, head, ids, **kw)
    assert set(out) == {"alpha", "kl", "ce", "greedy_alpha", "target_entropy", "accuracy"}
    for key in out:
        assert out[key].dtype == jnp.float32 and out[key].shape == (N,)
        _close(out[key], ref[key], 1e-5)
    grads = jax.grad(_da_scalar(draft_agreement, chunk_size=chunk_size, **kw), argnums=(0, 1, 2))(
        target, draft, head, ids)
    ref_grads = jax.grad(_da_scalar(draft_agreement_reference, **kw), argnums=(0, 1, 2))(target, draft, head, ids)
    _close(grads[1], ref_grads[1], 1e-4, atol=1e-5)
    assert float(jnp.max(jnp.abs(grads[1]))) > 1e-3  # the draft does get a gradient
    # the target side and the LM head are read through stop_gradient
    assert not np.any(np.asarray(grads[0])) and not np.any(np.asarray(grads[2]))


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_head_grad_trains_the_draft_sides_lm_head(chunk_size):
    """Joint training: with head_grad the draft's use of the LM head gets its gradient (the
    target's use still does not), as autodiff of the dense formula with only the target stopped."""
    target, draft, head, ids = _inputs(3)
    kw = dict(temperature=0.8, head_grad=True)
    grads = jax.grad(_da_scalar(draft_agreement, chunk_size=chunk_size, **kw), argnums=(0, 1, 2))(target, draft, head, ids)
    ref = jax.grad(_da_scalar(draft_agreement_reference, **kw), argnums=(0, 1, 2))(target, draft, head, ids)
    assert not np.any(np.asarray(grads[0]))
    assert float(jnp.max(jnp.abs(grads[2]))) > 1e-3
    for g, r in zip(grads[1:], ref[1:]):
        _close(g, r, 1e-4, atol=1e-5)


def test_greedy_metrics_take_the_first_maximal_column():
    """Ties in the draft's logits: argmax is the first maximal column, as jnp.argmax, even when the
    tie spans chunks."""
    head = jnp.zeros((2, 10)).at[0, 3].set(1.0).at[0, 7].set(1.0)  # columns 3 and 7 tie
    draft = jnp.array([[2.0, 0.0]])
    target = jnp.array([[0.0, 1.0]])
    for chunk in (2, 4, 10):
        out = draft_agreement(target, draft, head, jnp.array([3]), chunk_size=chunk)
        ref = draft_agreement_reference(target, draft, head, jnp.array([3]))
        assert float(out["accuracy"][0]) == float(ref["accuracy"][0]) == 1.0
        _close(out["greedy_alpha"], ref["greedy_alpha"], 1e-6)


def test_draft_equal_to_target_agrees_fully():
    target, _, head, ids = _inputs(2)
    out = draft_agreement(target, target, head, ids, chunk_size=8)
    _close(out["alpha"], np.ones(N), 1e-5)
    _close(out["kl"], np.zeros(N), 0, atol=1e-5)


def test_bfloat16_hidden_sums_in_float32():
    hidden, draft, head, ids = _inputs(3, dtype=jnp.bfloat16)
    logp, ent = token_logprobs(hidden, head, ids, chunk_size=8)
    ref_logp, ref_ent = token_logprobs_reference(hidden, head, ids)  # the same bf16 inputs, dense
    assert logp.dtype == jnp.float32
    _close(logp, ref_logp, 1e-5, atol=1e-5)
    _close(ent, ref_ent, 1e-5, atol=1e-5)
    g = jax.grad(_tl_scalar(token_logprobs, chunk_size=8))(hidden, head, ids)
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))
    out = draft_agreement(hidden, draft, head, ids, chunk_size=8)
    ref = draft_agreement_reference(hidden, draft, head, ids)
    for key in out:
        _close(out[key], ref[key], 1e-5, atol=1e-5)


def test_extreme_logits_stay_finite():
    """Logits in the hundreds: exp overflows unless every sum is taken relative to a running max."""
    hidden, draft, head, ids = _inputs(4, scale=400.0)
    logp, ent = token_logprobs(hidden, head, ids, chunk_size=8)
    ref_logp, ref_ent = token_logprobs_reference(hidden, head, ids)
    assert np.all(np.isfinite(np.asarray(ref_logp))) and np.all(np.isfinite(np.asarray(logp)))
    _close(logp, ref_logp, 1e-5, atol=1e-3)
    _close(ent, ref_ent, 1e-5, atol=1e-3)
    grads = jax.grad(_tl_scalar(token_logprobs, chunk_size=8), argnums=(0, 1))(hidden, head, ids)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    out = draft_agreement(hidden, draft, head, ids, chunk_size=8)
    ref = draft_agreement_reference(hidden, draft, head, ids)
    for key in out:
        assert np.all(np.isfinite(np.asarray(out[key])))
        _close(out[key], ref[key], 1e-5, atol=1e-3)
    g = jax.grad(_da_scalar(draft_agreement, chunk_size=8), argnums=1)(hidden, draft, head, ids)
    assert np.all(np.isfinite(np.asarray(g)))


def test_jit_and_one_row():
    hidden, draft, head, ids = _inputs(5)
    f = jax.jit(lambda h, w, t: token_logprobs(h, w, t, chunk_size=16))
    _close(f(hidden, head, ids)[0], token_logprobs_reference(hidden, head, ids)[0], 1e-5)
    one = token_logprobs(hidden[:1], head, ids[:1], chunk_size=16)
    _close(one[0], token_logprobs_reference(hidden[:1], head, ids[:1])[0], 1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda h, d, w, t: token_logprobs(h, w.T, t), "hidden must be"),
    (lambda h, d, w, t: token_logprobs(h, w, t[:-1]), "tokens must be integer"),
    (lambda h, d, w, t: token_logprobs(h, w, t.astype(jnp.float32)), "tokens must be integer"),
    (lambda h, d, w, t: token_logprobs(h, w, t.at[0].set(V)), r"tokens must lie in \[0, V=61\)"),
    (lambda h, d, w, t: token_logprobs(h, w, t, chunk_size=0), "chunk_size"),
    (lambda h, d, w, t: token_logprobs(h, w, t, temperature=0.0), "temperature"),
    (lambda h, d, w, t: token_logprobs(h, w, t, impl="cuda"), "impl"),
    (lambda h, d, w, t: token_logprobs(h, w, t, interpret="grid"), "interpret must be None"),
    (lambda h, d, w, t: draft_agreement(h, d, w, t, impl="pallas", interpret="tiles"), "interpret must be None"),
    (lambda h, d, w, t: draft_agreement(h, d[:-1], w, t), "draft_hidden has 6 rows"),
    (lambda h, d, w, t: draft_agreement(h, d, w, t.at[0].set(-1)), "labels must lie in"),
    (lambda h, d, w, t: draft_agreement(h, d, w[:, :, None], t), "lm_head must be"),
])
def test_bad_input_one_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(*_inputs(6))


@pytest.mark.parametrize("chunk_size,impl", [(None, "xla"), (5, "xla"), (8, "pallas")])
def test_vocabulary_sharded_equals_one_device(chunk_size, impl):
    """LM head split along V over the model axis of 8 fake devices (2 x 4): same values and gradients."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from bebop_jax.config import MeshConfig
    from bebop_jax.parallel import make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=1, model=4))
    k = jax.random.split(jax.random.key(7), 4)
    v = 64  # divisible by the 4 vocabulary shards; 16 columns each, chunk 5 does not divide them
    target, draft = jax.random.normal(k[0], (N, H)), jax.random.normal(k[1], (N, H))
    head, ids = jax.random.normal(k[2], (H, v)) / np.sqrt(H), jax.random.randint(k[3], (N,), 0, v)
    placed = jax.device_put(head, NamedSharding(mesh, P(None, "model")))
    kw = dict(chunk_size=chunk_size, temperature=0.8, impl=impl)
    one = token_logprobs(target, head, ids, **kw)
    many = jax.jit(lambda h, w, t: token_logprobs(h, w, t, mesh=mesh, **kw))(target, placed, ids)
    for a, b in zip(many, one):
        _close(a, b, 1e-5)
    g_one = jax.grad(_tl_scalar(token_logprobs, **kw), argnums=(0, 1))(target, head, ids)
    g_many = jax.jit(jax.grad(_tl_scalar(token_logprobs, mesh=mesh, **kw), argnums=(0, 1)))(target, placed, ids)
    for a, b in zip(g_many, g_one):
        _close(a, b, 1e-5, atol=1e-6)
    out_one = draft_agreement(target, draft, head, ids, **kw)
    out_many = jax.jit(lambda a, b, w, t: draft_agreement(a, b, w, t, mesh=mesh, **kw))(target, draft, placed, ids)
    for key in out_one:
        _close(out_many[key], out_one[key], 1e-5)
    d_one = jax.grad(_da_scalar(draft_agreement, **kw), argnums=1)(target, draft, head, ids)
    d_many = jax.jit(jax.grad(_da_scalar(draft_agreement, mesh=mesh, **kw), argnums=1))(target, draft, placed, ids)
    _close(d_many, d_one, 1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by the mesh's model axis"):
        token_logprobs(target, head[:, :62], ids % 62, mesh=mesh)
