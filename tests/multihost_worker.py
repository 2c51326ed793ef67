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
     `jax.make_array_from_process_local_data`.
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

    with open(os.path.join(args.out, f"worker{pid}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
