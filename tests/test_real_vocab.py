"""The real-vocabulary path end to end, as a user takes it: a random Qwen3-shaped checkpoint with
Qwen3's 151,936-entry vocabulary and tokenizer (experiments/random_qwen3.py), MTP heads trained on
it by pretrain_mtp.py, then GRPO with an online MTP strategy by rl.py; reduced sizes (the README
gives the sequence-length-1,024 commands and their memory). Both runs take the chunked
vocabulary path (ModelConfig.vocab_impl="auto" at this V)."""

import json
import math
import subprocess
import sys

import pytest

from bebop_jax.model.hf import load_hf_checkpoint
from bebop_jax.model.random_qwen3 import QWEN3_VOCAB
from subprocesses import ROOT, env

pytestmark = pytest.mark.slow


def _run(*args, timeout=900):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_random_qwen3_through_pretrain_mtp_and_rl(tmp_path):
    ckpt = tmp_path / "qwen3"
    _run("experiments/random_qwen3.py", "--out", ckpt, "--hidden_size", 32, "--num_layers", 1, "--head_dim", 8,
         "--intermediate_size", 64, "--max_seq_len", 512)
    config, _ = load_hf_checkpoint(ckpt)
    assert config.vocab_size == QWEN3_VOCAB and config.chunked_vocab

    mtp_dir = tmp_path / "mtp"
    out = _run("experiments/pretrain_mtp.py", "--policy_dir", ckpt, "--run_dir", mtp_dir, "--loss", "e2e_tv",
               "--train.seq-len", 256, "--train.batch-size", 2, "--train.num-steps", 2, "--optimizer.warmup-steps", 1,
               "--warm_start_steps", 0, "--distill_prompts", 2, "--eval_prompts", 2, "--max_new_tokens", 200,
               "--batch_size_decode", 2, "--eval_temperatures", 1.0)
    results = json.loads((mtp_dir / "results.json").read_text())
    assert set(results["acceptance"]) == {"e2e_tv"} and "e2e_tv" in out
    assert (mtp_dir / "mtp_e2e_tv" / "hf" / "tokenizer.json").is_file()  # the export loads with its tokenizer

    rl_dir = tmp_path / "rl"
    out = _run("experiments/rl.py", "--policy_dir", mtp_dir / "mtp_e2e_tv" / "hf", "--run_dir", rl_dir, "--rl.num-steps", 1,
               "--rl.prompts-per-step", 1, "--grpo.group-size", 2, "--rl.max-new-tokens", 192, "--rl.prompt-len", 64,
               "--rl.decode-batch", 2, "--rl.eval-prompts", 1, "--rl.eval-samples", 1,
               "--rl.mtp-strategy", "online_e2e_tv", "--grpo.kl-coef", 0.01)
    assert "held-out accuracy" in out
    results = json.loads((rl_dir / "results.json").read_text())
    assert results["history"] and all(map(math.isfinite, (results["history"][-1]["loss"],)))
