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


def sync_weights(params: Any, shardings: Any) -> Any:
    """``params`` copied into ``shardings`` (another mesh's): a resharding device_put."""
    return jax.device_put(params, shardings, may_alias=False)


class WeightStore:
    """Versions of the rollout weights; ``transfer`` (default: ``sync_weights`` into ``shardings``)
    moves a published tree where the producer reads it."""

    def __init__(self, shardings: Any, transfer: Callable[[Any], Any] | None = None):
        self.shardings = shardings
        self._transfer = transfer if transfer is not None else lambda params: sync_weights(params, shardings)
        self._versions: dict[int, Any] = {}
        self._cond = threading.Condition()
        self._closed = False

    def publish(self, version: int, params: Any) -> None:
        copy = self._transfer(params)
        with self._cond:
            self._versions[version] = copy
            self._cond.notify_all()

    def get(self, version: int, timeout: float | None = None) -> Any:
        """The weights of ``version``, waiting until published. Raises if closed first."""
        with self._cond:
            ok = self._cond.wait_for(lambda: version in self._versions or self._closed, timeout)
            if self._closed and version not in self._versions:
                raise RuntimeError("weight store closed")
            if not ok:
                raise TimeoutError(f"version {version} was not published within {timeout} s")
            return self._versions[version]

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
