"""A version's prediction table: the static head, precomputed when the version loads, and what traffic repeats.

The head is the training data's most frequent instances (the Trainer writes them beside the model) and the
request log's; the model predicts them at load, in batches, so those requests are answered by a lookup. Beyond
the head, an instance the model has answered `admit_after` times is kept, up to `capacity` answers. A table
belongs to one loaded version: a new version starts its own, so it never answers with an older model's numbers.
"""

from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy

from models import features

FILL_BATCH = 1024


class PredictionTable:
    """Instance key -> the version's prediction (a Python float of the model's float32 output)."""

    def __init__(self, capacity: int, admit_after: int):
        self.capacity = capacity
        self.admit_after = max(1, admit_after)
        self._answers: Dict[features.InstanceKey, float] = {}
        self._seen: Dict[features.InstanceKey, int] = {}
        self.head_size = 0

    def fill(
        self, keys: Sequence[features.InstanceKey], predict: Callable[[Sequence[features.InstanceKey]], numpy.ndarray]
    ) -> None:
        """Predicts the head in batches and keeps every answer (before the version takes traffic)."""
        keys = list(keys)[: self.capacity]
        for start in range(0, len(keys), FILL_BATCH):
            batch = keys[start : start + FILL_BATCH]
            self._answers.update(zip(batch, predict(batch).tolist()))
        self.head_size = len(self._answers)

    def get(self, key: features.InstanceKey) -> Optional[float]:
        return self._answers.get(key)

    def offer(self, keys: Iterable[features.InstanceKey], predictions: Iterable[float]) -> None:
        """Counts the model's answers; keeps those asked `admit_after` times while there is room.

        Called only on the server's event loop (the batcher), as `get` is; `fill` runs before the version is served.
        """
        for key, prediction in zip(keys, predictions):
            seen = self._seen.get(key, 0) + 1
            if seen >= self.admit_after and len(self._answers) < self.capacity:
                self._answers[key] = prediction
                self._seen.pop(key, None)
            else:
                self._seen[key] = seen
        if len(self._seen) > self.capacity:  # the counts of one-off instances are forgotten, not the answers
            self._seen.clear()

    def __len__(self) -> int:
        return len(self._answers)


def most_frequent(keys: Iterable[features.InstanceKey], limit: int) -> List[features.InstanceKey]:
    """The `limit` most frequent keys, most frequent first."""
    counts: Dict[features.InstanceKey, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return sorted(counts, key=counts.__getitem__, reverse=True)[:limit]
