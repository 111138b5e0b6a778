"""What `babyweight watch` records beside ML Metadata: outputs/watch/watch.sqlite.

ML Metadata holds the runs; this file holds what the watcher decided around them, in SQLite transactions, so a
watcher killed at any moment finds on restart exactly what it had committed:
- spans: each span's journal (waiting, queued, running, done, blocked, crashed, gave_up) and its files' fingerprint;
- cursors: where it stopped reading the request log and the feedback store;
- requests: the newest served requests it read (the windows of the skew and drift checks);
- outcomes: the newest live errors (prediction minus outcome) per version, from the feedback store;
- checks: one row per check (kind, slice, version, requests or outcomes judged, status, figures per feature);
- events: alerts opening and resolving, numbered in order (seq), each written once to alerts.jsonl and the webhook.
The history page (pipeline/reports/history.py) reads the checks and the alerts from here.
"""

import contextlib
import json
import pathlib
import sqlite3
from typing import Any, Dict, Iterator, List

FILE_NAME = "watch.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
  span INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
  next_try REAL NOT NULL DEFAULT 0, started REAL, outcome TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '',
  seen REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, version TEXT NOT NULL, client TEXT NOT NULL,
  instance TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS requests_client ON requests (client, seq);
CREATE TABLE IF NOT EXISTS outcomes (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, version TEXT NOT NULL, error REAL NOT NULL);
CREATE INDEX IF NOT EXISTS outcomes_version ON outcomes (version, seq);
CREATE TABLE IF NOT EXISTS checks (
  id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, kind TEXT NOT NULL, slice TEXT NOT NULL,
  version TEXT NOT NULL, n INTEGER NOT NULL, status TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, key TEXT NOT NULL, state TEXT NOT NULL,
  time REAL NOT NULL, kind TEXT NOT NULL, subject TEXT NOT NULL, message TEXT NOT NULL, body TEXT NOT NULL,
  delivered REAL, tries INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL DEFAULT 0);
"""


def path_of(output_dir: str) -> pathlib.Path:
    return pathlib.Path(output_dir) / "watch" / FILE_NAME


def connect(output_dir: str, read_only: bool = False) -> sqlite3.Connection:
    """The watch file, created with its tables unless read_only (then it must exist)."""
    path = path_of(output_dir)
    if read_only:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=30, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")  # a committed pass survives a lost machine too
        connection.executescript(SCHEMA)
    connection.row_factory = sqlite3.Row
    return connection


@contextlib.contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One atomic step: all of it is committed, or (killed, or an error) none of it."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def open_alerts(connection: sqlite3.Connection) -> List[Dict[str, Any]]:
    """Alerts whose newest event opened them, oldest first."""
    rows = connection.execute(
        "SELECT * FROM events WHERE seq IN (SELECT MAX(seq) FROM events GROUP BY key) AND state = 'open' ORDER BY seq"
    ).fetchall()
    return [dict(row) for row in rows]


def recent_events(connection: sqlite3.Connection, limit: int) -> List[Dict[str, Any]]:
    return [dict(r) for r in connection.execute("SELECT * FROM events ORDER BY seq DESC LIMIT ?", (limit,))]


def recent_checks(connection: sqlite3.Connection, limit: int) -> List[Dict[str, Any]]:
    """The newest checks, newest first, each with its figures per feature (detail) read back."""
    rows = connection.execute("SELECT * FROM checks ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    return [{**dict(row), "detail": json.loads(row["detail"])} for row in rows]


def spans(connection: sqlite3.Connection) -> List[Dict[str, Any]]:
    return [dict(r) for r in connection.execute("SELECT * FROM spans ORDER BY span")]
