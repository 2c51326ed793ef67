"""A deterministic toy training loop that checkpoints through `Checkpointer`.

Used by tests/test_checkpoint.py, which SIGKILLs it mid-run and restarts it: the final
state of an interrupted-and-resumed run must equal an uninterrupted run's bit for bit.
Everything random is a function of (seed, step): the batch at data position i comes
from numpy's generator seeded with (seed, i), and the dropout mask of step s from
`fold_in(key, s)`, so the checkpointed state plus the data position in `extra` is all
a resumed run needs.

Prints one line per event, flushed: "started fresh" or "resumed from step S", then
"step S" after each train step, "save-requested S" after each save call that wrote
(the write may still be in flight), then "done".
Run: python tests/ckpt_worker.py --ckpt_dir DIR --steps 40 --out final.npz
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_dir", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save_every", type=int, default=5)
    parser.add_argument("--keep", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="final state as .npz")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from bebop_jax.train.checkpoint import Checkpointer

    d_in, d_hidden, d_out, batch = 64, 512, 64, 64
    config = {
        "model": {"d_in": d_in, "d_hidden": d_hidden, "d_out": d_out},
        "train": {"lr": 3e-3, "batch": batch, "seed": args.seed, "steps": args.steps},
    }
    key = jax.random.key(args.seed)
    init_rng = np.random.default_rng([args.seed, 10**6 + 1])
    params = {
        "w1": init_rng.standard_normal((d_in, d_hidden), np.float32) / np.sqrt(d_in),  # [D_in, H]
        "b1": np.zeros((d_hidden,), np.float32),
        "w2": init_rng.standard_normal((d_hidden, d_out), np.float32) / np.sqrt(d_hidden),
    }
    params = jax.tree.map(jnp.asarray, params)
    optimizer = optax.adamw(config["train"]["lr"], weight_decay=1e-2)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
    teacher_DxO = np.random.default_rng([args.seed, 10**6]).standard_normal((d_in, d_out))

    def batch_at(position: int):
        rng = np.random.default_rng([args.seed, position])
        x_BxD = rng.standard_normal((batch, d_in)).astype(np.float32)
        y_BxO = np.tanh(x_BxD @ teacher_DxO / np.sqrt(d_in)).astype(np.float32)
        return x_BxD, y_BxO

    def loss_fn(p, x_BxD, y_BxO, dropout_key):
        h_BxH = jax.nn.gelu(x_BxD @ p["w1"] + p["b1"])
        keep_BxH = jax.random.bernoulli(dropout_key, 0.9, h_BxH.shape)
        h_BxH = jnp.where(keep_BxH, h_BxH / 0.9, 0.0)
        return jnp.mean((h_BxH @ p["w2"] - y_BxO) ** 2)

    @jax.jit
    def train_step(state, x_BxD, y_BxO):
        dropout_key = jax.random.fold_in(key, state["step"])
        grads = jax.grad(loss_fn)(state["params"], x_BxD, y_BxO, dropout_key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}

    ckpt = Checkpointer(args.ckpt_dir, keep=args.keep, save_interval_steps=args.save_every)
    restored = ckpt.restore_latest(
        jax.eval_shape(lambda: state), config=config, config_keys=("model",)
    )
    step, position = 0, 0
    if restored is None:
        print("started fresh", flush=True)
    else:
        step, state, extra = restored
        position = extra["data_position"]
        if position != step or int(state["step"]) != step:
            raise RuntimeError(f"inconsistent checkpoint: step {step}, extra {extra}")
        print(f"resumed from step {step}", flush=True)

    while step < args.steps:
        state = train_step(state, *batch_at(position))
        position += 1
        step += 1
        print(f"step {step}", flush=True)
        extra = {"data_position": position, "config": config, "rng": {"seed": args.seed}}
        if ckpt.save(step, state, extra, force=step == args.steps):
            print(f"save-requested {step}", flush=True)
    ckpt.wait()
    ckpt.close()
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    np.savez(args.out, **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
    print("done", flush=True)


if __name__ == "__main__":
    main()
