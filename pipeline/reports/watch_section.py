"""The history page's watch section: what `babyweight watch` recorded in outputs/watch/watch.sqlite.

Three parts, read from the watch file alone (pipeline/metadata/watch_store.py defines it):
- Alerts: the open ones first (kind, subject, since when, message), then the newest resolutions;
- Checks: the newest checks (skew, drift, decay), one row each, with the features over their threshold or still
  waiting for enough requests, or the decay's figures;
- Spans: the watcher's journal of the spans it found and ran.
The history page is written at the end of every pipeline run, so this section never fails it: no file gives no
section, and a file that can't be read (corrupt, locked) gives a paragraph saying so.
"""

import contextlib
import datetime
import html
import logging
from typing import Any, Dict, List, Optional, Tuple, Union

from pipeline.metadata import watch_store

RESOLVED_SHOWN = 20  # resolutions listed under the open alerts
EVENTS_READ = 500  # newest events read to find them (openings and resolutions interleave)
CHECKS_SHOWN = 200
STYLE = ".ALARM,.open{color:#b00;font-weight:bold}.waiting{color:#a60}td.wrap{white-space:normal}"
Cell = Union[str, Tuple[str, str]]  # escaped HTML, or (its CSS class, escaped HTML)


def _time(epoch_seconds: Optional[float]) -> str:
    if epoch_seconds is None:
        return "-"
    return datetime.datetime.fromtimestamp(epoch_seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _figure(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}"


def _count(value: Optional[int]) -> str:
    return "?" if value is None else f"{value:,}"


def _table(head: List[str], rows: List[List[Cell]]) -> str:
    lines = ["<table><tr>" + "".join(f"<th>{name}</th>" for name in head) + "</tr>"]
    for cells in rows:
        lines.append("<tr>" + "".join(_td(cell) for cell in cells) + "</tr>")
    return "".join(lines) + "</table>"


def _td(cell: Cell) -> str:
    if isinstance(cell, tuple):
        return f"<td class='{cell[0]}'>{cell[1] or '-'}</td>"
    return f"<td>{cell or '-'}</td>"


def findings(check: Dict[str, Any]) -> List[str]:
    """What a check found worth a look: each feature over its threshold or still waiting for enough requests
    (skew, drift), or the decay's live RMSE against its limit."""
    detail = check["detail"]
    if check["kind"] == "decay":
        relation = ">" if check["status"] == "ALARM" else "vs"
        return [
            f"live RMSE {_figure(detail.get('live_rmse'))} {relation} limit {_figure(detail.get('limit'))} "
            f"(eval RMSE {_figure(detail.get('eval_rmse'))}, z {_figure(detail.get('z'))})"
        ]
    found = []
    for name, judged in sorted(detail.get("features", {}).items()):
        distance, threshold = judged.get("distance"), judged.get("threshold")
        over = judged.get("alarm") or (distance is not None and threshold is not None and distance > threshold)
        if over:
            found.append(f"{name} {_figure(distance)} > {_figure(threshold)}")
        elif judged.get("needed") is None or (judged.get("n") or 0) < judged["needed"]:
            found.append(f"{name} waiting {_count(judged.get('n'))}/{_count(judged.get('needed'))}")
    return found


def _alerts(open_alerts: List[Dict[str, Any]], resolved: List[Dict[str, Any]]) -> str:
    parts = ["<h2>Watch: alerts</h2>"]
    if open_alerts:
        rows = [
            [
                ("open", "open"),
                html.escape(alert["kind"]),
                html.escape(alert["subject"]),
                _time(alert["time"]),
                ("wrap", html.escape(alert["message"])),
            ]
            for alert in reversed(open_alerts)  # newest first
        ]
        parts.append(_table(["state", "kind", "subject", "since", "message"], rows))
    else:
        parts.append("<p class='ok'>No open alert.</p>")
    if resolved:
        parts.append(f"<h3>Resolved, newest first (the last {RESOLVED_SHOWN})</h3>")
        rows = [
            [
                ("ok", "resolved"),
                html.escape(event["kind"]),
                html.escape(event["subject"]),
                _time(event["time"]),
                ("wrap", html.escape(event["message"])),
            ]
            for event in resolved
        ]
        parts.append(_table(["state", "kind", "subject", "resolved", "message"], rows))
    return "".join(parts)


def _checks(checks: List[Dict[str, Any]]) -> str:
    alarms = sum(check["status"] == "ALARM" for check in checks)
    rows = [
        [
            _time(check["time"]),
            html.escape(check["kind"]),
            html.escape(check["slice"]),
            html.escape(str(check["version"])),
            _count(check["n"]),
            (html.escape(check["status"]), html.escape(check["status"])),
            ("wrap", html.escape("; ".join(findings(check)))),
        ]
        for check in checks
    ]
    return (
        f"<h2>Watch: checks</h2><details><summary>The newest {len(checks)} check(s), newest first: "
        f"{alarms} alarming</summary>"
        + _table(["time", "kind", "slice", "version", "n", "status", "over threshold or waiting"], rows)
        + "</details>"
    )


def _spans(journal: List[Dict[str, Any]]) -> str:
    rows = [
        [
            str(span["span"]),
            html.escape(span["state"]),
            str(span["attempts"]),
            _time(span["updated"]),
            ("wrap", html.escape((span["detail"] or "").strip().split("\n", 1)[0])),
        ]
        for span in journal
    ]
    return (
        f"<h2>Watch: spans</h2><details><summary>{len(journal)} span(s) in the watcher's journal</summary>"
        + _table(["span", "state", "attempts", "updated", "detail"], rows)
        + "</details>"
    )


def section(config) -> str:
    """The watch section of the history page: '' if no watcher ever ran, a note if its file can't be read."""
    path = watch_store.path_of(config.output_dir)
    if not path.exists():
        return ""
    try:
        with contextlib.closing(watch_store.connect(config.output_dir, read_only=True)) as connection:
            open_alerts = watch_store.open_alerts(connection)
            events = watch_store.recent_events(connection, EVENTS_READ)
            checks = watch_store.recent_checks(connection, CHECKS_SHOWN)
            journal = watch_store.spans(connection)
        resolved = [event for event in events if event["state"] == "resolved"][:RESOLVED_SHOWN]
        return (
            f"<p>What <code>babyweight watch</code> recorded in {html.escape(str(path))}.</p>"
            + _alerts(open_alerts, resolved)
            + _checks(checks)
            + (_spans(journal) if journal else "")
        )
    except Exception as error:  # corrupt, locked, or an older layout: the page is written at every run's end
        logging.warning("history: the watch file %s can't be read: %s", path, error, exc_info=True)
        return (
            f"<h2>Watch</h2><p class='unreadable'>The watcher's file {html.escape(str(path))} can't be read: "
            f"{html.escape(type(error).__name__)}: {html.escape(str(error))}</p>"
        )
