"""Dense and vocabulary-chunked training agree: the MTP step (every loss, M = 1 and M = K, each
mode), the GRPO loss with and without an online MTP loss, and the teacher-forced evaluation give
the same loss, metrics and parameter update whichever ``ModelConfig.vocab_impl`` computes them.

The chunk (24 columns of V = 64) does not divide the vocabulary, so the shifted last chunk is
exercised. One plain SGD step compares updates: Adam's first step divides each gradient by its
own magnitude and would amplify rounding in near-zero entries into full-size differences.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bebop_jax.config import LOSS_NAMES, GRPOConfig, ModelConfig, MTPConfig
from bebop_jax.model import init_params
from bebop_jax.mtp.evaluate import teacher_forced_acceptance
from bebop_jax.mtp.objective import mtp_loss
from bebop_jax.rl.batch import RolloutBatch
from bebop_jax.rl.loss import grpo_loss, policy_logprobs
from bebop_jax.train.step import TrainState, split_params, train_step

K, V, CHUNK = 2, 64, 24
B, T = 2, 12
OPT = optax.sgd(0.5)


def _cfg(impl: str, **kw) -> ModelConfig:
    return ModelConfig.tiny(num_layers=1, num_mtp_depths=K, vocab_impl=impl, vocab_chunk=CHUNK, **kw)


@functools.lru_cache(maxsize=None)
def _params(tie: bool, modules: int):
    return jax.device_get(init_params(_cfg("dense", tie_embeddings=tie, num_mtp_modules=modules),
                                      jax.random.key(1, impl="rbg")))


def _batch():
    tokens = jax.random.randint(jax.random.key(2), (B, T), 0, V, dtype=jnp.int32)
    mask = (jnp.arange(T)[None] >= 3) & (jnp.arange(T)[None] < T - jnp.arange(B)[:, None])
    return {"tokens": tokens, "loss_mask": mask.astype(jnp.float32)}


def _one_step(loss_fn, params, mode_or_split, batch):
    trainable, frozen = mode_or_split(params)
    state = TrainState(step=jnp.int32(0), params=trainable, frozen=frozen, opt_state=OPT.init(trainable))
    new_state, metrics = jax.jit(functools.partial(train_step, loss=loss_fn, optimizer=OPT))(state, batch)
    return jax.device_get(new_state.params), jax.device_get(metrics)


def _assert_same(dense, chunked, rtol=1e-5, atol=1e-6):
    flat_d, flat_c = jax.tree_util.tree_leaves_with_path(dense), jax.tree_util.tree_leaves_with_path(chunked)
    assert [p for p, _ in flat_d] == [p for p, _ in flat_c]
    for (path, d), (_, c) in zip(flat_d, flat_c):
        np.testing.assert_allclose(np.asarray(c), np.asarray(d), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


CASES = ([(loss, "mtp_only", modules, True) for loss in LOSS_NAMES for modules in (1, K)]
         + [("e2e_tv", "joint", 1, False), ("ce", "joint", K, True), ("kl", "trunk_only", 1, True)])


@pytest.mark.parametrize("loss,mode,modules,tie", CASES)
def test_mtp_step_dense_equals_chunked(loss, mode, modules, tie):
    batch, params = _batch(), _params(tie, modules)
    mtp = MTPConfig(loss=loss, mode=mode, temperature=0.8)
    out = {}
    for impl in ("dense", "chunked"):
        cfg = _cfg(impl, tie_embeddings=tie, num_mtp_modules=modules)
        out[impl] = _one_step(mtp_loss(cfg, mtp), params, lambda p: split_params(p, mode), batch)
    (params_d, metrics_d), (params_c, metrics_c) = out["dense"], out["chunked"]
    assert set(metrics_d) == set(metrics_c)
    assert metrics_d["grad_norm"] > 1e-3  # the step moves the parameters
    _assert_same(metrics_d, metrics_c)
    _assert_same(params_d, params_c)


def _rollout_batch(params, cfg):
    batch = _batch()
    tokens, mask = batch["tokens"], batch["loss_mask"]
    old = policy_logprobs(params, tokens, model_config=cfg, temperature=0.9)
    shift = jax.random.normal(jax.random.key(3), (B, T)) * 0.1
    return RolloutBatch(tokens=tokens, loss_mask=mask, advantages=jnp.array([1.0, -0.5]), old_logp=old + shift,
                        ref_logp=old - shift, behaviour_logp=old + 0.5 * shift, version=jnp.int32(0))


@pytest.mark.parametrize("mtp_strategy_loss", [None, "e2e_tv"])
def test_grpo_step_dense_equals_chunked(mtp_strategy_loss):
    params = _params(True, 1)
    grpo = GRPOConfig(kl_coef=0.1, group_size=2)
    out, logp = {}, {}
    for impl in ("dense", "chunked"):
        cfg = _cfg(impl)
        batch = _rollout_batch(params, cfg)
        logp[impl] = jax.device_get(batch.old_logp)
        loss = grpo_loss(cfg, grpo, 0.9, decoupled=True, mtp_loss=mtp_strategy_loss)
        out[impl] = _one_step(loss, params, lambda p: (dict(p), {}), batch)
    _assert_same(logp["dense"], logp["chunked"])
    assert out["dense"][1]["grad_norm"] > 1e-3
    _assert_same(out["dense"][1], out["chunked"][1])
    _assert_same(out["dense"][0], out["chunked"][0])


def test_teacher_forced_acceptance_dense_equals_chunked():
    params, batch = _params(True, 1), _batch()
    got = {impl: teacher_forced_acceptance(params, _cfg(impl), [batch, batch], temperature=0.7)
           for impl in ("dense", "chunked")}
    _assert_same(got["dense"], got["chunked"])


def test_pallas_vocab_impl_equals_dense_in_the_interpreter():
    """vocab_impl="pallas" runs the ops' kernels (interpreted on CPU): the e2e-TV step agrees with dense."""
    batch, params = _batch(), _params(True, 1)
    mtp = MTPConfig(loss="e2e_tv", mode="mtp_only", temperature=0.8)
    out = {impl: _one_step(mtp_loss(_cfg(impl), mtp), params, lambda p: split_params(p, "mtp_only"), batch)
           for impl in ("dense", "pallas")}
    _assert_same(out["dense"][1], out["pallas"][1])
    _assert_same(out["dense"][0], out["pallas"][0])


def test_chunked_is_the_default_for_large_vocabularies_only():
    assert not dataclasses.replace(_cfg("auto"), vocab_size=32_767).chunked_vocab
    assert dataclasses.replace(_cfg("auto"), vocab_size=151_936).chunked_vocab
