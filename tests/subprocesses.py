"""Running the experiment scripts as a user would, for the pipeline and RL tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict:
    """The test environment minus its 8 fake devices (one CPU device, as a user's laptop)."""
    out = dict(os.environ)
    out.pop("XLA_FLAGS", None)
    out["PYTHONPATH"] = str(ROOT)
    return out


def kill_at_checkpoint(victim: subprocess.Popen, checkpoint: Path, timeout_s: float = 300) -> None:
    """SIGKILL ``victim`` as soon as the checkpoint directory ``checkpoint`` is committed."""
    deadline = time.time() + timeout_s
    while not checkpoint.is_dir():
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
