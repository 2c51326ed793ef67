"""The small-scale pipeline end to end: resume after kill -9, results.json, bad input.

Runs the experiment scripts as subprocesses with a tiny model, as a user would.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from subprocesses import ROOT, env, kill_at_checkpoint
TINY_MODEL = ["--model.vocab-size", "264", "--model.hidden-size", "32", "--model.num-layers", "2",
              "--model.num-heads", "2", "--model.num-kv-heads", "1", "--model.head-dim", "16",
              "--model.intermediate-size", "64", "--model.max-seq-len", "128", "--model.num-mtp-depths", "2"]
TINY_BASE = TINY_MODEL + ["--train.batch-size", "8", "--train.seq-len", "96", "--train-examples", "64",
                          "--solutions-per-example", "1", "--optimizer.warmup-steps", "2",
                          "--optimizer.decay-steps", "40"]


_env = env


def _run(script, args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], capture_output=True,
                          text=True, env=_env(), timeout=600, **kw)


def _load_params(policy_dir):
    from bebop_jax.model.params_io import load_policy
    return load_policy(policy_dir)[1]


@pytest.mark.slow
def test_pretrain_base_resumes_bitwise_after_kill9(tmp_path):
    steps = ["--train.num-steps", "12", "--train.ckpt-every", "3", "--eval-examples", "0"]
    ref_dir, kill_dir = tmp_path / "ref", tmp_path / "killed"
    ref = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "pretrain_base.py"), "--run_dir", str(ref_dir),
                            *TINY_BASE, *steps], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    victim = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "pretrain_base.py"), "--run_dir",
                               str(kill_dir), *TINY_BASE, *steps], env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_at_checkpoint(victim, kill_dir / "checkpoints" / "6")  # step 6 committed: in the middle of the run
    assert not (kill_dir / "policy").exists(), "killed too late: the run had finished"
    resumed = _run("pretrain_base.py", ["--run_dir", str(kill_dir), *TINY_BASE, *steps])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ref.wait(timeout=600) == 0, ref.stderr.read().decode()[-3000:]
    a, b = _load_params(ref_dir / "policy"), _load_params(kill_dir / "policy")
    import jax
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    # and training did move the parameters away from a fresh init
    from bebop_jax.model import init_params
    from bebop_jax.model.params_io import read_model_config
    fresh = init_params(read_model_config(ref_dir / "policy"), jax.random.key(0))
    assert not np.array_equal(np.asarray(fresh["layers_0"]["mlp"]["up_proj"]), np.asarray(a["layers_0"]["mlp"]["up_proj"]))


@pytest.mark.slow
def test_pretrain_mtp_end_to_end_writes_results(tmp_path):
    run = tmp_path / "mtp"
    # --loss all: every loss trains from the same frozen base (the state donation must not eat it)
    args = ["--run_dir", str(run), "--loss", "all", "--distill-prompts", "32", "--eval-prompts", "16",
            "--eval-temperatures", "1.0", "--num_draft", "2", "--max-new-tokens", "24", "--batch-size-decode", "16",
            "--train.num-steps", "2", "--train.batch-size", "8", "--train.seq-len", "96",
            "--optimizer.warmup-steps", "1", "--warm-start-steps", "2",
            *[a.replace("--", "--base.", 1) if a.startswith("--") else a for a in TINY_BASE],
            "--base.train.num-steps", "4", "--base.eval-examples", "0"]
    out = _run("pretrain_mtp.py", args)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert sorted(results["acceptance"]) == ["ce", "e2e_tv", "kl", "tv"]
    assert results["warm_start"]["steps"] == 2 and (run / "warm_start_ce" / "policy").is_dir()
    for method in ("greedy", "rejection"):
        r = results["acceptance"]["e2e_tv"][method]["1.0"]
        assert len(r["per_depth"]) == 2
        assert 0.0 <= r["mean_accepted"] <= 2.0
        assert 1.0 <= r["tokens_per_forward"] <= 3.0
    assert "config" in results and results["num_draft"] == 2
    assert (run / "tensorboard").is_dir()
    assert "E[accepted]" in out.stdout

    # The study reads this run (pretrain_mtp's outputs are its input): tiny settings, every part.
    study = tmp_path / "study"
    refused = _run("study.py", ["--run_dir", str(study), "--pretrain_mtp_dir", str(run), "--rl.mtp-strategy",
                                "online_ce"])
    assert refused.returncode == 2 and refused.stderr.strip().startswith("error: --rl.mtp-strategy")
    assert len(refused.stderr.strip().splitlines()) == 1 and not study.exists()
    out = _run("study.py", ["--run_dir", str(study), "--policy_dir", str(run / "mtp_e2e_tv" / "policy"),
                            "--pretrain_mtp_dir", str(run), "--strategies", "frozen",
                            "online_e2e_tv", "--rl.num-steps", "4", "--temperatures", "0.5", "1.0", "--num-draft", "2",
                            "--sweep-prompts", "8", "--sweep-batch", "4", "--rl.prompts-per-step", "2",
                            "--grpo.group-size", "2", "--rl.max-new-tokens", "16"])
    assert out.returncode == 0, out.stderr[-3000:]
    report = (study / "report.md").read_text()
    for heading in ("## 1.", "## 2.", "## 3.", "## 4."):
        assert heading in report
    r = json.loads((study / "results.json").read_text())
    assert len(r["sweep"]) == 2 * 2 * 2  # (pre-RL, after RL) x temperatures x batches
    assert set(r["strategies"]) == {"frozen", "online_e2e_tv"}
    assert r["strategies"]["frozen"]["train_cost_ratio"] == 1.0
    assert set(r["losses"]["tests"]) == {"e2e_tv-ce", "e2e_tv-kl"}
    for png in r["plots"].values():
        assert (study / png).stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.parametrize("script,args,needle", [
    ("pretrain_mtp.py", ["--loss", "bogus"], "loss"),
    ("pretrain_mtp.py", ["--tasks", "no_such_task"], "no_such_task"),
    ("pretrain_mtp.py", ["--policy_dir", "/nonexistent/base"], "policy_dir"),
    ("bench_decode.py", ["--tasks", "no_such_task"], "no_such_task"),
    ("bench_decode.py", ["--policy_dir", "/nonexistent/policy"], "policy_dir"),
    ("bench_decode.py", ["--adversarial", "--agreeing-heads"], "agreeing_heads"),
])
def test_bad_input_one_error_line(tmp_path, script, args, needle):
    out = _run(script, ["--run_dir", str(tmp_path / "r"), *args])
    assert out.returncode != 0
    assert needle in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = _run("pretrain_mtp.py", ["--run_dir", str(blocker / "run")])
    assert out.returncode != 0
    assert out.stderr.strip().startswith("error:") and "run_dir" in out.stderr
    assert "Traceback" not in out.stderr
    assert blocker.read_text() == "x"


@pytest.mark.slow
def test_mismatched_base_checkpoint_is_refused_and_kept(tmp_path):
    import jax
    from bebop_jax.config import ModelConfig
    from bebop_jax.model import init_params
    from bebop_jax.model.params_io import save_policy
    cfg = ModelConfig.tiny(vocab_size=264, hidden_size=32, max_seq_len=128)
    policy = tmp_path / "run" / "base" / "policy"
    save_policy(policy, cfg, init_params(cfg, jax.random.key(0)))
    before = {p: p.stat().st_mtime_ns for p in policy.rglob("*")}
    out = _run("pretrain_mtp.py", ["--run_dir", str(tmp_path / "run"), "--base.model.hidden-size", "64"])
    assert out.returncode != 0
    assert "hidden_size" in out.stderr and "Traceback" not in out.stderr
    assert {p: p.stat().st_mtime_ns for p in policy.rglob("*")} == before


def test_mtp_training_starts_from_the_heads_an_hf_checkpoint_ships(tmp_path):
    import dataclasses

    import jax
    from safetensors.numpy import load_file, save_file
    from bebop_jax.config import ModelConfig
    from bebop_jax.model import init_params
    from bebop_jax.model import init_mtp_params
    from bebop_jax.model.hf import CONFIG_FILE, SINGLE_FILE, export_hf_checkpoint, load_hf_checkpoint
    from bebop_jax.model.source import find_policy
    from bebop_jax.mtp import pretrain as pretrain_mtp
    from bebop_jax.run import UserError

    cfg = ModelConfig.tiny(num_mtp_depths=2)
    shipped = init_params(cfg, jax.random.key(3))
    export_hf_checkpoint(cfg, shipped, tmp_path / "with_heads")
    (tmp_path / "trunk_only").mkdir()  # what a plain Qwen3 checkpoint looks like
    (tmp_path / "trunk_only" / CONFIG_FILE).write_text((tmp_path / "with_heads" / CONFIG_FILE).read_text())
    tensors = load_file(tmp_path / "with_heads" / SINGLE_FILE)
    save_file({k: v for k, v in tensors.items() if not k.startswith("mtp.")}, tmp_path / "trunk_only" / SINGLE_FILE)

    def start(path, **kw):
        args = pretrain_mtp.MTPArgs(policy_dir=str(path), **kw)
        config, base = load_hf_checkpoint(path)
        heads, from_file = pretrain_mtp.starting_heads(args, config, base, None, find_policy(path))
        fresh = init_mtp_params(config, jax.random.key(args.train.seed + 7))
        same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        return from_file, same(heads, {"mtp_0": shipped["mtp_0"]}), same(heads, fresh)

    assert start(tmp_path / "with_heads") == (True, True, False)
    assert start(tmp_path / "with_heads", fresh_heads=True) == (False, False, True)
    assert start(tmp_path / "trunk_only") == (False, False, True)
    with pytest.raises(ValueError, match="fresh_heads"):
        pretrain_mtp.MTPArgs(fresh_heads=True)
    # shipped heads of another width than asked for are refused, not silently reshaped
    config, base = load_hf_checkpoint(tmp_path / "with_heads")
    narrow = dataclasses.replace(config, mtp_intermediate_size=8)
    args = pretrain_mtp.MTPArgs(policy_dir=str(tmp_path / "with_heads"), mtp_intermediate_size=8)
    source = find_policy(args.policy_dir)
    with pytest.raises(UserError, match="are 64 wide; add --fresh_heads"):
        pretrain_mtp.starting_heads(args, narrow, base, None, source)
    heads, from_file = pretrain_mtp.starting_heads(dataclasses.replace(args, fresh_heads=True), narrow, base, None,
                                                   source)
    assert not from_file and heads["mtp_0"]["layer"]["mlp"]["up_proj"].shape == (config.hidden_size, 8)
