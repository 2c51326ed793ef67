"""One process of a two-process JAX program on CPU, for tests/test_multihost.py.

The parent starts two of these with SLURM-style environment variables (what `srun`
sets), so `parallel.maybe_initialize_distributed()` brings up `jax.distributed`
exactly as on a GPU cluster. Each process has 4 fake CPU devices; the global mesh is
(data=2, fsdp=2, model=2) over all 8. The worker then:
  1. loads the HF checkpoint sharded over the global mesh (each process reads only
     its own devices' slices) and checks every local shard against a local
     unsharded load;
  2. runs one jitted forward on the global mesh and writes the logits;
  3. exports the sharded params (gathered across processes, process 0 writes);
  4. builds its host's share of the data with `make_dataset`'s default process
     sharding and assembles the global batch with
     `jax.make_array_from_process_local_data`;
  5. runs a few steps of async RL (max_staleness 1) with a rollout mesh and a train
     mesh of 4 devices each, both spanning the two processes (2 devices of each).
Results go to OUT/worker{process_id}.json (+ logits .npy).
Run: python tests/multihost_worker.py --ckpt DIR --out DIR
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only: cross-process collectives
    from bebop_jax.parallel import maybe_initialize_distributed

    initialised = maybe_initialize_distributed()

    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    from bebop_jax.config import MeshConfig
    from bebop_jax.data.pipeline import make_dataset
    from bebop_jax.model import Policy, shard_params_for
    from bebop_jax.model.hf import export_hf_checkpoint, load_hf_checkpoint
    from bebop_jax.parallel import batch_sharding, make_mesh

    pid = jax.process_index()
    result = {"initialised": initialised, "process_index": pid, "process_count": jax.process_count(),
              "device_count": jax.device_count(), "local_device_count": jax.local_device_count()}
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, model=2))

    # 1. sharded load: shardings from the rules table, local shards equal an unsharded load
    config, params = load_hf_checkpoint(args.ckpt, mesh)
    _, local = load_hf_checkpoint(args.ckpt)  # whole model on this process's first device
    expected = dict(jax.tree_util.tree_flatten_with_path(shard_params_for(config, mesh))[0])
    local_flat = dict(jax.tree_util.tree_flatten_with_path(local)[0])
    bad, split = [], 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        if x.sharding != expected[path] or x.is_fully_addressable:
            bad.append(f"{name}: sharding {x.sharding}")
        split += any(s is not None for s in x.sharding.spec)
        ref = np.asarray(local_flat[path])
        for shard in x.addressable_shards:
            if not np.array_equal(np.asarray(shard.data), ref[shard.index]):
                bad.append(f"{name}: shard {shard.index} differs")
    result.update(bad_params=bad, num_split_params=split)

    # 2. one forward over the global mesh (cross-process collectives)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (4, 12)).astype(np.int32)
    forward = jax.jit(lambda p, t: Policy(config).apply({"params": p}, t).logits,
                      out_shardings=NamedSharding(mesh, P()))
    logits = forward(params, jax.device_put(tokens, NamedSharding(mesh, P())))
    np.save(os.path.join(args.out, f"logits{pid}.npy"), np.asarray(logits.addressable_data(0)))

    # 3. export from sharded params: every process gathers, process 0 writes
    export_hf_checkpoint(config, params, os.path.join(args.out, "exported"), max_shard_bytes=50_000)
    multihost_utils.sync_global_devices("export written")

    # 4. data sharded by process, assembled into one global batch
    examples = [([i, i + 1, i + 2], [0.0, 1.0, 1.0]) for i in range(1, 17)]
    make = lambda **kw: make_dataset(examples, seq_len=4, batch_size=2, seed=0, shuffle=False,
                                     num_epochs=1, **kw)
    local_batch = next(iter(make()))  # default shard: (process_index, process_count)
    per_shard = [next(iter(make(shard_index=i, shard_count=2)))["tokens"] for i in range(2)]
    global_tokens = jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch["tokens"])
    gathered = np.asarray(multihost_utils.process_allgather(global_tokens, tiled=True))
    result.update(local_rows=local_batch["tokens"].tolist(), global_shape=list(global_tokens.shape),
                  global_rows=gathered.tolist(), shard_rows=np.concatenate(per_shard).tolist())
    try:  # a numpy batch (even of the global shape) cannot feed a jit sharded over processes
        jax.jit(lambda t: t.sum(), in_shardings=batch_sharding(mesh))(np.zeros((4, 4), np.int32))
        result["numpy_batch_refused"] = False
    except ValueError as e:
        result["numpy_batch_refused"] = "make_array_from_process_local_data" in str(e)

    result.update(async_rl(args.out))
    with open(os.path.join(args.out, f"worker{pid}.json"), "w") as f:
        json.dump(result, f)


def async_rl(out: str) -> dict:
    """Three async GRPO steps; rollout devices {0, 1, 4, 5}, train devices {2, 3, 6, 7}."""
    import jax
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from toy_tasks import AsciiFirst

    from bebop_jax.config import GRPOConfig, MeshConfig, ModelConfig, OptimizerConfig, RLConfig, SpecConfig
    from bebop_jax.data.tokenizer import load_tokenizer
    from bebop_jax.model import init_params
    from bebop_jax.rl.loop import run_grpo
    from bebop_jax.rl.meshes import rl_meshes

    d = jax.devices()
    rollout_mesh, train_mesh = rl_meshes(4, MeshConfig(data=-1), devices=[d[0], d[1], d[4], d[5], d[2], d[3], d[6], d[7]])
    cfg = ModelConfig.tiny(vocab_size=264, max_seq_len=64, num_mtp_depths=2)
    params = init_params(cfg, jax.random.key(0), mesh=train_mesh)
    rl = RLConfig(num_steps=3, prompts_per_step=4, max_new_tokens=6, prompt_len=12, decode_batch=16, eval_prompts=0,
                  ckpt_every=1, async_rollouts=True, max_staleness=1, rollout_devices=4)
    result = run_grpo(params, cfg, load_tokenizer("byte"), [AsciiFirst()], rl=rl, grpo=GRPOConfig(group_size=4),
                      spec=SpecConfig("rejection", 2), optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=0,
                                                                                 decay_steps=10),
                      mesh=train_mesh, rollout_mesh=rollout_mesh, run_dir=os.path.join(out, "rl"), logger=None,
                      config={"multihost": 1}, log=lambda *_: None)
    from jax.experimental import multihost_utils
    trunk = multihost_utils.process_allgather(result.state.params["layers_0"]["mlp"]["up_proj"], tiled=True)
    return {"rl_rewards": [h["reward"] for h in result.history],
            "rl_lags": [h["policy_lag"] for h in result.history],
            "rl_versions": [h["policy_version"] for h in result.history],
            "rl_counters": result.counters, "rl_trunk_sum": float(np.asarray(trunk, np.float64).sum()),
            "rollout_processes": sorted({dev.process_index for dev in rollout_mesh.devices.flat}),
            "train_processes": sorted({dev.process_index for dev in train_mesh.devices.flat})}


if __name__ == "__main__":
    main()
