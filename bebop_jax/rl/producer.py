"""The rollout producer: a thread sampling batches ahead of the learner, with bounded staleness.

Batch i is sampled with policy version ``max(first_version, i - max_staleness)``
exactly (waiting for the learner to publish it), so the producer runs at most
``max_staleness`` versions ahead, every batch's version is fixed by its index (the
same on every process of a multi-host program, whatever the timing), and with
``max_staleness = 0`` producer and learner strictly alternate: the synchronous loop.
Batches (indices start .. stop-1) go through a bounded queue, tagged with their
index and version. An
exception in the producer is re-raised in the learner with the producer's
traceback; ``close()`` stops the thread wherever it waits.
"""

from __future__ import annotations

import queue
import threading
import traceback
from typing import Any, Callable

from bebop_jax.rl.weights import WeightStore

_POLL_S = 0.2  # how often blocked waits look at the stop flag


class ProducerError(RuntimeError):
    """The rollout producer failed; the message carries its traceback."""


class RolloutProducer:
    def __init__(self, sample: Callable[[int, int, Any], Any], weights: WeightStore, *, start: int,
                 max_staleness: int, first_version: int, stop: int | None = None):
        if not (isinstance(max_staleness, int) and max_staleness >= 0):
            raise ValueError(f"max_staleness: must be an int >= 0, got {max_staleness!r}")
        self._sample, self.weights = sample, weights
        self.start, self.max_staleness, self.first_version, self.stop = start, max_staleness, first_version, stop
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_staleness))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)

    def version_for(self, index: int) -> int:
        """The policy version batch ``index`` is sampled with."""
        return max(self.first_version, index - self.max_staleness)

    def start_thread(self) -> "RolloutProducer":
        self._thread.start()
        return self

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        index = self.start
        try:
            while not self._stop.is_set() and (self.stop is None or index < self.stop):
                version = self.version_for(index)
                params = None
                while params is None and not self._stop.is_set():
                    try:
                        params = self.weights.get(version, timeout=_POLL_S)
                    except TimeoutError:
                        continue
                if params is None:
                    return
                self.weights.drop_before(version)
                payload = self._sample(index, version, params)
                if not self._put(("batch", index, version, payload)):
                    return
                index += 1
        except BaseException as e:  # noqa: BLE001  (handed to the learner, which raises it)
            if not self._stop.is_set():
                self._put(("error", type(e).__name__, str(e), traceback.format_exc()))

    def get(self) -> tuple[int, int, Any]:
        """The next (index, version, batch); raises ProducerError if the producer failed."""
        while True:
            if not self._thread.is_alive() and self._queue.empty():
                raise ProducerError("the rollout producer stopped without a batch or an error")
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if item[0] == "error":
                _, name, message, tb = item
                raise ProducerError(f"rollout producer failed: {name}: {message}\n--- producer traceback ---\n{tb}")
            return item[1], item[2], item[3]

    @property
    def finished(self) -> bool:
        """The thread has ended (its last batch or error is in the queue)."""
        return not self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self.weights.close()
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def __enter__(self) -> "RolloutProducer":
        return self.start_thread()

    def __exit__(self, *exc) -> None:
        self.close()
