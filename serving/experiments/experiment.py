"""Experiments between versions: a fixed split (A/B), a shadow copy, or a multi-armed bandit fed by the outcome.

An experiment file (YAML; `babyweight serve --experiment-file FILE`) names the arms and the policy:

    arms: [stable, canary]          # labels of --model-config-file, version numbers, or latest (the newest)
    policy: thompson                # split | thompson | epsilon_greedy | shadow
    split: [0.9, 0.1]               # split: each arm's share; a request's X-Routing-Key always gets the same arm
                                    # (one arm, split: [1.0]: every answer recorded, for outcomes without a test;
                                    # arms: [latest] follows each new version, for babyweight watch's decay check)
    epsilon: 0.1                    # epsilon_greedy: the share of requests sent to a random arm
    reward: absolute                # the loss of an answer once its outcome is known: absolute or squared error
    state: outputs/experiment.sqlite
    promote_level: 0.95             # `babyweight experiment promote`: the probability of being best it needs

Requests without a version or label in their URL are routed by the policy; each answer says its arm and version
(X-Experiment-Arm, X-Model-Version). shadow: the first arm answers, the second is asked the same instances and
only its prediction is recorded. Every routed instance is recorded in the state file (SQLite): request id,
instance, arm, version, prediction. Feedback (POST /v1/models/NAME:feedback, or `babyweight experiment feedback
FILE` for a batch) joins the actual weight with the recorded predictions, once per request, instance and arm;
the policy's statistics are running sums over those joins (a row per arm, added to as outcomes join), so they survive
a restart and every worker process reads the same, refreshed each `REFRESH_SECONDS` (at once in the process that took
the feedback). In the server, every read and write of the state file runs on one writer thread, never on the event
loop: a locked or failing file costs the experiment its record (logged and counted), never a client its answer.
"""

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import logging
import math
import pathlib
import random
import sqlite3
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import yaml

from serving.core import contract, schema

POLICIES = ("split", "thompson", "epsilon_greedy", "shadow")
REWARDS = ("absolute", "squared")
REFRESH_SECONDS = 1.0
ROUTING_HEADER = "x-routing-key"
PRIOR_WEIGHT = 1.0  # pseudo-observations at the pooled loss an arm's posterior starts from
MAX_LOSS = 1e6  # beyond any loss of a sensible prediction: larger losses count as this much in the sums
MAX_REQUEST_ID = 128  # characters: a client's X-Request-Id, and an outcome's request_id
MAX_INSTANCE = 2**31 - 1  # an outcome's instance number: beyond any request's (and within SQLite's integers)
MAX_PENDING_WRITES = 1000  # the server's records waiting for the writer thread; beyond, a record is dropped (counted)
SERVER_LOCK_SECONDS = 2.0  # how long the server's writer waits for another process's lock on the state file
RECORD_WAIT_SECONDS = 0.25  # how long an answer waits for its record (to refuse a reused id); then it goes anyway


class ExperimentError(ValueError):
    """A bad experiment file or feedback; the message names the field, file or row."""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """The experiment file's settings (see the module's docstring)."""

    arms: Tuple[str, ...]
    policy: str = "thompson"
    split: Tuple[float, ...] = ()
    epsilon: float = 0.1
    reward: str = "absolute"
    state: str = "outputs/experiment.sqlite"
    promote_level: float = 0.95

    def loss(self, error: float) -> float:
        """An answer's loss from its error (actual - prediction), by the `reward` setting."""
        return abs(error) if self.reward == "absolute" else error * error


LATEST = "latest"  # an arm that follows the newest available version, as a request naming no version does


def arm_target(arm: str) -> Tuple[Optional[int], Optional[str]]:
    """(version, label) to resolve for an arm: a number names a version, `latest` the newest, anything else a
    label."""
    if arm == LATEST:
        return None, None
    return (int(arm), None) if arm.isdigit() else (None, arm)


def load_config(path: str) -> ExperimentConfig:
    """The experiment file's settings, checked; relative `state` paths are relative to the file."""
    where = f"experiment file {path}"
    try:
        values = yaml.safe_load(pathlib.Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ExperimentError(f"{where}: {error}") from None
    if not isinstance(values, dict):
        raise ExperimentError(f"{where}: expected settings (arms: [...], policy: ...), got {values!r}")
    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ExperimentError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        values.update(
            arms=tuple(str(arm) for arm in values.get("arms") or ()),
            split=tuple(float(share) for share in values.get("split") or ()),
            **{name: float(values[name]) for name in ("epsilon", "promote_level") if name in values},
        )
    except (TypeError, ValueError) as error:
        raise ExperimentError(f"{where}: split, epsilon and promote_level take numbers: {error}") from None
    config = ExperimentConfig(**values)
    arms = config.arms
    if config.policy not in POLICIES:
        raise ExperimentError(f"{where}: policy {config.policy!r} is not one of {', '.join(POLICIES)}")
    # A split of one arm chooses nothing: it records every answer, so that outcomes join what each version answered
    # without an A/B test. The other policies compare arms.
    if config.policy == "split":
        fewest, needs = 1, "one or more different labels or versions"
    else:
        shadow = config.policy == "shadow"
        compares = "shadow asks a challenger beside the incumbent" if shadow else "a bandit chooses between arms"
        fewest = 2
        needs = (
            f"two or more different labels or versions for policy {config.policy} ({compares}; "
            "one arm takes policy split, split: [1.0])"
        )
    if len(arms) < fewest or len(set(arms)) != len(arms):
        raise ExperimentError(f"{where}: 'arms' needs {needs}, not {list(arms)}")
    if config.reward not in REWARDS:
        raise ExperimentError(f"{where}: reward {config.reward!r} is not one of {', '.join(REWARDS)}")
    if config.policy == "split" and (
        len(config.split) != len(arms) or min(config.split) < 0 or not math.isclose(sum(config.split), 1.0)
    ):
        raise ExperimentError(f"{where}: 'split' needs one share per arm, adding up to 1, not {list(config.split)}")
    if config.policy == "shadow" and len(arms) != 2:
        raise ExperimentError(f"{where}: shadow takes two arms, the incumbent and the challenger")
    if not 0 <= config.epsilon <= 1 or not 0 < config.promote_level < 1:
        raise ExperimentError(f"{where}: epsilon must be in [0, 1] and promote_level in (0, 1)")
    state = pathlib.Path(config.state)
    if not state.is_absolute():
        state = pathlib.Path(path).resolve().parent / state
    return dataclasses.replace(config, state=str(state))


@dataclasses.dataclass(frozen=True)
class ArmStats:
    """Sums over one arm's joined outcomes: enough for its mean loss and the spread of that mean."""

    n: int = 0
    loss_sum: float = 0.0
    loss_squares: float = 0.0

    @property
    def mean(self) -> float:
        return self.loss_sum / self.n if self.n else math.nan

    def add(self, loss: float) -> "ArmStats":
        """These sums with one more outcome's loss."""
        return ArmStats(self.n + 1, self.loss_sum + loss, self.loss_squares + loss * loss)


def _posterior(stats: Mapping[str, ArmStats]) -> Dict[str, Tuple[float, float]]:
    """Each arm's mean loss as a normal belief (mean, sd): its data shrunk towards the pooled loss.

    An arm without outcomes gets the pooled mean and the pooled spread, so it is tried; with n outcomes the
    belief narrows as 1/sqrt(n + PRIOR_WEIGHT).
    """
    n = sum(s.n for s in stats.values())
    pooled_mean = sum(s.loss_sum for s in stats.values()) / n if n else 0.0
    pooled_var = (sum(s.loss_squares for s in stats.values()) / n - pooled_mean * pooled_mean) if n > 1 else 1.0
    if not (math.isfinite(pooled_mean) and math.isfinite(pooled_var)):  # sums beyond floats (Store.stats bounds them)
        pooled_mean, pooled_var = 0.0, 1.0
    pooled_var = max(pooled_var, 1e-6)
    beliefs = {}
    for arm, s in stats.items():
        weight = s.n + PRIOR_WEIGHT
        mean = (s.loss_sum + PRIOR_WEIGHT * pooled_mean) / weight
        var = ((s.loss_squares - s.loss_sum * s.loss_sum / s.n) / (s.n - 1)) if s.n > 1 else pooled_var
        if not (math.isfinite(mean) and math.isfinite(var)):
            mean, var = pooled_mean, pooled_var
        beliefs[arm] = (mean, math.sqrt(max(var, 1e-6) / weight))
    return beliefs


def probability_best(stats: Mapping[str, ArmStats], draws: int = 20_000, seed: int = 0) -> Dict[str, float]:
    """The probability that each arm has the lowest mean loss, under the beliefs Thompson sampling draws from."""
    beliefs = _posterior(stats)
    arms = list(beliefs)
    rng = np.random.default_rng(seed)
    samples = np.stack([rng.normal(*beliefs[arm], size=draws) for arm in arms])
    wins = np.bincount(samples.argmin(axis=0), minlength=len(arms))
    return {arm: float(wins[i]) / draws for i, arm in enumerate(arms)}


class Policy:
    """Chooses an arm per request: the one place the server, the simulation and Vertex's split share."""

    def __init__(self, config: ExperimentConfig, seed: Optional[int] = None):
        self.config = config
        self.rng = random.Random(seed)

    def choose(self, stats: Mapping[str, ArmStats], routing_key: Optional[str] = None) -> str:
        arms, config = self.config.arms, self.config
        if config.policy == "shadow":
            return arms[0]
        if config.policy == "split":
            # A routing key hashes to the same point of [0, 1) every time: the same arm for the same patient. The
            # arms salt it, so the same patients aren't the first share of every experiment.
            salted = "|".join(arms) + "|" + (routing_key or "")
            point = (
                int.from_bytes(hashlib.sha256(salted.encode()).digest()[:8], "big") / 2**64
                if routing_key
                else self.rng.random()
            )
            total = 0.0
            for arm, share in zip(arms, config.split):
                total += share
                if point < total:
                    return arm
            return arms[-1]
        if config.policy == "epsilon_greedy":
            # Arms without outcomes are explored at the epsilon rate like the others (outcomes arrive days
            # late: preferring them would send them everything meanwhile); with none scored, the incumbent.
            tried = [arm for arm in arms if stats.get(arm, ArmStats()).n]
            if self.rng.random() < config.epsilon:
                return self.rng.choice(arms)
            return min(tried, key=lambda arm: stats[arm].mean) if tried else arms[0]
        beliefs = _posterior({arm: stats.get(arm, ArmStats()) for arm in arms})
        return min(arms, key=lambda arm: self.rng.gauss(*beliefs[arm]))

    def shares(self, stats: Mapping[str, ArmStats], draws: int = 10_000) -> Dict[str, float]:
        """The share of traffic the policy would send each arm now (Vertex's traffic_split)."""
        if self.config.policy == "split":
            return dict(zip(self.config.arms, self.config.split))
        if self.config.policy == "shadow":
            return {arm: float(index == 0) for index, arm in enumerate(self.config.arms)}
        counts = {arm: 0 for arm in self.config.arms}
        for _ in range(draws):
            counts[self.choose(stats)] += 1
        return {arm: count / draws for arm, count in counts.items()}


@dataclasses.dataclass
class FeedbackResult:
    """What a batch of outcomes did: joined, or named as unknown or a duplicate."""

    accepted: int = 0
    unknown: List[str] = dataclasses.field(default_factory=list)
    duplicate: List[str] = dataclasses.field(default_factory=list)

    def as_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    request_id TEXT NOT NULL, instance INTEGER NOT NULL, arm TEXT NOT NULL, version INTEGER NOT NULL,
    prediction REAL NOT NULL, shadow INTEGER NOT NULL, time REAL NOT NULL,
    PRIMARY KEY (request_id, instance, arm));
CREATE TABLE IF NOT EXISTS outcomes (
    request_id TEXT NOT NULL, instance INTEGER NOT NULL, arm TEXT NOT NULL, actual REAL NOT NULL,
    error REAL NOT NULL, loss REAL NOT NULL, time REAL NOT NULL,
    PRIMARY KEY (request_id, instance, arm));
CREATE TABLE IF NOT EXISTS arm_totals (
    arm TEXT PRIMARY KEY, n INTEGER NOT NULL, loss_sum REAL NOT NULL, loss_squares REAL NOT NULL);
"""


class Store:
    """The experiment's state in SQLite (WAL: several server processes write, the commands read)."""

    def __init__(self, config: ExperimentConfig, lock_seconds: float = 30.0):
        self.config = config
        pathlib.Path(config.state).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(config.state, timeout=lock_seconds, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._add_up_earlier_outcomes()

    def _add_up_earlier_outcomes(self) -> None:
        """The running sums of a state file written before they were kept: added up once from its outcomes."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if self.db.execute("SELECT 1 FROM arm_totals LIMIT 1").fetchone() is None:
                self.db.execute(
                    "INSERT INTO arm_totals SELECT arm, COUNT(*), SUM(MIN(loss, ?1)), "
                    "SUM(MIN(loss, ?1) * MIN(loss, ?1)) FROM outcomes GROUP BY arm",
                    (MAX_LOSS,),
                )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()

    def record(
        self,
        request_id: str,
        arm: str,
        version: int,
        predictions: Sequence[float],
        shadow: bool = False,
        when: Optional[float] = None,
    ) -> bool:
        """One routed (or shadowed) request's predictions, one row per instance, in one transaction; False (and
        nothing written) if the request id was recorded already (a client's retry keeps its first answer)."""
        when = time.time() if when is None else when
        self.db.execute("BEGIN IMMEDIATE")
        try:
            seen = self.db.execute(
                "SELECT 1 FROM predictions WHERE request_id = ? AND shadow = ? LIMIT 1", (request_id, int(shadow))
            ).fetchone()
            if not seen:
                self.db.executemany(
                    "INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (request_id, index, arm, version, float(p), int(shadow), when)
                        for index, p in enumerate(predictions)
                    ],
                )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return not seen

    def feedback(self, items: Iterable[Tuple[str, int, float]], when: Optional[float] = None) -> FeedbackResult:
        """Joins (request id, instance, actual weight) with the recorded predictions; each once."""
        when = time.time() if when is None else when
        result = FeedbackResult()
        added: Dict[str, ArmStats] = {}
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for request_id, instance, actual in items:
                name = f"{request_id}" + (f"#{instance}" if instance else "")
                rows = self.db.execute(
                    "SELECT arm, prediction FROM predictions WHERE request_id = ? AND instance = ?",
                    (request_id, instance),
                ).fetchall()
                if not rows:
                    result.unknown.append(name)
                    continue
                inserted = 0
                for arm, prediction in rows:
                    error = actual - prediction
                    loss = self.config.loss(error)
                    joined = self.db.execute(
                        "INSERT OR IGNORE INTO outcomes VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (request_id, instance, arm, actual, error, loss, when),
                    ).rowcount
                    if joined:
                        # Capped (an arm answering nonsense still scores as the worst), so that no prediction or
                        # outcome can make the sums overflow.
                        added[arm] = added.get(arm, ArmStats()).add(min(loss, MAX_LOSS))
                    inserted += joined
                if inserted:
                    result.accepted += 1
                else:
                    result.duplicate.append(name)
            self.db.executemany(
                "INSERT INTO arm_totals VALUES (?, ?, ?, ?) ON CONFLICT (arm) DO UPDATE SET n = n + excluded.n, "
                "loss_sum = loss_sum + excluded.loss_sum, loss_squares = loss_squares + excluded.loss_squares",
                [(arm, s.n, s.loss_sum, s.loss_squares) for arm, s in added.items()],
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return result

    def stats(self) -> Dict[str, ArmStats]:
        """Each arm's sums over its joined outcomes (arms without any: zero): a row per arm, whatever the outcomes."""
        found = {
            arm: ArmStats(n, total, squares)
            for arm, n, total, squares in self.db.execute("SELECT arm, n, loss_sum, loss_squares FROM arm_totals")
        }
        return {arm: found.get(arm, ArmStats()) for arm in self.config.arms}

    def errors(self) -> Dict[str, np.ndarray]:
        """Each arm's errors (actual - prediction) of the joined outcomes."""
        result = {arm: [] for arm in self.config.arms}
        for arm, error in self.db.execute("SELECT arm, error FROM outcomes"):
            result.setdefault(arm, []).append(error)
        return {arm: np.array(values) for arm, values in result.items()}

    def routed(self) -> List[Tuple[float, str, int]]:
        """(time, arm, version) of each answered (not shadow) request, in time order."""
        return self.db.execute(
            "SELECT time, arm, version FROM predictions WHERE shadow = 0 AND instance = 0 ORDER BY time"
        ).fetchall()

    def versions(self) -> Dict[str, List[int]]:
        """The versions each arm answered with (a label's version can change during an experiment)."""
        found: Dict[str, List[int]] = {}
        for arm, version in self.db.execute(
            "SELECT arm, version FROM predictions GROUP BY arm, version ORDER BY MIN(time)"
        ):
            found.setdefault(arm, []).append(version)
        return found


class Experiment:
    """The server's side: routes requests on the event loop from the statistics it holds; records them, takes
    feedback and refreshes the statistics on its writer thread (at most MAX_PENDING_WRITES waiting)."""

    def __init__(self, config: ExperimentConfig, on_error: Callable[[str], None] = lambda reason: None):
        self.config = config
        self.policy = Policy(config)
        self._on_error = on_error  # (reason): a record or refresh that failed or was dropped, for the metrics
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="experiment-writer")
        self.store = self._writer.submit(Store, config, SERVER_LOCK_SECONDS).result()
        self._stats = self._writer.submit(self.store.stats).result()
        self._refreshed = time.monotonic()
        self._refreshing = False
        self._pending = 0

    def route(self, routing_key: Optional[str]) -> Tuple[str, Optional[str]]:
        """(the arm that answers, the arm that shadows it or None), from the statistics held: never waits."""
        if not self._refreshing and time.monotonic() - self._refreshed > REFRESH_SECONDS:  # other workers' feedback
            self._refreshing = True
            self._writer.submit(self._refresh)
        arm = self.policy.choose(self._stats, routing_key)
        return arm, (self.config.arms[1] if self.config.policy == "shadow" else None)

    def _refresh(self) -> None:
        """On the writer thread: the statistics read again (the event loop swaps in the new dict whole)."""
        try:
            self._stats = self.store.stats()
        except Exception:
            logging.exception("experiment: the statistics could not be read from %s", self.config.state)
            self._on_error("refresh")
        finally:
            self._refreshed, self._refreshing = time.monotonic(), False

    def record(
        self, request_id: str, arm: str, version: int, predictions: Sequence[float], shadow: bool = False
    ) -> "asyncio.Future[Optional[bool]]":
        """Store.record on the writer thread, as a future of: True, False (the id was recorded already) or None (not
        recorded: the writer too far behind, or the state file failed; logged and counted). Called on the loop."""
        loop = asyncio.get_running_loop()
        if self._pending >= MAX_PENDING_WRITES:
            self._on_error("queue_full")
            dropped = loop.create_future()
            dropped.set_result(None)
            return dropped
        self._pending += 1
        future = asyncio.wrap_future(
            self._writer.submit(self._record, request_id, arm, version, predictions, shadow), loop=loop
        )
        future.add_done_callback(self._written)
        return future

    def _written(self, _: Any) -> None:
        self._pending -= 1

    def _record(
        self, request_id: str, arm: str, version: int, predictions: Sequence[float], shadow: bool
    ) -> Optional[bool]:
        try:
            recorded = self.store.record(request_id, arm, version, predictions, shadow)
        except Exception:
            logging.exception("experiment: request %s was not recorded in %s", request_id, self.config.state)
            self._on_error("record")
            return None
        if not recorded:
            logging.warning("experiment: request id %s was recorded already; this answer was not", request_id)
        return recorded

    async def feedback(self, items: Iterable[Tuple[str, int, float]]) -> FeedbackResult:
        """Joins outcomes on the writer thread, then reads the statistics again at once."""

        def join() -> FeedbackResult:
            result = self.store.feedback(items)
            self._refresh()
            return result

        return await asyncio.get_running_loop().run_in_executor(self._writer, join)

    def close(self) -> None:
        """Writes what is queued, then closes the state file."""
        self._writer.submit(self.store.close)
        self._writer.shutdown(wait=True)


def parse_feedback(payload: Any, where: str = "the body") -> List[Tuple[str, int, float]]:
    """Feedback items from {"feedback": [{"request_id", "weight_pounds"[, "instance"]}, ...]} or one such object."""
    items = payload.get("feedback", [payload]) if isinstance(payload, dict) else payload
    if not isinstance(items, list) or not items:
        raise ExperimentError(f'{where}: expected {{"feedback": [{{"request_id": ..., "weight_pounds": ...}}]}}')
    parsed = []
    for number, item in enumerate(items):
        try:
            if item["request_id"] in (None, ""):
                raise ValueError("no request_id")
            if isinstance(item["weight_pounds"], bool):
                raise ValueError("a weight is no truth value")
            request_id, actual = str(item["request_id"]), float(item["weight_pounds"])
            instance = float(item.get("instance") or 0)
            if not instance.is_integer() or not 0 <= instance <= MAX_INSTANCE:
                raise ValueError("instance")
            instance = int(instance)
        except (TypeError, KeyError, ValueError):
            raise ExperimentError(
                f"{where}, item {number}: needs request_id and a numeric weight_pounds "
                f"(and optionally instance, a whole number), got {contract.shown(item)}"
            ) from None
        if not math.isfinite(actual):
            raise ExperimentError(f"{where}, item {number}: weight_pounds {actual} is not a number")
        low, high = schema.label_domain()
        if not low <= actual <= high:
            raise ExperimentError(
                f"{where}, item {number}: weight_pounds {actual:g} is outside the label's domain "
                f"[{low:g}, {high:g}] (schema/schema.pbtxt)"
            )
        if len(request_id) > MAX_REQUEST_ID:
            raise ExperimentError(f"{where}, item {number}: request_id is longer than {MAX_REQUEST_ID} characters")
        parsed.append((request_id, instance, actual))
    return parsed
