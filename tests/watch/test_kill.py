"""The watcher killed (SIGKILL) at random moments and restarted, until all its spans are through: no span runs
twice, and each alert is in watch.sqlite, once in alerts.jsonl and at the webhook, by the same id.

Each start loads TensorFlow (TFDV): a few kills, each at a seeded random moment once the watcher is up."""

import collections
import json
import random
import subprocess
import time

import pytest

from pipeline import config as config_lib
from pipeline.metadata import watch_store
from tests.watch.fake_run import ledger_lines
from tests.watch.helpers import Receiver, make_span, subprocess_env, wait_for, watcher_command
from watch import alerts

SEED = 35
KILLS = 3
KILL_WITHIN_SECONDS = 2.5  # after the watcher is up: about the time a few fake runs take
START_SECONDS = 120  # a watcher's start, TensorFlow's import included, on a busy machine
MAX_ATTEMPTS = 2
# span: (what its run does, seconds it takes), and how its journal ends
SPANS = {
    1: ("ok", 0.8, "done"),
    2: ("ok", 1.5, "done"),
    3: ("blocked", 0.5, "blocked"),
    4: ("crash", 0.4, "gave_up"),
    5: ("ok", 0.3, "done"),
    6: ("blocked", 1.2, "blocked"),
    7: ("ok", 0.6, "done"),
}


def _journal(output_dir) -> dict:
    path = watch_store.path_of(str(output_dir))
    if not path.exists():
        return {}
    connection = watch_store.connect(str(output_dir), read_only=True)
    try:
        spans = {row["span"]: row["state"] for row in watch_store.spans(connection)}
        events = [dict(row) for row in connection.execute("SELECT * FROM events ORDER BY seq")]
    finally:
        connection.close()
    return {"spans": spans, "events": events}


def _jsonl(output_dir) -> list:
    path = output_dir / "watch" / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_a_watcher_killed_at_random_moments_runs_each_span_once_and_loses_no_alert(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    for number, (behaviour, seconds, _) in SPANS.items():
        make_span(data, number, behaviour, seconds)
    rng = random.Random(SEED)
    lock = out / "watch" / "watcher.lock"
    with Receiver() as receiver:
        env = subprocess_env(**{alerts.WEBHOOK_URL: receiver.url(), alerts.WEBHOOK_TOKEN: "token"})
        command = watcher_command(
            data, out, f"--set=watch_max_attempts={MAX_ATTEMPTS}", "--set=watch_retry_seconds=0.3"
        )

        def start(number: int) -> subprocess.Popen:
            log = (tmp_path / f"watcher-{number}.log").open("w")
            with log:
                watcher = subprocess.Popen(
                    command, cwd=config_lib.PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                )
            wait_for(
                lambda: watcher.poll() is not None or (lock.exists() and lock.read_text().strip() == str(watcher.pid)),
                START_SECONDS,
                f"watcher {number} to start (see {log.name})",
                interval=0.1,
            )
            assert watcher.poll() is None, (tmp_path / f"watcher-{number}.log").read_text()[-3000:]
            return watcher

        def through() -> bool:
            journal = _journal(out)
            if journal.get("spans") != {n: spec[2] for n, spec in SPANS.items()}:
                return False
            ids = [e["id"] for e in journal["events"]]
            return [e["id"] for e in _jsonl(out)] == ids and set(ids) <= set(receiver.keys())

        killed_in = []
        for number in range(KILLS):
            watcher = start(number)
            time.sleep(rng.uniform(0, KILL_WITHIN_SECONDS))
            killed_in.append(dict(collections.Counter(_journal(out).get("spans", {}).values())))
            watcher.kill()
            watcher.wait()
        watcher = start(KILLS)
        try:
            wait_for(through, 60, f"all spans through and their alerts published (kills at {killed_in})")
        finally:
            watcher.kill()
            watcher.wait()

    journal = _journal(out)
    ledger = collections.Counter(ledger_lines(out))
    expected = {f"span {n}": 1 for n, (behaviour, _, _) in SPANS.items() if behaviour != "crash"}
    expected.update({f"span {n} crashed": MAX_ATTEMPTS for n, spec in SPANS.items() if spec[0] == "crash"})
    assert ledger == expected, f"a span ran twice or never (kills at {killed_in})"
    events = journal["events"]
    assert sorted((e["key"], e["state"]) for e in events) == [
        ("run_failed|span 4", "open"),
        ("span_blocked|span 3", "open"),
        ("span_blocked|span 6", "open"),
    ]
    lines = _jsonl(out)
    assert [(line["seq"], line["id"]) for line in lines] == [(e["seq"], e["id"]) for e in events]
    received = receiver.keys(status=None)
    assert set(received) == {e["id"] for e in events}  # each at least once, nothing else
    bodies = {p["key"]: p["body"] for p in receiver.posts}
    assert all(bodies[e["id"]]["seq"] == e["seq"] for e in events)
