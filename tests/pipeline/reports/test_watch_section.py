"""The history page's watch section, read from a watch file written here with watch_store's own tables."""

import json
import pathlib

import pytest

from pipeline import config as config_lib
from pipeline.metadata import mlmd, watch_store
from pipeline.reports import history, watch_section

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


@pytest.fixture
def config(tmp_path):
    return config_lib.load_config(overrides={"output_dir": str(tmp_path)})


def event(connection, key_number: int, state: str, time: float, subject: str, message: str) -> None:
    connection.execute(
        "INSERT INTO events (id, key, state, time, kind, subject, message, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (f"id-{key_number}-{state}-{time}", f"skew|{subject}", state, time, "skew", subject, message, "{}"),
    )


def check(connection, time: float, kind: str, slice_: str, status: str, detail: dict) -> None:
    connection.execute(
        "INSERT INTO checks (time, kind, slice, version, n, status, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (time, kind, slice_, "3", 1290, status, json.dumps(detail)),
    )


@pytest.fixture
def watched(config):
    """A watch file with an open alert, a resolved one, a skew check, a decay check and a span's journal."""
    connection = watch_store.connect(config.output_dir)
    event(connection, 1, "open", T0, "client acme: weight_gain_pounds", "skew of weight_gain_pounds 0.31 > 0.1")
    event(connection, 2, "open", T0 + 1, "client beta: mother_age", "skew of mother_age 0.2 > 0.1")
    event(connection, 2, "resolved", T0 + 60, "client beta: mother_age", "mother_age back under 0.1")
    features = {
        "weight_gain_pounds": {"distance": 0.31, "threshold": 0.1, "n": 1290, "needed": 400, "alarm": True},
        "mother_married": {"distance": None, "threshold": 0.1, "n": 812, "needed": 1290, "alarm": False},
        "mother_age": {"distance": 0.02, "threshold": 0.1, "n": 1290, "needed": 300, "alarm": False},
    }
    check(connection, T0, "skew", "client acme", "ALARM", {"features": features})
    decay = {"live_rmse": 1.41, "eval_rmse": 1.1, "limit": 1.3, "z": 3.2}
    check(connection, T0 + 5, "decay", "version 3", "ALARM", decay)
    connection.execute(
        "INSERT INTO spans (span, fingerprint, state, attempts, detail, seen, updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (7, "abc", "crashed", 2, "Trainer failed: out of memory\nTraceback ...", T0, T0 + 9),
    )
    connection.close()
    return config


def test_an_open_alert_is_in_the_panel_and_a_resolved_one_among_the_resolved(watched):
    text = watch_section.section(watched)
    open_part, resolved_part = text.split("<h3>Resolved", 1)
    assert "client acme: weight_gain_pounds" in open_part
    assert "skew of weight_gain_pounds 0.31 &gt; 0.1" in open_part
    assert "2023-11-14 22:13:20 UTC" in open_part  # since when
    assert "client beta" not in open_part.split("<h2>Watch: checks")[0]
    assert "client beta: mother_age" in resolved_part and "mother_age back under 0.1" in resolved_part
    assert "No open alert" not in text


def test_no_open_alert_says_so(config):
    connection = watch_store.connect(config.output_dir)
    event(connection, 1, "open", T0, "client acme: mother_age", "skew")
    event(connection, 1, "resolved", T0 + 5, "client acme: mother_age", "back")
    connection.close()
    assert "No open alert" in watch_section.section(config)


def test_a_check_row_shows_its_kind_slice_status_and_what_passed_its_threshold(watched):
    checks = watch_section.section(watched).split("<h2>Watch: checks", 1)[1].split("<h2>Watch: spans", 1)[0]
    row = next(r for r in checks.split("<tr>") if "client acme" in r)
    assert "<td>skew</td>" in row and "<td class='ALARM'>ALARM</td>" in row
    assert "weight_gain_pounds 0.31 &gt; 0.1" in row
    assert "mother_married waiting 812/1,290" in row
    assert "mother_age" not in row  # judged and under its threshold
    decay = next(r for r in checks.split("<tr>") if "version 3" in r)
    assert "live RMSE 1.41 &gt; limit 1.3" in decay
    assert "2 check(s)" in checks and "2 alarming" in checks


def test_the_spans_journal_shows_the_first_line_of_a_span_detail(watched):
    spans = watch_section.section(watched).split("<h2>Watch: spans", 1)[1]
    assert "<td>7</td><td>crashed</td><td>2</td>" in spans
    assert "Trainer failed: out of memory" in spans and "Traceback" not in spans


def test_html_in_a_subject_or_message_is_escaped(config):
    connection = watch_store.connect(config.output_dir)
    event(connection, 1, "open", T0, "client <script>alert(1)</script>", "from <b>client</b>")
    check(connection, T0, "skew", "client <script>", "ok", {"features": {}})
    connection.close()
    text = watch_section.section(config)
    assert "<script>" not in text and "<b>" not in text
    assert "client &lt;script&gt;alert(1)&lt;/script&gt;" in text and "from &lt;b&gt;client&lt;/b&gt;" in text


def test_no_watch_file_gives_no_section(config):
    assert watch_section.section(config) == ""


def empty_metadata_store(config) -> None:
    pathlib.Path(config.metadata_path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(config.metadata_path).touch()
    mlmd.open_sqlite(config.metadata_path, read_only=False)  # creates ML Metadata's tables: a store with no run


def test_a_corrupt_watch_file_gives_a_note_and_the_page_still_renders(config):
    path = watch_store.path_of(config.output_dir)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a database, " * 100)
    assert "can't be read" in watch_section.section(config)
    empty_metadata_store(config)
    page = history.write_index(config).read_text()
    assert "can't be read" in page and "No runs yet" in page


def test_the_history_page_carries_the_watch_section_above_the_runs(watched):
    empty_metadata_store(watched)
    page = history.write_index(watched).read_text()
    assert page.index("<h1>") < page.index("Watch: alerts") < page.index("No runs yet")
    assert "client acme: weight_gain_pounds" in page and watch_section.STYLE in page
