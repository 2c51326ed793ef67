"""A resumable training loop: data -> jitted step -> metrics, checkpoints, logs.

Resuming is exact: the checkpoint holds the train state AND the data iterator's
position, so a run killed at any moment and restarted continues with the same
batches and reaches bitwise the same parameters (on CPU) as an uninterrupted
one. Metrics of step N are fetched after step N+1 is dispatched, so logging
never stalls the device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from bebop_jax.data.pipeline import TokenDataset, get_state, set_state
from bebop_jax.parallel import batch_sharding
from bebop_jax.train.checkpoint import Checkpointer
from bebop_jax.run.metrics import MetricLogger
from bebop_jax.run.progress import Progress


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs with shardings: what a checkpoint restores into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@dataclasses.dataclass
class LoopResult:
    state: Any
    last_metrics: dict
    resumed_from: int | None


def run_training(state: Any, step_fn: Callable, dataset: TokenDataset, *, num_steps: int, mesh: Mesh,
                 ckpt_dir: str, ckpt_every: int, logger: MetricLogger | None, config: dict,
                 log_every: int = 10, desc: str = "train", tb_prefix: str = "train",
                 config_keys: tuple[str, ...] | None = None) -> LoopResult:
    """Train ``state`` to ``num_steps`` steps, resuming from ``ckpt_dir`` if it holds a checkpoint.

    ``config`` (JSON-able) is saved with every checkpoint and compared on resume
    (``config_keys`` selects the compared fields), so a checkpoint of another
    model shape is refused with a message naming the differing fields.
    """
    iterator = iter(dataset)
    shard = batch_sharding(mesh)
    start, resumed = 0, None
    with Checkpointer(ckpt_dir, keep=2, save_interval_steps=ckpt_every) as ckpt:
        restored = ckpt.restore_latest(abstract_like(state), config=config, config_keys=config_keys)
        if restored is not None:
            state = restored.state
            set_state(iterator, restored.extra["data"])
            start = resumed = restored.step
        pending: tuple[int, Any] | None = None
        last: dict = {}

        def flush(item):
            step, metrics = item
            host = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
            scalars = {k: float(v) for k, v in host.items() if v.ndim == 0}
            for k, v in host.items():  # per-depth vectors -> one scalar per depth
                if v.ndim == 1:
                    scalars.update({f"{k}_{i + 1}": float(x) for i, x in enumerate(v)})
            if logger is not None:
                logger.log(step, scalars, prefix=tb_prefix)
            return scalars

        with Progress(num_steps - start, desc, unit="step") as bar:
            for step in range(start, num_steps):
                # each host feeds its own shard of the global batch (one host: a plain device_put)
                host_batch = next(iterator)
                batch = {k: jax.make_array_from_process_local_data(shard, v) for k, v in host_batch.items()}
                state, metrics = step_fn(state, batch)
                postfix = {}
                if pending is not None and (pending[0] % log_every == 0 or pending[0] == num_steps):
                    last = flush(pending)
                    postfix = {"loss": last.get("loss", float("nan"))}
                pending = (step + 1, metrics)
                ckpt.save(step + 1, state, {"data": get_state(iterator), "config": config},
                          force=(step + 1 == num_steps))
                bar.update(1, **postfix)
            if pending is not None:
                last = flush(pending)
        ckpt.wait()
    return LoopResult(state=state, last_metrics=last, resumed_from=resumed)
