"""The policy: output shapes and dtypes, MTP module routing, causality through
gradients, and KV-cache consistency of the trunk and of every MTP depth.

All on ModelConfig.tiny (V=64, H=32, 2 layers, K=3). Model calls run eagerly (flax
apply without jit): on these sizes that is cheaper than compiling each variant.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bebop_jax.config import ModelConfig
from bebop_jax.model import (Policy, abstract_params, empty_kv_cache, head_names, head_params, init_params,
                             shift_tokens, trunk_params)

K = 3
V = 64
T_FULL = 12  # sequence length of every eager forward here (one set of compiled ops)
CACHE_LEN = 16


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.tiny(num_mtp_depths=K, **overrides)


def random_tokens(seed: int, shape) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, V, dtype=jnp.int32)


def apply(cfg, params, *args, **kwargs):
    return Policy(cfg).apply({"params": params}, *args, **kwargs)


_SUPERSET = {}


def params_for(cfg: ModelConfig):
    """Parameters for ``cfg``, cut from one initialisation of the largest variant.

    Initialising once (untied head, one module per depth) and dropping ``lm_head`` /
    extra modules gives every variant with one compile of init (the rbg key compiles in
    ~3 s of CPU, the default threefry key ~8 s). ``test_param_tree_matches_init`` pins
    that the cut tree is exactly what ``init_params`` builds for that config.
    """
    if "params" not in _SUPERSET:
        _SUPERSET["params"] = init_params(tiny(tie_embeddings=False, num_mtp_modules=K),
                                          jax.random.key(0, impl="rbg"))
    full = _SUPERSET["params"]
    keep = {k: v for k, v in trunk_params(full).items() if k != "lm_head"}
    keep.update({name: full[name] for name in head_names(cfg)})
    if not cfg.tie_embeddings:
        keep["lm_head"] = full["lm_head"]
    if cfg.param_dtype != "float32":
        keep = jax.tree.map(lambda x: x.astype(cfg.param_dtype), keep)
    return keep


# ------------------------------------------------------------------ shapes, API, dtypes

VARIANTS = {
    "tied-M1": dict(tie_embeddings=True, num_mtp_modules=1),
    "tied-MK": dict(tie_embeddings=True, num_mtp_modules=K),
    "untied-M1": dict(tie_embeddings=False, num_mtp_modules=1),
    "untied-MK": dict(tie_embeddings=False, num_mtp_modules=K),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_output_shapes(variant):
    cfg = tiny(**VARIANTS[variant])
    params = params_for(cfg)
    b, t, h = 2, T_FULL, cfg.hidden_size
    out = apply(cfg, params, random_tokens(1, (b, t)))
    assert out.logits.shape == (b, t, V) and out.logits.dtype == jnp.float32
    assert out.hidden.shape == (b, t, h)
    assert out.mtp_logits.shape == (b, t, K, V) and out.mtp_logits.dtype == jnp.float32
    for x in (out.logits, out.hidden, out.mtp_logits):
        assert np.isfinite(np.asarray(x)).all()


@pytest.mark.parametrize("variant", list(VARIANTS) + ["bf16-params"])
def test_param_tree_matches_init(variant):
    """What init_params builds (shapes and dtypes, via eval_shape): M modules, an lm_head
    only when untied. Also pins that params_for() cuts exactly this tree."""
    cfg = tiny(**VARIANTS.get(variant, dict(param_dtype="bfloat16")))
    abstract = abstract_params(cfg)
    h, m = cfg.hidden_size, cfg.num_mtp_modules
    assert sorted(head_params(abstract)) == head_names(cfg) == [f"mtp_{i}" for i in range(m)]
    assert set(trunk_params(abstract)) == set(abstract) - set(head_names(cfg))
    assert abstract["embed_tokens"].shape == (V, h)
    assert abstract["mtp_0"]["fc"].shape == (2 * h, h)  # concat[embedding, hidden] -> H
    assert abstract["layers_0"]["self_attn"]["q_proj"].shape == (h, cfg.num_heads, cfg.head_dim)
    assert abstract["layers_0"]["self_attn"]["k_proj"].shape == (h, cfg.num_kv_heads, cfg.head_dim)
    if cfg.tie_embeddings:
        assert "lm_head" not in abstract
    else:
        assert abstract["lm_head"].shape == (h, V)
    assert all(x.dtype == jnp.dtype(cfg.param_dtype) for x in jax.tree.leaves(abstract))
    cut = params_for(cfg)
    assert jax.tree.structure(cut) == jax.tree.structure(abstract)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), cut) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), abstract)


def test_mtp_mlp_width_is_set_apart_from_the_trunks():
    """mtp_intermediate_size narrows the MTP modules' MLP only: the draft's capacity knob."""
    cfg = tiny(mtp_intermediate_size=8)
    abstract = abstract_params(cfg)
    h = cfg.hidden_size
    assert abstract["mtp_0"]["layer"]["mlp"]["up_proj"].shape == (h, 8)
    assert abstract["mtp_0"]["layer"]["mlp"]["down_proj"].shape == (8, h)
    assert abstract["layers_0"]["mlp"]["up_proj"].shape == (h, cfg.intermediate_size)
    assert cfg.mtp_mlp_size == 8 and tiny().mtp_mlp_size == tiny().intermediate_size
    params = init_params(cfg, jax.random.key(1))
    out = apply(cfg, params, random_tokens(3, (2, 8)))
    assert out.mtp_logits.shape == (2, 8, K, V) and bool(jnp.all(jnp.isfinite(out.mtp_logits)))


@pytest.mark.parametrize("num_modules", [1, K])
def test_depths_are_routed_to_their_module(num_modules):
    """M = K: module m serves depth m+1 only, so perturbing it changes depth m+1 and the
    depths chained after it, never earlier depths or the trunk. M = 1: one module, every depth."""
    cfg = tiny(num_mtp_modules=num_modules)
    params = params_for(cfg)
    tokens = random_tokens(2, (2, T_FULL))
    base = apply(cfg, params, tokens)
    target = 1 if num_modules == K else 0
    bumped = jax.tree.map(lambda x: x, params)
    bumped[f"mtp_{target}"] = dict(bumped[f"mtp_{target}"], fc=params[f"mtp_{target}"]["fc"] * 1.5)
    out = apply(cfg, bumped, tokens)
    np.testing.assert_array_equal(out.logits, base.logits)
    changed = [not np.array_equal(out.mtp_logits[:, :, d], base.mtp_logits[:, :, d]) for d in range(K)]
    assert changed == ([False, True, True] if num_modules == K else [True, True, True])


def test_freeze_trunk_does_not_change_values():
    cfg = tiny()
    params = params_for(cfg)
    tokens = random_tokens(3, (2, T_FULL))
    a = apply(cfg, params, tokens)
    b = apply(cfg, params, tokens, freeze_trunk=True)
    for x, y in ((a.logits, b.logits), (a.hidden, b.hidden), (a.mtp_logits, b.mtp_logits)):
        np.testing.assert_array_equal(x, y)


def test_bfloat16_activations_close_to_float32_and_finite():
    cfg32 = tiny()
    cfg16 = tiny(dtype="bfloat16")
    params = params_for(cfg32)  # same f32 params, bf16 compute
    tokens = random_tokens(4, (2, T_FULL))
    o32 = apply(cfg32, params, tokens)
    o16 = apply(cfg16, params, tokens)
    assert o16.logits.dtype == jnp.float32 and o16.mtp_logits.dtype == jnp.float32
    assert o16.hidden.dtype == jnp.bfloat16
    for x16, x32 in ((o16.logits, o32.logits), (o16.mtp_logits, o32.mtp_logits)):
        assert np.isfinite(np.asarray(x16)).all()
        # bf16 keeps 8 mantissa bits: logits of size ~3 agree to a few 1e-2, not exactly.
        err = np.max(np.abs(np.asarray(x16) - np.asarray(x32)))
        assert 0 < err < 0.15, err

    # bf16 parameters too (what param_dtype="bfloat16" stores): still finite, still close.
    cfg_all16 = tiny(dtype="bfloat16", param_dtype="bfloat16")
    p16 = params_for(cfg_all16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    o = apply(cfg_all16, p16, tokens)
    assert np.isfinite(np.asarray(o.mtp_logits)).all()
    assert np.max(np.abs(np.asarray(o.mtp_logits) - np.asarray(o32.mtp_logits))) < 0.15


# ------------------------------------------------------------------ causality via gradients


def test_causality_through_gradients():
    """d output / d embedding of the token at position s must be exactly 0 when s is in
    the future: trunk at t sees s <= t; MTP depth k at t sees s <= t + k (and does see t + k).

    The sequence holds distinct tokens 1..T and the LM head is untied, so row x_s of the
    embedding table is used only by position s: its gradient is the gradient w.r.t. the
    input embedding at s. (Row 0 is the padding shift_tokens adds past the end.)
    """
    cfg = tiny(tie_embeddings=False)
    params = params_for(cfg)
    t_len = T_FULL
    tokens = jnp.arange(1, t_len + 1, dtype=jnp.int32)[None]  # [1, T], distinct
    # Random projections reduce each [V] logit vector to one scalar per output.
    proj_trunk = jax.random.normal(jax.random.key(5), (V,))
    proj_mtp = jax.random.normal(jax.random.key(6), (K, V))

    def scores(table):  # -> [T, 1 + K]: column 0 trunk, column k depth k
        p = dict(params, embed_tokens=table)
        out = apply(cfg, p, tokens)
        trunk = out.logits[0] @ proj_trunk  # [T]
        mtp = jnp.einsum("tkv,kv->tk", out.mtp_logits[0], proj_mtp)  # [T, K]
        return jnp.concatenate([trunk[:, None], mtp], axis=1)

    jac = jax.jit(jax.jacrev(scores), compiler_options={"xla_backend_optimization_level": 0})(
        params["embed_tokens"])  # [T, 1+K, V, H]
    per_row = np.linalg.norm(np.asarray(jac), axis=-1)  # [T, 1+K, V]
    dep = per_row[:, :, np.asarray(tokens[0])]  # [T(out), 1+K, T(input position)]

    for t in range(t_len):
        for k in range(K + 1):  # k = 0 is the trunk
            horizon = t + k
            future = dep[t, k, horizon + 1:]
            assert np.all(future == 0.0), (t, k, future)
            if horizon < t_len:
                # The newest visible token matters, and so does the first token.
                assert dep[t, k, horizon] > 1e-6, (t, k)
                assert dep[t, k, 0] > 1e-6, (t, k)


# ------------------------------------------------------------------ KV cache consistency

# One schedule for a batch of 2 rows. Each step feeds every row a chunk of the same width
# at that row's own positions; `n` is how many leading entries are real tokens, the rest
# are garbage (a padded prompt, or drafts that the verifier rejects) written into slots
# that a later step overwrites. Rows sit at different positions throughout.
#                  row 0 (start, n)   row 1 (start, n)     width
SCHEDULE = [((0, 4), (0, 2), 4),   # row 1: short prompt padded with 2 garbage tokens
            ((4, 1), (2, 4), 4),   # row 0: 1 accepted, 3 rejected drafts left in slots 5..7
            ((5, 1), (6, 1), 1),   # single-token steps while garbage sits in later slots
            ((6, 4), (7, 2), 4),
            ((10, 2), (9, 3), 4)]  # row 0 writes garbage at 12, 13 (past the sequence)


def _schedule_inputs(seq_BxT, garbage_seed: int):
    """Per step: (tokens [2, W], positions [2, W], valid [2, W]) built from SCHEDULE."""
    rng = np.random.default_rng(garbage_seed)
    seq = np.asarray(seq_BxT)
    steps = []
    for row0, row1, width in SCHEDULE:
        toks, poss, valid = [], [], []
        for b, (start, n) in enumerate((row0, row1)):
            pos = np.arange(start, start + width)
            tok = rng.integers(0, V, size=width)
            tok[:n] = seq[b, pos[:n]]
            toks.append(tok), poss.append(pos), valid.append(np.arange(width) < n)
        steps.append((jnp.asarray(np.stack(toks), jnp.int32), jnp.asarray(np.stack(poss), jnp.int32),
                      np.stack(valid)))
    return steps


def _check_covers_every_position():
    seen = [set(), set()]
    for *rows, _ in SCHEDULE:
        for b, (start, n) in enumerate(rows):
            seen[b].update(range(start, start + n))
    assert seen == [set(range(T_FULL))] * 2


@pytest.mark.parametrize("num_modules", [1, K])
def test_kv_cache_matches_teacher_forced_forward(num_modules):
    """Trunk and every MTP depth, run chunk by chunk with their own KV caches (as the
    decoder does, each depth fed the previous one's hidden at the same positions), give
    the full teacher-forced logits at every real position, within 1e-5 in float32."""
    _check_covers_every_position()
    cfg = tiny(num_mtp_modules=num_modules)
    params = params_for(cfg)
    seq = random_tokens(7, (2, T_FULL))
    ref = apply(cfg, params, seq)
    shifted = [shift_tokens(seq, k) for k in range(1, K + 1)]  # x_{t+k}, 0-padded past the end

    trunk_caches = [empty_kv_cache(cfg, 2, CACHE_LEN) for _ in range(cfg.num_layers)]
    depth_caches = [empty_kv_cache(cfg, 2, CACHE_LEN) for _ in range(K)]
    # The clean cache: the sequence prefilled in chunks of 4 (the width the schedule uses).
    clean_caches = trunk_caches
    for start in range(0, T_FULL, 4):
        pos = jnp.broadcast_to(jnp.arange(start, start + 4, dtype=jnp.int32), (2, 4))
        _, prefill_logits, clean_caches = apply(cfg, params, seq[:, start:start + 4], pos, clean_caches,
                                                method=Policy.trunk)
        np.testing.assert_allclose(prefill_logits, ref.logits[:, start:start + 4], rtol=0, atol=1e-5)

    rows = np.arange(2)[:, None]
    checked = 0
    for step, (tokens, positions, valid) in enumerate(_schedule_inputs(seq, garbage_seed=8)):
        if step == 2:  # row 0 queries position 5 while rejected drafts still sit in slots 6, 7
            dirty = np.asarray(trunk_caches[0]["k"][0, 6:8])
            assert np.abs(dirty - np.asarray(clean_caches[0]["k"][0, 6:8])).min() > 1e-3
        hidden, logits, trunk_caches = apply(cfg, params, tokens, positions, trunk_caches,
                                             method=Policy.trunk)
        assert logits.shape == tokens.shape + (V,)
        pos_np = np.minimum(np.asarray(positions), T_FULL - 1)  # garbage past the end: unchecked
        np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(ref.logits)[rows, pos_np][valid],
                                   rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(hidden)[valid], np.asarray(ref.hidden)[rows, pos_np][valid],
                                   rtol=0, atol=1e-5)
        h = hidden
        for k in range(1, K + 1):
            # The token x_{t+k} each MTP depth reads; garbage wherever the trunk input was.
            mtp_tokens = jnp.where(jnp.asarray(valid), np.asarray(shifted[k - 1])[rows, pos_np], tokens)
            h, mtp_logits, depth_caches[k - 1] = apply(
                cfg, params, k, h, mtp_tokens, positions, depth_caches[k - 1], method=Policy.mtp_depth)
            np.testing.assert_allclose(
                np.asarray(mtp_logits)[valid], np.asarray(ref.mtp_logits[:, :, k - 1])[rows, pos_np][valid],
                rtol=0, atol=1e-5, err_msg=f"depth {k}")
            if step == 1 and k == 1:  # the decoder's frontier-only head: the chunk's last column
                _, last, _ = apply(cfg, params, k, hidden, mtp_tokens, positions, depth_caches[k - 1],
                                   last_only=True, method=Policy.mtp_depth)
                assert last.shape == (2, 1, V)
                np.testing.assert_allclose(last[:, 0], mtp_logits[:, -1], rtol=0, atol=1e-6)
        checked += int(valid.sum())
    assert checked == 2 * T_FULL
    # Every garbage write was overwritten: the real slots hold the clean keys and values.
    for got, want in zip(trunk_caches, clean_caches):
        for name in ("k", "v"):
            np.testing.assert_allclose(got[name][:, :T_FULL], want[name][:, :T_FULL], rtol=0, atol=1e-5)
