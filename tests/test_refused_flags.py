"""A flag a script sets itself is refused with one error line and exit status 2, never silently
replaced, and before anything is written."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from subprocesses import env

ROOT = Path(__file__).resolve().parents[1]

# script -> (the library module whose REFUSED table it applies, {field path: the command line to pass})
REFUSED = {
    "pretrain_mtp.py": ("bebop_jax.mtp.pretrain", {
        "optimizer.decay_steps": ["--optimizer.decay-steps", "500"],
        "base.run_dir": ["--base.run-dir", "elsewhere"],
        "base.tasks": ["--base.tasks", "countdown"],
        "base.tokenizer": ["--base.tokenizer", "other"],
    }),
    "rl.py": ("bebop_jax.rl.stage", {
        "optimizer.decay_steps": ["--optimizer.decay-steps", "500"],
    }),
    "bench_rl.py": ("bebop_jax.bench.rl", {
        "rl.async_rollouts": ["--rl.async-rollouts"],
        "rl.rollout_devices": ["--rl.rollout-devices", "1", "--rl.async-rollouts"],  # a valid RLConfig
    }),
    "study.py": ("bebop_jax.rl.study", {
        "rl.mtp_strategy": ["--rl.mtp-strategy", "online_ce"],
    }),
}

CASES = [(script, path, argv) for script, (_, flags) in REFUSED.items() for path, argv in flags.items()]


@pytest.mark.parametrize("script", sorted(REFUSED))
def test_every_refused_flag_is_tried(script):
    """The table above covers each script's own REFUSED table, so a new refusal needs a case here."""
    module, flags = REFUSED[script]
    assert set(importlib.import_module(module).REFUSED) == set(flags)


@pytest.mark.slow
@pytest.mark.parametrize("script,path,argv", CASES, ids=[f"{s}:{p}" for s, p, _ in CASES])
def test_refused_flag_one_error_line_exit_2_nothing_written(tmp_path, script, path, argv):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--run_dir", str(run_dir), *argv],
                         capture_output=True, text=True, env=env(), timeout=300, cwd=tmp_path)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: " + argv[0]), out.stderr[-2000:]
    assert "does not take it" in lines[0]
    assert not run_dir.exists()
