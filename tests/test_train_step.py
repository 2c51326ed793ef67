"""The MTP train step: target alignment, the frozen trunk of mode mtp_only, loss goldens
and loss-mask weighting, batch validation, and the sharded step on 8 fake CPU devices.

Compiling a train step costs ~10 s of CPU here, so the model is shrunk to one trunk
layer and K = 2 depths and the whole file compiles four steps: one mtp_only (one
device) and one joint per mesh (1 device, 8x1x1, 2x2x2), shared through fixtures.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from bebop_jax.config import LOSS_NAMES, MeshConfig, ModelConfig, MTPConfig, OptimizerConfig
from bebop_jax.model import (Policy, abstract_params, head_names, init_params, is_trunk_param, shard_params_for,
                             trunk_params)
from bebop_jax.parallel import make_mesh
from bebop_jax.mtp.objective import loss_fn, mtp_targets
from bebop_jax.train.step import init_train_state, make_optimizer, make_train_step, split_params

K = 2
V = 64
CFG = ModelConfig.tiny(num_layers=1, num_mtp_depths=K)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=1, decay_steps=100)
B, T = 8, 16  # jitted steps: 8 rows split over up to 8 devices
EB, ET = 2, 12  # eager loss_fn calls: the shapes tests/test_model.py runs, so compiled ops are shared
NUM_STEPS = 5
# For this file's own jits: LLVM optimisation off halves XLA:CPU compile time (~10 s -> ~5 s
# of CPU for a train step); the programs and their partitioning are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def make_batch(seed: int, b: int = B, t: int = T) -> dict:
    """Random tokens; loss_mask is 0 on a 3-token prompt and a padded tail, 1 elsewhere."""
    tokens = jax.random.randint(jax.random.key(seed), (b, t), 0, V, dtype=jnp.int32)
    pos = np.arange(t)[None]
    ends = t - np.arange(b)[:, None] % 4  # rows padded by 0..3 tokens
    mask = ((pos >= 3) & (pos < ends)).astype(np.float32)
    return {"tokens": tokens, "loss_mask": jnp.asarray(mask)}


_HOST = {}


def host_params(cfg: ModelConfig = CFG) -> dict:
    """Host (numpy) parameters for ``cfg`` (steps donate device buffers, so tests keep
    host copies). One init of the largest variant (untied head, M = K), cut down per
    config, as in tests/test_model.py: init compiles once for the whole file."""
    if "full" not in _HOST:
        full_cfg = ModelConfig.tiny(num_layers=1, num_mtp_depths=K, tie_embeddings=False,
                                    num_mtp_modules=K)
        _HOST["full"] = jax.device_get(init_params(full_cfg, jax.random.key(0, impl="rbg")))
    full = _HOST["full"]
    keep = {k: v for k, v in trunk_params(full).items() if k != "lm_head"}
    keep.update({name: full[name] for name in head_names(cfg)})
    if not cfg.tie_embeddings:
        keep["lm_head"] = full["lm_head"]
    assert jax.tree.structure(keep) == jax.tree.structure(abstract_params(cfg))
    return keep


def one_device_mesh():
    return make_mesh(MeshConfig(data=1, fsdp=1, model=1), jax.devices()[:1])


def loss_and_metrics(params, batch, cfg=CFG, **mtp):
    return loss_fn(params, {}, batch, model_config=cfg, mtp_config=MTPConfig(**mtp))


def path_name(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


# ------------------------------------------------------------------ target alignment


def test_mtp_targets_alignment():
    """Depth k at position t: target = trunk logits at t+k, label x_{t+k+1},
    weight loss_mask[t+k+1], and weight 0 once t+k+1 is past the sequence."""
    b, t, k_depths = 2, 6, 3
    logits = jnp.arange(b * t, dtype=jnp.float32).reshape(b, t, 1) * jnp.ones((1, 1, 5))
    tokens = jnp.arange(b * t, dtype=jnp.int32).reshape(b, t) + 100
    mask = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, (b, t)), jnp.float32)
    target, labels, weights = map(np.asarray, mtp_targets(logits, tokens, mask, k_depths))
    logits, tokens, mask = map(np.asarray, (logits, tokens, mask))
    assert target.shape == (b, t, k_depths, 5) and labels.shape == weights.shape == (b, t, k_depths)
    for row in range(b):
        for pos in range(t):
            for k in range(1, k_depths + 1):
                if pos + k + 1 < t:
                    assert target[row, pos, k - 1, 0] == logits[row, pos + k, 0]
                    assert labels[row, pos, k - 1] == tokens[row, pos + k + 1]
                    assert weights[row, pos, k - 1] == mask[row, pos + k + 1]
                else:
                    assert weights[row, pos, k - 1] == 0.0


# ------------------------------------------------------------------ mtp_only: frozen trunk


UNTIED_CFG = ModelConfig.tiny(num_layers=1, num_mtp_depths=K, tie_embeddings=False, num_mtp_modules=K)
GRAD_CASES = {  # name: (model config, MTPConfig)
    "mtp_only-e2e_tv-tied": (CFG, MTPConfig(loss="e2e_tv", mode="mtp_only")),
    "mtp_only-ce-tied": (CFG, MTPConfig(loss="ce", mode="mtp_only")),
    "mtp_only-e2e_tv-untied-MK": (UNTIED_CFG, MTPConfig(loss="e2e_tv", mode="mtp_only")),
    "trunk_only": (CFG, MTPConfig(mode="trunk_only")),
}


@pytest.fixture(scope="module")
def full_tree_grads():
    """Gradients of loss_fn w.r.t. the FULL param tree (nothing split off) for each case,
    all in one jit: one compile instead of one per case."""
    batch = make_batch(1, b=EB, t=ET)
    params = {name: host_params(cfg) for name, (cfg, _) in GRAD_CASES.items()}

    def all_grads(params, batch):
        return {name: jax.grad(loss_fn, has_aux=True)(params[name], {}, batch, model_config=cfg,
                                                        mtp_config=mtp)
                for name, (cfg, mtp) in GRAD_CASES.items()}

    return jax.device_get(jax.jit(all_grads, compiler_options=FAST_COMPILE)(params, batch)), batch


@pytest.mark.parametrize("case", [c for c in GRAD_CASES if c.startswith("mtp_only")])
def test_mtp_only_gradient_is_zero_outside_mtp(full_tree_grads, case):
    """Mode mtp_only: every trunk, embedding and LM-head leaf gets an exactly zero
    gradient, every MTP leaf a non-zero one. (Tied: the embedding table is read by the
    trunk, the MTP input and the shared head; untied adds lm_head.)"""
    cfg = GRAD_CASES[case][0]
    grads, metrics = full_tree_grads[0][case]
    assert np.isfinite(float(metrics["loss"]))
    assert "trunk/ce" not in metrics
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    trunk_leaves = [(path_name(p), g) for p, g in flat if is_trunk_param(p)]
    mtp_leaves = [(path_name(p), g) for p, g in flat if not is_trunk_param(p)]
    names = {n.split("/")[0] for n, _ in trunk_leaves}
    assert {"embed_tokens", "layers_0", "norm"} <= names
    assert ("lm_head" in names) == (not cfg.tie_embeddings)
    assert {n.split("/")[0] for n, _ in mtp_leaves} == {f"mtp_{m}" for m in range(cfg.num_mtp_modules)}
    for name, g in trunk_leaves:
        assert np.all(g == 0.0), name
    for name, g in mtp_leaves:
        assert np.any(g != 0.0), name


def test_trunk_only_gradient_is_zero_on_mtp(full_tree_grads):
    """Base pretraining: the loss is the trunk's next-token CE alone (equal to the joint
    mode's trunk/ce), the MTP modules get exactly zero gradient and are the frozen part."""
    grads, m = full_tree_grads[0]["trunk_only"]
    batch = full_tree_grads[1]
    params = host_params()
    _, joint_m = loss_and_metrics(params, batch, loss="ce", mode="joint")
    np.testing.assert_allclose(float(m["loss"]), float(joint_m["trunk/ce"]), rtol=1e-5)
    assert "mtp/loss" not in m
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        if is_trunk_param(path):
            assert np.any(g != 0.0), path_name(path)
        else:
            assert np.all(g == 0.0), path_name(path)
    trainable, frozen = split_params(params, "trunk_only")
    assert set(frozen) == {"mtp_0"} and set(trainable) == set(params) - {"mtp_0"}


@pytest.fixture(scope="module")
def mtp_only_run():
    mesh = one_device_mesh()
    mtp_config = MTPConfig(loss="e2e_tv", mode="mtp_only")
    optimizer = make_optimizer(OPT)
    params = jax.device_put(host_params(), shard_params_for(CFG, mesh))
    state = init_train_state(params, mtp_config, optimizer, mesh)
    run = make_train_step(CFG, mtp_config, optimizer, state, mesh)
    return dict(state=state, run=run)


def test_mtp_only_steps_leave_trunk_bitwise_unchanged(mtp_only_run):
    state, run = mtp_only_run["state"], mtp_only_run["run"]
    host = host_params()
    assert set(state.params) == {"mtp_0"}
    assert set(state.frozen) == set(host) - {"mtp_0"}
    # The optimizer holds moments for the MTP parameters only.
    n_trainable = len(jax.tree.leaves(state.params))
    for moment in ("mu", "nu"):
        tree = optax.tree_utils.tree_get(state.opt_state, moment)
        assert jax.tree.structure(tree) == jax.tree.structure(state.params)
    array_leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert len(array_leaves) == 2 * n_trainable
    opt_elems = sum(x.size for x in array_leaves)
    assert opt_elems == 2 * sum(x.size for x in jax.tree.leaves(state.params))

    batch = make_batch(2)
    losses = []
    for _ in range(NUM_STEPS):
        state, metrics = run(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == NUM_STEPS
    assert losses[-1] < losses[0]  # the MTP heads learn on a fixed batch
    for path, x in jax.tree_util.tree_flatten_with_path(state.frozen)[0]:
        want = host
        for p in path:
            want = want[p.key]
        np.testing.assert_array_equal(np.asarray(x), want, err_msg=path_name(path))
    for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        want = host
        for p in path:
            want = want[p.key]
        assert not np.array_equal(np.asarray(x), want), path_name(path)


# ------------------------------------------------------------------ goldens, mask weighting


def test_golden_uniform_logits():
    """A zero embedding table (tied head) makes every logit 0: p = q = uniform. Then the
    trunk CE and the MTP CE are ln V exactly, TV-based losses are 0 and every alpha is 1,
    whatever the mask; a sum instead of a mean would scale the CEs by the token count."""
    params = dict(host_params(), embed_tokens=np.zeros((V, CFG.hidden_size), np.float32))
    batch = make_batch(3, b=EB, t=ET)
    ln_v = math.log(V)
    for loss, mtp_value in (("ce", ln_v), ("kl", 0.0), ("tv", 0.0), ("e2e_tv", 0.0)):
        total, m = loss_and_metrics(params, batch, loss=loss, mode="joint", mtp_weight=0.5)
        np.testing.assert_allclose(float(m["trunk/ce"]), ln_v, rtol=0, atol=1e-5)
        np.testing.assert_allclose(float(m["mtp/loss"]), mtp_value, rtol=0, atol=1e-5)
        np.testing.assert_allclose(float(total), ln_v + 0.5 * mtp_value, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(m["mtp/alpha"]), np.ones(K), rtol=0, atol=1e-6)
        # Every draft accepted: E[A] at a position is its number of scored depths (fewer
        # than K near the end and at the prompt boundary), averaged over scored positions.
        _, _, w = mtp_targets(jnp.zeros((EB, ET, V)), batch["tokens"], batch["loss_mask"], K)
        w = np.asarray(w)
        scored = w.max(axis=-1) > 0
        want = w.sum(axis=-1)[scored].mean()
        assert 1.0 < want < K
        np.testing.assert_allclose(float(m["mtp/expected_accepted"]), want, rtol=0, atol=1e-5)


def test_golden_trunk_ce_at_init_is_masked_mean():
    """At init the logits are nearly uniform (std ~1): the trunk CE is a bit above ln V,
    and equals the loss_mask-weighted mean of -log p(x_{t+1}) over the batch."""
    params = host_params()
    batch = make_batch(4, b=EB, t=ET)
    weights = np.asarray(batch["loss_mask"]).copy()
    weights[1, 5:9] = 2.5  # non-binary weights too
    batch = dict(batch, loss_mask=jnp.asarray(weights))
    logits = np.asarray(Policy(CFG).apply({"params": params}, batch["tokens"]).logits, np.float64)
    tokens = np.asarray(batch["tokens"])
    num = den = 0.0
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            w = weights[b, t + 1]  # the weight of predicting token t+1
            row = logits[b, t]
            nll = np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[tokens[b, t + 1]]
            num += w * nll
            den += w
    _, m = loss_and_metrics(params, batch, loss="ce", mode="joint")
    ce = float(m["trunk/ce"])
    np.testing.assert_allclose(ce, num / den, rtol=1e-5)
    assert math.log(V) < ce < math.log(V) + 1.0, ce


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_loss_mask_weighting(loss):
    """Scaling every weight leaves the loss unchanged (a weighted mean); zeroing row r
    gives exactly the loss of the batch without row r."""
    params = host_params()
    batch = make_batch(5, b=EB, t=ET)
    rng = np.random.default_rng(0)
    weights = np.asarray(batch["loss_mask"]) * rng.uniform(0.5, 1.5, (EB, ET)).astype(np.float32)
    base_batch = dict(batch, loss_mask=jnp.asarray(weights))
    base, base_m = loss_and_metrics(params, base_batch, loss=loss, mode="joint")
    doubled, doubled_m = loss_and_metrics(params, dict(batch, loss_mask=jnp.asarray(2 * weights)),
                                          loss=loss, mode="joint")
    np.testing.assert_allclose(float(doubled), float(base), rtol=1e-6)
    for key in ("trunk/ce", "mtp/loss", "mtp/alpha"):
        np.testing.assert_allclose(np.asarray(doubled_m[key]), np.asarray(base_m[key]), rtol=1e-5)

    r = 1
    zeroed = weights.copy()
    zeroed[r] = 0.0
    with_zero, _ = loss_and_metrics(params, dict(batch, loss_mask=jnp.asarray(zeroed)), loss=loss,
                                    mode="joint")
    keep = [i for i in range(EB) if i != r]
    without, _ = loss_and_metrics(params, {"tokens": batch["tokens"][jnp.asarray(keep)],
                                           "loss_mask": jnp.asarray(weights[keep])},
                                  loss=loss, mode="joint")
    np.testing.assert_allclose(float(with_zero), float(without), rtol=1e-5)
    assert abs(float(with_zero) - float(base)) > 1e-4  # the row did contribute


def test_expected_accepted_metric_ignores_weight_scale():
    """mtp/expected_accepted is a number of tokens (between 0 and K): with float loss_mask
    weights (RL weights) it must be a weighted average, so scaling every weight by 2
    cannot change it. With all drafts accepted (uniform p = q) it must not exceed K."""
    params = dict(host_params(), embed_tokens=np.zeros((V, CFG.hidden_size), np.float32))
    batch = make_batch(6, b=EB, t=ET)
    values = []
    for scale in (1.0, 2.0):
        _, m = loss_and_metrics(params, dict(batch, loss_mask=scale * batch["loss_mask"]),
                                loss="e2e_tv", mode="mtp_only")
        values.append(float(m["mtp/expected_accepted"]))
    assert values[1] <= K, values
    np.testing.assert_allclose(values[1], values[0], rtol=1e-6)


# ------------------------------------------------------------------ sharded joint steps

MESHES = {"1dev": None, "8x1x1": MeshConfig(data=8, fsdp=1, model=1),
          "2x2x2": MeshConfig(data=2, fsdp=2, model=2)}


@pytest.fixture(scope="module")
def joint_runs():
    """NUM_STEPS joint steps on each mesh from the same initial params and batches.

    Each step is the program make_train_step builds (``run.jitted``: its HLO, shardings
    and donation), compiled ahead of time with LLVM optimisation off, which halves the
    compile time on CPU; the SPMD partitioning under test is done either way. The exact
    user path ``run(state, batch)`` with default compilation is exercised by mtp_only_run.
    """
    mtp_config = MTPConfig(loss="e2e_tv", mode="joint")
    optimizer = make_optimizer(OPT)
    batches = [make_batch(10 + i) for i in range(NUM_STEPS)]
    runs = {}
    for name, mesh_config in MESHES.items():
        mesh = one_device_mesh() if mesh_config is None else make_mesh(mesh_config, jax.devices()[:8])
        params = jax.device_put(host_params(), shard_params_for(CFG, mesh))
        state = init_train_state(params, mtp_config, optimizer, mesh)
        run = make_train_step(CFG, mtp_config, optimizer, state, mesh)
        step = run.jitted.lower(state, batches[0]).compile(compiler_options=FAST_COMPILE)
        metrics = []
        for batch in batches:
            state, m = step(state, batch)
            metrics.append(jax.device_get(m))
        runs[name] = dict(mesh=mesh, state=state, run=run, step=step, metrics=metrics)
    return runs


@pytest.mark.slow
def test_sharded_losses_match_one_device(joint_runs):
    ref = joint_runs["1dev"]["metrics"]
    assert len(jax.devices()) >= 8
    assert ref[-1]["loss"] < ref[0]["loss"]
    for name in ("8x1x1", "2x2x2"):
        got = joint_runs[name]["metrics"]
        for key in ("loss", "trunk/ce", "mtp/loss", "grad_norm"):
            np.testing.assert_allclose([float(m[key]) for m in got], [float(m[key]) for m in ref],
                                       rtol=0, atol=1e-5, err_msg=f"{name} {key}")
    # Final parameters agree too (Adam after 5 steps: differences stay at rounding level).
    ref_params = jax.device_get(joint_runs["1dev"]["state"].params)
    for name in ("8x1x1", "2x2x2"):
        got = jax.device_get(joint_runs[name]["state"].params)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_joint_mode_trains_trunk(joint_runs):
    state = joint_runs["1dev"]["state"]
    host = host_params()
    assert state.frozen == {}
    for top in ("embed_tokens", "layers_0", "norm", "mtp_0"):
        changed = [not np.array_equal(np.asarray(a), b) for a, b in
                   zip(jax.tree.leaves(state.params[top]), jax.tree.leaves(host[top]))]
        assert all(changed), top


@pytest.mark.slow
def test_params_sharded_by_rules_table(joint_runs):
    """2x2x2 mesh, tiny config (H=32, 4 heads, 2 KV heads, MLP 64, V=64): by RULES
    embed -> fsdp, heads / kv_heads / mlp / vocab -> model, norms replicated. The sharding
    survives the steps (out_shardings) and the Adam moments follow their parameters."""
    state = joint_runs["2x2x2"]["state"]
    attn = state.params["layers_0"]["self_attn"]
    mlp = state.params["layers_0"]["mlp"]
    expected = {  # name: (array, spec, per-device shard shape)
        "q_proj": (attn["q_proj"], P("fsdp", "model", None), (16, 2, 8)),
        "k_proj": (attn["k_proj"], P("fsdp", "model", None), (16, 1, 8)),
        "o_proj": (attn["o_proj"], P("model", None, "fsdp"), (2, 8, 16)),
        "embed_tokens": (state.params["embed_tokens"], P("model", "fsdp"), (32, 16)),
        "gate_proj": (mlp["gate_proj"], P("fsdp", "model"), (16, 32)),
        "down_proj": (mlp["down_proj"], P("model", "fsdp"), (32, 16)),
        "mtp_fc": (state.params["mtp_0"]["fc"], P(None, "fsdp"), (64, 16)),
        "norm": (state.params["norm"]["scale"], P(None), (32,)),
    }
    for name, (x, spec, shard_shape) in expected.items():
        assert x.sharding.spec == spec, (name, x.sharding.spec)
        shards = x.addressable_shards
        assert len(shards) == 8
        assert {s.data.shape for s in shards} == {shard_shape}, name
        # Distinct devices hold distinct blocks: 8 / (replication) distinct index tuples.
        n_blocks = int(np.prod([x.shape[i] // shard_shape[i] for i in range(x.ndim)]))
        assert len({tuple((sl.start, sl.stop) for sl in s.index) for s in shards}) == n_blocks
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    assert mu["layers_0"]["self_attn"]["q_proj"].sharding.spec == P("fsdp", "model", None)
    assert mu["embed_tokens"].sharding.spec == P("model", "fsdp")
    # Pure data parallelism: parameters replicated.
    dp = joint_runs["8x1x1"]["state"].params["layers_0"]["self_attn"]["q_proj"]
    assert dp.sharding.spec == P(None, None, None) and dp.addressable_shards[0].data.shape == dp.shape


def test_packed_rows_give_each_example_its_own_loss():
    """Three examples packed into one row (positions restart, segment ids) give the
    same trunk logits as each example alone, so the packed CE is the unpacked one."""
    params = host_params()
    lens = (5, 4, 3)
    rng = np.random.default_rng(3)
    examples = [rng.integers(0, V, n).astype(np.int32) for n in lens]
    tokens = np.concatenate(examples)[None]
    positions = np.concatenate([np.arange(n) for n in lens])[None].astype(np.int32)
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)])[None].astype(np.int32)
    policy = Policy(CFG)
    _, packed, _ = policy.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(positions), None,
                                jnp.asarray(segments), method=Policy.trunk)
    start = 0
    for ex in examples:
        alone = policy.apply({"params": params}, jnp.asarray(ex[None])).logits
        np.testing.assert_allclose(packed[0, start:start + len(ex)], alone[0], atol=2e-5)
        start += len(ex)
    # Without the segment ids the second example would see the first: the check can fail.
    _, leaky, _ = policy.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(positions),
                               method=Policy.trunk)
    assert not np.allclose(leaky[0, lens[0]:], packed[0, lens[0]:], atol=1e-3)
    # The train step's CE on the packed row (first token of each example unscored)
    # equals the token-weighted CE of the examples alone.
    mask = np.ones_like(tokens, np.float32)
    mask[0, np.cumsum((0,) + lens[:-1])] = 0.0
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask),
             "positions": jnp.asarray(positions), "segment_ids": jnp.asarray(segments)}
    _, m = loss_and_metrics(params, batch, mode="trunk_only")
    alone_ce = [float(loss_and_metrics(params, {"tokens": jnp.asarray(ex[None]),
                                                "loss_mask": jnp.ones((1, len(ex)), jnp.float32)},
                                       mode="trunk_only")[1]["trunk/ce"]) for ex in examples]
    np.testing.assert_allclose(float(m["trunk/ce"]), np.average(alone_ce, weights=[n - 1 for n in lens]),
                               rtol=1e-5)


@pytest.mark.slow
def test_bad_batches_rejected_before_compile(joint_runs):
    run, state = joint_runs["2x2x2"]["run"], joint_runs["2x2x2"]["state"]
    compiled_before = run.jitted._cache_size()
    good = make_batch(20)
    bad = [
        (dict(good, loss_mask=good["loss_mask"][:, :-1]), r"batch\['loss_mask'\]"),
        (dict(good, loss_mask=good["loss_mask"][None]), r"batch\['loss_mask'\]"),
        (dict(good, tokens=good["tokens"].astype(jnp.float32)), r"batch\['tokens'\]"),
        (make_batch(20, b=6), r"data\*fsdp"),  # 6 rows over data*fsdp = 4
        (make_batch(20, t=CFG.max_seq_len + 1), "max_seq_len"),
        ({"tokens": good["tokens"]}, "keys"),
        (dict(good, extra=good["tokens"]), "keys"),
        (dict(good, positions=good["tokens"], segment_ids=good["tokens"]), "trunk_only"),  # packed: base only
    ]
    for batch, pattern in bad:
        with pytest.raises(ValueError, match=pattern):
            run(state, batch)
    assert run.jitted._cache_size() == compiled_before  # nothing was traced or compiled
    # The state was not donated by the failed calls: it still runs.
    _, m = joint_runs["2x2x2"]["step"](state, good)
    assert np.isfinite(float(m["loss"]))


def test_split_params_modes():
    params = host_params()
    trainable, frozen = split_params(params, "mtp_only")
    assert set(trainable) == {"mtp_0"} and set(frozen) == set(params) - {"mtp_0"}
    trainable, frozen = split_params(params, "joint")
    assert set(trainable) == set(params) and frozen == {}
