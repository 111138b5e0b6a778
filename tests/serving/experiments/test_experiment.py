"""Experiments between versions: routing (sticky split, shadow, bandit), feedback joins, persistence, promotion."""

import concurrent.futures
import csv
import dataclasses
import json
import math
import re
import sqlite3
import time

import numpy as np
import orjson
import pytest

from serving.experiments import experiment, experiment_cli
from serving.experiments.experiment import ArmStats, ExperimentConfig, ExperimentError
from tests.serving import toy_model
from tests.serving.conftest import call, running_server
from tests.serving.model_server.test_server import LABELS_CONFIG, call_text

MEDIUM = {"mother_age": 30, "gestation_weeks": 39}
TOKEN = "test-feedback-token-0123456789"
WITH_TOKEN = {"BABYWEIGHT_FEEDBACK_TOKEN": TOKEN}
AUTHORIZED = {"Authorization": f"Bearer {TOKEN}"}


def _experiment_file(folder, **settings):
    path = folder / "experiment.yaml"
    path.write_text(json.dumps({"arms": ["stable", "canary"], "state": "state.sqlite", **settings}))
    return path


def _models_config(folder, toy_versions):
    path = folder / "models.config"
    path.write_text(LABELS_CONFIG.format(base=toy_versions, policy="all {}", canary=2))
    return path


@pytest.mark.parametrize(
    "settings, message",
    [
        # One arm is a split's (it records every answer); a bandit or a shadow compares two or more.
        ({"arms": ["stable"]}, "'arms' needs two or more different labels or versions for policy thompson (a bandit"),
        ({"arms": ["stable"], "policy": "epsilon_greedy"}, "versions for policy epsilon_greedy (a bandit chooses"),
        ({"arms": ["stable"], "policy": "shadow"}, "versions for policy shadow (shadow asks a challenger beside"),
        ({"arms": [], "policy": "split", "split": []}, "'arms' needs one or more different labels or versions"),
        ({"arms": ["a", "a"], "policy": "split", "split": [0.5, 0.5]}, "'arms' needs one or more different labels"),
        ({"arms": ["stable"], "policy": "split", "split": [0.5]}, "'split' needs one share per arm, adding up to 1"),
        ({"policy": "ucb"}, "policy 'ucb' is not one of split, thompson, epsilon_greedy, shadow"),
        ({"policy": "split", "split": [0.7, 0.2]}, "'split' needs one share per arm, adding up to 1"),
        ({"reward": "log"}, "reward 'log' is not one of absolute, squared"),
        ({"arm": ["a", "b"]}, "unknown setting(s) arm"),
    ],
)
def test_a_bad_experiment_file_is_refused_naming_the_setting(tmp_path, settings, message):
    path = _experiment_file(tmp_path, **settings)
    with pytest.raises(ExperimentError, match="experiment file .*experiment.yaml") as error:
        experiment.load_config(str(path))
    assert message in str(error.value)


def test_a_fixed_split_keeps_a_routing_key_on_one_arm_and_splits_the_rest_by_share():
    policy = experiment.Policy(ExperimentConfig(("a", "b"), "split", split=(0.8, 0.2)), seed=3)
    assert len({policy.choose({}, "patient-17") for _ in range(50)}) == 1
    keyed = [policy.choose({}, f"patient-{n}") for n in range(4000)]
    unkeyed = [policy.choose({}) for _ in range(4000)]
    assert keyed.count("a") / 4000 == pytest.approx(0.8, abs=0.03)
    assert unkeyed.count("a") / 4000 == pytest.approx(0.8, abs=0.03)


def test_a_one_arm_split_loads_and_routes_every_request_to_its_arm(tmp_path):
    config = experiment.load_config(str(_experiment_file(tmp_path, arms=["stable"], policy="split", split=[1.0])))
    assert (config.arms, config.policy, config.split) == (("stable",), "split", (1.0,))
    policy = experiment.Policy(config, seed=4)
    routed = {policy.choose({}) for _ in range(500)} | {policy.choose({}, f"patient-{n}") for n in range(500)}
    assert routed == {"stable"} and policy.shares({}) == {"stable": 1.0}


def test_an_arm_is_a_version_a_label_or_latest_the_newest():
    # latest resolves as a request naming no version does (the manager's newest available), so a one-arm split on
    # it follows each pushed version (babyweight watch's decay check, docs/watch.md)
    assert experiment.arm_target("latest") == (None, None)
    assert experiment.arm_target("3") == (3, None) and experiment.arm_target("stable") == (None, "stable")


def test_thompson_sampling_prefers_the_arm_with_the_lower_loss_and_still_tries_a_new_one():
    policy = experiment.Policy(ExperimentConfig(("a", "b", "c")), seed=1)
    stats = {
        "a": ArmStats(200, 200 * 0.7, 200 * 0.7**2 + 200 * 0.3),
        "b": ArmStats(200, 200 * 0.9, 200 * 0.9**2 + 200 * 0.3),
    }
    chosen = [policy.choose(stats) for _ in range(2000)]
    assert chosen.count("b") < 0.02 * 2000 and chosen.count("a") > 0.4 * 2000
    assert chosen.count("c") > 0.2 * 2000  # no outcome yet: its belief is wide, so it is tried
    best = experiment.probability_best({**stats, "c": ArmStats(200, 200 * 0.9, 200 * 0.9**2 + 200 * 0.3)})
    assert best["a"] > 0.99 and best["b"] < 0.01
    shares = policy.shares(stats)
    assert shares["b"] < 0.02 and shares["c"] > 0.2


def test_epsilon_greedy_exploits_the_best_scored_arm_and_explores_at_its_rate_only():
    policy = experiment.Policy(ExperimentConfig(("a", "b", "c"), "epsilon_greedy", epsilon=0.1), seed=2)
    assert {policy.choose({}) for _ in range(200)} <= {"a", "b", "c"}
    unscored = [policy.choose({}) for _ in range(3000)]
    assert unscored.count("a") / 3000 == pytest.approx(0.9 + 0.1 / 3, abs=0.02)  # nothing scored: the incumbent
    scored = [policy.choose({"b": ArmStats(5, 3.0, 2.0), "a": ArmStats(5, 4.0, 4.0)}) for _ in range(3000)]
    assert scored.count("b") / 3000 == pytest.approx(0.9 + 0.1 / 3, abs=0.02)
    assert scored.count("c") / 3000 == pytest.approx(0.1 / 3, abs=0.015)  # unscored: at the epsilon rate, no more


def test_feedback_joins_late_outcomes_once_and_names_unknown_and_duplicate_ids(tmp_path):
    config = experiment.load_config(str(_experiment_file(tmp_path, policy="shadow")))
    store = experiment.Store(config)
    store.record("r1", "stable", 1, [7.0, 6.0])
    store.record("r1", "canary", 2, [8.0, 5.0], shadow=True)
    store.record("r2", "stable", 1, [7.5])
    first = store.feedback([("r1", 0, 7.5), ("r1", 1, 6.5), ("nope", 0, 7.0)])
    assert (first.accepted, first.unknown, first.duplicate) == (2, ["nope"], [])
    store.record("r3", "stable", 1, [9.0])  # more traffic before the late outcome of r2
    assert not store.record("r2", "canary", 2, [1.0])  # a client's retry under the same id: the first answer stays
    again = store.feedback([("r1", 0, 7.5), ("r2", 0, 7.0)])
    assert (again.accepted, again.unknown, again.duplicate) == (1, [], ["r1"])
    store.close()
    reopened = experiment.Store(config)  # a restart: the same sums from the file
    stats = reopened.stats()
    assert stats["stable"].n == 3 and stats["stable"].loss_sum == pytest.approx(0.5 + 0.5 + 0.5)
    assert stats["canary"].n == 2 and stats["canary"].loss_sum == pytest.approx(0.5 + 1.5)
    reopened.close()


@pytest.mark.parametrize(
    "item, message",
    [
        ({"request_id": "a", "weight_pounds": 1e308}, "weight_pounds 1e+308 is outside the label's domain [0.2, 20]"),
        ({"request_id": "a", "weight_pounds": -3}, "weight_pounds -3 is outside the label's domain"),
        ({"request_id": "a", "weight_pounds": 0.19}, "weight_pounds 0.19 is outside the label's domain"),
        ({"request_id": "a" * 129, "weight_pounds": 7}, "request_id is longer than 128 characters"),
        ({"request_id": "a", "weight_pounds": True}, "needs request_id and a numeric weight_pounds"),
        ({"request_id": "a", "weight_pounds": 7, "instance": 1e30}, "needs request_id and a numeric weight_pounds"),
        (  # nested past repr's stack: the message quotes it cut short
            {"request_id": "a", "weight_pounds": orjson.loads("[" * 1000 + "]" * 1000)},
            "needs request_id and a numeric weight_pounds",
        ),
    ],
)
def test_an_outcome_that_is_no_birth_weight_is_refused_naming_it(item, message):
    with pytest.raises(ExperimentError, match=re.escape(f"the body, item 0: {message}")):
        experiment.parse_feedback({"feedback": [item]})
    for edge in (0.2, 20.0):  # the schema's own bounds (float32 in its proto) are in
        assert experiment.parse_feedback({"request_id": "a", "weight_pounds": edge}) == [("a", 0, edge)]


def test_whatever_the_state_file_holds_routing_and_reports_do_not_overflow(tmp_path):
    """A model's absurd prediction, and an outcome stored before outcomes were checked (1e308 pounds) in a state
    file from before the running sums: their losses would make the sums overflow."""
    config = experiment.load_config(str(_experiment_file(tmp_path, reward="squared")))
    store = experiment.Store(config)
    for n in range(3):
        store.record(f"r{n}", "stable" if n else "canary", 1, [7.0])
    store.record("r3", "canary", 1, [1e300])  # its squared error is inf
    store.feedback([("r1", 0, 7.5), ("r2", 0, 6.5), ("r3", 0, 7.0)])
    store.db.execute("INSERT INTO outcomes VALUES ('r0', 0, 'canary', 1e308, 1e308, 1e308, 0)")
    store.db.execute("DROP TABLE arm_totals")  # the file as an earlier server left it: summed once at the next start
    store.close()
    served = experiment.Experiment(config)
    try:
        assert {served.route(None)[0] for _ in range(50)} <= {"stable", "canary"}
        stats = served.store.stats()
    finally:
        served.close()
    assert all(math.isfinite(p) for p in experiment.probability_best(stats).values())
    assert stats["canary"].loss_sum == 2 * experiment.MAX_LOSS  # capped, not dropped: still the worst arm
    assert stats["stable"].n == 2 and stats["stable"].loss_sum == pytest.approx(0.5)
    beliefs = experiment._posterior({"a": ArmStats(2, 1e308, float("inf")), "b": ArmStats(3, 1.5, 1.0)})
    assert all(math.isfinite(value) for belief in beliefs.values() for value in belief)


def test_the_statistics_are_running_sums_read_without_scanning_the_outcomes(tmp_path):
    """Each worker reads the statistics every second: a scan of every outcome would grow with the experiment."""
    store = experiment.Store(experiment.load_config(str(_experiment_file(tmp_path))))
    for n in range(20):
        store.record(f"r{n}", ("stable", "canary")[n % 2], 1, [7.0])
    store.feedback([(f"r{n}", 0, 7.0 + n / 10) for n in range(20)])
    before = store.stats()
    store.db.execute("DELETE FROM outcomes")  # the sums alone answer
    assert store.stats() == before and before["canary"].n == 10
    assert before["canary"].loss_sum == pytest.approx(sum(n / 10 for n in range(1, 20, 2)))
    store.close()


def test_the_batch_feedback_command_reads_csv_and_reports_what_it_could_not_join(tmp_path, capsys):
    path = _experiment_file(tmp_path)
    store = experiment.Store(experiment.load_config(str(path)))
    store.record("a-1", "stable", 1, [7.0])
    store.close()
    outcomes = tmp_path / "outcomes.csv"
    with outcomes.open("w", newline="") as handle:
        csv.writer(handle).writerows([["request_id", "weight_pounds"], ["a-1", "7.25"], ["b-9", "6.0"]])
    assert experiment_cli.main(["feedback", "--experiment-file", str(path), str(outcomes)]) == 1
    assert "1 outcome(s) joined; 1 unknown request id(s): b-9; 0 duplicate(s)" in capsys.readouterr().out
    assert experiment_cli.main(["feedback", "--experiment-file", str(path), str(outcomes)]) == 1
    assert "0 outcome(s) joined; 1 unknown request id(s): b-9; 1 duplicate(s): a-1" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text("request_id,weight_pounds\na-1,7\n\na-2,heavy\n")
    assert experiment_cli.main(["feedback", "--experiment-file", str(path), str(bad)]) == 1
    assert "bad.csv, line 4, item 0: needs request_id and a numeric weight_pounds" in capsys.readouterr().err


@pytest.mark.slow
def test_a_served_split_is_sticky_says_its_arm_and_takes_feedback_across_a_restart(toy_versions, tmp_path):
    exp = _experiment_file(tmp_path, policy="split", split=[0.5, 0.5])
    flags = ("--model-config-file", str(_models_config(tmp_path, toy_versions)), "--experiment-file", str(exp))
    url_predict = "/v1/models/babyweight:predict"
    with running_server(toy_versions, tmp_path / "logs", *flags, available=2, env=WITH_TOKEN) as url:
        sticky = {
            call(url + url_predict, {"instances": [MEDIUM]}, {"X-Routing-Key": "patient-7"})[1]["x-experiment-arm"]
            for _ in range(10)
        }
        answers = [call(url + url_predict, {"instances": [MEDIUM]}, {"X-Request-Id": f"q{n}"}) for n in range(40)]
        arms = {headers["x-experiment-arm"] for _, headers, _ in answers}
        for status, headers, body in answers:  # the arm's version answered
            version = {"stable": 1, "canary": 2}[headers["x-experiment-arm"]]
            assert status == 200 and headers["x-model-version"] == str(version)
            assert body["predictions"][0][0] == pytest.approx(toy_model.expected(MEDIUM, version))
        reused = call(url + url_predict, {"instances": [MEDIUM]}, {"X-Request-Id": "q0"})  # claimed by the first
        pinned = call(url + "/v1/models/babyweight/versions/1:predict", {"instances": [MEDIUM]})[1]
        status, _, result = call(
            url + "/v1/models/babyweight:feedback",
            {
                "feedback": [
                    {"request_id": "q0", "weight_pounds": 7.0},
                    {"request_id": "q1", "weight_pounds": 7.0},
                    {"request_id": "q0", "weight_pounds": 7.0},
                    {"request_id": "unseen", "weight_pounds": 7.0},
                ]
            },
            AUTHORIZED,
        )
        bad = call(url + "/v1/models/babyweight:feedback", {"feedback": [{"request_id": "q2"}]}, AUTHORIZED)
        outside = call(url + "/v1/models/babyweight:feedback", {"request_id": "q2", "weight_pounds": 1e308}, AUTHORIZED)
        # Feedback steers the policy: without the token it is refused, and nothing is joined.
        anonymous = call(url + "/v1/models/babyweight:feedback", {"request_id": "q2", "weight_pounds": 7.0})
        wrong = call(
            url + "/v1/models/babyweight:feedback",
            {"request_id": "q2", "weight_pounds": 7.0},
            {"Authorization": "Bearer " + TOKEN[:-1] + "x"},
        )
    assert reused[0] == 409 and "X-Request-Id 'q0' was used by an earlier request" in reused[2]["error"]
    assert len(sticky) == 1 and arms == {"stable", "canary"}
    assert "x-experiment-arm" not in pinned  # a version asked by name is not routed
    assert status == 200 and result == {"accepted": 2, "unknown": ["unseen"], "duplicate": ["q0"]}
    assert bad[0] == 400 and "needs request_id and a numeric weight_pounds" in bad[2]["error"]
    assert outside[0] == 400 and "weight_pounds 1e+308 is outside the label's domain [0.2, 20]" in outside[2]["error"]
    assert anonymous[0] == wrong[0] == 401 and anonymous[1]["www-authenticate"] == "Bearer"
    with running_server(toy_versions, tmp_path / "logs", *flags, available=2) as url:  # no token: feedback is off
        off = call(url + "/v1/models/babyweight:feedback", {"request_id": "q1", "weight_pounds": 7.0}, AUTHORIZED)
    assert off[0] == 403 and "feedback is off: this server has no feedback token" in off[2]["error"]
    with running_server(toy_versions, tmp_path / "logs", *flags, available=2, env=WITH_TOKEN) as url:
        again = call(
            url + "/v1/models/babyweight:feedback",
            {"feedback": [{"request_id": "q1", "weight_pounds": 7.0}, {"request_id": "q3", "weight_pounds": 7.0}]},
            AUTHORIZED,
        )
    assert again[2] == {"accepted": 1, "unknown": [], "duplicate": ["q1"]}  # the state survived the restart
    result = experiment_cli.report(experiment.load_config(str(exp)))
    assert sum(a["outcomes"] for a in result["arms"].values()) == 3
    assert sum(a["requests"] for a in result["arms"].values()) == 50


def test_a_locked_state_file_stalls_no_request_and_costs_only_its_record(toy_versions, tmp_path):
    """Another process holds the state file's write lock: the event loop goes on (metrics, other requests), routed
    requests are answered without waiting for their records, and the records lost are counted."""
    exp = _experiment_file(tmp_path, policy="split", split=[0.5, 0.5])
    flags = ("--model-config-file", str(_models_config(tmp_path, toy_versions)), "--experiment-file", str(exp))
    predict = "/v1/models/babyweight:predict"
    with running_server(toy_versions, tmp_path / "logs", *flags, available=2) as url:
        assert call(url + predict, {"instances": [MEDIUM]})[0] == 200
        holder = sqlite3.connect(str(tmp_path / "state.sqlite"), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")

        def routed(number: int):
            started = time.monotonic()
            answer = call(url + predict, {"instances": [MEDIUM]}, {"X-Request-Id": f"while-locked-{number}"})
            return answer, time.monotonic() - started

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(routed, range(3)))
            started = time.monotonic()
            pinned = call(url + "/v1/models/babyweight/versions/1:predict", {"instances": [MEDIUM]})
            text = call_text(url + "/metrics")
            waited = time.monotonic() - started
        deadline = time.monotonic() + 20  # each record gives up after 2 s of the lock, one after the other
        while 'babyweight_experiment_errors_total{reason="record"} 3.0' not in call_text(url + "/metrics"):
            assert time.monotonic() < deadline, "the lost records were not counted"
            time.sleep(0.2)
        holder.execute("ROLLBACK")
        holder.close()
    assert waited < 1.0, f"the event loop stalled {waited:.1f} s behind the state file's lock"
    assert pinned[0] == 200 and "babyweight_requests_total" in text
    for (status, headers, body), seconds in answers:
        version = {"stable": 1, "canary": 2}[headers["x-experiment-arm"]]
        assert status == 200 and body["predictions"][0][0] == pytest.approx(toy_model.expected(MEDIUM, version))
        assert seconds < 1.5, f"an answer waited {seconds:.1f} s for its record"


def test_a_served_one_arm_split_records_every_answer_with_its_version_for_outcomes(toy_versions, tmp_path):
    """No A/B test: every request the one arm's version answers (stable -> 1, not the newest, 2) is recorded with
    that version, its outcome joins at the feedback route, and the report reads it; promote has no winner."""
    exp = _experiment_file(tmp_path, arms=["stable"], policy="split", split=[1.0])
    flags = ("--model-config-file", str(_models_config(tmp_path, toy_versions)), "--experiment-file", str(exp))
    predict = "/v1/models/babyweight:predict"
    with running_server(toy_versions, tmp_path / "logs", *flags, available=2, env=WITH_TOKEN) as url:
        answers = [call(url + predict, {"instances": [MEDIUM]}, {"X-Request-Id": f"one-{n}"}) for n in range(8)]
        keyed = call(url + predict, {"instances": [MEDIUM, MEDIUM]}, {"X-Routing-Key": "p-1", "X-Request-Id": "k"})
        status, _, joined = call(
            url + "/v1/models/babyweight:feedback",
            {"feedback": [{"request_id": "one-0", "weight_pounds": 8.0}, {"request_id": "k", "weight_pounds": 7.0}]},
            AUTHORIZED,
        )
    for answer_status, headers, body in [*answers, keyed]:
        assert answer_status == 200 and (headers["x-experiment-arm"], headers["x-model-version"]) == ("stable", "1")
        assert body["predictions"][0][0] == pytest.approx(toy_model.expected(MEDIUM, 1))
    assert status == 200 and joined == {"accepted": 2, "unknown": [], "duplicate": []}
    config = experiment.load_config(str(exp))
    store = experiment.Store(config)
    recorded = store.db.execute("SELECT request_id, instance, arm, version, shadow FROM predictions").fetchall()
    store.close()
    assert sorted(recorded) == sorted(
        [(f"one-{n}", 0, "stable", 1, 0) for n in range(8)] + [("k", 0, "stable", 1, 0), ("k", 1, "stable", 1, 0)]
    )
    result = experiment_cli.report(config)["arms"]["stable"]
    assert (result["versions"], result["requests"], result["outcomes"]) == ([1], 9, 2)
    answered = toy_model.expected(MEDIUM, 1)
    assert result["mae"] == pytest.approx((abs(8.0 - answered) + abs(7.0 - answered)) / 2)
    with pytest.raises(ExperimentError, match="one arm, stable: there is no winner to promote"):
        experiment_cli.promote(config, str(tmp_path / "models.config"), "babyweight")


def test_a_restarted_bandit_routes_by_the_persisted_outcomes_and_an_absent_arm_falls_back(toy_versions, tmp_path):
    exp = _experiment_file(tmp_path, arms=["stable", "canary", "ghost"])
    store = experiment.Store(experiment.load_config(str(exp)))  # outcomes from before the restart
    rng = np.random.default_rng(1)
    for n, error in enumerate(np.concatenate([rng.normal(0, 1.5, 300), rng.normal(0, 0.5, 300)])):
        arm = "stable" if n < 300 else "canary"
        store.record(f"old-{n}", arm, {"stable": 1, "canary": 2}[arm], [7.0])
        store.feedback([(f"old-{n}", 0, 7.0 + error)])
    store.close()
    flags = ("--model-config-file", str(_models_config(tmp_path, toy_versions)), "--experiment-file", str(exp))
    with running_server(toy_versions, tmp_path / "logs", *flags, available=2) as url:
        answers = [call(url + "/v1/models/babyweight:predict", {"instances": [MEDIUM]}) for _ in range(60)]
    arms = [headers["x-experiment-arm"] for _, headers, _ in answers]
    assert all(status == 200 for status, _, _ in answers)
    # "ghost" is no label of the config: its draws are answered by the incumbent, and recorded as such.
    assert "ghost" not in arms and arms.count("canary") > 0.5 * len(arms)
    assert {headers["x-model-version"] for _, headers, _ in answers if headers["x-experiment-arm"] == "stable"} <= {"1"}


def test_shadow_mode_answers_with_the_incumbent_and_records_the_challenger(toy_versions, tmp_path):
    exp = _experiment_file(tmp_path, policy="shadow")
    flags = ("--model-config-file", str(_models_config(tmp_path, toy_versions)), "--experiment-file", str(exp))
    with running_server(toy_versions, tmp_path / "logs", *flags, available=2, env=WITH_TOKEN) as url:
        answers = [
            call(
                url + "/v1/models/babyweight:predict",
                {"instances": [MEDIUM, dict(MEDIUM, mother_age=25)]},
                {"X-Request-Id": f"s{n}"},
            )
            for n in range(5)
        ]
        call(url + "/v1/models/babyweight:predict", {"instances": [MEDIUM]})  # the shadows run after the answers
        call(
            url + "/v1/models/babyweight:feedback",
            {"feedback": [{"request_id": "s0", "weight_pounds": 9.0}]},
            AUTHORIZED,
        )
    for status, headers, body in answers:
        assert status == 200 and headers["x-model-version"] == "1" and headers["x-experiment-arm"] == "stable"
        assert body["predictions"][0][0] == pytest.approx(toy_model.expected(MEDIUM, 1))
    store = experiment.Store(experiment.load_config(str(exp)))
    shadowed = store.db.execute(
        "SELECT version, prediction FROM predictions WHERE arm = 'canary' AND instance = 1 AND shadow = 1"
    ).fetchall()
    stats = store.stats()
    store.close()
    assert len(shadowed) == 5 and shadowed[0] == (2, pytest.approx(toy_model.expected(dict(MEDIUM, mother_age=25), 2)))
    # One outcome scores both: the incumbent's answer and the challenger's shadow.
    assert stats["stable"].n == stats["canary"].n == 1
    assert stats["canary"].loss_sum == pytest.approx(abs(9.0 - toy_model.expected(MEDIUM, 2)))


def _fed(tmp_path, errors_by_arm, **settings):
    tmp_path.mkdir()
    path = _experiment_file(tmp_path, **settings)
    config = experiment.load_config(str(path))
    store = experiment.Store(config)
    for arm, errors in errors_by_arm.items():
        for n in range(len(errors)):
            store.record(f"{arm}-{n}", arm, {"stable": 1, "canary": 2}[arm], [7.0], when=1000.0 + n)
        store.feedback([(f"{arm}-{n}", 0, 7.0 + error) for n, error in enumerate(errors)])
    store.close()
    return path, config


def test_promotion_moves_stable_to_a_clear_winner_and_refuses_an_unclear_one(tmp_path, toy_versions, capsys):
    rng = np.random.default_rng(0)
    models = _models_config(tmp_path, toy_versions)
    unclear, _ = _fed(tmp_path / "unclear", {"stable": rng.normal(0, 1, 20), "canary": rng.normal(0, 1, 20)})
    assert experiment_cli.main(["promote", "--experiment-file", str(unclear), "--model-config-file", str(models)]) == 1
    assert "no arm is best with probability 0.95 yet" in capsys.readouterr().err
    from serving.core import manager

    def labels():
        return dict(manager.read_model_config(str(models), "babyweight", str(toy_versions)).labels)

    assert labels() == {"stable": 1, "canary": 2}  # refused: unchanged
    models.chmod(0o644)  # readable by a server running as another user: the promotion keeps it so
    clear, config = _fed(tmp_path / "clear", {"stable": rng.normal(0, 1.2, 300), "canary": rng.normal(0, 0.6, 300)})
    assert experiment_cli.main(["promote", "--experiment-file", str(clear), "--model-config-file", str(models)]) == 0
    assert "stable: version 1 -> 2 (arm canary" in capsys.readouterr().out
    assert labels() == {"stable": 2, "canary": 2} and models.stat().st_mode & 0o777 == 0o644
    page = tmp_path / "report.html"
    assert experiment_cli.main(["report", "--experiment-file", str(clear), "--output", str(page)]) == 0
    text = page.read_text()
    assert "<th>P(best)</th>" in text and "<title>Traffic share per arm over time</title>" in text
    assert text.count("<polygon") == 2 and "src=" not in text  # self-contained: nothing to fetch
    result = experiment_cli.report(config)
    low, high = result["arms"]["canary"]["mae_interval"]
    assert low < result["arms"]["canary"]["mae"] < high < result["arms"]["stable"]["mae_interval"][0]


def test_a_seeded_simulation_sends_the_best_version_most_traffic_with_less_regret_than_a_split(real_export_csv):
    """Real rows and outcomes; two real predictors fit on the other half of the rows: the mean weight per week of
    gestation (and plurality), and the overall mean weight (clearly worse)."""
    rows = [
        r
        for r in csv.DictReader(real_export_csv.open())
        if r["weight_pounds"] and r["gestation_weeks"] and r["gestation_weeks"] != "99"
    ]
    fit, replay = rows[::2], rows[1::2]
    groups = {}
    for r in fit:
        groups.setdefault((r["gestation_weeks"], r["plurality"]), []).append(float(r["weight_pounds"]))
    overall = float(np.mean([float(r["weight_pounds"]) for r in fit]))
    by_week = np.array([np.mean(groups.get((r["gestation_weeks"], r["plurality"]), [overall])) for r in replay])
    actual = np.array([float(r["weight_pounds"]) for r in replay])
    predictions = {"by_week": by_week, "mean": np.full(len(actual), overall)}
    arms = ("mean", "by_week")  # the incumbent first
    bandit = experiment_cli.simulate(predictions, actual, ExperimentConfig(arms), 4000, 200, seed=5)
    split = experiment_cli.simulate(
        predictions, actual, ExperimentConfig(arms, "split", split=(0.5, 0.5)), 4000, 200, seed=5
    )
    assert bandit.best_share_last_half >= 0.9
    assert bandit.regret < 0.5 * split.regret
    assert split.best_share_last_half == pytest.approx(0.5, abs=0.05)


def test_the_vertex_command_splits_an_endpoints_traffic_by_the_policy(tmp_path, monkeypatch, capsys):
    """Offline: BigQuery's joined rows and Vertex AI's endpoint are faked, as the Pusher's tests fake them."""
    from google.cloud import aiplatform

    rng = np.random.default_rng(2)
    rows = (
        [
            {"request_id": f"a{n}", "arm": "111", "prediction": 7.0, "actual": 7.0 + e}
            for n, e in enumerate(rng.normal(0, 1.3, 400))
        ]
        + [
            {"request_id": f"b{n}", "arm": "222", "prediction": 7.0, "actual": 7.0 + e}
            for n, e in enumerate(rng.normal(0, 0.8, 400))
        ]
        + [{"request_id": "c", "arm": "222", "prediction": None, "actual": 7.0}]
    )  # no prediction: skipped
    rows += [dict(rows[0])] * 500  # one request logged again and again: counted once
    queries, updates, calls = [], [], {}

    class FakeBigQuery:
        def query(self, sql):
            queries.append(sql)
            return type("Job", (), {"result": lambda self: rows})()

    class FakeEndpoint:
        traffic_split = {"111": 50, "222": 50}

        def list_models(self):
            return [type("DeployedModel", (), {"id": model})() for model in ("111", "222")]

        def update(self, traffic_split):
            updates.append(traffic_split)

    monkeypatch.setattr(aiplatform, "init", lambda **kwargs: calls.update(kwargs))
    monkeypatch.setattr(aiplatform.Endpoint, "list", classmethod(lambda cls, filter: [FakeEndpoint()]))
    config = experiment.load_config(str(_experiment_file(tmp_path)))
    split = experiment_cli.vertex_split(
        config, "p", "us-central1", "babyweight", "p.logs.requests", "p.b.outcomes", bigquery_client=FakeBigQuery()
    )
    assert calls == {"project": "p", "location": "us-central1"}
    assert "FROM `p.logs.requests` AS log" in queries[0] and "JOIN `p.b.outcomes` AS outcome" in queries[0]
    assert updates == [split] and sum(split.values()) == 100 and split["222"] >= 95
    (tmp_path / "fixed").mkdir()
    fixed = experiment.load_config(
        str(_experiment_file(tmp_path / "fixed", arms=["222", "111"], policy="split", split=[0.7, 0.3]))
    )
    assert experiment_cli.vertex_split(
        fixed, "p", "r", "babyweight", "l", "o", dry_run=True, bigquery_client=FakeBigQuery()
    ) == {"222": 70, "111": 30}
    with pytest.raises(ExperimentError, match="no shadow mode"):
        experiment_cli.vertex_split(
            dataclasses.replace(config, policy="shadow"),
            "p",
            "r",
            "babyweight",
            "l",
            "o",
            bigquery_client=FakeBigQuery(),
        )
    assert len(updates) == 1  # a dry run sets nothing
    assert experiment_cli.percentages({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}) == {"a": 34, "b": 33, "c": 33}


def test_the_simulate_command_replays_real_rows_through_served_versions(
    toy_versions, real_export_csv, tmp_path, capsys
):
    rows = tmp_path / "rows.csv"
    rows.write_text("".join(real_export_csv.open().readlines()[:1500]))
    assert (
        experiment_cli.main(
            [
                "simulate",
                "--model-dir",
                str(toy_versions),
                "--versions",
                "1,2",
                "--data",
                str(rows),
                "--requests",
                "3000",
                "--delay",
                "100",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    lines = {line.split("  ")[0].strip(): line.split() for line in printed.splitlines()[2:]}
    assert set(lines) == {"thompson", "split 50%/50%", "always 1"}, printed
    assert float(lines["thompson"][-1]) >= 0.9 and float(lines["always 1"][-1]) == 0.0  # version 2 is nearer
    assert float(lines["thompson"][-2]) < 0.5 * float(lines["split 50%/50%"][-2])


def test_grpc_calls_are_routed_recorded_and_joined_as_rest_requests_are(toy_versions, tmp_path):
    """A split over gRPC: each call answered by its arm's version (x-experiment-arm in the trailing metadata), its
    x-request-id recorded so that feedback joins it, and a reused id refused (ALREADY_EXISTS), as over REST."""
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from tests.serving.conftest import free_port
    from tests.serving.model_server.test_grpc import predict_request

    exp = _experiment_file(tmp_path, policy="split", split=[0.5, 0.5])
    port = free_port()
    flags = ("--model-config-file", str(_models_config(tmp_path, toy_versions)), "--experiment-file", str(exp))
    with running_server(
        toy_versions, tmp_path / "logs", *flags, "--grpc-port", str(port), available=2, env=WITH_TOKEN
    ) as url:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            arms = {}
            for number in range(30):
                response, done = stub.Predict.with_call(
                    predict_request([MEDIUM]), metadata=[("x-request-id", f"g{number}")], timeout=30
                )
                trailing = dict(done.trailing_metadata())
                version = {"stable": 1, "canary": 2}[trailing["x-experiment-arm"]]
                assert response.model_spec.version.value == version
                assert response.outputs["predictions"].float_val[0] == pytest.approx(
                    toy_model.expected(MEDIUM, version)
                )
                arms[trailing["x-experiment-arm"]] = True
            with pytest.raises(grpc.RpcError) as reused:
                stub.Predict(predict_request([MEDIUM]), metadata=[("x-request-id", "g0")], timeout=30)
        status, _, result = call(
            url + "/v1/models/babyweight:feedback",
            {"feedback": [{"request_id": "g1", "weight_pounds": 7.0}]},
            AUTHORIZED,
        )
    assert set(arms) == {"stable", "canary"}
    assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS and "'g0' was used" in reused.value.details()
    assert status == 200 and result["accepted"] == 1
