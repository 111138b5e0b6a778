"""watch/alerts.py: each event written once to alerts.jsonl, a line cut by a kill dropped; the webhook gets each
event with its Idempotency-Key and bearer token, is retried on a later pass, must be https (or http to this
machine), and its URL and token never reach the log."""

import json
import logging
import time

import pytest

from pipeline.metadata import watch_store
from tests.watch.helpers import Receiver
from watch import alerts

SECRET_PATH = "/hooks/s3cret-path-42"
TOKEN = "t0ken-never-logged"


@pytest.fixture
def connection(tmp_path):
    connection = watch_store.connect(str(tmp_path))
    yield connection
    connection.close()


@pytest.fixture
def no_webhook(monkeypatch):
    monkeypatch.delenv(alerts.WEBHOOK_URL, raising=False)
    monkeypatch.delenv(alerts.WEBHOOK_TOKEN, raising=False)


def _open(connection, subject: str, now: float) -> str:
    with watch_store.transaction(connection):
        assert alerts.open_alert(connection, "span_blocked", subject, now, f"{subject} was blocked", {"n": 1})
    return connection.execute("SELECT id FROM events ORDER BY seq DESC LIMIT 1").fetchone()["id"]


def _lines(tmp_path) -> list:
    return [json.loads(line) for line in (tmp_path / "watch" / "alerts.jsonl").read_text().splitlines()]


def test_an_alert_opens_once_and_resolves_once(tmp_path, connection, no_webhook):
    first = _open(connection, "span 1", 1.0)
    with watch_store.transaction(connection):
        assert not alerts.open_alert(connection, "span_blocked", "span 1", 2.0, "again", {})
        assert alerts.resolve(connection, "span_blocked", "span 1", 3.0, "it passed")
        assert not alerts.resolve(connection, "span_blocked", "span 1", 4.0, "it passed")
    assert [e["state"] for e in alerts.publish(connection, tmp_path / "watch", 5.0)] == ["open", "resolved"]
    assert alerts.publish(connection, tmp_path / "watch", 6.0) == []
    assert [(e["id"], e["state"]) for e in _lines(tmp_path)][0] == (first, "open")
    assert len(_lines(tmp_path)) == 2


def test_a_line_cut_short_by_a_kill_is_dropped_and_the_event_written_whole(tmp_path, connection, no_webhook):
    folder = tmp_path / "watch"
    first = _open(connection, "span 1", 1.0)
    alerts.publish(connection, folder, 1.0)
    second = _open(connection, "span 2", 2.0)
    # the watcher was killed halfway through appending the second event
    row = connection.execute("SELECT * FROM events WHERE id = ?", (second,)).fetchone()
    whole = json.dumps(alerts.event_json(row), sort_keys=True)
    with (folder / "alerts.jsonl").open("a") as handle:
        handle.write(whole[: len(whole) // 2])
    published = alerts.publish(connection, folder, 3.0)
    assert [e["id"] for e in published] == [second]
    assert [e["id"] for e in _lines(tmp_path)] == [first, second]
    assert [e["seq"] for e in _lines(tmp_path)] == [1, 2]
    assert alerts.publish(connection, folder, 4.0) == []
    assert len(_lines(tmp_path)) == 2


def test_the_webhook_gets_each_event_with_its_key_and_token(tmp_path, connection, monkeypatch, caplog):
    with Receiver() as receiver:
        monkeypatch.setenv(alerts.WEBHOOK_URL, receiver.url(SECRET_PATH))
        monkeypatch.setenv(alerts.WEBHOOK_TOKEN, TOKEN)
        ids = [_open(connection, f"span {n}", 1.0) for n in (1, 2)]
        with caplog.at_level(logging.INFO):
            alerts.publish(connection, tmp_path / "watch", 1.0)
        assert receiver.keys() == ids
        assert [p["body"]["id"] for p in receiver.posts] == ids
        assert {p["authorization"] for p in receiver.posts} == {f"Bearer {TOKEN}"}
        delivered = connection.execute("SELECT COUNT(*) FROM events WHERE delivered IS NOT NULL").fetchone()[0]
        assert delivered == 2
        alerts.publish(connection, tmp_path / "watch", 2.0)
        assert len(receiver.posts) == 2  # delivered once
    assert "s3cret" not in caplog.text and TOKEN not in caplog.text


def test_a_failed_delivery_is_retried_on_a_later_pass(tmp_path, connection, monkeypatch, caplog):
    with Receiver() as receiver:
        receiver.statuses = [500]
        monkeypatch.setenv(alerts.WEBHOOK_URL, receiver.url(SECRET_PATH))
        monkeypatch.setenv(alerts.WEBHOOK_TOKEN, TOKEN)
        ids = [_open(connection, f"span {n}", 10.0) for n in (1, 2)]
        with caplog.at_level(logging.INFO):
            alerts.publish(connection, tmp_path / "watch", 10.0)
            assert receiver.keys(status=None) == [ids[0]]  # one try, and the rest waits behind it, in order
            alerts.publish(connection, tmp_path / "watch", 11.0)
            assert len(receiver.posts) == 1  # not retried at once
            row = connection.execute("SELECT * FROM events WHERE id = ?", (ids[0],)).fetchone()
            assert row["delivered"] is None and row["tries"] == 1 and row["next_try"] > 11.0
            alerts.publish(connection, tmp_path / "watch", row["next_try"])
        assert receiver.keys() == ids
    assert "500" in caplog.text
    assert "s3cret" not in caplog.text and TOKEN not in caplog.text
    assert len(_lines(tmp_path)) == 2  # the file got each event once, whatever the webhook did


def test_a_receiver_that_is_down_is_retried_and_not_named_in_full(tmp_path, connection, monkeypatch, caplog):
    with Receiver() as receiver:
        url = receiver.url(SECRET_PATH)
    monkeypatch.setenv(alerts.WEBHOOK_URL, url)  # nothing listens there now
    monkeypatch.setenv(alerts.WEBHOOK_TOKEN, TOKEN)
    _open(connection, "span 1", 1.0)
    with caplog.at_level(logging.INFO):
        alerts.publish(connection, tmp_path / "watch", 1.0)
    row = connection.execute("SELECT * FROM events").fetchone()
    assert row["delivered"] is None and row["tries"] == 1
    assert "s3cret" not in caplog.text and TOKEN not in caplog.text


@pytest.mark.parametrize(
    "url, allowed",
    [
        ("https://hooks.example.com/x", True),
        ("http://localhost:8080/x", True),
        ("http://127.0.0.1:8080/x", True),
        ("http://example.com/x", False),
        ("http://localhost.example.com/x", False),
        ("ftp://localhost/x", False),
    ],
)
def test_the_webhook_must_be_https_or_this_machine(url, allowed, monkeypatch):
    monkeypatch.setenv(alerts.WEBHOOK_URL, url)
    if allowed:
        assert alerts.webhook_url() == url
    else:
        with pytest.raises(alerts.WebhookError) as raised:
            alerts.webhook_url()
        assert "example.com" not in str(raised.value)


def test_publish_refuses_a_plain_http_webhook_elsewhere(tmp_path, connection, monkeypatch):
    monkeypatch.setenv(alerts.WEBHOOK_URL, "http://example.com/hook")
    _open(connection, "span 1", time.time())
    with pytest.raises(alerts.WebhookError):
        alerts.publish(connection, tmp_path / "watch", time.time())


def test_a_redirect_is_a_failed_delivery_and_the_token_goes_nowhere_else(tmp_path, connection, monkeypatch):
    import http.server
    import threading

    seen = []  # what reached the other host: urllib would follow a 302 with a GET carrying the headers

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            if self.server.server_address[1] == ports["elsewhere"]:
                return self.do_GET()
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{ports['elsewhere']}/")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere) for _ in range(2)]
    ports = {"hook": servers[0].server_address[1], "elsewhere": servers[1].server_address[1]}
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv(alerts.WEBHOOK_URL, f"http://127.0.0.1:{ports['hook']}/hook")
        monkeypatch.setenv(alerts.WEBHOOK_TOKEN, TOKEN)
        event = _open(connection, "span 1", 1.0)
        alerts.publish(connection, tmp_path / "watch", 1.0)
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert seen == []  # not followed: the token went nowhere else
    row = connection.execute("SELECT * FROM events WHERE id = ?", (event,)).fetchone()
    assert row["delivered"] is None and row["tries"] == 1  # owed, retried later


def test_a_rotated_alerts_file_starts_afresh_without_repeating_old_events(tmp_path, connection, no_webhook):
    folder = tmp_path / "watch"
    _open(connection, "span 1", 1.0)
    alerts.publish(connection, folder, 1.0)
    (folder / "alerts.jsonl").rename(folder / "alerts.jsonl.1")  # logrotate
    second = _open(connection, "span 2", 2.0)
    assert [e["id"] for e in alerts.publish(connection, folder, 2.0)] == [second]
    assert [e["id"] for e in _lines(tmp_path)] == [second]
