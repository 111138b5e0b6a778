"""Concurrent requests' instances predicted together, in one model call per version.

The batcher runs on the server's event loop. A request's instances join the queue; the queue is run when the
loop has taken every request that arrived with them (or after `timeout` seconds, TF Serving's
batch_timeout_micros), in calls of at most `max_batch_size` instances (a larger request takes several calls).
Alone, a request waits for nothing; under load, the requests that came in while the model ran go together in the
next call. An answer that is not a finite number fails its request (NotANumber) and is never kept in the table.
"""

import asyncio
import logging
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy

from models import features
from serving.core import loader

Pending = Tuple[Sequence[features.InstanceKey], asyncio.Future]


class NotANumber(RuntimeError):
    """The model answered an instance with something that is not a finite number: the version's fault, not the
    request's, and nothing to serve."""

    def __init__(self, version: int, instance: int, value: float):
        super().__init__(f"version {version} answered {value} for instance {instance}, not a weight: nothing served")
        self.version = version


class Batcher:
    def __init__(self, max_batch_size: int, timeout: float, on_batch: Callable[[int, int], None] = lambda v, n: None):
        self.max_batch_size = max(1, max_batch_size)
        self.timeout = timeout
        self._on_batch = on_batch  # (version, instances): for the metrics
        self._queue: Dict[int, Tuple[loader.LoadedVersion, List[Pending]]] = {}
        self._scheduled = False
        self._timer: Optional[asyncio.Handle] = None

    def predict(self, version: loader.LoadedVersion, keys: Sequence[features.InstanceKey]) -> asyncio.Future:
        """A future of the version's predictions for `keys` (a numpy array, in order)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.setdefault(version.version, (version, []))[1].append((keys, future))
        if not self._scheduled:
            self._scheduled = True
            self._timer = loop.call_later(self.timeout, self._run) if self.timeout > 0 else loop.call_soon(self._run)
        elif self.timeout > 0 and sum(len(keys) for keys, _ in self._queue[version.version][1]) >= self.max_batch_size:
            self._timer.cancel()  # a full batch doesn't wait for the timeout
            self._timer = loop.call_soon(self._run)
        return future

    def _run(self) -> None:
        queue, self._queue, self._scheduled = self._queue, {}, False
        for version, pending in queue.values():
            while pending:
                batch, size = [], 0
                while pending and (not batch or size + len(pending[0][0]) <= self.max_batch_size):
                    batch.append(pending.pop(0))
                    size += len(batch[-1][0])
                self._call(version, batch)

    def _call(self, version: loader.LoadedVersion, batch: List[Pending]) -> None:
        keys = [key for request_keys, _ in batch for key in request_keys]
        try:
            predictions = self._predict(version, keys)
        except Exception as error:  # checked requests should not fail; if one does, it alone fails
            if len(batch) > 1:
                for one in batch:
                    self._call(version, [one])
                return
            logging.error(
                "version %d refused a request that the serving contract's check passed: %s", version.version, error
            )
            if not batch[0][1].done():
                batch[0][1].set_exception(error)
            return
        start = 0
        answers = predictions.tolist()
        for request_keys, future in batch:
            end = start + len(request_keys)
            if not future.done():  # a client that went away
                wrong = next((index for index in range(start, end) if not math.isfinite(answers[index])), None)
                if wrong is None:
                    future.set_result(predictions[start:end])
                else:
                    future.set_exception(NotANumber(version.version, wrong - start, answers[wrong]))
            start = end
        version.table.offer(keys, answers)  # it keeps finite answers only

    def _predict(self, version: loader.LoadedVersion, keys: List[features.InstanceKey]) -> numpy.ndarray:
        """The version's answers for `keys`, in model calls of at most max_batch_size instances."""
        size = self.max_batch_size
        parts = []
        for start in range(0, len(keys), size):
            chunk = keys[start : start + size]
            parts.append(version.predict_keys(chunk))
            self._on_batch(version.version, len(chunk))
        return parts[0] if len(parts) == 1 else numpy.concatenate(parts)
