"""Served requests: the request log read once each (a line cut short waits, a restart resumes), and the watcher's
checks on them: a check row per slice, a skew alert for the client that sends kilograms, JSON lines once."""

import csv
import json
import random
import time

import pytest

from models import features
from pipeline.config import load_config
from pipeline.metadata import watch_store
from serving.model_server.request_log import RequestLog
from watch import skew, traffic
from watch.loop import Sources, Watcher

CLIENTS = ("clinic-a", "clinic-b", "clinic-c", "clinic-d")


@pytest.fixture(scope="module")
def rows(real_export_csv):
    with real_export_csv.open(newline="") as handle:
        found = [
            {k: row[k] for k in features.FEATURE_NAMES if row.get(k) not in ("", None)}
            for row in csv.DictReader(handle)
        ]
    found = [row for row in found if not features.missing_required(row)]
    random.Random(0).shuffle(found)
    return found


def _log(folder, records):
    """Records written by the server's own request log writer."""
    log = RequestLog(str(folder), max_bytes=1 << 20, keep_files=100)
    for record in records:
        log.write(record)
    log.close()


def _record(instance, client, version=1):
    return {"request_id": "r", "client": client, "time": "t", "version": version, "instance": instance}


def test_records_are_read_once_across_a_cut_line_and_a_restart(tmp_path, rows):
    folder = tmp_path / "logs"
    _log(folder, [_record(row, "a") for row in rows[:30]])
    [path] = list(folder.iterdir())
    with path.open("ab") as handle:
        handle.write(b'{"request_id": "half", "instance": {"mother_age"')  # a writer mid-line
    connection = watch_store.connect(str(tmp_path / "out"))
    with watch_store.transaction(connection):
        assert traffic.read_new(connection, folder, keep=1000) == 30
    with path.open("ab") as handle:
        handle.write(b': 30, "gestation_weeks": 39}, "client": "b", "version": 1}\n')
    connection.close()
    again = watch_store.connect(str(tmp_path / "out"))  # a restarted watcher
    with watch_store.transaction(again):
        assert traffic.read_new(again, folder, keep=1000) == 1  # the finished line, and nothing twice
    _log(folder, [_record(row, "c") for row in rows[30:40]])  # a second file (another worker or a rotation)
    with watch_store.transaction(again):
        assert traffic.read_new(again, folder, keep=1000) == 10
    assert traffic.clients(again) == {"a": 30, "b": 1, "c": 10}
    with watch_store.transaction(again):
        assert traffic.read_new(again, folder, keep=25) == 0
    assert again.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 25  # the newest kept, no more
    again.close()


def test_a_client_in_kilograms_opens_one_skew_alert_for_its_slice(tmp_path, rows):
    config = load_config(overrides={"output_dir": str(tmp_path / "out"), "watch_window_requests": "1024"})
    folder = tmp_path / "logs"
    watcher = Watcher(config, Sources(folder, None))
    training = skew.statistics_of(rows[:3200], watcher.schema)
    watcher._training = training  # what ML Metadata would give: the train split's statistics, calibrated floors
    watcher._floors = {
        kind: skew.calibrated(watcher.schema, training, rows[:3200], kind, config.watch_false_alarm_rate, 1024)
        for kind in ("skew", "drift")
    }
    rng = random.Random(1)
    pool = rows[3200:]
    _log(folder, [_record(rng.choice(pool), CLIENTS[n % 4]) for n in range(1200)])
    assert watcher.run_pass(time.time(), check=True) == []  # clean: no alert
    statuses = {row["slice"]: row["status"] for row in watch_store.recent_checks(watcher.connection, 10)}
    assert statuses["all"] == "ok" and statuses["client clinic-b"] == "ok"

    served = []
    for n in range(1200):
        row = dict(rng.choice(pool))
        if n % 4 == 1 and "weight_gain_pounds" in row:
            row["weight_gain_pounds"] = round(float(row["weight_gain_pounds"]) / 2.2046)
        served.append(_record(row, CLIENTS[n % 4]))
    _log(folder, served)
    opened = watcher.run_pass(time.time(), check=True)
    assert [(e["kind"], e["subject"]) for e in opened] == [("skew", "weight_gain_pounds in client clinic-b")]
    assert opened[0]["distance"] > opened[0]["threshold"] == 0.1
    assert watcher.run_pass(time.time(), check=True) == []  # open: not repeated
    lines = [json.loads(line) for line in (tmp_path / "out" / "watch" / "alerts.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [opened[0]["id"]]
    watcher.close()


def test_a_bad_line_a_missing_store_or_a_failing_stage_does_not_stop_the_watcher(tmp_path, rows, monkeypatch):
    from watch import alerts

    config = load_config(overrides={"output_dir": str(tmp_path / "out")})  # no ML Metadata store yet
    folder = tmp_path / "logs"
    folder.mkdir()
    good = json.dumps(_record(rows[0], "a"))
    (folder / "requests-20261207T000000-1-0.jsonl").write_text(f'[1, 2]\n{good}\n"text"\n')
    watcher = Watcher(config, Sources(folder, None))
    assert watcher.run_pass(time.time(), check=True) == [] and watcher.errors == 0
    assert traffic.clients(watcher.connection) == {"a": 1}  # the good line read, the others skipped
    with watch_store.transaction(watcher.connection):  # an alert the runs stage committed
        alerts.open_alert(watcher.connection, "span_blocked", "span 3", 1.0, "span 3 was blocked", {})

    def broken(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(traffic, "read_new", broken)
    published = watcher.run_pass(time.time(), check=True)
    assert [e["subject"] for e in published] == ["span 3"]  # published before the check that failed
    assert watcher.errors == 1
    watcher.close()


def test_the_watch_file_stays_bounded_keeping_each_alerts_latest_event(tmp_path, monkeypatch):
    from watch import alerts, loop

    monkeypatch.delenv(alerts.WEBHOOK_URL, raising=False)
    monkeypatch.setattr(loop, "KEEP_EVENTS", 5)
    monkeypatch.setattr(loop, "KEEP_CHECKS", 3)
    config = load_config(overrides={"output_dir": str(tmp_path / "out"), "decay_window_outcomes": "2"})
    watcher = Watcher(config, Sources(tmp_path / "logs", None))
    db = watcher.connection
    with watch_store.transaction(db):
        alerts.open_alert(db, "decay", "version 1", 0.0, "old and still open", {})
        for n in range(20):
            alerts.open_alert(db, "skew", f"f{n} in all", 1.0, "m", {})
            alerts.resolve(db, "skew", f"f{n} in all", 2.0, "m")
            db.execute(
                "INSERT INTO checks (time, kind, slice, version, n, status, detail) VALUES (0, 'skew', 'all',"
                " '1', 1, 'ok', '{}')"
            )
        db.executemany("INSERT INTO outcomes (version, error) VALUES (?, ?)", [("1", 0.5)] * 30)
        watcher._prune()
    assert db.execute("SELECT COUNT(*) FROM checks").fetchone()[0] == 3
    assert db.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0] == loop.KEEP_OUTCOME_WINDOWS * 2
    assert [a["subject"] for a in watch_store.open_alerts(db)] == ["version 1"]  # an open alert is never pruned
    assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] <= 21 + 5  # each alert's latest, the newest 5
    watcher.close()
