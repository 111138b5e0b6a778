"""Every prediction as a JSON line, written by a background thread off the requests' path.

One line per instance: {"request_id", "client" (the client's X-Client-Id, a label it chooses; "" when none), "time",
"model", "version", "signature", "index", "instance" (the raw features as sent), "prediction", "latency_ms", "path"
("cache" or "model")}. Each server process writes its own files, requests-<start time>-<pid>-<n>.jsonl, in the log
folder, and starts a new one when it reaches `max_bytes`. Each new file enforces the folder's budget (`keep_files`
files, `max_total_bytes` bytes), all processes' files together, past restarts included: the oldest are deleted,
except each live process's newest (the one it writes). `babyweight validate-serving FOLDER` reads the files as they
are (models/requests.py), and the next version's cache learns its head from them.

Storage faults never reach the requests: `write` only queues (at most `max_pending` records; beyond, records
are dropped), and the writer thread catches every error, drops what it can't write, logs once per streak of
failures, and tries again every RETRY_SECONDS in a new file, recreating the folder. `counts` gives the dropped
records (by reason) and the errors for /metrics.
"""

import collections
import logging
import os
import pathlib
import re
import threading
import time
from typing import IO, Any, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

import orjson

from serving.model_server import server
from serving.model_server.settings import ServerSettings

FLUSH_SECONDS = 0.05  # short: each flush holds the interpreter while it encodes the records
RETRY_SECONDS = 1.0  # after a failed write, records are dropped (not encoded) until the next try
REMIND_SECONDS = 300.0  # a failure that lasts is logged again this often, with what it has cost
MAX_PENDING = 50_000  # records queued for the writer (36-73 MiB measured; a healthy writer holds one flush's worth)
PATTERN = "requests-*.jsonl"
FILE_NAME = re.compile(r"requests-\d{8}T\d{6}-(?P<pid>\d+)-\d+\.jsonl")

# Why records were dropped: the `reason` label of babyweight_request_log_dropped_records_total.
QUEUE_FULL = "queue_full"  # the writer was behind by max_pending records
WRITE_ERROR = "write_error"  # the folder or file could not be written (or a retry was not due yet)
UNENCODABLE = "unencodable"  # orjson could not encode the record
DROP_REASONS = (QUEUE_FULL, WRITE_ERROR, UNENCODABLE)

Record = Dict[str, Any]


class RequestLog:
    def __init__(
        self,
        folder: str,
        max_bytes: int,
        keep_files: int,
        max_total_bytes: int = ServerSettings.log_max_total_bytes,
        max_pending: int = MAX_PENDING,
    ):
        self.folder = pathlib.Path(folder)
        self.max_bytes = max_bytes
        self.keep_files = max(1, keep_files)
        self.max_total_bytes = max_total_bytes
        self.max_pending = max_pending
        self._pending: Deque[Record] = collections.deque()
        self._stop = threading.Event()
        self._file: Optional[IO[bytes]] = None
        self._path: Optional[pathlib.Path] = None
        self._identity: Tuple[int, int] = (0, 0)  # the open file's (device, inode): is its path still it?
        self._size = 0
        self._counts_lock = threading.Lock()  # write() counts on the caller's thread, the writer on its own
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._errors = 0
        self._retry_at = 0.0
        self._streak_errors = 0  # failures since the last good write: logged once, then every REMIND_SECONDS
        self._streak_dropped = 0
        self._remind_at = 0.0
        self._unencodable_logged_at = -REMIND_SECONDS
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def write(self, record: Record) -> None:
        """Queues one record, or drops and counts it when max_pending are queued; never blocks."""
        if len(self._pending) >= self.max_pending:
            self._count(QUEUE_FULL, 1)
            return
        self._pending.append(record)

    def counts(self) -> Tuple[Dict[str, int], int]:
        """Records dropped so far, by reason, and the storage errors met (totals since the start)."""
        with self._counts_lock:
            return dict(self._dropped), self._errors

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Writes what is queued and closes the file."""
        self._stop.set()
        self._thread.join(timeout=10)
        self._close_file()
        if self._streak_errors:
            logging.error(
                "request log: closed while %s was failing: %d errors, %d records dropped",
                self.folder,
                self._streak_errors,
                self._streak_dropped,
            )

    # The writer thread

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS):
            self._flush()
        self._flush(final=True)

    def _flush(self, final: bool = False) -> None:
        """Writes what is queued; catches everything (the thread must outlive any fault) and counts the loss."""
        queued = len(self._pending)
        if not queued:
            return
        records = [self._pending.popleft() for _ in range(queued)]
        if not final and time.monotonic() < self._retry_at:
            self._count(WRITE_ERROR, queued)
            self._streak_dropped += queued
            return
        lines: List[bytes] = []
        try:
            lines = self._encode(records)
            if lines:
                self._append(b"\n".join(lines) + b"\n")
        except Exception as error:  # noqa: BLE001 (an OSError mostly: a full disk, a removed or read-only folder)
            self._failed(error, len(lines) or queued)

    def _encode(self, records: List[Record]) -> List[bytes]:
        lines = []
        for record in records:
            try:
                lines.append(orjson.dumps(record))
            except orjson.JSONEncodeError as error:  # a bug upstream, maybe in every record: logged now and then
                self._count(UNENCODABLE, 1)
                if time.monotonic() >= self._unencodable_logged_at + REMIND_SECONDS:
                    self._unencodable_logged_at = time.monotonic()
                    logging.error(
                        "request log: a record of request %r not encodable, dropped (others like it are counted, "
                        "logged every %g s): %s",
                        record.get("request_id"),
                        REMIND_SECONDS,
                        error,
                    )
        return lines

    def _append(self, data: bytes) -> None:
        if self._file is None or self._size >= self.max_bytes or self._moved():
            self._open()
        assert self._file is not None
        self._file.write(data)
        self._file.flush()
        self._size += len(data)
        if self._streak_errors:
            logging.warning(
                "request log: writing again to %s after %d errors; %d records were dropped",
                self._path,
                self._streak_errors,
                self._streak_dropped,
            )
            self._streak_errors = self._streak_dropped = 0

    def _moved(self) -> bool:
        """Whether the open file's path is gone or another file (its folder removed): writes would be lost."""
        try:
            stat = os.stat(self._path)
        except (FileNotFoundError, NotADirectoryError):
            moved = True
        else:
            moved = (stat.st_dev, stat.st_ino) != self._identity
        if moved:
            logging.warning("request log: %s was removed; a new file follows", self._path)
        return moved

    def _open(self) -> None:
        self._close_file()
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = self.folder / f"requests-{stamp}-{os.getpid()}-{time.monotonic_ns() % 10**6:06d}.jsonl"
        self._file, self._path, self._size = _open_append(path), path, 0
        stat = os.fstat(self._file.fileno())
        self._identity = (stat.st_dev, stat.st_ino)
        try:
            prune(self.folder, self.keep_files, self.max_total_bytes, keep=[path])
        except OSError as error:  # the budget is enforced again at the next file
            self._count_error()
            logging.warning("request log: old files in %s not deleted: %s", self.folder, error)

    def _close_file(self) -> None:
        if self._file is None:
            return
        file, self._file = self._file, None
        try:
            file.close()
        except OSError:  # what the buffer held is lost with the error that the writer has counted
            pass

    def _failed(self, error: Exception, records: int) -> None:
        self._count(WRITE_ERROR, records)
        self._count_error()
        if self._file is not None and self._size == 0 and self._path is not None:
            # A file that never took a record (a full disk): don't let every retry leave one behind.
            self._close_file()
            try:
                self._path.unlink(missing_ok=True)
            except OSError:
                pass
        self._close_file()
        self._retry_at = time.monotonic() + RETRY_SECONDS
        self._streak_errors += 1
        self._streak_dropped += records
        now = time.monotonic()
        if self._streak_errors == 1:
            self._remind_at = now + REMIND_SECONDS
            logging.error(
                "request log: can't write to %s (%s: %s); records are dropped until it works again (tried every "
                "%g s; counted in babyweight_request_log_dropped_records_total)",
                self.folder,
                type(error).__name__,
                error,
                RETRY_SECONDS,
                exc_info=not isinstance(error, OSError),  # anything else is a bug: its traceback
            )
        elif now >= self._remind_at:
            self._remind_at = now + REMIND_SECONDS
            logging.error(
                "request log: still can't write to %s (%s): %d errors, %d records dropped so far",
                self.folder,
                error,
                self._streak_errors,
                self._streak_dropped,
            )

    def _count(self, reason: str, records: int) -> None:
        with self._counts_lock:
            self._dropped[reason] += records

    def _count_error(self) -> None:
        with self._counts_lock:
            self._errors += 1


def _open_append(path: pathlib.Path) -> IO[bytes]:
    return path.open("ab")


def prune(
    folder: pathlib.Path, max_files: int, max_total_bytes: int, keep: Iterable[pathlib.Path] = ()
) -> List[pathlib.Path]:
    """Deletes the folder's oldest log files, any process's, until at most `max_files` and `max_total_bytes`
    remain; never a file in `keep` nor the newest of a live process (it may be writing it). Returns those deleted."""
    files = []
    for path in folder.glob(PATTERN):
        match = FILE_NAME.fullmatch(path.name)
        if match is None:  # not named as the server names its files: not the log's to delete
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:  # deleted by another process meanwhile
            continue
        files.append((stat.st_mtime, path.name, path, stat.st_size, int(match["pid"])))
    files.sort()
    newest_by_pid = {pid: path for _, _, path, _, pid in files}  # oldest first: the newest wins
    protected = {path for pid, path in newest_by_pid.items() if server.alive(pid)} | set(keep)
    count, total = len(files), sum(size for _, _, _, size, _ in files)
    deleted = []
    for _, _, path, size, _ in files:
        if count <= max_files and total <= max_total_bytes:
            break
        if path in protected:
            continue
        path.unlink(missing_ok=True)
        count, total = count - 1, total - size
        deleted.append(path)
    return deleted


def log_files(folder: str) -> List[pathlib.Path]:
    """The log's files, oldest first (those another process deletes meanwhile left out)."""
    dated = []
    for path in pathlib.Path(folder).glob(PATTERN):
        try:
            dated.append((path.stat().st_mtime, path))
        except FileNotFoundError:
            continue
    return [path for _, path in sorted(dated)]


def recent_records(folder: str, limit: int) -> Iterator[Record]:
    """Up to `limit` records of the newest log files (newest files first), skipping a line cut short."""
    count = 0
    for path in reversed(log_files(folder)):
        try:
            handle = path.open("rb")
        except FileNotFoundError:  # deleted by another process's budget since it was listed
            continue
        with handle:
            for line in handle:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                yield record
                count += 1
                if count >= limit:
                    return
