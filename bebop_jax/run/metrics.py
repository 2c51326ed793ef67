"""Scalars to TensorBoard and metrics.jsonl.

`MetricLogger(run_dir)`: every scalar to TensorBoard (tensorboardX event files under
run_dir/tensorboard) and to run_dir/metrics.jsonl (one line per `log` call,
{"step", "wall_time", "scalars": {name: value}}, to read back without TensorBoard).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, Any, Mapping

import jax
import numpy as np

from bebop_jax.run.files import ensure_run_dir


class MetricLogger:
    """Logs scalars to TensorBoard (run_dir/tensorboard) and run_dir/metrics.jsonl.

    `enabled` defaults to "this is JAX process 0", so every host may call `log` and
    only one writes. Values may be jax arrays: one `jax.device_get` per `log` call.
    To avoid stalling the device, log step N's metrics after dispatching step N+1.
    """

    def __init__(
        self, run_dir: str | os.PathLike, *, enabled: bool | None = None, flush_secs: int = 30
    ):
        self.run_dir = Path(run_dir)
        self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
        self._writer = None
        self._jsonl: IO[str] | None = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            ensure_run_dir(self.run_dir)
            self._writer = SummaryWriter(
                logdir=str(self.run_dir / "tensorboard"), flush_secs=flush_secs
            )
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a")

    def log(self, step: int, scalars: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
        """Logs each scalar as `prefix/name` at `step`; returns the logged floats.

        Every value must hold exactly one number (python, numpy or jax; shape () or a
        single element). Bad input raises ValueError naming the key before anything is
        written.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if not isinstance(scalars, Mapping):
            raise ValueError(f"scalars must be a mapping of name -> scalar, got {type(scalars)}")
        host = jax.device_get(dict(scalars))
        values: dict[str, float] = {}
        for key, value in host.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"scalars: keys must be non-empty strings, got {key!r}")
            arr = np.asarray(value)
            real = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
            if arr.size != 1 or not (real or arr.dtype == bool):
                raise ValueError(
                    f"scalars[{key!r}] must be a single number, got {arr.dtype}{list(arr.shape)}"
                )
            name = f"{prefix.rstrip('/')}/{key}" if prefix else key
            values[name] = float(arr.reshape(()))
        if self.enabled:
            for name, value in values.items():
                self._writer.add_scalar(name, value, int(step))
            record = {"step": int(step), "wall_time": time.time(), "scalars": values}
            self._jsonl.write(json.dumps(record) + "\n")
        return values

    def flush(self) -> None:
        if self.enabled:
            self._writer.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled and self._jsonl is not None:
            self._writer.close()
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
