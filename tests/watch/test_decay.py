"""Decay: live outcomes joined to the version that answered, read once each, and judged against the version's eval
RMSE without alarming on noise."""

import random

import pytest

from pipeline.metadata import watch_store
from serving.experiments import experiment
from watch import decay

EVAL_RMSE = 1.05
MARGIN, ALPHA, MIN_OUTCOMES, WINDOW = 0.1, 0.001, 200, 1000


@pytest.fixture
def store(tmp_path):
    """A feedback store as the server writes it (a one-arm split on `latest`), and the watch file."""
    config = experiment.ExperimentConfig(arms=("latest",), policy="split", split=(1.0,), state=str(tmp_path / "s.db"))
    feedback = experiment.Store(config)
    connection = watch_store.connect(str(tmp_path / "out"))
    yield feedback, connection, tmp_path / "s.db"
    feedback.close()
    connection.close()


def _serve(feedback, version: int, count: int, sd: float, rng: random.Random, start: int = 0) -> None:
    """`count` answers of `version`, then their outcomes: errors of spread `sd` (real residuals have a heavy tail:
    a tenth of them three times as wide)."""
    for n in range(start, start + count):
        feedback.record(f"r{n}", "latest", version, [7.0])
    outcomes = []
    for n in range(start, start + count):
        spread = sd * (3 if rng.random() < 0.1 else 1) / (0.9 + 0.1 * 9) ** 0.5
        outcomes.append((f"r{n}", 0, 7.0 + rng.gauss(0, spread)))
    feedback.feedback(outcomes)


def _judge(connection, state):
    with watch_store.transaction(connection):
        decay.read_new(connection, state, WINDOW)
    return {
        d.version: d for d in decay.judge(connection, {"1": EVAL_RMSE, "2": EVAL_RMSE}, MARGIN, ALPHA, MIN_OUTCOMES)
    }


def test_clean_outcomes_never_alarm_over_a_year_of_checks(store):
    feedback, connection, state = store
    rng = random.Random(0)
    worst = -99.0
    for month in range(12):
        for check in range(10):  # 10 checks a month, 150 outcomes each
            _serve(feedback, 1, 150, EVAL_RMSE, rng, start=(month * 10 + check) * 150)
            judged = _judge(connection, state)["1"]
            assert not judged.alarm, judged
            worst = max(worst, judged.z if judged.z is not None else -99.0)
    assert worst < 1.0  # far from the 3.09 that alarms


def test_decay_is_flagged_within_2000_outcomes(store):
    feedback, connection, state = store
    rng = random.Random(1)
    _serve(feedback, 1, 1000, EVAL_RMSE, rng)
    assert not _judge(connection, state)["1"].alarm
    decayed = (EVAL_RMSE**2 + 0.8**2) ** 0.5  # the relation moved by 0.8 lb
    flagged_at = None
    for served in range(100, 2001, 100):
        _serve(feedback, 1, 100, decayed, rng, start=1000 + served)
        if _judge(connection, state)["1"].alarm:
            flagged_at = served
            break
    assert flagged_at is not None and flagged_at <= 2000


def test_outcomes_are_read_once_per_version_and_resume_from_the_cursor(store, tmp_path):
    feedback, connection, state = store
    rng = random.Random(2)
    _serve(feedback, 1, 300, EVAL_RMSE, rng)
    _serve(feedback, 2, 50, EVAL_RMSE, rng, start=300)
    judged = _judge(connection, state)
    assert (judged["1"].n, judged["2"].n) == (300, 50)
    assert judged["2"].waiting == "50/200 outcomes" and not judged["2"].alarm
    connection.close()  # a restarted watcher reads on from its cursor: nothing twice
    again = watch_store.connect(str(tmp_path / "out"))
    _serve(feedback, 2, 10, EVAL_RMSE, rng, start=350)
    judged = _judge(again, state)
    assert (judged["1"].n, judged["2"].n) == (300, 60)
    again.close()


def test_a_version_without_eval_rmse_waits(store):
    feedback, connection, state = store
    _serve(feedback, 7, 300, 3.0, random.Random(3))
    judged = _judge(connection, state)["7"]
    assert not judged.alarm and judged.waiting == "no eval RMSE in ML Metadata"
