"""MTP strategies during RL: frozen heads stay bitwise; online ones train the heads and
leave the policy's update bitwise the frozen run's.

Rollouts here are vanilla (``spec.method none``): they do not depend on the heads, so
runs with different strategies see the same batches and their trunks can be compared
bit for bit over several steps.
"""

from __future__ import annotations

import functools
import tempfile

import jax
import numpy as np
import pytest

from bebop_jax.config import GRPOConfig, MeshConfig, OptimizerConfig, RLConfig, SpecConfig
from bebop_jax.parallel import make_mesh
from bebop_jax.rl.loop import run_grpo
from bebop_jax.train.step import split_params

from test_rl import CFG, TASK, TOK, policy

pytestmark = pytest.mark.slow  # every test runs GRPO steps in process: 20-40 s each on a 2-core CPU
STEPS = 2


@functools.lru_cache(maxsize=None)
def run(strategy: str):
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    rl = RLConfig(num_steps=STEPS, prompts_per_step=4, max_new_tokens=8, prompt_len=12, decode_batch=16,
                  eval_every=STEPS, eval_prompts=2, eval_samples=1, ckpt_every=STEPS, mtp_strategy=strategy,
                  mtp_learning_rate=1e-2)
    result = run_grpo(jax.device_put(policy()), CFG, TOK, [TASK], rl=rl, grpo=GRPOConfig(group_size=4),
                      spec=SpecConfig("none"), optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=0,
                                                                          decay_steps=10),
                      mesh=mesh, run_dir=tempfile.mkdtemp(), logger=None, config={"strategy": strategy},
                      log=lambda *_: None)
    params = jax.tree.map(np.asarray, result.state.all_params)
    return split_params(params, "trunk_only"), result.history


def _equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_frozen_leaves_the_heads_bitwise_unchanged():
    (trunk, heads), _ = run("frozen")
    trunk0, heads0 = split_params(policy(), "trunk_only")
    assert _equal(heads, heads0)
    assert not _equal(trunk, trunk0)


@pytest.mark.parametrize("strategy", ["online_ce", "online_kl", "online_e2e_tv"])
def test_online_strategies_train_the_heads_and_leave_the_trunk_update_bitwise_unchanged(strategy):
    (trunk_f, _), hist_f = run("frozen")
    (trunk, heads), hist = run(strategy)
    _, heads0 = split_params(policy(), "trunk_only")
    assert [h["reward"] for h in hist] == [h["reward"] for h in hist_f]  # the same rollouts
    assert _equal(trunk, trunk_f), "the MTP loss reached the policy's update"
    changed = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(heads), jax.tree.leaves(heads0))]
    assert all(changed), f"{sum(changed)}/{len(changed)} head parameters changed"
    assert "mtp" in hist[0] and np.isfinite(hist[0]["mtp"]["loss"]), hist[0].keys()
