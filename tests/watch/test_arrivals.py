"""watch/arrivals.py: a span still being copied waits; a settled or marked one is complete; spans in numeric order."""

import os
import time

from tests.watch.helpers import make_span, watch_config
from watch import arrivals


def _only(config, now=None) -> arrivals.Span:
    (span,) = arrivals.found(config, now)
    return span


def test_a_span_with_a_file_still_being_copied_waits(tmp_path):
    folder = make_span(tmp_path / "data", 1)
    (folder / "more.csv.part").write_text("weight_pounds,mother_age\n7.1,")
    config = watch_config(tmp_path)
    span = _only(config, time.time() + 3600)
    assert not span.complete and "more.csv.part" in span.why_waiting
    (folder / "more.csv.part").rename(folder / "more.csv")
    (folder / "more.csv").write_text("weight_pounds,mother_age\n7.1,31\n")
    assert _only(config, time.time() + 3600).complete


def test_a_csv_cut_in_the_middle_of_a_line_waits(tmp_path):
    folder = make_span(tmp_path / "data", 1)
    (folder / "data.csv").write_text("weight_pounds,mother_age\n7.5,3")
    config = watch_config(tmp_path)
    span = _only(config, time.time() + 3600)
    assert not span.complete and "middle of a line" in span.why_waiting
    with (folder / "data.csv").open("a") as handle:
        handle.write("0\n")
    assert _only(config, time.time() + 3600).complete


def test_a_span_is_complete_only_once_its_files_settled(tmp_path):
    folder = make_span(tmp_path / "data", 1)
    config = watch_config(tmp_path, watch_settle_seconds="30")
    landed = max(os.stat(p).st_ctime for p in [folder, *folder.iterdir()])
    waiting = _only(config, landed + 10)
    assert not waiting.complete and "changed" in waiting.why_waiting
    assert _only(config, landed + 31).complete


def test_a_file_copied_with_its_old_modification_time_is_new_all_the_same(tmp_path):
    folder = make_span(tmp_path / "data", 1)
    config = watch_config(tmp_path, watch_settle_seconds="1")
    time.sleep(1.1)  # the folder settles
    old = time.time() - 86400
    os.utime(folder / "data.csv", (old, old))  # what `cp -p` over the file leaves: only its ctime is new
    copied = os.stat(folder / "data.csv").st_ctime
    assert not _only(config, copied + 0.5).complete
    assert _only(config, copied + 1.5).complete


def test_a_success_marker_makes_a_span_complete_at_once(tmp_path):
    folder = make_span(tmp_path / "data", 1, marker=True)
    (folder / "data.csv").write_text("weight_pounds,mother_age\n7.5,3")  # the marker's writer knows it is whole
    config = watch_config(tmp_path, watch_settle_seconds="3600")
    assert _only(config, time.time()).complete


def test_a_success_marker_without_a_csv_is_not_a_span(tmp_path):
    folder = tmp_path / "data" / "span-1"
    folder.mkdir(parents=True)
    (folder / "_SUCCESS").write_text("")
    assert not _only(watch_config(tmp_path)).complete


def test_spans_come_in_numeric_order(tmp_path):
    for number in (10, 9, 2, 100):
        make_span(tmp_path / "data", number)
    (tmp_path / "data" / "span-x").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("not a span")
    spans = arrivals.found(watch_config(tmp_path), time.time() + 1)
    assert [s.number for s in spans] == [2, 9, 10, 100]
    assert all(s.complete for s in spans)


def test_a_span_files_change_changes_its_fingerprint(tmp_path):
    folder = make_span(tmp_path / "data", 1)
    config = watch_config(tmp_path)
    before = _only(config).fingerprint
    (folder / "behaviour").write_text("blocked")  # not a data file
    assert _only(config).fingerprint == before
    with (folder / "data.csv").open("a") as handle:
        handle.write("8.0,25\n")
    assert _only(config).fingerprint != before
