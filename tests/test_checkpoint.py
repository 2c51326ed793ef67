"""Checkpointer: exact resume after SIGKILL, fall-back on damage, mismatch errors."""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bebop_jax.train.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    config_differences,
    state_manifest,
)

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "ckpt_worker.py"
LOGGER = "bebop_jax.train.checkpoint"


# ----------------------------------------------------------------------------- helpers


def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    params = {
        "w": jnp.asarray(rng.standard_normal((64, 64), np.float32)),  # [64, 64]: own data file
        "b": jnp.asarray(rng.standard_normal((16,), np.float32)).astype(jnp.bfloat16),
    }
    opt_state = optax.adamw(1e-3).init(params)
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(seed)}


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and np.array_equal(x, y)


def _saved(tmp_path: Path, steps=(2, 4, 6), keep: int = 3) -> tuple[Path, dict]:
    directory = tmp_path / "ckpt"
    states = {s: _state(s) for s in steps}
    with Checkpointer(directory, keep=keep) as ckpt:
        for s in steps:
            assert ckpt.save(s, states[s], {"data_position": s, "config": {"model": {"d": 8}}})
    return directory, states


def _abstract(state):
    return jax.eval_shape(lambda: state)


# ----------------------------------------------------------------------------- kill -9


def _run_worker(ckpt_dir: Path, out: Path, log: Path, kill_on_line: str | None = None):
    """Runs the worker; SIGKILLs it as soon as it prints `kill_on_line`. Returns (lines, rc)."""
    # A compilation cache shared by the runs of one test saves ~1 s of compiling per run.
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        JAX_COMPILATION_CACHE_DIR=str(log.parent / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), "--ckpt_dir", str(ckpt_dir), "--out", str(out),
             "--steps", "40", "--save_every", "5", "--keep", "1"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
        )
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if kill_on_line is not None and line.strip() == kill_on_line:
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.stdout.close()
        rc = proc.wait(timeout=120)
    return lines, rc


@pytest.mark.slow
def test_sigkill_mid_save_and_mid_run_then_resume_is_bitwise_exact(tmp_path):
    ref_lines, rc = _run_worker(tmp_path / "ref", tmp_path / "ref.npz", tmp_path / "ref.log")
    assert rc == 0 and ref_lines[-1] == "done", (tmp_path / "ref.log").read_text()[-3000:]

    ckpt_dir = tmp_path / "run"
    # Kill 1: right after the save of step 15 was requested, while it is being written.
    lines, rc = _run_worker(ckpt_dir, tmp_path / "x.npz", tmp_path / "1.log", "save-requested 15")
    assert rc == -signal.SIGKILL and lines[0] == "started fresh"
    # The kill landed inside the save: step 15 exists only as orbax's tmp dir, and the
    # previous good step (keep=1) was not deleted ahead of it.
    assert (ckpt_dir / "15.orbax-checkpoint-tmp").is_dir() and not (ckpt_dir / "15").exists()
    assert (ckpt_dir / "10").is_dir()

    # Kill 2: at a seeded random training step of the resumed run.
    kill_step = int(np.random.default_rng(1234).integers(16, 31))
    lines, rc = _run_worker(ckpt_dir, tmp_path / "x.npz", tmp_path / "2.log", f"step {kill_step}")
    assert rc == -signal.SIGKILL and lines[0] == "resumed from step 10", lines[:3]
    log2 = (tmp_path / "2.log").read_text()
    assert "checkpoint step 15" in log2 and "partial" in log2  # the interrupted save is reported
    committed = [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()]

    lines, rc = _run_worker(ckpt_dir, tmp_path / "final.npz", tmp_path / "3.log")
    assert rc == 0 and lines[-1] == "done", (tmp_path / "3.log").read_text()[-3000:]
    assert lines[0].startswith("resumed from step ")
    assert int(lines[0].split()[-1]) == max(committed)  # the newest committed step

    ref, final = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "final.npz")
    # 3 params, 3 adam mu, 3 adam nu, adam count, step
    assert sorted(ref.files) == sorted(final.files) and len(ref.files) == 11
    for name in ref.files:
        assert ref[name].dtype == final[name].dtype
        assert np.array_equal(ref[name], final[name]), name


# ----------------------------------------------------------------------------- damage


def _truncate_state_files(step_dir: Path) -> None:
    for f in (step_dir / "state").rglob("*"):
        if f.is_file():
            os.truncate(f, f.stat().st_size // 2)


def _delete_extra(step_dir: Path) -> None:
    (step_dir / "extra" / "metadata").unlink()


def _flip_data_bytes(step_dir: Path) -> None:
    """Silent damage: one flipped bit inside the array data, which orbax reads without error."""
    largest = max((f for f in (step_dir / "state").rglob("*") if f.is_file()),
                  key=lambda f: f.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x01
    largest.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate_state_files, _delete_extra, _flip_data_bytes])
def test_damaged_latest_is_reported_skipped_and_set_aside(tmp_path, caplog, damage):
    directory, states = _saved(tmp_path)
    damage(directory / "6")
    with Checkpointer(directory, keep=3) as ckpt, caplog.at_level(logging.WARNING, LOGGER):
        step, state, extra = ckpt.restore_latest(_abstract(states[6]))
        assert step == 4 and extra["data_position"] == 4
        _assert_trees_equal(state, states[4])
        warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
        assert any("checkpoint step 6" in w and "falling back" in w for w in warnings), warnings
        if damage is _flip_data_bytes:  # caught by the manifest checksums, not by orbax
            assert any("checksum mismatch" in w for w in warnings), warnings
        # Step 6 is moved aside, so the resumed run can save step 6 again.
        assert ckpt.all_steps() == [2, 4] and (directory / "6.corrupt").is_dir()
        assert ckpt.save(6, states[6], {"data_position": 6})
        ckpt.wait()
        step, state, _ = ckpt.restore_latest(_abstract(states[6]))
        assert step == 6
        _assert_trees_equal(state, states[6])


def test_every_step_damaged_raises_instead_of_starting_over(tmp_path):
    directory, states = _saved(tmp_path, steps=(2, 4))
    for s in (2, 4):
        _delete_extra(directory / str(s))
    with Checkpointer(directory) as ckpt:
        with pytest.raises(RuntimeError, match="no readable checkpoint") as info:
            ckpt.restore_latest(_abstract(states[2]))
        assert "step 4" in str(info.value) and "step 2" in str(info.value)


def test_partial_save_dir_is_reported_ignored_and_removed(tmp_path, caplog):
    directory, states = _saved(tmp_path, steps=(2, 4))
    partial = directory / "6.orbax-checkpoint-tmp"  # what a kill during save 6 leaves
    partial.mkdir()
    (partial / "state").mkdir()
    (partial / "state" / "_METADATA").write_text("{")
    with caplog.at_level(logging.WARNING, LOGGER):
        ckpt = Checkpointer(directory, keep=3)
    assert any("checkpoint step 6" in r.getMessage() and "partial" in r.getMessage()
               for r in caplog.records)
    with ckpt:
        assert ckpt.restore_latest(_abstract(states[4])).step == 4
        assert ckpt.save(6, states[4], {})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4, 6] and not partial.exists()


# ----------------------------------------------------------------------------- mismatch


def test_config_mismatch_names_the_differing_fields(tmp_path):
    directory = tmp_path / "ckpt"
    state = _state(0)
    saved_config = {"model": {"hidden": 64, "layers": 2, "vocab": 100}, "train": {"lr": 1e-3}}
    with Checkpointer(directory) as ckpt:
        ckpt.save(1, state, {"config": saved_config})
        ckpt.wait()
        given = {"model": {"hidden": 128, "layers": 2, "vocab": 100}, "train": {"lr": 5e-4}}
        with pytest.raises(ValueError, match="mismatched checkpoint") as info:
            ckpt.restore_latest(_abstract(state), config=given, config_keys=("model",))
        message = str(info.value)
        assert "model.hidden: saved 64, given 128" in message
        assert "layers" not in message and "train.lr" not in message
        # Fields outside config_keys may differ (e.g. a new learning rate on resume).
        given["model"]["hidden"] = 64
        assert ckpt.restore_latest(_abstract(state), config=given, config_keys=("model",)).step == 1
        with pytest.raises(CheckpointMismatchError, match="train.lr"):
            ckpt.restore_latest(_abstract(state), config=given)  # None compares every field


def test_config_differences_reports_missing_fields_and_ignores_tuple_vs_list():
    saved = {"model": {"dims": [2, 3], "k": 1}}
    assert config_differences(saved, {"model": {"dims": (2, 3), "k": 1}}) == []
    assert config_differences(saved, {"model": {"dims": (2, 3)}}) == [
        "model.k: saved 1, given <missing>"
    ]


def test_shape_or_dtype_mismatch_names_the_leaf(tmp_path):
    directory = tmp_path / "ckpt"
    state = _state(0)
    with Checkpointer(directory) as ckpt:
        ckpt.save(1, state, {})
        ckpt.wait()
        wrong = _abstract(state)
        wrong["params"]["w"] = jax.ShapeDtypeStruct((8, 32), jnp.float32)
        wrong["params"]["b"] = jax.ShapeDtypeStruct((16,), jnp.float32)
        with pytest.raises(CheckpointMismatchError) as info:
            ckpt.restore_latest(wrong)
        message = str(info.value)
        assert "['params']['w']: saved float32[64, 64], abstract_state float32[8, 32]" in message
        assert "['params']['b']: saved bfloat16[16], abstract_state float32[16]" in message


# ----------------------------------------------------------------------------- behaviour


def test_restore_places_arrays_with_the_given_shardings(tmp_path):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    state = _state(3)
    shard = lambda x: NamedSharding(mesh, P("data", "model") if x.ndim == 2 else P())  # noqa: E731
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard(x)), _abstract(state)
    )
    abstract["step"] = jax.ShapeDtypeStruct((), jnp.int32)  # no sharding: default device
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(3, state, {})
        step, restored, _ = ckpt.restore_latest(abstract)
    assert step == 3
    _assert_trees_equal(restored, state)
    assert type(restored["opt_state"][0]) is type(state["opt_state"][0])  # ScaleByAdamState
    assert restored["params"]["w"].sharding == NamedSharding(mesh, P("data", "model"))
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        if want.sharding is None:
            assert leaf.sharding.device_set == {jax.devices()[0]}
        else:
            assert leaf.sharding == want.sharding


def test_async_save_survives_deleting_the_arrays_right_after_save(tmp_path):
    state = _state(5)
    copy = jax.tree.map(np.asarray, state)
    with Checkpointer(tmp_path / "ckpt", async_save=True) as ckpt:
        assert ckpt.save(5, state, {})
        for leaf in jax.tree.leaves(state):
            leaf.delete()  # as a donating train step would
        restored = ckpt.restore_latest(_abstract(copy)).state
    _assert_trees_equal(restored, copy)


def test_interval_retention_and_skips(tmp_path):
    state = _state(0)
    with Checkpointer(tmp_path / "ckpt", keep=2, save_interval_steps=3) as ckpt:
        written = [s for s in range(1, 11) if ckpt.save(s, state, {}, force=s == 10)]
        ckpt.wait()
        assert written == [1, 3, 6, 9, 10]  # 1: a fresh directory's first save
        assert ckpt.all_steps() == [9, 10]
        assert not ckpt.save(10, state, {}, force=True)  # not newer than the latest
        assert ckpt.latest_step() == 10


def test_empty_directory_restores_none_and_bad_arguments_raise(tmp_path):
    state = _state(0)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.restore_latest(_abstract(state)) is None
        with pytest.raises(ValueError, match="extra must be JSON-serialisable"):
            ckpt.save(1, state, {"rng": np.zeros(2)})
        with pytest.raises(ValueError, match="step must be an int"):
            ckpt.save(-1, state, {})
        assert ckpt.all_steps() == []
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path / "other", keep=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        Checkpointer(tmp_path / "file")


def test_manifest_checksum_sees_one_changed_element_and_swaps_but_not_sharding():
    rng = np.random.default_rng(0)
    base = {
        "f32": rng.standard_normal((4, 8)).astype(np.float32),
        "bf16": jnp.asarray(rng.standard_normal((5,)), jnp.bfloat16),
        "i32": np.arange(7, dtype=np.int32),
        "mask": np.array([True, False, True]),
    }
    sums = {k: v["checksum"] for k, v in state_manifest(base)["leaves"].items()}
    for name in base:
        changed = dict(base)
        arr = np.array(base[name])
        if arr.dtype == bool:
            arr[1] = ~arr[1]
        else:
            arr.reshape(-1).view(np.uint8)[1] ^= 1  # one bit of the first element
        changed[name] = arr
        new = state_manifest(changed)["leaves"][f"['{name}']"]["checksum"]
        assert new != sums[f"['{name}']"], name
    swapped = dict(base)
    swapped["i32"] = base["i32"][[1, 0, 2, 3, 4, 5, 6]]
    assert state_manifest(swapped)["leaves"]["['i32']"]["checksum"] != sums["['i32']"]
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    sharded = jax.device_put(base["f32"], NamedSharding(mesh, P("data", "model")))
    assert state_manifest({"f32": sharded})["leaves"]["['f32']"]["checksum"] == sums["['f32']"]
