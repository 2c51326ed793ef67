"""Async RL: rollout and train meshes split from 8 fake CPU devices, the weight sync, bounded
staleness, the synchronous limit (max_staleness 0), and producer failures."""

from __future__ import annotations

import functools
import tempfile
import threading
import time

import jax
import numpy as np
import pytest

from bebop_jax.config import GRPOConfig, MeshConfig, OptimizerConfig, RLConfig, SpecConfig
from bebop_jax.model import init_params, shard_params_for
from bebop_jax.rl import policy_loss
from bebop_jax.rl.loop import run_grpo
from bebop_jax.rl.meshes import rl_meshes, split_devices
from bebop_jax.rl.producer import ProducerError, RolloutProducer
from bebop_jax.rl.weights import WeightStore

from test_rl import CFG, TASK, TOK, policy


@pytest.mark.parametrize("rollout_devices,train_config", [(4, MeshConfig(data=-1)), (2, MeshConfig(data=1, fsdp=-1)),
                                                          (2, MeshConfig(data=2, model=-1))])
def test_synced_weights_are_bitwise_the_learners_in_the_rollout_shardings(rollout_devices, train_config):
    assert jax.device_count() == 8
    rollout_mesh, train_mesh = rl_meshes(rollout_devices, train_config)
    assert set(rollout_mesh.devices.flat).isdisjoint(train_mesh.devices.flat)
    assert rollout_mesh.size == rollout_devices and train_mesh.size == 8 - rollout_devices
    params = init_params(CFG, jax.random.key(0), mesh=train_mesh)
    shardings = shard_params_for(CFG, rollout_mesh)
    store = WeightStore(shardings)
    store.publish(3, params)
    synced = store.get(3)
    for (path, a), b, want in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(synced),
                                  jax.tree.leaves(shardings)):
        assert b.sharding == want, path
        assert set(b.sharding.device_set) <= set(rollout_mesh.devices.flat), path
        assert np.array_equal(np.asarray(a), np.asarray(b)), path
    assert store.versions() == [3]


def test_device_split_is_checked():
    assert split_devices(0)[0] == split_devices(0)[1] == jax.devices()
    for bad in (8, -1, 9):
        with pytest.raises(ValueError, match="rollout_devices"):
            split_devices(bad)


# ------------------------------------------------------------------ the producer on its own

def _run_fake(max_staleness: int, steps: int = 8, fail_at: int | None = None):
    store = WeightStore(None, transfer=lambda params: params)  # host strings stand in for weights
    learner_version = [0]
    log = []

    def sample(index, version, params):
        if index == fail_at:
            raise KeyError(f"boom at {index}")
        assert params == f"w{version}"
        log.append((index, version, learner_version[0]))
        time.sleep(0.01)
        return f"batch{index}"

    store.publish(0, "w0")
    producer = RolloutProducer(sample, store, start=0, max_staleness=max_staleness, first_version=0)
    got = []
    with producer:
        for step in range(steps):
            index, version, batch = producer.get()
            got.append((index, version, batch))
            time.sleep(0.02)  # train
            learner_version[0] = step + 1
            store.publish(step + 1, f"w{step + 1}")
    return got, log


@pytest.mark.parametrize("s", [0, 1, 2])
def test_producer_runs_at_most_max_staleness_versions_ahead(s):
    got, log = _run_fake(s)
    assert [g[0] for g in got] == list(range(8))
    versions = [g[1] for g in got]
    assert versions == sorted(versions), versions  # monotone tags
    assert all(index - version == min(index, s) for index, version, _ in got)  # exactly the allowed lag
    # sampled only once the learner had reached the batch's version, and never more than s ahead
    assert all(learner >= version for _, version, learner in log)
    if s == 0:
        assert all(learner == index for index, _, learner in log)  # strictly alternating: the sync loop


def test_a_producer_crash_reaches_the_learner_with_its_traceback():
    t0 = time.perf_counter()
    with pytest.raises(ProducerError, match=r"KeyError: 'boom at 3'[\s\S]*producer traceback[\s\S]*in sample"):
        _run_fake(1, fail_at=3)
    assert time.perf_counter() - t0 < 30
    assert not [t for t in threading.enumerate() if t.name == "rollout-producer"]


# ------------------------------------------------------------------ the RL loop, async

def _rl(**kw):
    base = dict(num_steps=4, prompts_per_step=4, max_new_tokens=8, prompt_len=12, decode_batch=16, eval_every=4,
                eval_prompts=2, eval_samples=1, ckpt_every=4)
    base.update(kw)
    return RLConfig(**base)


@functools.lru_cache(maxsize=None)
def run(async_rollouts: bool, max_staleness: int = 1, rollout_devices: int = 0):
    rollout_mesh, train_mesh = rl_meshes(rollout_devices, MeshConfig(data=-1),
                                         devices=jax.devices() if rollout_devices else jax.devices()[:1])
    params = jax.device_put(policy(), shard_params_for(CFG, train_mesh))
    result = run_grpo(params, CFG, TOK, [TASK], rl=_rl(async_rollouts=async_rollouts, max_staleness=max_staleness,
                                                          rollout_devices=rollout_devices),
                      grpo=GRPOConfig(group_size=4), spec=SpecConfig("rejection", 2),
                      optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=0, decay_steps=10),
                      mesh=train_mesh, rollout_mesh=rollout_mesh, run_dir=tempfile.mkdtemp(), logger=None,
                      config={"test": 1}, log=lambda *_: None)
    return jax.tree.map(np.asarray, result.state.all_params), result


@pytest.mark.slow
def test_async_with_max_staleness_0_reproduces_the_sync_path_bitwise():
    p_sync, r_sync = run(False)
    p_async, r_async = run(True, 0)
    assert [h["reward"] for h in r_async.history] == [h["reward"] for h in r_sync.history]
    for a, b in zip(jax.tree.leaves(p_sync), jax.tree.leaves(p_async)):
        assert np.array_equal(a, b)
    assert r_async.counters == {"dropped_batches": 0, "max_policy_lag": 0}


@pytest.mark.slow
def test_async_on_disjoint_meshes_respects_the_staleness_bound():
    """Rollouts on 4 devices, training on the other 4, one version of lag allowed."""
    _, result = run(True, 1, 4)
    lags = [h["policy_lag"] for h in result.history]
    versions = [h["policy_version"] for h in result.history]
    assert versions == sorted(versions) and lags == [0, 1, 1, 1], (versions, lags)
    assert result.counters == {"dropped_batches": 0, "max_policy_lag": 1}
    # a stale batch is weighted by min(exp(old - behaviour), is_cap): not all ones, and finite
    w = [h["policy"]["is_weight_mean"] for h in result.history if h["policy_lag"]]
    assert all(np.isfinite(w)) and any(x != 1.0 for x in w), w
    assert result.history[0]["policy"]["is_weight_mean"] == 1.0  # on-policy batch: the sync step


def test_behaviour_weights_are_exactly_one_when_behaviour_is_the_proximal_policy():
    rng = np.random.default_rng(0)
    logp, old = rng.normal(size=(8, 6)) - 2.0, rng.normal(size=(8, 6)) - 2.0
    adv, mask = rng.normal(size=8), (rng.random((8, 6)) > 0.3).astype(np.float32)
    cfg = GRPOConfig(group_size=4)
    with_b, m = policy_loss(logp, old, adv, mask, cfg, behaviour_logp=old)
    without, _ = policy_loss(logp, old, adv, mask, cfg)
    assert float(m["is_weight_mean"]) == 1.0
    assert float(with_b) == float(without)


@pytest.mark.slow
def test_a_producer_crash_stops_the_rl_loop_cleanly(monkeypatch):
    from bebop_jax.rl import rollout
    real = rollout.RolloutWorker.sample

    def flaky(self, params, items, key, **kw):
        if kw.get("version", 0) >= 1:
            raise FloatingPointError("reward model exploded")
        return real(self, params, items, key, **kw)

    monkeypatch.setattr(rollout.RolloutWorker, "sample", flaky)
    mesh = rl_meshes(0, MeshConfig(data=-1), devices=jax.devices()[:1])[1]
    t0 = time.perf_counter()
    with pytest.raises(ProducerError, match="FloatingPointError: reward model exploded"):
        run_grpo(jax.device_put(policy()), CFG, TOK, [TASK], rl=_rl(async_rollouts=True, max_staleness=1),
                 grpo=GRPOConfig(group_size=4), spec=SpecConfig("none"), optimizer=OptimizerConfig(),
                 mesh=mesh, run_dir=tempfile.mkdtemp(), logger=None, config={}, log=lambda *_: None)
    assert time.perf_counter() - t0 < 120
    time.sleep(0.5)
    assert not [t for t in threading.enumerate() if t.name == "rollout-producer"]
