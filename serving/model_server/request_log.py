"""Every prediction as a JSON line, written by a background thread off the requests' path.

One line per instance: {"request_id", "time", "model", "version", "signature", "index", "instance" (the raw
features as sent), "prediction", "latency_ms", "path" ("cache" or "model")}. Each server process writes its
own files, requests-<start time>-<pid>-<n>.jsonl, in the log folder, and starts a new one when it reaches
`max_bytes`; its oldest files beyond `keep_files` are deleted (each process's own: another's may be open).
`babyweight validate-serving FOLDER` reads
the files as they are (models/requests.py), and the next version's cache learns its head from them.
"""

import collections
import logging
import os
import pathlib
import threading
import time
from typing import Any, Deque, Dict, Iterator, List

import orjson

FLUSH_SECONDS = 0.05  # short: each flush holds the interpreter while it encodes the records
PATTERN = "requests-*.jsonl"

Record = Dict[str, Any]


class RequestLog:
    def __init__(self, folder: str, max_bytes: int, keep_files: int):
        self.folder = pathlib.Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.keep_files = max(1, keep_files)
        self._pending: Deque[Record] = collections.deque()
        self._stop = threading.Event()
        self._file = None
        self._size = 0
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def write(self, record: Record) -> None:
        """Queues one record (a deque append: cheap and thread-safe)."""
        self._pending.append(record)

    def _open(self) -> None:
        if self._file is not None:
            self._file.close()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = self.folder / f"requests-{stamp}-{os.getpid()}-{time.monotonic_ns() % 10**6:06d}.jsonl"
        self._file = path.open("ab")
        self._size = 0
        # Each process deletes only its own old files: another's may still be open.
        own = self.folder.glob(f"requests-*-{os.getpid()}-*.jsonl")
        for old in sorted(own, key=lambda p: p.stat().st_mtime)[: -self.keep_files]:
            old.unlink(missing_ok=True)

    def _flush(self) -> None:
        if not self._pending:
            return
        lines = []
        while self._pending:
            lines.append(orjson.dumps(self._pending.popleft()))
        if self._file is None or self._size >= self.max_bytes:
            self._open()
        data = b"\n".join(lines) + b"\n"
        try:
            self._file.write(data)
            self._file.flush()
            self._size += len(data)
        except OSError as error:  # a full disk must not stop serving; the loss is logged
            logging.error("request log: %d records not written to %s: %s", len(lines), self.folder, error)

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS):
            self._flush()
        self._flush()

    def close(self) -> None:
        """Writes what is queued and closes the file."""
        self._stop.set()
        self._thread.join(timeout=10)
        if self._file is not None:
            self._file.close()


def log_files(folder: str) -> List[pathlib.Path]:
    """The log's files, oldest first."""
    path = pathlib.Path(folder)
    return sorted(path.glob(PATTERN), key=lambda p: p.stat().st_mtime) if path.is_dir() else []


def recent_records(folder: str, limit: int) -> Iterator[Record]:
    """Up to `limit` records of the newest log files (newest files first), skipping a line cut short."""
    count = 0
    for path in reversed(log_files(folder)):
        with path.open("rb") as handle:
            for line in handle:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                yield record
                count += 1
                if count >= limit:
                    return
