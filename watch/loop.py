"""The watcher's pass: new spans to runs (watch/runs.py), then, every watch_interval_seconds, the served requests
and live outcomes read and checked, each check and alert committed with the cursors in one transaction, then
published (watch/alerts.py).

A pass killed before its commit is redone from the same cursors by the next start; one killed after it only
publishes what it had committed. So no request or outcome is judged twice into a second alert, and none is lost.
"""

import dataclasses
import json
import logging
import pathlib
import sqlite3
from typing import Dict, List, Optional, Sequence

import tensorflow_data_validation as tfdv

from pipeline.config import PipelineConfig
from pipeline.metadata import mlmd, watch_store
from watch import alerts, decay, skew, traffic
from watch.runs import Runs

KEEP_CHECKS = 20_000  # rows of the checks table kept (the newest): weeks of checks every 5 minutes
KEEP_EVENTS = 10_000  # alert events kept (the newest, and each alert's latest)
KEEP_OUTCOME_WINDOWS = 5  # live outcomes kept: this many decay windows, all versions together
ALL = "all"
KINDS = ("skew", "drift")
MAX_CLIENT_SLICES = 20  # the busiest clients get a slice each: a client id is the client's to choose


@dataclasses.dataclass(frozen=True)
class Sources:
    request_log: pathlib.Path  # the server's request log folder
    feedback_state: Optional[pathlib.Path]  # the experiment's state file (live outcomes), None: no decay check


class Watcher:
    def __init__(self, config: PipelineConfig, sources: Sources, overrides: Sequence[str] = ()):
        self.config = config
        self.sources = sources
        self.connection = watch_store.connect(config.output_dir)
        self.runs = Runs(config, self.connection, overrides)
        self.schema = tfdv.load_schema_text(config.schema_path)
        self.last_check: Optional[float] = None
        self._reference_key: Optional[tuple] = None
        self._training = None
        self._floors: Dict[str, Dict] = {kind: {} for kind in KINDS}  # nothing judged before a span validates
        self._eval_rmse: Dict[str, float] = {}
        self.errors = 0  # stages that failed (logged); --once exits 2 if any did

    @property
    def folder(self) -> pathlib.Path:
        return watch_store.path_of(self.config.output_dir).parent

    def run_pass(self, now: float, check: Optional[bool] = None) -> List[Dict]:
        """One pass at time `now`; `check` forces (or skips) the traffic and outcome checks. Returns the alert
        events it published. A stage that fails is logged with its traceback and counted in `errors`; the others
        go on (alerts already committed are published first, so no failure below holds them back)."""
        published: List[Dict] = []
        due = self.last_check is None or now - self.last_check >= self.config.watch_interval_seconds
        stages = [("runs", lambda: self.runs.step(now)), ("publish", lambda: published.extend(self._publish(now)))]
        if check if check is not None else due:
            stages += [("check", lambda: self.check(now)), ("publish", lambda: published.extend(self._publish(now)))]
            self.last_check = now
        for name, stage in stages:
            try:
                stage()
            except Exception as error:  # one bad input must not stop the watcher: say what, go on
                self.errors += 1
                logging.error("watch: the %s stage failed: %s: %s", name, type(error).__name__, error, exc_info=True)
        return published

    def _publish(self, now: float) -> List[Dict]:
        return alerts.publish(self.connection, self.folder, now)

    def check(self, now: float) -> None:
        """Reads what was served and reported since the last check and judges it, in one transaction."""
        self._load_references()
        with watch_store.transaction(self.connection):
            read = traffic.read_new(self.connection, self.sources.request_log, 4 * self.config.watch_window_requests)
            if self.sources.feedback_state is not None:
                decay.read_new(self.connection, self.sources.feedback_state, self.config.decay_window_outcomes)
            if read:
                self._traffic_checks(now)
            self._decay_checks(now)
            self._prune()

    def _prune(self) -> None:
        """Bounds the watch file: the newest checks; outcomes of the versions served lately (older versions drop
        out of the decay check); events beyond the newest KEEP_EVENTS, except each alert's latest and any the
        webhook is still owed."""
        execute = self.connection.execute
        execute("DELETE FROM checks WHERE id <= (SELECT MAX(id) FROM checks) - ?", (KEEP_CHECKS,))
        keep_outcomes = KEEP_OUTCOME_WINDOWS * self.config.decay_window_outcomes
        execute("DELETE FROM outcomes WHERE seq <= (SELECT MAX(seq) FROM outcomes) - ?", (keep_outcomes,))
        execute(
            "DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ? AND (delivered IS NOT NULL OR ?)"
            " AND seq NOT IN (SELECT MAX(seq) FROM events GROUP BY key)",
            (KEEP_EVENTS, alerts.webhook_url() is None),
        )

    def _load_references(self) -> None:
        """The training statistics the skew is measured against (the newest validated span's train split) with
        their calibrated floors, and each pushed version's eval RMSE, from ML Metadata; read again when either
        changes (a span validated, a version pushed), not when a run merely starts."""
        from pipeline.commands.serving_check import newest_validated
        from pipeline.components.validation import DRIFT_SPLIT, load_statistics
        from pipeline.reports import history

        if not pathlib.Path(self.config.metadata_path).exists():
            return
        try:
            examples, statistics = newest_validated(self.config)
        except mlmd.MetadataError:
            examples = statistics = None
        versions = tuple(sorted(p.name for p in pathlib.Path(self.config.serving_dir).glob("[0-9]*")))
        key = (examples.id if examples is not None else None, versions)
        if key == self._reference_key:
            return
        if examples is not None and (self._reference_key or (None,))[0] != examples.id:
            self._training = load_statistics(statistics.uri, DRIFT_SPLIT)
            self._floors = self._calibrated(examples, DRIFT_SPLIT)
        runs = history.rows(self.config)
        self._eval_rmse = {row.pushed_version: row.eval_rmse for row in runs if row.pushed_version and row.eval_rmse}
        # a version folder appears while its Pusher runs, before ML Metadata has the push: read again next time
        self._reference_key = key if not versions or versions[-1] in self._eval_rmse else None

    def _calibrated(self, examples, split: str) -> Dict[str, Dict]:
        """The floors of skew and drift for a span's training rows, calibrated once and kept in the watch file
        (a calibration reads thousands of windows: not again after a restart)."""
        name = f"floors {examples.id}"
        row = self.connection.execute("SELECT value FROM cursors WHERE name = ?", (name,)).fetchone()
        if row is not None:
            return json.loads(row["value"])
        rate, largest = self.config.watch_false_alarm_rate, self.config.watch_window_requests
        rows = skew.training_rows(examples.uri, split)
        floors = {kind: skew.calibrated(self.schema, self._training, rows, kind, rate, largest) for kind in KINDS}
        logging.info(
            "watch: floors calibrated on %d training rows of span artifact %d: %s", len(rows), examples.id, floors
        )
        with watch_store.transaction(self.connection):
            self.connection.execute("DELETE FROM cursors WHERE name LIKE 'floors %'")
            self.connection.execute("INSERT INTO cursors (name, value) VALUES (?, ?)", (name, json.dumps(floors)))
        return floors

    def _traffic_checks(self, now: float) -> None:
        largest = self.config.watch_window_requests
        slices = {ALL: self.connection.execute("SELECT COUNT(*) FROM requests").fetchone()[0]}
        busiest = sorted(traffic.clients(self.connection).items(), key=lambda item: -item[1])[:MAX_CLIENT_SLICES]
        slices.update({f"client {name}": n for name, n in busiest if n >= skew.SMALLEST_WINDOW})
        version = self._newest_version()
        if self._training is not None:
            floors = self._floors["skew"]
            for name, count in slices.items():
                client = "" if name == ALL else name.split(" ", 1)[1]
                sizes = [s for s in skew.window_sizes(floors, largest) if s <= count] or [count]
                windows = {size: (traffic.window(self.connection, size, client), None) for size in sizes}
                judged = skew.judge(self.schema, windows, self._training, "skew", floors)
                self._record("skew", name, version, max(sizes), judged, now)
        floors = self._floors["drift"]
        sizes = [s for s in skew.window_sizes(floors, largest) if 2 * s <= slices[ALL]]
        windows = {s: (traffic.window(self.connection, s), traffic.window(self.connection, s, before=s)) for s in sizes}
        judged = skew.judge(self.schema, windows, None, "drift", floors) if windows else []
        self._record("drift", ALL, version, max(sizes, default=0), judged, now)

    def _newest_version(self) -> str:
        row = self.connection.execute("SELECT version FROM requests ORDER BY seq DESC LIMIT 1").fetchone()
        return row["version"] if row else ""

    def _record(self, kind: str, name: str, version: str, n: int, judged: List[skew.Judged], now: float) -> None:
        alarms = [j for j in judged if j.alarm]
        status = "ALARM" if alarms else "ok" if any(j.distance is not None for j in judged) else "waiting"
        detail = {
            "features": {
                j.feature: {
                    "measure": j.measure,
                    "distance": j.distance,
                    "threshold": j.threshold,
                    "n": j.n,
                    "needed": j.needed,
                    "alarm": j.alarm,
                }
                for j in judged
            }
        }
        check_id = self._insert_check(now, kind, name, version, n, status, detail)
        what = (
            "served requests against the training data"
            if kind == "skew"
            else "the newest requests against those before"
        )
        for j in judged:
            subject = f"{j.feature} in {name}"
            if j.alarm:
                alerts.open_alert(
                    self.connection,
                    kind,
                    subject,
                    now,
                    f"{kind} of {j.feature} ({name}, {what}): {j.measure} {j.distance:.3f} > {j.threshold} over "
                    f"{j.n} requests",
                    {
                        "feature": j.feature,
                        "slice": name,
                        "distance": j.distance,
                        "threshold": j.threshold,
                        "n": j.n,
                        "check": check_id,
                        "version": version,
                    },
                )
            elif j.distance is not None and j.distance <= skew.RESOLVE_SHARE * j.threshold:
                alerts.resolve(
                    self.connection,
                    kind,
                    subject,
                    now,
                    f"{j.measure} {j.distance:.3f}, under {skew.RESOLVE_SHARE} of {j.threshold}",
                )

    def _insert_check(self, now: float, kind: str, name: str, version: str, n: int, status: str, detail: Dict) -> int:
        cursor = self.connection.execute(
            "INSERT INTO checks (time, kind, slice, version, n, status, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (now, kind, name, version, n, status, json.dumps(detail, sort_keys=True)),
        )
        return int(cursor.lastrowid)

    def _decay_checks(self, now: float) -> None:
        config = self.config
        judged = decay.judge(
            self.connection, self._eval_rmse, config.decay_rmse_margin, config.decay_alpha, config.decay_min_outcomes
        )
        # a version that a newer, healthy one replaced is over: its old outcomes no longer open anything
        healthy = [int(r.version) for r in judged if r.z is not None and r.z <= 0 and r.version.isdigit()]
        for result in judged:
            replaced = bool(healthy) and result.version.isdigit() and int(result.version) < max(healthy)
            status = "replaced" if replaced else "ALARM" if result.alarm else "waiting" if result.waiting else "ok"
            detail = {k: v for k, v in dataclasses.asdict(result).items() if k != "version"}
            check_id = self._insert_check(
                now, "decay", f"version {result.version}", result.version, result.n, status, detail
            )
            subject = f"version {result.version}"
            if replaced:
                alerts.resolve(self.connection, "decay", subject, now, f"replaced by version {max(healthy)}")
            elif result.alarm:
                alerts.open_alert(
                    self.connection,
                    "decay",
                    subject,
                    now,
                    f"version {result.version} decays: live RMSE {result.live_rmse:.3f} lb over {result.n} outcomes, "
                    f"above its eval RMSE {result.eval_rmse:.3f} + {config.decay_rmse_margin} (z {result.z:.1f})",
                    {
                        "version": result.version,
                        "live_rmse": result.live_rmse,
                        "eval_rmse": result.eval_rmse,
                        "n": result.n,
                        "z": result.z,
                        "check": check_id,
                    },
                )
            elif result.z is not None and result.z <= 0:
                alerts.resolve(self.connection, "decay", subject, now, f"live RMSE {result.live_rmse:.3f} lb")

    def close(self) -> None:
        self.connection.close()


def open_alert_lines(connection: sqlite3.Connection) -> List[str]:
    return [f"{a['kind']}: {a['subject']}: {a['message']}" for a in watch_store.open_alerts(connection)]
