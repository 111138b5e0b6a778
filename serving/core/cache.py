"""A version's prediction table: the static head, precomputed when the version loads, and what traffic repeats.

The head is the training data's most frequent instances (the Trainer writes them beside the model) and the
request log's; the model predicts them at load, in batches, so those requests are answered by a lookup. Beyond
the head, an instance the model has answered `admit_after` times is kept, if each of its texts is a value the
schema lists for its feature (a client can't fill the table with made-up values): the table holds at most
`capacity` answers and `max_bytes` of them, and makes room by dropping the answers traffic added longest ago (the
head stays). Only finite answers are kept. A table belongs to one loaded version: a new version starts its own, so
it never answers with an older model's numbers.
"""

import collections
import math
import sys
from typing import Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy

from models import features
from serving.core import schema

FILL_BATCH = 1024
ENTRY_OVERHEAD = 120  # bytes a kept answer costs beyond its key's objects: the dict's slot and the float


def entry_bytes(key: features.InstanceKey) -> int:
    """What keeping an answer for `key` costs in memory (the shared None and small numbers counted too: an upper
    bound)."""
    return sys.getsizeof(key) + sum(sys.getsizeof(value) for value in key) + ENTRY_OVERHEAD


def _listed_texts() -> Tuple[Tuple[int, frozenset], ...]:
    """(key position, the schema's values) of each text feature the schema lists values for."""
    domains = schema.string_domains()
    return tuple(
        (index, domains[column.name]) for index, column in enumerate(features.FEATURES) if column.name in domains
    )


class PredictionTable:
    """Instance key -> the version's prediction (a Python float of the model's float32 output)."""

    def __init__(self, capacity: int, admit_after: int, max_bytes: int = 2**62):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.admit_after = max(1, admit_after)
        self._answers: Dict[features.InstanceKey, float] = {}
        self._added: Deque[features.InstanceKey] = collections.deque()  # traffic's answers, oldest first
        self._seen: Dict[features.InstanceKey, int] = {}  # answers not kept yet: how often the model gave them
        self._seen_bytes = 0
        self._listed = _listed_texts()
        self.bytes = 0
        self.head_size = 0
        self.evicted = 0

    def fill(
        self, keys: Sequence[features.InstanceKey], predict: Callable[[Sequence[features.InstanceKey]], numpy.ndarray]
    ) -> None:
        """Predicts the head in batches and keeps every finite answer within the bounds (before the version takes
        traffic)."""
        keys = list(keys)[: self.capacity]
        for start in range(0, len(keys), FILL_BATCH):
            batch = keys[start : start + FILL_BATCH]
            for key, answer in zip(batch, predict(batch).tolist()):
                size = entry_bytes(key)
                if math.isfinite(answer) and self.bytes + size <= self.max_bytes:
                    self._answers[key] = answer
                    self.bytes += size
        self.head_size = len(self._answers)

    def get(self, key: features.InstanceKey) -> Optional[float]:
        return self._answers.get(key)

    def offer(self, keys: Iterable[features.InstanceKey], predictions: Iterable[float]) -> None:
        """Counts the model's answers; keeps those asked `admit_after` times, dropping the oldest kept to make room.

        Called only on the server's event loop (the batcher), as `get` is; `fill` runs before the version is served.
        """
        for key, prediction in zip(keys, predictions):
            if key in self._answers or not self._listed_values(key) or not math.isfinite(prediction):
                continue
            seen = self._seen.get(key, 0) + 1
            if seen >= self.admit_after:
                if self._seen.pop(key, None) is not None:
                    self._seen_bytes -= entry_bytes(key)
                self._keep(key, prediction)
                continue
            if seen == 1:
                self._seen_bytes += entry_bytes(key)
            self._seen[key] = seen
        if len(self._seen) > self.capacity or self._seen_bytes > self.max_bytes:
            self._seen.clear()  # the counts of one-off instances are forgotten, not the answers
            self._seen_bytes = 0

    def _listed_values(self, key: features.InstanceKey) -> bool:
        """Whether each of the key's texts is absent or a value the schema lists."""
        for index, values in self._listed:
            if key[index] is not None and key[index] not in values:
                return False
        return True

    def _keep(self, key: features.InstanceKey, prediction: float) -> None:
        size = entry_bytes(key)
        while self._added and (len(self._answers) >= self.capacity or self.bytes + size > self.max_bytes):
            old = self._added.popleft()
            del self._answers[old]
            self.bytes -= entry_bytes(old)
            self.evicted += 1
        if len(self._answers) < self.capacity and self.bytes + size <= self.max_bytes:
            self._answers[key] = prediction
            self._added.append(key)
            self.bytes += size

    def __len__(self) -> int:
        return len(self._answers)


def most_frequent(keys: Iterable[features.InstanceKey], limit: int) -> List[features.InstanceKey]:
    """The `limit` most frequent keys, most frequent first."""
    counts: Dict[features.InstanceKey, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return sorted(counts, key=counts.__getitem__, reverse=True)[:limit]
