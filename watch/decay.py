"""Decay: a version's live RMSE, from the outcomes clients report, against the RMSE its run measured on the eval
split, with a test that noise alone passes with chance decay_alpha.

Outcomes come from the feedback store of the server's experiment (serving/experiments: every routed answer is
recorded with its version, and `POST .../feedback` or `babyweight experiment feedback` joins the real weight to
it; a one-arm split records every answer). They are read once each (the store's outcomes rowid is the cursor)
into the watch file, the newest decay_window_outcomes kept per version.

The test, per version with at least decay_min_outcomes outcomes: the squared errors d have mean m and spread s;
the version decays when m exceeds (eval RMSE + decay_rmse_margin)^2 by more than z(1 - decay_alpha) * s / sqrt(n).
One-sided and with a margin, so a live RMSE a little above the eval one (other traffic, other months) doesn't
alarm, and a small window of bad luck doesn't either.
"""

import dataclasses
import math
import pathlib
import sqlite3
import statistics
from typing import Dict, List, Optional

CURSOR = "feedback_store"
READ_ROWS_PER_PASS = 200_000


@dataclasses.dataclass(frozen=True)
class Decay:
    version: str
    n: int
    live_rmse: Optional[float]
    eval_rmse: Optional[float]  # None: no run in ML Metadata pushed this version (nothing to compare with)
    limit: Optional[float]  # eval RMSE + margin
    z: Optional[float]
    alarm: bool
    waiting: str  # why it isn't judged yet, or ''


def read_new(connection: sqlite3.Connection, state: pathlib.Path, keep: int) -> int:
    """Joins the feedback store's outcomes after the cursor to their versions, into `outcomes`; inside the
    caller's transaction. Returns how many were read."""
    if not state.exists():
        return 0
    row = connection.execute("SELECT value FROM cursors WHERE name = ?", (CURSOR,)).fetchone()
    cursor = int(row["value"]) if row else 0
    feedback = sqlite3.connect(f"file:{state}?mode=ro", uri=True, timeout=10)
    try:
        rows = feedback.execute(
            "SELECT o.rowid, p.version, o.error FROM outcomes o JOIN predictions p ON p.request_id = o.request_id"
            " AND p.instance = o.instance AND p.arm = o.arm WHERE o.rowid > ? ORDER BY o.rowid LIMIT ?",
            (cursor, READ_ROWS_PER_PASS),
        ).fetchall()
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            return 0  # a state file no server has written yet
        raise
    finally:
        feedback.close()
    if not rows:
        return 0
    connection.executemany(
        "INSERT INTO outcomes (version, error) VALUES (?, ?)", [(str(version), error) for _, version, error in rows]
    )
    connection.execute(
        "INSERT OR REPLACE INTO cursors (name, value) VALUES (?, ?)", (CURSOR, str(max(r[0] for r in rows)))
    )
    for version in {str(r[1]) for r in rows}:
        connection.execute(
            "DELETE FROM outcomes WHERE version = ? AND seq NOT IN "
            "(SELECT seq FROM outcomes WHERE version = ? ORDER BY seq DESC LIMIT ?)",
            (version, version, keep),
        )
    return len(rows)


def judge(
    connection: sqlite3.Connection,
    eval_rmse: Dict[str, float],
    margin: float,
    alpha: float,
    min_outcomes: int,
) -> List[Decay]:
    """Each version with outcomes, judged against its eval RMSE (`eval_rmse`: version -> RMSE)."""
    z_limit = statistics.NormalDist().inv_cdf(1 - alpha)
    versions = [r["version"] for r in connection.execute("SELECT DISTINCT version FROM outcomes ORDER BY version")]
    result = []
    for version in versions:
        errors = [r["error"] for r in connection.execute("SELECT error FROM outcomes WHERE version = ?", (version,))]
        squares = [error * error for error in errors]
        n = len(squares)
        live = math.sqrt(sum(squares) / n)
        reference = eval_rmse.get(version)
        if reference is None:
            result.append(Decay(version, n, live, None, None, None, False, "no eval RMSE in ML Metadata"))
            continue
        limit = reference + margin
        if n < min_outcomes:
            result.append(Decay(version, n, live, reference, limit, None, False, f"{n}/{min_outcomes} outcomes"))
            continue
        spread = statistics.pstdev(squares) or 1e-12
        z = (sum(squares) / n - limit * limit) / (spread / math.sqrt(n))
        result.append(Decay(version, n, live, reference, limit, z, z > z_limit, ""))
    return result
