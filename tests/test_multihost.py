"""Multi-host plumbing: meshes, distributed start-up, and a real two-process run on CPU.

The two-process test launches tests/multihost_worker.py twice with the environment
`srun` gives its tasks; jax.distributed then connects them over localhost and the
8 fake CPU devices (4 per process) form one global (data=2, fsdp=2, model=2) mesh.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors import safe_open

from bebop_jax.config import MeshConfig, ModelConfig
from bebop_jax.model import Policy, abstract_params
from bebop_jax.model.hf import export_hf_checkpoint, load_hf_checkpoint
from bebop_jax import parallel
from bebop_jax.parallel import make_mesh

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID",
                 "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID", "JAX_COORDINATOR_PORT")


def test_make_mesh_refuses_axis_sizes_that_do_not_match_the_devices():
    assert jax.device_count() == 8
    with pytest.raises(ValueError, match=r"data\*fsdp\*model = 3\*2\*2 = 12 but 8 devices"):
        make_mesh(MeshConfig(data=3, fsdp=2, model=2))
    with pytest.raises(ValueError, match=r"fixed axes multiply to 3, which does not divide the 8"):
        make_mesh(MeshConfig(data=-1, fsdp=3))
    with pytest.raises(ValueError, match=r"2\*2\*2 = 8 but 4 devices"):
        make_mesh(MeshConfig(data=2, fsdp=2, model=2), jax.devices()[:4])
    mesh = make_mesh(MeshConfig(data=-1, fsdp=2, model=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}


def test_maybe_initialize_distributed_starts_only_under_a_multi_process_launcher(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    assert parallel.maybe_initialize_distributed() is False
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task SLURM job is a single process
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # a single-host TPU VM
    assert parallel.maybe_initialize_distributed() is False
    assert calls == []
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert parallel.maybe_initialize_distributed() is True
    assert calls == [((), {})]  # no arguments: jax reads the cluster from the environment


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_load_shard_export_and_split_data(tmp_path):
    config = ModelConfig.tiny(num_kv_heads=2, tie_embeddings=False, num_mtp_depths=2)
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda s: (0.3 * rng.randn(*s.shape)).astype(np.float32), abstract_params(config))
    ckpt = tmp_path / "ckpt"
    export_hf_checkpoint(config, params, ckpt)
    loaded_config, loaded = load_hf_checkpoint(ckpt)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (4, 12)).astype(np.int32)
    ref_logits = np.asarray(jax.jit(lambda p, t: Policy(loaded_config).apply({"params": p}, t).logits)(
        loaded, tokens))

    out = tmp_path / "out"
    out.mkdir()
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("TPU_")}
        env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   SLURM_JOB_ID="1", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                   SLURM_PROCID=str(pid), SLURM_LOCALID=str(pid), JAX_COORDINATOR_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "multihost_worker.py"),
             "--ckpt", str(ckpt), "--out", str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]

    results = [json.loads((out / f"worker{pid}.json").read_text()) for pid in range(2)]
    for pid, r in enumerate(results):
        assert r["initialised"] and r["process_index"] == pid
        assert (r["process_count"], r["device_count"], r["local_device_count"]) == (2, 8, 4)
        assert r["bad_params"] == []
        assert r["num_split_params"] >= 20
        np.testing.assert_allclose(np.load(out / f"logits{pid}.npy"), ref_logits, atol=1e-5, rtol=0)
        # data: each process batches its own shard; the global batch is both shards' rows
        assert r["global_shape"] == [4, 4]
        assert r["global_rows"] == r["shard_rows"]
        assert r["numpy_batch_refused"]
        # async RL with both meshes spanning the processes: bounded lag, monotone versions
        assert r["rollout_processes"] == r["train_processes"] == [0, 1]
        assert r["rl_lags"] == [0, 1, 1] and r["rl_versions"] == [0, 0, 1], r
        assert r["rl_counters"] == {"dropped_batches": 0, "max_policy_lag": 1}
    # both processes saw the same rollouts and hold the same trained weights
    assert results[0]["rl_rewards"] == results[1]["rl_rewards"]
    assert results[0]["rl_trunk_sum"] == results[1]["rl_trunk_sum"]
    assert results[0]["local_rows"] == results[0]["shard_rows"][:2]
    assert results[1]["local_rows"] == results[1]["shard_rows"][2:]
    assert not {tuple(r) for r in results[0]["local_rows"]} & {tuple(r) for r in results[1]["local_rows"]}

    # the multi-host export (gathered, written once) equals the single-host checkpoint
    def tensors(path):
        found = {}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(f, "numpy") as h:
                found.update({k: h.get_tensor(k) for k in h.keys()})
        return found

    exported, original = tensors(out / "exported"), tensors(ckpt)
    assert len(list((out / "exported").glob("*.safetensors"))) > 1
    assert exported.keys() == original.keys()
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
