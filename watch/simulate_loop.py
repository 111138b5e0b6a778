"""`make simulate-loop`: monthly spans through `babyweight watch`, with served traffic and late outcomes drawn from
the real export's rows, and what the loop caught, when.

Everything is the product's own: each month's span lands in the data folder (a _SUCCESS file last) and the
watcher (watch/loop.py) runs the pipeline on it; `babyweight serve` answers the month's requests from four
clients with the newest pushed version, writing its request log and, through a one-arm experiment on `latest`,
recording each answer; the outcomes come back a week late (`--outcome-delay` requests) into the experiment's
feedback store; the watcher checks every `--check-every` requests (200). The months:
- 1 to --clean-months: clean;
- then (a) 10 points more unmarried mothers among the served requests;
- then (b) one client (clinic-b, a quarter of the traffic) sends weight gain in kilograms;
- then (c) the relation between features and weight changes (girls 10% heavier, boys 10% lighter than the rows
  say, about 0.7 lb; --relation-shift) in the outcomes: the served model decays;
- then the span that carries the new relation lands: the watcher retrains on it; the outcomes keep the relation.
It prints a line per month, then the figures; exit 1 if a goal of issue 35 is missed.
"""

import argparse
import collections
import csv
import dataclasses
import json
import logging
import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
from typing import Dict, List, Optional, Tuple

import babyweight_cli

SHARED_EXPORT = pathlib.Path(__file__).resolve().parent.parent.parent / "shared/data/natality/bq_export_31col.csv"
CLIENTS = (("clinic-a", 0.40), ("clinic-b", 0.25), ("clinic-c", 0.20), ("clinic-d", 0.15))
UNIT_BUG_CLIENT = "clinic-b"
POUNDS_PER_KILOGRAM = 2.2046
RATE_SHIFT = 0.10  # more unmarried mothers
# The real export's rows are harder than the bundled ones (eval RMSE 1.13-1.23 lb on 4,000-row spans, against the
# profile's 1.2 bound): the gate here stops a worse model, not every model.
REAL_ROWS_GATE = {"eval_rmse_threshold": "1.4", "eval_mae_threshold": "1.1"}
GOALS = {"false alarms": 0, "rate shift": 5000, "unit bug": 500, "decay": 2000}


@dataclasses.dataclass
class Month:
    number: int
    problem: str  # '', 'rate shift', 'unit bug', 'decay', 'fix'
    new_outcomes: bool  # the month's outcomes follow the new relation
    new_span: bool  # so do the labels of the span that lands at its start


def months(clean: int) -> List[Month]:
    scenario = [Month(m, "", False, False) for m in range(1, clean + 1)]
    return scenario + [
        Month(clean + 1, "rate shift", False, False),
        Month(clean + 2, "unit bug", False, False),
        Month(clean + 3, "decay", True, False),
        Month(clean + 4, "fix", True, True),
    ]


def _shifted_weight(row: Dict[str, str], shift: float) -> str:
    weight = float(row["weight_pounds"])
    return f"{weight * (1 + shift if row['is_male'] == 'false' else 1 - shift):.4f}"


def write_span(
    data_dir: pathlib.Path, month: Month, rows: List[Dict[str, str]], header: List[str], shift: float
) -> None:
    """The month's span, written aside and moved in whole, _SUCCESS last (as an export job would)."""
    staging = data_dir / f".span-{month.number}.tmp"
    staging.mkdir(parents=True)
    with (staging / "natality.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, header)
        writer.writeheader()
        for row in rows:
            writer.writerow(dict(row, weight_pounds=_shifted_weight(row, shift)) if month.new_span else row)
    final = data_dir / f"span-{month.number}"
    os.replace(staging, final)
    (final / "_SUCCESS").touch()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`babyweight serve` on loopback over the pushed models, with the one-arm experiment."""

    def __init__(self, model_dir: pathlib.Path, log_dir: pathlib.Path, experiment_file: pathlib.Path):
        import urllib3

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = urllib3.PoolManager(maxsize=1, retries=False, timeout=30)
        command = [sys.executable, "-m", "babyweight_cli", "serve", "--model-dir", str(model_dir)]
        command += ["--port", str(self.port), "--grpc-port", "0", "--workers", "1", "--poll-seconds", "0.5"]
        command += ["--log-dir", str(log_dir), "--experiment-file", str(experiment_file)]
        self.output = (log_dir.parent / "server.log").open("w")
        self.process = subprocess.Popen(command, stdout=self.output, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, version: int, seconds: float = 180.0) -> None:
        """Until the server answers with `version` (the newest pushed)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited; see {self.output.name}")
            try:
                response = self.http.request("GET", f"{self.url}/v1/models/babyweight")
                states = json.loads(response.data).get("model_version_status", [])
                if any(s["version"] == str(version) and s["state"] == "AVAILABLE" for s in states):
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        raise RuntimeError(f"version {version} was not served within {seconds:.0f} s; see {self.output.name}")

    def predict(self, instance: Dict, client: str, request_id: str) -> Tuple[float, str]:
        response = self.http.request(
            "POST",
            f"{self.url}/v1/models/babyweight:predict",
            body=json.dumps({"instances": [instance]}),
            headers={"Content-Type": "application/json", "X-Client-Id": client, "X-Request-Id": request_id},
        )
        if response.status != 200:
            raise RuntimeError(f"request {request_id}: {response.status} {response.data[:300]!r}")
        prediction = json.loads(response.data)["predictions"][0]  # [weight]: the signature's one output
        return float(prediction[0] if isinstance(prediction, list) else prediction), response.headers.get(
            "x-model-version", ""
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.output.close()


@dataclasses.dataclass
class Tally:
    """What the watcher said, counted against what was done."""

    false_alarms: List[str] = dataclasses.field(default_factory=list)
    flagged: Dict[str, Optional[int]] = dataclasses.field(default_factory=dict)  # problem -> requests (outcomes)
    unit_bug_all_requests: Optional[int] = None
    runs_in_first_pass: int = 0
    spans: int = 0
    rmse: Dict[str, float] = dataclasses.field(default_factory=dict)
    retrained: str = ""
    decay_resolved: bool = False


def _expected(event: Dict, problem: str) -> bool:
    """Whether an alert is the one the month's problem should raise."""
    if problem == "rate shift":
        return event["kind"] in ("skew", "drift") and event.get("feature") == "mother_married"
    if problem == "unit bug":
        return event["kind"] in ("skew", "drift") and event.get("feature") == "weight_gain_pounds"
    return problem in ("decay", "fix") and event["kind"] == "decay"


def simulate(args: argparse.Namespace) -> Tally:
    from pipeline import config as config_lib
    from serving.core import contract
    from serving.experiments import experiment
    from watch.loop import Sources, Watcher

    rng = random.Random(args.seed)
    with args.rows.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        rows = [row for row in reader if row.get("weight_pounds") and _answerable(contract, row)]
    work = args.work_dir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    data_dir, output_dir = work / "data", work / "out"
    data_dir.mkdir(parents=True)
    overrides = {"data_dir": str(data_dir), "output_dir": str(output_dir), "input_pattern": "span-{SPAN}/*.csv"}
    overrides.update(REAL_ROWS_GATE)
    overrides.update(config_lib.parse_overrides(args.set))
    config = config_lib.load_config(args.profile, overrides)
    experiment_file = work / "experiment.yaml"
    experiment_file.write_text(
        json.dumps({"arms": [experiment.LATEST], "policy": "split", "split": [1.0], "state": "experiment.sqlite"})
    )
    feedback = experiment.Store(experiment.load_config(str(experiment_file)))
    log_dir = output_dir / "serving_logs"
    watcher = Watcher(config, Sources(log_dir, work / "experiment.sqlite"), [f"{k}={v}" for k, v in overrides.items()])
    tally, server, now, served_version = Tally(), None, time.time(), None
    married = [row for row in rows if row["mother_married"] == "true"]
    unmarried = [row for row in rows if row["mother_married"] == "false"]
    unmarried_share = len(unmarried) / (len(married) + len(unmarried))
    try:
        for month in months(args.clean_months):
            write_span(data_dir, month, [rng.choice(rows) for _ in range(args.span_rows)], header, args.relation_shift)
            watcher.run_pass(now, check=False)
            tally.spans += 1
            tally.runs_in_first_pass += watcher.runs.child is not None
            while watcher.runs.busy(time.time()):
                time.sleep(1.0)
                watcher.run_pass(now, check=False)
            version = max((int(p.name) for p in pathlib.Path(config.serving_dir).glob("[0-9]*")), default=None)
            if version is None:
                raise RuntimeError(f"span {month.number}'s run pushed no model: see {config.log_path}")
            if server is None:
                server = Server(pathlib.Path(config.serving_dir), log_dir, experiment_file)
            server.wait_for(version)
            if month.problem == "fix" and version != served_version:
                tally.retrained = f"span {month.number} -> version {version}"
            served_version = version
            pending: collections.deque = collections.deque()
            squares: List[float] = []
            bug_requests = 0  # the month's requests from the client with the unit bug
            for number in range(1, args.requests + 1):
                client = rng.choices([c for c, _ in CLIENTS], [s for _, s in CLIENTS])[0]
                if month.problem == "rate shift":
                    row = rng.choice(unmarried if rng.random() < unmarried_share + RATE_SHIFT else married)
                else:
                    row = rng.choice(rows)
                instance = contract.to_instance(row)
                if month.problem == "unit bug" and client == UNIT_BUG_CLIENT and "weight_gain_pounds" in instance:
                    instance["weight_gain_pounds"] = round(instance["weight_gain_pounds"] / POUNDS_PER_KILOGRAM)
                request_id = uuid.uuid4().hex
                prediction, _ = server.predict(instance, client, request_id)
                weight = _shifted_weight(row, args.relation_shift) if month.new_outcomes else row["weight_pounds"]
                actual = float(weight)
                pending.append((request_id, actual))
                squares.append((prediction - actual) ** 2)
                if len(pending) > args.outcome_delay:
                    feedback.feedback([(pending[0][0], 0, pending.popleft()[1])])
                bug_requests += month.problem == "unit bug" and client == UNIT_BUG_CLIENT
                if number % args.check_every == 0:
                    now += 3600.0
                    joined = max(0, number - args.outcome_delay)  # the month's outcomes sent back so far
                    _tally(tally, watcher.run_pass(now, check=True), month, number, joined, bug_requests, args)
            time.sleep(1.0)  # the server records its last answers on its writer thread
            feedback.feedback([(request_id, 0, actual) for request_id, actual in pending])
            now += 3600.0
            _tally(tally, watcher.run_pass(now, check=True), month, args.requests, args.requests, bug_requests, args)
            rmse = (sum(squares) / len(squares)) ** 0.5
            tally.rmse[month.problem or "clean"] = rmse
            print(f"month {month.number:>2} {month.problem or 'clean':<10} version {version}: live RMSE {rmse:.3f} lb")
    finally:
        feedback.close()
        watcher.close()
        if server is not None:
            server.stop()
    return tally


def _answerable(contract, row: Dict[str, str]) -> bool:
    try:
        contract.to_instance(row)
        return True
    except ValueError:
        return False


def _tally(
    tally: Tally,
    events: List[Dict],
    month: Month,
    served: int,
    outcomes: int,
    bug_requests: int,
    args: argparse.Namespace,
) -> None:
    """Each opened alert: a false alarm unless a problem of this month or an earlier one explains it, else how soon
    the month's problem was flagged."""
    started = [m.problem for m in months(args.clean_months) if m.problem and m.number <= month.number]
    for event in events:
        if event["state"] != "open":
            if event["kind"] == "decay" and month.problem == "fix":
                tally.decay_resolved = True
            continue
        if not any(_expected(event, problem) for problem in started):
            tally.false_alarms.append(f"month {month.number} ({month.problem or 'clean'}): {event['message']}")
        elif _expected(event, month.problem) and tally.flagged.get(month.problem) is None:
            if month.problem == "decay":
                tally.flagged["decay"] = outcomes
            elif month.problem == "unit bug":
                tally.flagged["unit bug"] = bug_requests
                tally.unit_bug_all_requests = served
            else:
                tally.flagged[month.problem] = served


def report(tally: Tally) -> Tuple[List[str], bool]:
    """The figures, a line each, and whether every goal was met."""
    flagged = {problem: tally.flagged.get(problem) for problem in ("rate shift", "unit bug", "decay")}
    met = (
        len(tally.false_alarms) == GOALS["false alarms"]
        and all(flagged[p] is not None and flagged[p] <= GOALS[p] for p in flagged)
        and bool(tally.retrained)
        and tally.runs_in_first_pass == tally.spans
        and tally.rmse.get("fix", 99) <= tally.rmse.get("clean", 0) + 0.1
    )
    lines = [f"false alarms: {len(tally.false_alarms)}"] + [f"  {alarm}" for alarm in tally.false_alarms]
    # (any alert no problem introduced so far explains, in the clean months or after)
    lines += [
        f"rate shift (10 points more unmarried mothers) flagged after: {_shown(flagged['rate shift'])} requests",
        f"unit bug (clinic-b in kilograms) flagged after: {_shown(flagged['unit bug'])} of its requests "
        f"({_shown(tally.unit_bug_all_requests)} from all clients)",
        f"decay (relation changed) flagged after: {_shown(flagged['decay'])} outcomes",
        f"retrain followed: {tally.retrained or 'no'}; decay alert resolved: {'yes' if tally.decay_resolved else 'no'}",
        "live RMSE: "
        + ", ".join(f"{name} {tally.rmse[name]:.3f}" for name in ("clean", "decay", "fix") if name in tally.rmse)
        + " lb (clean: the last clean month; decay: the month of the change; fix: after the retrain)",
        f"new span's run started in the first pass after it landed: {tally.runs_in_first_pass} of {tally.spans}",
        f"goals: {'met' if met else 'NOT met'}",
    ]
    return lines, met


def _shown(value: Optional[int]) -> str:
    return "never" if value is None else f"{value:,}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="simulate-loop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=pathlib.Path, default=SHARED_EXPORT, help="the real export (31 columns)")
    parser.add_argument("--work-dir", type=pathlib.Path, default=pathlib.Path("outputs/simulate-loop"))
    parser.add_argument("--clean-months", type=int, default=12)
    parser.add_argument("--span-rows", type=int, default=4000)
    parser.add_argument("--requests", type=int, default=5000, help="served a month")
    parser.add_argument("--check-every", type=int, default=200, help="requests between the watcher's checks")
    parser.add_argument("--outcome-delay", type=int, default=1000, help="requests before an outcome comes back")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--relation-shift", type=float, default=0.10, help="girls this much heavier, boys lighter (a share)"
    )
    parser.add_argument("--profile", default="local")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a pipeline setting")
    args = parser.parse_args(argv)
    if not args.rows.is_file():
        print(f"error: no real export at {args.rows} (--rows FILE: the natality table's 31 columns)", file=sys.stderr)
        return 2
    babyweight_cli.install_quiet_tensorflow()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # the watcher's alerts, as they open
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # TFMA's deprecation notices, each time runs are read
    lines, met = report(simulate(args))
    print("\n".join(lines))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
