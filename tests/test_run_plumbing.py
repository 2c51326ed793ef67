"""bebop_jax.run: TensorBoard round trip, atomic results.json, run dirs, progress, tables."""

import dataclasses
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bebop_jax.run import (
    MetricLogger,
    Progress,
    cached_json,
    ensure_run_dir,
    format_table,
    print_table,
    progress,
    write_results_json,
)
from bebop_jax.run import files as run_files


# ----------------------------------------------------------------------------- metrics


def test_scalars_read_back_with_tensorboard_event_accumulator(tmp_path, monkeypatch):
    calls = []
    real_device_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: calls.append(1) or real_device_get(x))
    logged = {}
    with MetricLogger(tmp_path / "run") as logger:
        for step in range(5):
            metrics = {
                "loss": jnp.float32(2.0) / (step + 1),  # jax scalar
                "acc": np.float64(0.1 * step),  # numpy scalar
                "tokens": step * 1000,  # python int
                "alpha_last": jnp.arange(3.0)[-1:] * step,  # one-element jax array
            }
            logged[step] = logger.log(step, metrics, prefix="train")
        assert len(calls) == 5  # one device_get per log call
    assert logged[3] == {"train/loss": 0.5, "train/acc": pytest.approx(0.3),
                         "train/tokens": 3000.0, "train/alpha_last": 6.0}

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == sorted(logged[0])
    for tag in logged[0]:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == list(range(5))
        want = np.float32([logged[s][tag] for s in range(5)])  # TensorBoard stores float32
        np.testing.assert_array_equal(np.float32([e.value for e in events]), want)

    jsonl = (tmp_path / "run" / "metrics.jsonl").read_text()
    records = [json.loads(line) for line in jsonl.splitlines()]
    assert [r["step"] for r in records] == list(range(5))
    assert [r["scalars"] for r in records] == [logged[s] for s in range(5)]


def test_log_rejects_non_scalars_before_writing(tmp_path):
    with MetricLogger(tmp_path) as logger:
        with pytest.raises(ValueError, match=r"scalars\['logits'\] must be a single number"):
            logger.log(0, {"loss": 1.0, "logits": jnp.zeros((2, 3))})
        with pytest.raises(ValueError, match="step must be an int"):
            logger.log(-1, {"loss": 1.0})
        logger.log(1, {"loss": 1.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 1


def test_disabled_logger_writes_nothing(tmp_path):
    with MetricLogger(tmp_path / "run", enabled=False) as logger:
        assert logger.log(0, {"loss": jnp.float32(1.5)}) == {"loss": 1.5}
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- results, run dir


@dataclasses.dataclass(frozen=True)
class _Config:
    num_layers: int = 2
    dims: tuple = (4, 8)


def test_results_json_round_trip_with_numpy_and_jax_values(tmp_path):
    obj = {"config": _Config(),"acceptance": {"e2e_tv": {"per_depth": jnp.array([0.5, 0.25]),
                                     "mean_accepted": np.float32(0.75)}},
           "steps": np.int64(7), "run_dir": tmp_path}
    path = write_results_json(tmp_path / "run", obj)
    assert path == tmp_path / "run" / "results.json"
    assert json.loads(path.read_text()) == {
        "config": {"num_layers": 2, "dims": [4, 8]},
        "acceptance": {"e2e_tv": {"per_depth": [0.5, 0.25], "mean_accepted": 0.75}},
        "steps": 7, "run_dir": str(tmp_path)}
    assert os.listdir(tmp_path / "run") == ["results.json"]  # no temp files left


def test_results_json_is_replaced_atomically_or_not_at_all(tmp_path, monkeypatch):
    path = write_results_json(tmp_path, {"version": 1})
    # A value that cannot be serialised: nothing is touched.
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        write_results_json(tmp_path, {"version": 2, "bad": object()})
    assert json.loads(path.read_text()) == {"version": 1}
    # A crash after the new bytes were written but before the rename: old file intact.
    def failing_fsync(fd):
        raise OSError(5, "simulated I/O error")
    monkeypatch.setattr(run_files.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        write_results_json(tmp_path, {"version": 3, "payload": list(range(10000))})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"version": 1}
    assert sorted(os.listdir(tmp_path)) == ["results.json"]


def test_unusable_run_dir_fails_with_one_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"run_dir '.*a_file/run' is not a writable directory "
                                         r"\(.*a_file is a file\)"):
        ensure_run_dir(blocker / "run")
    with pytest.raises(ValueError, match=r"a_file' is not a writable directory \(it is a file\)"):
        ensure_run_dir(blocker)
    with pytest.raises(ValueError, match="not a writable directory"):
        MetricLogger(blocker / "run")
    with pytest.raises(ValueError, match="not a writable directory"):
        write_results_json(blocker / "run", {})
    assert ensure_run_dir(tmp_path / "x" / "y").is_dir()


def test_run_dir_without_write_permission_is_reported(tmp_path, monkeypatch):
    # Tests run as root, which ignores permission bits: simulate what a user would get.
    def denied(dir, prefix):
        raise PermissionError(13, "Permission denied", os.path.join(dir, prefix))
    monkeypatch.setattr(run_files.tempfile, "mkstemp", denied)
    with pytest.raises(ValueError, match=r"'.*locked' is not a writable directory "
                                         r"\(Permission denied: .*locked/.write_probe_\)"):
        ensure_run_dir(tmp_path / "locked")


# ----------------------------------------------------------------------------- progress


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_plain_progress_prints_rate_and_eta_at_intervals_without_carriage_returns():
    out, clock = io.StringIO(), FakeClock()
    with Progress(total=100, desc="train", file=out, interval_s=10.0, clock=clock) as bar:
        assert bar.mode == "plain"  # StringIO is not a terminal
        for _ in range(100):
            clock.t += 0.25  # 4 it/s
            bar.update(1, loss=0.125)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # first update, then every 10 s (40 updates), then the closing line
    assert len(lines) == 1 + 2 + 1, lines
    assert lines[1] == "train: 41/100 (41%) | 4 it/s | elapsed 10s | ETA 15s | loss=0.125"
    assert lines[-1].startswith("train: 100/100 (100%) | 4 it/s | elapsed 25s | ETA 0s")


def test_progress_uses_tqdm_on_a_terminal_and_can_be_turned_off():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    items = list(progress(range(7), desc="eval", file=term))
    assert items == list(range(7))
    assert "\r" in term.getvalue() and "7/7" in term.getvalue()
    quiet = io.StringIO()
    assert list(progress(iter(range(3)), file=quiet, mode="off")) == [0, 1, 2]
    assert quiet.getvalue() == ""
    plain = io.StringIO()
    list(progress(iter(range(3)), desc="gen", file=plain, mode="plain"))
    assert plain.getvalue().splitlines()[-1].startswith("gen: 3 | ")  # unknown total: no ETA
    with pytest.raises(ValueError, match="mode"):
        Progress(mode="fancy")


# ----------------------------------------------------------------------------- tables


def test_table_aligns_numbers_right_and_text_left():
    rows = [{"loss": "e2e_tv", "mean_accepted": 2.71828, "steps": 1000},
            ["ce", 1.5, 20],
            {"loss": "kl", "steps": 3}]
    out = io.StringIO()
    text = print_table(rows, ["loss", "mean_accepted", "steps"], title="Acceptance", file=out)
    assert out.getvalue() == text + "\n"
    assert text.splitlines() == [
        "Acceptance",
        "loss    mean_accepted  steps",
        "------  -------------  -----",
        "e2e_tv          2.718   1000",
        "ce                1.5     20",
        "kl      -                  3",
    ]
    with pytest.raises(ValueError, match=r"rows\[0\] has 2 values for 3 columns"):
        format_table([[1, 2]], ["a", "b", "c"])


def test_cached_json_computes_once_and_reads_back(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.float32(1.5), "rows": np.arange(3)}

    path = tmp_path / "stage" / "summary.json"
    first = cached_json(path, compute)
    second = cached_json(path, compute)
    assert calls == [1]  # the second call read the file
    assert first == second == {"x": 1.5, "rows": [0, 1, 2]}
    assert not [p for p in path.parent.iterdir() if p.name != "summary.json"]  # no temp file left
