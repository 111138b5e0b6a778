"""One pipeline run at a time for the spans that arrive, kept in a journal that survives kill -9.

A span's journal (watch_store's spans table) goes queued -> running -> done | blocked | crashed -> ... gave_up.
Spans run in order. The run itself is a child process (watch/run_span.py) that holds the run lock
(outputs/watch/run.lock) it inherits from the watcher: the kernel keeps the lock while either lives. So a
restarted watcher that finds the journal saying `running`
- waits while the lock is held (the run outlived the watcher: it adopts it);
- else reads the outcome file the child writes last, or, without one, ML Metadata: a complete run of the span
  since the attempt began is done; anything else is queued again, without charging an attempt (an interrupted
  run resumes from TFX's cache).
A span blocked by validation waits until its files change. A crashed run is retried after watch_retry_seconds,
doubling each time, up to watch_max_attempts; then an alert.
"""

import dataclasses
import fcntl
import json
import logging
import os
import pathlib
import sqlite3
import subprocess
import sys
from typing import Dict, Optional, Sequence

from pipeline.config import PipelineConfig
from pipeline.metadata import mlmd, watch_store
from watch import alerts, arrivals

MAX_RETRY_SECONDS = 3600.0
CHILD_MODULE = "watch.run_span"  # the run of one span, in a process of its own
SLOW_RUN_SECONDS = 6 * 3600.0  # a run longer than this opens a run_slow alert (a local run takes minutes)
MAX_RUNS_LOG_BYTES = 64 * 1024 * 1024  # outputs/watch/runs.log is moved to runs.log.1 past this


def _folder(config: PipelineConfig) -> pathlib.Path:
    return watch_store.path_of(config.output_dir).parent


@dataclasses.dataclass
class Child:
    span: int
    process: subprocess.Popen
    lock_fd: int


class Runs:
    """The spans' journal and the one child run; `step` is called once a pass."""

    def __init__(self, config: PipelineConfig, connection: sqlite3.Connection, overrides: Sequence[str] = ()):
        self.config = config
        self.connection = connection
        self.overrides = list(overrides)  # the watcher's --set flags, passed on to each run
        self.child: Optional[Child] = None
        self._waiting: Dict[int, str] = {}  # why each incomplete span waits, as last logged

    def step(self, now: float) -> None:
        """Journals new and changed spans, finishes a run that ended, and starts the next one if none runs."""
        self._arrivals(now)
        if self.child is not None:
            code = self.child.process.poll()
            if code is None:
                self._slow(now)
                return
            os.close(self.child.lock_fd)
            span, self.child = self.child.span, None
            self._finish(span, now, code)
        running = self.connection.execute("SELECT * FROM spans WHERE state = 'running'").fetchone()
        if running is not None:
            if mlmd.lock_held(self._lock_path()) is not False:
                self._slow(now)
                return  # a run that outlived an earlier watcher: wait for it
            self._finish(running["span"], now, None)
        if mlmd.runner_alive(self.config.metadata_path):
            return  # someone runs the pipeline by hand on this store: one run at a time
        self._launch_next(now)

    def _slow(self, now: float) -> None:
        """An alert for a run going on past SLOW_RUN_SECONDS: the queue waits behind it (a hung step, a lock held
        by a process it started); the operator decides."""
        row = self.connection.execute("SELECT * FROM spans WHERE state = 'running'").fetchone()
        if row is not None and row["started"] is not None and now - row["started"] > SLOW_RUN_SECONDS:
            with watch_store.transaction(self.connection):
                alerts.open_alert(
                    self.connection,
                    "run_slow",
                    f"span {row['span']}",
                    now,
                    f"span {row['span']}'s run has gone on {(now - row['started']) / 3600:.1f} h; later spans wait "
                    f"behind it (its lock: {self._lock_path()}; its log: {_folder(self.config) / 'runs.log'})",
                    {},
                )

    def _arrivals(self, now: float) -> None:
        journal = {row["span"]: row for row in self.connection.execute("SELECT * FROM spans")}
        for span in arrivals.found(self.config, now):
            row = journal.get(span.number)
            if not span.complete:
                if self._waiting.get(span.number) != span.why_waiting and row is None:
                    logging.info("watch: span %d is not complete yet: %s", span.number, span.why_waiting)
                self._waiting[span.number] = span.why_waiting
                continue
            if row is None:
                logging.info("watch: span %d is complete: queued", span.number)
                with watch_store.transaction(self.connection):
                    self.connection.execute(
                        "INSERT INTO spans (span, fingerprint, state, seen, updated) VALUES (?, ?, 'queued', ?, ?)",
                        (span.number, span.fingerprint, now, now),
                    )
            elif row["fingerprint"] != span.fingerprint and row["state"] == "queued":
                with watch_store.transaction(self.connection):  # changed before it ran: it runs once, as it is now
                    self.connection.execute(
                        "UPDATE spans SET fingerprint = ?, updated = ? WHERE span = ?",
                        (span.fingerprint, now, span.number),
                    )
            elif row["fingerprint"] != span.fingerprint and row["state"] != "running":
                # new files in a span that ran, was blocked or gave up: the fix the blocked run's summary asks for
                logging.info("watch: span %d's files changed (%s before): queued again", span.number, row["state"])
                with watch_store.transaction(self.connection):
                    self.connection.execute(
                        "UPDATE spans SET fingerprint = ?, state = 'queued', attempts = 0, next_try = 0, detail = '',"
                        " updated = ? WHERE span = ?",
                        (span.fingerprint, now, span.number),
                    )

    def _launch_next(self, now: float) -> None:
        # in span order: a crashed span waiting for its retry holds the later ones back (a blocked one, or one given
        # up, doesn't: it waits for new files)
        row = self._next(now)
        if row is None:
            return
        lock_fd = os.open(self._lock_path(), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            return
        attempt = row["attempts"] + 1
        outcome = _folder(self.config) / "outcomes" / f"span-{row['span']}-attempt-{attempt}.json"
        outcome.parent.mkdir(parents=True, exist_ok=True)
        outcome.unlink(missing_ok=True)
        with watch_store.transaction(self.connection):
            self.connection.execute(
                "UPDATE spans SET state = 'running', attempts = ?, started = ?, outcome = ?, updated = ?"
                " WHERE span = ?",
                (attempt, now, str(outcome), now, row["span"]),
            )
        log_path = _folder(self.config) / "runs.log"
        if log_path.exists() and log_path.stat().st_size > MAX_RUNS_LOG_BYTES:
            os.replace(log_path, log_path.with_suffix(".log.1"))  # the previous one kept, no more
        command = [sys.executable, "-m", CHILD_MODULE, "--profile", self.config.profile]
        command += [f"--set={pair}" for pair in self.overrides]
        command += ["--span", str(row["span"]), "--outcome", str(outcome), "--lock-fd", str(lock_fd)]
        # the run needs none of the watcher's secrets
        environment = {k: v for k, v in os.environ.items() if not k.startswith("BABYWEIGHT_WATCH_WEBHOOK")}
        try:
            with log_path.open("ab") as log:
                process = subprocess.Popen(
                    command,
                    pass_fds=(lock_fd,),
                    start_new_session=True,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=environment,
                )
        except OSError:
            os.close(lock_fd)
            raise
        self.child = Child(row["span"], process, lock_fd)
        logging.info("watch: span %d: run started (attempt %d, pid %d)", row["span"], attempt, process.pid)

    def _finish(self, span: int, now: float, exit_code: Optional[int]) -> None:
        """Journals how span's run ended: its outcome file, else ML Metadata; `exit_code` is None when the run
        ended while no watcher was its parent (it ran on after a watcher was killed, or never started)."""
        row = self.connection.execute("SELECT * FROM spans WHERE span = ?", (span,)).fetchone()
        result = _read_outcome(pathlib.Path(row["outcome"])) if row["outcome"] else None
        if result is None:
            result = self._from_metadata(span, row["started"])
        if result is None and exit_code is not None:
            log = _folder(self.config) / "runs.log"
            result = {"ok": False, "crash": f"the run ended with exit code {exit_code} and no outcome (see {log})"}
        if result is None:
            # the watcher was killed before it started the run, or the run was killed with it: run it again,
            # which resumes from TFX's cache; the attempt is not charged
            logging.warning("watch: span %d's run ended with no outcome while no watcher waited: queued again", span)
            with watch_store.transaction(self.connection):
                self.connection.execute(
                    "UPDATE spans SET state = 'queued', attempts = attempts - 1, updated = ? WHERE span = ?",
                    (now, span),
                )
            return
        subject = f"span {span}"
        with watch_store.transaction(self.connection):
            alerts.resolve(self.connection, "run_slow", subject, now, "its run ended")
            if result["ok"]:
                state, detail = "done", ""
                alerts.resolve(self.connection, "span_blocked", subject, now, "its run passed")
                alerts.resolve(self.connection, "run_failed", subject, now, "its run passed")
            elif not result["crash"]:
                state, detail = "blocked", result.get("summary", "")
                alerts.open_alert(
                    self.connection,
                    "span_blocked",
                    subject,
                    now,
                    f"span {span} was blocked; it runs again when its files change",
                    {"summary": detail[-4000:]},
                )
            elif row["attempts"] >= self.config.watch_max_attempts:
                state, detail = "gave_up", result["crash"]
                alerts.open_alert(
                    self.connection,
                    "run_failed",
                    subject,
                    now,
                    f"span {span}'s run failed {row['attempts']} times: {result['crash'][:300]}",
                    {"crash": result["crash"][-4000:]},
                )
            else:
                state, detail = "crashed", result["crash"]
            wait = min(MAX_RETRY_SECONDS, self.config.watch_retry_seconds * 2 ** (row["attempts"] - 1))
            self.connection.execute(
                "UPDATE spans SET state = ?, detail = ?, next_try = ?, updated = ? WHERE span = ?",
                (state, detail[-4000:], now + wait if state == "crashed" else 0, now, span),
            )
        if row["outcome"]:
            pathlib.Path(row["outcome"]).unlink(missing_ok=True)  # journalled: no longer needed
        logging.log(
            logging.INFO if state == "done" else logging.WARNING,
            "watch: span %d: %s%s",
            span,
            state,
            f" (retry in {wait:.0f} s)" if state == "crashed" else "",
        )

    def _from_metadata(self, span: int, started: Optional[float]) -> Optional[Dict]:
        """How a run of `span` that ML Metadata recorded since `started` ended, as an outcome: passed (complete),
        or blocked by validation; None for none, or one interrupted or failed otherwise (run it again)."""
        if started is None or not pathlib.Path(self.config.metadata_path).exists():
            return None
        from pipeline.reports import history

        store = mlmd.open_sqlite(self.config.metadata_path)
        runs = store.runs()
        for number, run in reversed(list(enumerate(runs, start=1))):
            start_ms, _ = store.run_times(run)
            if start_ms / 1000 < started:
                break
            row = history.run_row(self.config, store, run, number)
            if row.span != span:
                continue
            if row.verdict == "BLOCKED":
                return {"ok": False, "crash": "", "summary": f"run {run.name} was blocked: {', '.join(row.blocked_by)}"}
            if row.verdict in ("passed", "passed with warnings", "not validated"):
                return {"ok": True, "crash": "", "summary": f"run {run.name} (from ML Metadata)"}
        return None

    def _lock_path(self) -> pathlib.Path:
        _folder(self.config).mkdir(parents=True, exist_ok=True)
        return _folder(self.config) / "run.lock"

    def _next(self, now: float) -> Optional[sqlite3.Row]:
        """The span to run now, if any."""
        row = self.connection.execute(
            "SELECT * FROM spans WHERE state IN ('queued', 'crashed') ORDER BY span LIMIT 1"
        ).fetchone()
        return None if row is None or (row["state"] == "crashed" and row["next_try"] > now) else row

    def busy(self, now: float) -> bool:
        """Whether a run is going or can start now: --once waits for these (not for a retry's backoff)."""
        running = self.connection.execute("SELECT 1 FROM spans WHERE state = 'running'").fetchone()
        return self.child is not None or running is not None or self._next(now) is not None


def _read_outcome(path: pathlib.Path) -> Optional[Dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
