"""Served requests read from the server's request log, once each, into the watch file's window of requests.

The log (serving/model_server/request_log.py) is a folder of append-only JSON-lines files, one writer each,
rotated and pruned by size. The cursor is each file's (inode, offset of its last whole line): a restarted watcher
goes on where its last committed pass stopped, and a line still being written is read next time.
"""

import json
import logging
import pathlib
import sqlite3
from typing import Dict, List, Tuple

import orjson

from serving.model_server.request_log import log_files

CURSOR = "request_log"
READ_BYTES_PER_PASS = 64 * 1024 * 1024  # a pass reads at most this much log; the rest waits for the next


def read_new(connection: sqlite3.Connection, folder: pathlib.Path, keep: int) -> int:
    """Reads what the log gained since the cursor into `requests` (the newest `keep` rows kept) and moves the
    cursor; inside the caller's transaction. Returns how many requests it read."""
    row = connection.execute("SELECT value FROM cursors WHERE name = ?", (CURSOR,)).fetchone()
    cursors: Dict[str, List[int]] = json.loads(row["value"]) if row else {}
    current: Dict[str, List[int]] = {}
    read, budget = 0, READ_BYTES_PER_PASS
    files = log_files(str(folder)) if folder.is_dir() else []
    for path in files:
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        inode, offset = cursors.get(path.name, [stat.st_ino, 0])
        if inode != stat.st_ino:  # a new file under an old name: read it whole
            offset = 0
        if stat.st_size > offset and budget > 0:
            start = offset
            records, offset = _read_from(path, offset, min(budget, stat.st_size - offset))
            budget -= offset - start
            connection.executemany(
                "INSERT INTO requests (time, version, client, instance) VALUES (?, ?, ?, ?)",
                [
                    (
                        str(r.get("time", "")),
                        str(r.get("version", "")),
                        str(r.get("client", "")),
                        json.dumps(r["instance"]),
                    )
                    for r in records
                    if isinstance(r, dict) and isinstance(r.get("instance"), dict)
                ],
            )
            read += len(records)
        current[path.name] = [stat.st_ino, offset]
    connection.execute(
        "INSERT OR REPLACE INTO cursors (name, value) VALUES (?, ?)", (CURSOR, json.dumps(current, sort_keys=True))
    )
    connection.execute("DELETE FROM requests WHERE seq <= (SELECT MAX(seq) FROM requests) - ?", (keep,))
    return read


def _read_from(path: pathlib.Path, offset: int, limit: int) -> Tuple[List[dict], int]:
    """The whole lines of `path` from `offset` (at most `limit` bytes), and the offset after the last one."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(limit)
    except FileNotFoundError:
        return [], offset
    whole = data[: data.rfind(b"\n") + 1]
    records = []
    for line in whole.splitlines():
        try:
            records.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            logging.warning("watch: %s: a line that is not JSON at byte %d skipped", path, offset)
    return records, offset + len(whole)


def window(connection: sqlite3.Connection, size: int, client: str = "", before: int = 0) -> List[dict]:
    """The newest `size` requests (of `client`, if given), oldest first; `before` skips that many newer ones."""
    if client:
        rows = connection.execute(
            "SELECT instance FROM requests WHERE client = ? ORDER BY seq DESC LIMIT ? OFFSET ?", (client, size, before)
        ).fetchall()
    else:
        rows = connection.execute(
            "SELECT instance FROM requests ORDER BY seq DESC LIMIT ? OFFSET ?", (size, before)
        ).fetchall()
    return [json.loads(row["instance"]) for row in reversed(rows)]


def clients(connection: sqlite3.Connection) -> Dict[str, int]:
    """Requests in the window of each named client."""
    return {
        row["client"]: row["n"]
        for row in connection.execute("SELECT client, COUNT(*) AS n FROM requests WHERE client != '' GROUP BY client")
    }


def _text(instance: dict) -> str:
    return json.dumps(instance, sort_keys=True)
