"""Alerts: opened and resolved in the watch file's transactions, then published once each.

An alert is a (kind, subject) pair: skew of a feature in a slice of the traffic, drift, a version's decay, a
blocked span, a failed run. It opens on the first judged breach, stays open (never repeated) while the breaches
go on, and resolves on a judged check that passes. Each opening and resolution is an event numbered in commit
order (seq), then published after the commit:
- appended to outputs/watch/alerts.jsonl, each event once: the file's last whole line says where to go on
  (a line cut short by a kill is dropped first);
- logged (a JSON line with --log-format json);
- POSTed to BABYWEIGHT_WATCH_WEBHOOK_URL when set (with BABYWEIGHT_WATCH_WEBHOOK_TOKEN as a bearer token),
  at least once, with an Idempotency-Key header of the event's id so the receiver drops repeats; a failed
  delivery is retried with backoff. The URL and token come from the environment only: flags show in `ps`.
"""

import json
import logging
import os
import pathlib
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any, Dict, List, Optional

WEBHOOK_URL = "BABYWEIGHT_WATCH_WEBHOOK_URL"
WEBHOOK_TOKEN = "BABYWEIGHT_WATCH_WEBHOOK_TOKEN"
WEBHOOK_TIMEOUT_SECONDS = 5.0
DELIVERIES_PER_PASS = 20  # a receiver that is down costs a pass at most this many timeouts
MAX_BACKOFF_SECONDS = 3600.0
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
TAIL_BYTES = 65536  # alerts.jsonl's tail read for its last line
PUBLISHED = "published"  # the watch file's cursor: the seq of the last event appended to alerts.jsonl


class WebhookError(ValueError):
    """The webhook URL in the environment can't be used."""


def _is_open(connection: sqlite3.Connection, key: str) -> bool:
    row = connection.execute("SELECT state FROM events WHERE key = ? ORDER BY seq DESC LIMIT 1", (key,)).fetchone()
    return row is not None and row["state"] == "open"


def open_alert(
    connection: sqlite3.Connection, kind: str, subject: str, now: float, message: str, body: Dict[str, Any]
) -> bool:
    """Opens the alert unless it is open already; inside the caller's transaction. Returns whether it opened."""
    key = f"{kind}|{subject}"
    if _is_open(connection, key):
        return False
    _insert(connection, key, "open", now, kind, subject, message, body)
    return True


def resolve(connection: sqlite3.Connection, kind: str, subject: str, now: float, message: str) -> bool:
    """Resolves the alert if it is open; inside the caller's transaction."""
    key = f"{kind}|{subject}"
    if not _is_open(connection, key):
        return False
    _insert(connection, key, "resolved", now, kind, subject, message, {})
    return True


def _insert(
    connection: sqlite3.Connection,
    key: str,
    state: str,
    now: float,
    kind: str,
    subject: str,
    message: str,
    body: Dict[str, Any],
) -> None:
    connection.execute(
        "INSERT INTO events (id, key, state, time, kind, subject, message, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (str(uuid.uuid4()), key, state, now, kind, subject, message, json.dumps(body, sort_keys=True)),
    )


def event_json(row: Any) -> Dict[str, Any]:
    """An event as it is written to alerts.jsonl and POSTed."""
    return {
        "seq": row["seq"],
        "id": row["id"],
        "state": row["state"],
        "time": row["time"],
        "kind": row["kind"],
        "subject": row["subject"],
        "message": row["message"],
        **json.loads(row["body"]),
    }


def _last_seq(path: pathlib.Path) -> int:
    """The seq of the file's last whole line (its tail only is read); a line cut short by a kill is cut off the
    file first. 0 for a file that is missing, or whose last line can't be read."""
    try:
        handle = path.open("r+b")
    except FileNotFoundError:
        return 0
    with handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - TAIL_BYTES))
        tail = handle.read()
        cut = len(tail) - (tail.rfind(b"\n") + 1)
        if cut:
            handle.truncate(size - cut)
        lines = tail[: len(tail) - cut].splitlines()
    try:
        return int(json.loads(lines[-1])["seq"]) if lines else 0
    except (ValueError, KeyError, TypeError):
        logging.warning("watch: the last line of %s is not an alert; events are appended after it", path)
        return 0


def publish(connection: sqlite3.Connection, folder: pathlib.Path, now: float) -> List[Dict[str, Any]]:
    """Appends the committed events alerts.jsonl lacks, logs them, and delivers what the webhook is owed."""
    path = folder / "alerts.jsonl"
    # the file's last line says what it has (a kill between the append and the commit below loses nothing and
    # repeats nothing); the watch file's cursor, what was published before the file was rotated away
    row = connection.execute("SELECT value FROM cursors WHERE name = ?", (PUBLISHED,)).fetchone()
    in_file = _last_seq(path)
    newest = connection.execute("SELECT MAX(seq) FROM events").fetchone()[0] or 0
    if in_file > newest:  # the file of an earlier watch file: go on after its lines
        in_file = 0
    last = max(in_file, int(row["value"]) if row else 0)
    new = [event_json(row) for row in connection.execute("SELECT * FROM events WHERE seq > ? ORDER BY seq", (last,))]
    if new:
        with path.open("ab") as handle:
            handle.write(b"".join(json.dumps(event, sort_keys=True).encode() + b"\n" for event in new))
            handle.flush()
            os.fsync(handle.fileno())
        connection.execute(
            "INSERT OR REPLACE INTO cursors (name, value) VALUES (?, ?)", (PUBLISHED, str(new[-1]["seq"]))
        )
    for event in new:
        logging.warning(
            "watch alert %s: %s: %s",
            event["state"],
            event["kind"],
            event["message"],
            extra={"alert": {k: event[k] for k in ("id", "seq", "state", "kind", "subject")}},
        )
    _deliver(connection, now)
    return new


def webhook_url() -> Optional[str]:
    """The webhook URL from the environment, checked: https, or http to this machine only; None if unset."""
    url = os.environ.get(WEBHOOK_URL, "").strip()
    if not url:
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in LOCAL_HOSTS):
        return url
    raise WebhookError(f"{WEBHOOK_URL} must be an https:// URL (or http:// to this machine), not {parts.scheme}://")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003 (urllib's signature)
        return None  # urllib then raises the 3xx as an HTTPError


_OPENER = urllib.request.build_opener(_NoRedirect)


def _deliver(connection: sqlite3.Connection, now: float) -> None:
    url = webhook_url()
    if url is None:
        return
    host = urllib.parse.urlsplit(url).hostname
    token = os.environ.get(WEBHOOK_TOKEN, "").strip()
    owed = connection.execute(
        "SELECT * FROM events WHERE delivered IS NULL ORDER BY seq LIMIT ?", (DELIVERIES_PER_PASS,)
    ).fetchall()
    for row in owed:
        if row["next_try"] > now:
            break  # in order: an alert's resolution never reaches the receiver before its opening
        request = urllib.request.Request(
            url,
            data=json.dumps(event_json(row)).encode(),
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Idempotency-Key": row["id"],
                **({"Authorization": f"Bearer {token}"} if token else {}),
            },
        )
        try:
            # no redirects: a 3xx is a failure, never a GET elsewhere carrying the token
            with _OPENER.open(request, timeout=WEBHOOK_TIMEOUT_SECONDS) as response:
                response.read(1024)
                if not 200 <= response.status < 300:
                    raise urllib.error.HTTPError(url, response.status, "not 2xx", response.headers, None)
            connection.execute("UPDATE events SET delivered = ? WHERE seq = ?", (now, row["seq"]))
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = error.code if isinstance(error, urllib.error.HTTPError) else type(error).__name__
            wait = min(MAX_BACKOFF_SECONDS, 5.0 * 2 ** row["tries"])
            connection.execute(
                "UPDATE events SET tries = tries + 1, next_try = ? WHERE seq = ?", (now + wait, row["seq"])
            )
            logging.warning(
                "watch: the webhook at %s refused alert %d (%s); retried in %.0f s", host, row["seq"], reason, wait
            )
            break  # the receiver is down: the rest waits for the next pass, in order
