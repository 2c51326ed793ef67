"""Policy weights on the rollout mesh, by version: the one place weights cross meshes.

The learner ``publish``es version v (its parameters after v updates) with a resharding
``jax.device_put`` onto the rollout mesh's shardings (always a copy: the train step
donates its state); the producer ``get``s exactly the version a batch must be sampled
with, waiting for it if needed. Versions older than any batch can still need are dropped.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils


def sync_weights(params: Any, shardings: Any) -> Any:
    """``params`` copied into ``shardings`` (another mesh's): a resharding ``jax.device_put``.

    Multi-controller JAX reshards across processes only between shardings of one device
    set (CPU/GPU). Between disjoint meshes each process then copies its own slices: from a
    local shard holding the same index when every process has one (replicated or
    identically split weights: no communication), else from the leaf gathered across
    processes (one collective, the same decision on every process).
    """
    leaves = jax.tree.leaves(params)
    if all(x.is_fully_addressable for x in leaves):
        return jax.device_put(params, shardings, may_alias=False)
    return jax.tree.map(_reshard_across_processes, params, shardings)


def _norm(index: tuple, shape: tuple) -> tuple:
    return tuple(sl.indices(n)[:2] for sl, n in zip(index, shape))


def _locally_available(src: jax.sharding.Sharding, dst: jax.sharding.Sharding, shape: tuple) -> bool:
    """Whether every process holds, on its source devices, each slice its target devices need."""
    have: dict[int, set] = {}
    for device, index in src.devices_indices_map(shape).items():
        have.setdefault(device.process_index, set()).add(_norm(index, shape))
    return all(_norm(index, shape) in have.get(device.process_index, set())
               for device, index in dst.devices_indices_map(shape).items())


def _reshard_across_processes(x: jax.Array, sharding: jax.sharding.Sharding) -> jax.Array:
    if x.sharding.device_set == sharding.device_set:
        return jax.device_put(x, sharding, may_alias=False)
    shape = x.shape
    if _locally_available(x.sharding, sharding, shape):
        local = {_norm(s.index, shape): s.data for s in x.addressable_shards}
        read = lambda index: local[_norm(index, shape)]
    else:
        host = np.asarray(multihost_utils.process_allgather(x, tiled=True))
        read = lambda index: host[index]
    arrays = [jax.device_put(read(index), device, may_alias=False)
              for device, index in sharding.addressable_devices_indices_map(shape).items()]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


class WeightStore:
    """Versions of the rollout weights; ``transfer`` (default: ``sync_weights`` into ``shardings``)
    moves a published tree where the producer reads it."""

    def __init__(self, shardings: Any, transfer: Callable[[Any], Any] | None = None):
        self.shardings = shardings
        self._transfer = transfer if transfer is not None else lambda params: sync_weights(params, shardings)
        self._versions: dict[int, Any] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._parked_for: int | None = None  # the version a reader is blocked on

    def publish(self, version: int, params: Any) -> None:
        copy = self._transfer(params)
        with self._cond:
            self._versions[version] = copy
            self._cond.notify_all()

    def get(self, version: int, timeout: float | None = None) -> Any:
        """The weights of ``version``, waiting until published. Raises if closed first."""
        with self._cond:
            if version not in self._versions:
                self._parked_for = version
                self._cond.notify_all()
            ok = self._cond.wait_for(lambda: version in self._versions or self._closed, timeout)
            if ok:
                self._parked_for = None
            if self._closed and version not in self._versions:
                raise RuntimeError("weight store closed")
            if not ok:
                raise TimeoutError(f"version {version} was not published within {timeout} s")
            return self._versions[version]

    def wait_parked(self, version: int, done: Callable[[], bool]) -> None:
        """Block until a reader waits for ``version`` (it has done all it can before it) or ``done()``.

        Multi-process programs run collectives that span both meshes (checkpoint barriers,
        weight gathers) only then, so another thread's collectives cannot interleave
        with them in a different order on another process.
        """
        with self._cond:
            while not (self._parked_for == version or self._closed or done()):
                self._cond.wait(0.05)

    def drop_before(self, version: int) -> None:
        with self._cond:
            for v in [v for v in self._versions if v < version]:
                del self._versions[v]

    def versions(self) -> list[int]:
        with self._cond:
            return sorted(self._versions)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
