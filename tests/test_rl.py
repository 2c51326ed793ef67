"""GRPO with speculative rollouts: the update's direction, its masks, frozen heads,
exactness of spec rollouts, and resume after kill -9.

A tiny byte-level policy whose MTP heads agree with its trunk (``agreeing_params``) so
speculative rollouts accept drafts; a toy task rewards a response that starts with an
ASCII character (about half of them), so rewards vary within groups.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from bebop_jax.config import GRPOConfig, MeshConfig, ModelConfig, OptimizerConfig, RLConfig, SpecConfig
from bebop_jax.data.tokenizer import load_tokenizer
from bebop_jax.decode.synthetic import agreeing_params
from bebop_jax.model import head_names, init_params
from bebop_jax.parallel import make_mesh
from bebop_jax.rl.batch import RolloutBatch
from bebop_jax.rl.loop import run_grpo
from bebop_jax.rl.loss import grpo_loss, loss_from_logits, policy_logprobs
from bebop_jax.rl.rollout import RolloutWorker
from bebop_jax.sampling import SamplingConfig
from bebop_jax.train.step import make_optimizer, make_step, train_state_for, split_params

from subprocesses import ROOT, env, kill_at_checkpoint
from toy_tasks import AsciiFirst

CFG = ModelConfig.tiny(vocab_size=264, max_seq_len=128, num_mtp_depths=2)
TOK = load_tokenizer("byte")
ALPHA = 0.01  # significance level of the two-sample tests


TASK = AsciiFirst()  # reward 1 iff the response starts with an ASCII character


@functools.lru_cache(maxsize=None)
def policy():
    return agreeing_params(CFG, init_params(CFG, jax.random.key(0)), scale=0.3)


def worker(spec=SpecConfig("rejection", 2), temperature=1.0, max_new=8, batch=64):
    return RolloutWorker(CFG, TOK, max_new_tokens=max_new, prompt_len=12, sampling=SamplingConfig(temperature),
                         spec=spec, decode_batch=batch)


def items(n: int, seed: int = 0):
    return [(TASK, e) for e in TASK.examples("train", n, seed=seed)]


# ------------------------------------------------------------------ the update

@pytest.mark.slow
def test_one_step_raises_the_logprob_of_rewarded_responses():
    grpo = GRPOConfig(group_size=8)
    ro = worker().sample(policy(), items(8), jax.random.key(1), group_size=8)
    assert 0.2 < ro.rewards.mean() < 0.8, ro.rewards  # both signs of advantage occur
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    trunk, heads = split_params(jax.device_put(policy()), "trunk_only")
    opt = make_optimizer(OptimizerConfig(learning_rate=3e-3, warmup_steps=0, decay_steps=10, weight_decay=0.0))
    state = train_state_for(trunk, heads, opt, mesh)
    before = np.asarray(policy_logprobs(state.all_params, ro.batch.tokens, model_config=CFG, temperature=1.0))
    step = make_step(grpo_loss(CFG, grpo, 1.0), opt, state, mesh, batch_shardings=ro.batch.shardings(mesh))
    state, metrics = step(state, ro.batch.on(mesh))
    after = np.asarray(policy_logprobs(state.all_params, ro.batch.tokens, model_config=CFG, temperature=1.0))
    mask, adv = ro.batch.loss_mask, ro.batch.advantages
    delta_B = ((after - before) * mask).sum(1) / mask.sum(1)  # mean log-prob change per response
    assert float(metrics["policy/ratio_mean"]) == pytest.approx(1.0, abs=1e-6)  # on-policy: r = 1 exactly
    assert delta_B[adv > 0].mean() > 0 > delta_B[adv < 0].mean(), (delta_B, adv)
    assert np.corrcoef(delta_B, adv)[0, 1] > 0.5


def test_prompt_padding_and_environment_tokens_get_exactly_zero_gradient():
    """d loss / d logits[t-1] (the prediction of token t) is exactly 0 wherever mask[t] = 0."""
    b, t, v = 4, 14, CFG.vocab_size
    rng = np.random.default_rng(0)
    mask = np.zeros((b, t), np.float32)
    mask[:, 4:7] = 1.0    # first assistant turn (tokens 0..3: prompt)
    mask[:, 9:11] = 1.0   # second assistant turn (tokens 7..8: an environment turn)
    mask[1, 10:] = 0.0    # a shorter row: padding from token 10 on
    batch = RolloutBatch(tokens=jnp.asarray(rng.integers(0, 256, (b, t)), jnp.int32), loss_mask=jnp.asarray(mask),
                         advantages=jnp.array([1.0, -1.0, 0.5, -0.5]), behaviour_logp=jnp.zeros((b, t)),
                         version=jnp.int32(0))
    logits = jnp.asarray(rng.normal(size=(b, t, v)), jnp.float32)
    for aggregation in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        grpo = GRPOConfig(group_size=2, aggregation=aggregation)
        grad = jax.grad(lambda lg: loss_from_logits(lg, batch, grpo, 1.0, decoupled=False)[0])(logits)
        per_prediction = np.abs(np.asarray(grad)).sum(-1)  # [B, T]: row t-1 predicts token t
        predicts_masked = np.concatenate([mask[:, 1:], np.ones((b, 1))], axis=1) == 0
        assert np.all(per_prediction[predicts_masked] == 0.0), aggregation
        assert np.all(per_prediction[:, :-1][mask[:, 1:] > 0] > 0), aggregation
        assert np.all(per_prediction[:, -1] == 0.0)  # the last position predicts nothing


@pytest.mark.slow
def test_rl_steps_leave_frozen_heads_bitwise_unchanged_and_move_the_trunk(tmp_path):
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    params = jax.device_put(policy())
    heads0 = jax.tree.map(np.asarray, split_params(params, "trunk_only")[1])
    trunk0 = jax.tree.map(np.asarray, split_params(params, "trunk_only")[0])
    rl = RLConfig(num_steps=2, prompts_per_step=4, max_new_tokens=8, prompt_len=12, decode_batch=16,
                  eval_every=2, eval_prompts=4, eval_samples=1, ckpt_every=1)
    result = run_grpo(params, CFG, TOK, [TASK], rl=rl, grpo=GRPOConfig(group_size=4), spec=SpecConfig("rejection", 2),
                      optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=0, decay_steps=10), mesh=mesh,
                      run_dir=tmp_path, logger=None, config={"test": 1}, log=lambda *_: None)
    state = result.state
    assert set(state.frozen) == set(heads0) == set(head_names(CFG))
    for a, b in zip(jax.tree.leaves(heads0), jax.tree.leaves(state.frozen)):
        assert np.array_equal(a, np.asarray(b))
    moved = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(trunk0), jax.tree.leaves(state.params))]
    assert all(moved), "every trunk parameter should have been updated"
    # the optimizer holds moments for the trunk only
    n_trunk = len(jax.tree.leaves(trunk0))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]  # (counts are scalars)
    assert len(moments) == 2 * n_trunk  # adam's mu and nu for each trunk leaf, nothing for the heads
    assert [h["step"] for h in result.history] == [1, 2]
    for key in ("reward", "entropy", "mean_accepted", "per_depth_acceptance", "rollout_seconds", "train_seconds"):
        assert key in result.history[0], key
    assert result.history[0]["mean_accepted"] > 0.5  # the heads drafted and were accepted
    assert set(result.evals) == {"0", "2"}


# ------------------------------------------------------------------ exactness of spec rollouts

@functools.lru_cache(maxsize=None)
def rollout_sample(method: str, temperature: float = 1.0):
    spec = SpecConfig(method, 2) if method != "none" else SpecConfig("none")
    ro = worker(spec, temperature).sample(policy(), items(64, seed=5), jax.random.key(11 + len(method)),
                                          group_size=8)
    mask = ro.batch.loss_mask
    mean_logp = (ro.batch.behaviour_logp * mask).sum(1) / mask.sum(1)
    return ro.rewards, mean_logp, ro.stats


@pytest.mark.slow
def test_spec_and_vanilla_rollouts_have_the_same_reward_and_logprob_distributions():
    """512 episodes each; chi-squared on rewards, KS on per-episode mean log-prob, at alpha = 0.01.

    The episodes' mean log-prob at T = 0.7 (a different policy) must be told apart: the
    test has power.
    """
    r_spec, lp_spec, stats = rollout_sample("rejection")
    r_van, lp_van, _ = rollout_sample("none")
    assert stats["mean_accepted"] > 0.5, stats  # speculation really happened
    table = np.array([[np.sum(r_spec == 1), np.sum(r_spec == 0)], [np.sum(r_van == 1), np.sum(r_van == 0)]])
    assert scipy.stats.chi2_contingency(table).pvalue > ALPHA, table
    assert scipy.stats.ks_2samp(lp_spec, lp_van).pvalue > ALPHA
    _, lp_cold, _ = rollout_sample("none", 0.7)
    assert scipy.stats.ks_2samp(lp_spec, lp_cold).pvalue < ALPHA


# ------------------------------------------------------------------ experiments/rl.py

_env = env


def _rl_cmd(run_dir, policy_dir, *extra):
    return [sys.executable, str(ROOT / "tests" / "rl_worker.py"), "--run_dir", str(run_dir), "--policy_dir",
            str(policy_dir), "--tasks", "ascii_first", "--rl.prompt-len", "12", "--rl.num-steps", "6", "--rl.prompts-per-step", "2", "--grpo.group-size", "4",
            "--rl.decode-batch", "8", "--rl.max-new-tokens", "8", "--rl.eval-prompts", "2",
            "--rl.eval-samples", "1", "--rl.eval-every", "6", "--rl.ckpt-every", "1", "--num_draft", "2",
            *extra]


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    from bebop_jax.model.params_io import save_policy
    root = tmp_path_factory.mktemp("policies")
    save_policy(root / "mtp", CFG, policy(), mtp_heads_trained=True)
    save_policy(root / "base", CFG, policy(), mtp_heads_trained=False)
    return root


@pytest.mark.slow
def test_rl_resumes_bitwise_after_kill9(tmp_path, tiny_policy):
    from bebop_jax.model.params_io import load_policy
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    ref = subprocess.Popen(_rl_cmd(ref_dir, tiny_policy / "mtp"), env=_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    victim = subprocess.Popen(_rl_cmd(kill_dir, tiny_policy / "mtp"), env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    kill_at_checkpoint(victim, kill_dir / "checkpoints" / "2")
    assert not (kill_dir / "results.json").exists(), "killed too late: the run had finished"
    resumed = subprocess.run(_rl_cmd(kill_dir, tiny_policy / "mtp"), env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stdout
    assert ref.wait(timeout=600) == 0, ref.stderr.read().decode()[-3000:]
    a, b = load_policy(ref_dir / "policy")[1], load_policy(kill_dir / "policy")[1]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert not all(np.array_equal(np.asarray(x), np.asarray(y))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(policy())))
    import json
    res = json.loads((kill_dir / "results.json").read_text())
    assert [h["step"] for h in res["history"]] == [1, 2, 3, 4, 5, 6]
    assert set(res["eval"]["before"]) >= {"greedy", "T1"} and set(res["eval"]["after"]) >= {"greedy", "T1"}
    assert "held-out accuracy" in resumed.stdout
    # the learning rate decays over the run's own length (6 steps here), to a tenth
    assert res["config"]["optimizer"]["decay_steps"] == 6 and res["config"]["optimizer"]["min_lr_ratio"] == 0.1


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["--grpo.group-size", "1"], "group_size"),
    (["--grpo.aggregation", "seq-sum"], "aggregation"),
    (["--grpo.clip-low", "-0.1"], "clip_low"),
    (["--grpo.clip-high", "-0.2"], "clip_high"),
    (["--rl.mtp-strategy", "online_magic"], "mtp_strategy"),
])
def test_rl_bad_config_one_error_line_and_nothing_written(tmp_path, tiny_policy, args, needle):
    run_dir = tmp_path / "run"
    out = subprocess.run(_rl_cmd(run_dir, tiny_policy / "mtp", *args), env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and needle in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not run_dir.exists()


@pytest.mark.slow
def test_rl_refuses_a_policy_without_trained_heads_for_speculative_rollouts(tmp_path, tiny_policy):
    run_dir = tmp_path / "run"
    out = subprocess.run(_rl_cmd(run_dir, tiny_policy / "base"), env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--spec_method none" in lines[0], out.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_rl_default_policy_missing_says_what_to_run(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "rl.py"), "--run_dir", str(tmp_path / "r")],
                         env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode != 0 and "python experiments/pretrain_mtp.py" in out.stderr and "--policy_dir" in out.stderr
    assert "Traceback" not in out.stderr


def test_batches_not_divisible_into_groups_are_refused():
    from bebop_jax.rl import group_advantages
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(np.zeros(6), 4)
    z = np.zeros((6, 8), np.float32)
    batch = RolloutBatch(tokens=z.astype(np.int32), loss_mask=z, advantages=z[:, 0], behaviour_logp=z,
                         version=np.int32(0))
    with pytest.raises(ValueError, match="group_size"):
        batch.validate(CFG, 4)


@pytest.mark.slow
def test_kl_to_the_starting_policy_is_zero_on_the_first_step_and_grows(tmp_path):
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    rl = RLConfig(num_steps=2, prompts_per_step=4, max_new_tokens=8, prompt_len=12, decode_batch=16,
                  eval_prompts=0, ckpt_every=2)
    result = run_grpo(jax.device_put(policy()), CFG, TOK, [TASK], rl=rl, grpo=GRPOConfig(group_size=4, kl_coef=0.1),
                      spec=SpecConfig("none"), optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0,
                                                                          decay_steps=10),
                      mesh=mesh, run_dir=tmp_path, logger=None, config={}, log=lambda *_: None)
    kl = [h["policy"]["kl"] for h in result.history]
    assert kl[0] == 0.0 and kl[1] > 0.0, kl  # the reference is the starting policy, held fixed


@pytest.mark.slow
def test_bench_rl_reports_each_setup(tmp_path, tiny_policy):
    """experiments/bench_rl.py end to end, tiny: a sync and an async setup, their table, plot and results."""
    run = tmp_path / "bench"
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "bench_rl.py"), "--run_dir", str(run),
                          "--policy_dir", str(tiny_policy / "mtp"), "--setups", "sync-vanilla", "async-spec",
                          "--rl.num-steps", "3", "--warmup", "1", "--num_draft", "2", "--rl.prompts-per-step", "2",
                          "--grpo.group-size", "2", "--rl.max-new-tokens", "8"],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads((run / "results.json").read_text())
    sync, spec = r["setups"]["sync-vanilla"], r["setups"]["async-spec"]
    assert sync["speedup_vs_sync_vanilla"] == 1.0
    assert sync["overlap"] is None and isinstance(spec["overlap"], float)  # overlap only where rollouts overlap
    assert spec["max_policy_lag"] <= 1 and spec["dropped_batches"] >= 0
    assert len(spec["reward"]) == 3 and spec["mean_accepted"] > 0
    assert (run / r["plot"]).stat().st_size > 1000
    assert "async-spec" in out.stdout and "model: disjoint hw" in out.stdout
