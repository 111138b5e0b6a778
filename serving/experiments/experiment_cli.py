"""`babyweight experiment ...`: feed outcomes, read the report, promote the winner, simulate a policy.

    babyweight experiment feedback --experiment-file exp.yaml outcomes.csv   # request_id,weight_pounds[,instance]
    babyweight experiment report --experiment-file exp.yaml --output report.html
    babyweight experiment promote --experiment-file exp.yaml --model-config-file models.config
    babyweight experiment simulate --model-dir outputs/serving_model --versions 2,1 --data natality.csv
    babyweight experiment vertex --experiment-file exp.yaml --project P --region R --endpoint babyweight \
        --log-table P.babyweight_serving.request_response_logging --outcomes-table P.babyweight.outcomes
"""

import argparse
import csv
import dataclasses
import html
import io
import json
import math
import os
import pathlib
import sys
import tempfile
from collections import deque
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from serving.experiments import experiment
from serving.experiments.experiment import ArmStats, ExperimentConfig, ExperimentError, Policy


def read_feedback_file(path: pathlib.Path) -> List[tuple]:
    """Outcomes from a CSV file (header request_id,weight_pounds[,instance]) or JSON lines of such objects."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ExperimentError(f"{path}: {error}") from None
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        items = []
        for row in reader:
            items += experiment.parse_feedback(
                [{k: v for k, v in row.items() if v not in ("", None)}], f"{path}, line {reader.line_num}"
            )
        return items
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                payload = json.loads(line)
            except ValueError as error:
                raise ExperimentError(f"{path}, line {number}: not JSON: {error}") from None
            items += experiment.parse_feedback([payload], f"{path}, line {number}")
    return items


def _interval(
    values: np.ndarray, statistic: Callable[[np.ndarray], float], seed: int = 0, resamples: int = 2000
) -> List[float]:
    """A 95% bootstrap interval of a statistic of the errors."""
    if len(values) < 2:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    draws = [statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(resamples)]
    return [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]


def report(config: ExperimentConfig, bins: int = 20) -> Dict[str, Any]:
    """Per arm: requests, outcomes, MAE and RMSE with 95% intervals, probability of being best; traffic over time."""
    store = experiment.Store(config)
    try:
        stats, errors, routed, versions = store.stats(), store.errors(), store.routed(), store.versions()
    finally:
        store.close()
    best = experiment.probability_best(stats)
    arms = {}
    for arm in config.arms:
        e = errors.get(arm, np.array([]))
        arms[arm] = {
            "versions": versions.get(arm, []),
            "requests": sum(1 for _, a, _ in routed if a == arm),
            "outcomes": int(len(e)),
            "mae": float(np.abs(e).mean()) if len(e) else math.nan,
            "mae_interval": _interval(e, lambda x: np.abs(x).mean()),
            "rmse": float(np.sqrt((e**2).mean())) if len(e) else math.nan,
            "rmse_interval": _interval(e, lambda x: np.sqrt((x**2).mean())),
            "probability_best": best[arm],
        }
    shares: List[Dict[str, Any]] = []
    if routed:
        edges = np.linspace(routed[0][0], np.nextafter(routed[-1][0], math.inf), bins + 1)  # the last one inside
        times = np.array([t for t, _, _ in routed])
        chosen = np.array([a for _, a, _ in routed])
        for low, high in zip(edges, edges[1:]):
            inside = (times >= low) & (times < high)
            if inside.any():
                shares.append(
                    {"time": float(low), **{arm: float((chosen[inside] == arm).mean()) for arm in config.arms}}
                )
    return {
        "policy": config.policy,
        "reward": config.reward,
        "arms": arms,
        "traffic": shares,
        "stats": {arm: dataclasses.asdict(s) for arm, s in stats.items()},
    }


COLOURS = ("#4878d0", "#ee854a", "#6acc64", "#d65f5f", "#956cb4")


def traffic_svg(result: Dict[str, Any], width: int = 640, height: int = 200) -> str:
    """The traffic share per arm over time as a stacked-area inline SVG (no library, no network to view it)."""
    traffic, arms = result["traffic"], list(result["arms"])
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height + 40}' role='img'>",
        "<title>Traffic share per arm over time</title>",
    ]
    if len(traffic) > 1:
        start, end = traffic[0]["time"], traffic[-1]["time"]
        xs = [(point["time"] - start) / (end - start) * width for point in traffic]
        below = [0.0] * len(traffic)
        for index, arm in enumerate(arms):
            above = [low + point[arm] for low, point in zip(below, traffic)]
            outline = [(x, height * (1 - y)) for x, y in zip(xs, above)] + [
                (x, height * (1 - y)) for x, y in reversed(list(zip(xs, below)))
            ]
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in outline)
            parts.append(
                f"<polygon points='{points}' fill='{COLOURS[index % len(COLOURS)]}'>"
                f"<title>{html.escape(arm)}</title></polygon>"
            )
            below = above
        parts.append(
            f"<text x='0' y='{height + 15}' font-size='12'>{(end - start) / 60:.1f} minutes of routed "
            "requests, left to right; share of requests, bottom to top</text>"
        )
    parts.append(
        "".join(
            f"<text x='{8 + 120 * index}' y='{height + 34}' font-size='12' "
            f"fill='{COLOURS[index % len(COLOURS)]}'>&#9632; {html.escape(arm)}</text>"
            for index, arm in enumerate(arms)
        )
    )
    return "".join(parts) + "</svg>"


def write_html(result: Dict[str, Any], path: pathlib.Path) -> None:
    def number(value: float) -> str:
        return "-" if math.isnan(value) else f"{value:.3f}"

    rows = "".join(
        f"<tr><td>{html.escape(arm)}</td><td>{', '.join(map(str, a['versions']))}</td><td>{a['requests']}</td>"
        f"<td>{a['outcomes']}</td><td>{number(a['mae'])} [{number(a['mae_interval'][0])}, "
        f"{number(a['mae_interval'][1])}]</td><td>{number(a['rmse'])} [{number(a['rmse_interval'][0])}, "
        f"{number(a['rmse_interval'][1])}]</td><td>{a['probability_best']:.3f}</td></tr>"
        for arm, a in result["arms"].items()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>babyweight experiment</title></head><body>"
        f"<h1>Experiment: {html.escape(result['policy'])}, {html.escape(result['reward'])} error</h1>"
        "<table border='1'><tr><th>arm</th><th>versions</th><th>requests</th><th>outcomes</th>"
        "<th>MAE [95%]</th><th>RMSE [95%]</th><th>P(best)</th></tr>" + rows + "</table>"
        f"<h2>Traffic share over time</h2>{traffic_svg(result)}</body></html>"
    )


def promote(config: ExperimentConfig, model_config_file: str, model_name: str) -> str:
    """Moves the `stable` label to the winner's version if its probability of being best reaches the level."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    if len(config.arms) < 2:  # a one-arm split records answers for their outcomes; it compares nothing
        raise ExperimentError(f"the experiment has one arm, {config.arms[0]}: there is no winner to promote")
    result = report(config)
    winner = max(result["arms"], key=lambda arm: result["arms"][arm]["probability_best"])
    chance = result["arms"][winner]["probability_best"]
    if chance < config.promote_level:
        raise ExperimentError(
            f"no arm is best with probability {config.promote_level:g} yet: the likeliest, "
            f"{winner}, is best with probability {chance:.3f} after "
            f"{result['arms'][winner]['outcomes']} outcome(s); feed more outcomes"
        )
    versions = result["arms"][winner]["versions"]
    if len(versions) != 1:
        raise ExperimentError(
            f"arm {winner} answered with versions {versions}: its outcomes can't say which version "
            "won; run a new experiment (a new state file) for the version it has now"
        )
    path = pathlib.Path(model_config_file)
    try:
        parsed = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
    except (OSError, text_format.ParseError) as error:
        raise ExperimentError(f"{path}: {error}") from None
    entries = [c for c in parsed.model_config_list.config if c.name == model_name]
    if not entries:
        raise ExperimentError(f"{path}: no model named {model_name!r}")
    previous = entries[0].version_labels.get("stable")
    entries[0].version_labels["stable"] = versions[-1]
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, delete=False) as temporary:
        temporary.write(text_format.MessageToString(parsed))
    # The file's own mode, not the temporary's 600: a server running as another user must still read it.
    os.chmod(temporary.name, path.stat().st_mode & 0o7777)
    pathlib.Path(temporary.name).replace(path)  # the server re-reads the file whole, never half-written
    return f"stable: version {previous} -> {versions[-1]} (arm {winner}, best with probability {chance:.3f}; {path})"


# Vertex AI logs each request and answer of the endpoint (pipeline/components/vertex_pusher.py turns it on); a client
# that
# wants its outcomes joined sends its own id in the body's "parameters" (Vertex passes them to the container,
# whose :predict ignores them) and writes (request_id, weight_pounds) to an outcomes table.
VERTEX_QUERY = """SELECT outcome.request_id AS request_id, log.deployed_model_id AS arm,
  CAST(JSON_VALUE(log.response_payload[SAFE_OFFSET(0)], '$.predictions[0][0]') AS FLOAT64) AS prediction,
  outcome.weight_pounds AS actual
FROM `{log_table}` AS log
JOIN `{outcomes_table}` AS outcome
  ON JSON_VALUE(log.request_payload[SAFE_OFFSET(0)], '$.parameters.request_id') = outcome.request_id"""


def percentages(shares: Dict[str, float]) -> Dict[str, int]:
    """Whole percentages adding up to 100 (Vertex's traffic_split), by the largest remainders."""
    exact = {arm: share * 100 for arm, share in shares.items()}
    whole = {arm: int(math.floor(value)) for arm, value in exact.items()}
    for arm in sorted(exact, key=lambda a: exact[a] - whole[a], reverse=True)[: 100 - sum(whole.values())]:
        whole[arm] += 1
    return whole


def vertex_split(
    config: ExperimentConfig,
    project: str,
    region: str,
    endpoint_name: str,
    log_table: str,
    outcomes_table: str,
    dry_run: bool = False,
    bigquery_client: Any = None,
) -> Dict[str, int]:
    """The experiment's policy over the endpoint's deployed models, fed by the logged answers joined with the
    outcomes table; sets the endpoint's traffic_split (unless dry_run) and returns it."""
    from google.cloud import aiplatform

    aiplatform.init(project=project, location=region)
    endpoints = aiplatform.Endpoint.list(filter=f'display_name="{endpoint_name}"')
    if not endpoints:
        raise ExperimentError(f"no Vertex AI endpoint named {endpoint_name!r} in {project}/{region}")
    endpoint = endpoints[0]
    deployed = tuple(model.id for model in endpoint.list_models())  # also those at 0% of the traffic
    if config.policy == "shadow":
        raise ExperimentError("Vertex AI's traffic_split has no shadow mode: use split, thompson or epsilon_greedy")
    if config.policy == "split" and not set(config.arms) <= set(deployed):
        raise ExperimentError(
            f"a split on Vertex AI names deployed model ids as its arms; {endpoint_name} has "
            f"{', '.join(deployed)}, the file names {', '.join(config.arms)}"
        )
    arms = config.arms if set(config.arms) <= set(deployed) else deployed
    if len(arms) < 2:
        raise ExperimentError(
            f"endpoint {endpoint_name}: the experiment has {len(arms)} arm(s) among its deployed models "
            f"({', '.join(deployed) or 'none'}); a traffic split between them needs two"
        )
    if bigquery_client is None:
        from google.cloud import bigquery

        bigquery_client = bigquery.Client(project=project)
    stats = {arm: ArmStats() for arm in arms}
    seen = set()
    for row in bigquery_client.query(VERTEX_QUERY.format(log_table=log_table, outcomes_table=outcomes_table)).result():
        key = (row["request_id"], row["arm"])
        if row["arm"] in stats and row["prediction"] is not None and key not in seen:  # each request once
            seen.add(key)
            stats[row["arm"]] = stats[row["arm"]].add(config.loss(row["actual"] - row["prediction"]))
    policy_config = dataclasses.replace(config, arms=arms)
    split = percentages(Policy(policy_config, seed=0).shares(stats))
    if not dry_run:
        endpoint.update(traffic_split=split)
    return split


@dataclasses.dataclass
class SimulationResult:
    policy: str
    regret: float  # extra absolute error against always choosing the best version, summed
    best_share_last_half: float
    shares: Dict[str, float]


def simulate(
    predictions: Dict[str, np.ndarray],
    actual: np.ndarray,
    config: ExperimentConfig,
    requests: int,
    delay: int,
    seed: int,
) -> SimulationResult:
    """Replays `requests` rows drawn at random; each outcome is fed back `delay` requests after its answer."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(actual), size=requests)
    policy = Policy(config, seed)
    absolute = {arm: np.abs(actual - values) for arm, values in predictions.items()}
    best = min(absolute, key=lambda arm: absolute[arm].mean())
    stats = {arm: ArmStats() for arm in config.arms}
    pending: deque = deque()
    chosen: List[str] = []
    regret = 0.0
    for step, row in enumerate(rows):
        while pending and pending[0][0] <= step:
            _, arm, loss = pending.popleft()
            stats[arm] = stats[arm].add(loss)
        arm = policy.choose(stats)
        chosen.append(arm)
        regret += absolute[arm][row] - absolute[best][row]
        pending.append((step + delay, arm, config.loss(actual[row] - predictions[arm][row])))
    last_half = chosen[requests // 2 :]
    return SimulationResult(
        config.policy
        if config.policy != "split"
        else (
            "always " + config.arms[0]
            if config.split[0] == 1
            else "split " + "/".join(f"{share:.0%}" for share in config.split)
        ),
        float(regret),
        last_half.count(best) / len(last_half),
        {arm: chosen.count(arm) / requests for arm in config.arms},
    )


def version_predictions(model_dir: str, versions: Sequence[str], data: pathlib.Path) -> tuple:
    """Each version's predictions on the file's rows the contract answers and that have a weight."""
    import tensorflow as tf

    from models import features
    from serving.core import contract, loader

    instances, actual = [], []
    with data.open(newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                instance = contract.to_instance(row)
                weight = float(row[features.LABEL.name])
            except (ValueError, KeyError, TypeError):
                continue
            instances.append(instance)
            actual.append(weight)
    columns = loader.columns_of([features.instance_key(i) for i in instances])
    predictions = {}
    for version in versions:
        signature = tf.saved_model.load(str(pathlib.Path(model_dir) / version)).signatures["serving_raw"]
        predictions[version] = signature(**columns)["predictions"].numpy().reshape(-1)
    return predictions, np.array(actual)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="babyweight experiment", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("feedback", "report", "promote"):
        command = commands.add_parser(name)
        command.add_argument("--experiment-file", required=True, help="the file babyweight serve was started with")
        if name == "feedback":
            command.add_argument("outcomes", type=pathlib.Path, help="CSV or JSON lines: request_id, weight_pounds")
        if name == "report":
            command.add_argument("--output", type=pathlib.Path, help="a self-contained HTML page of the report")
            command.add_argument("--json", action="store_true")
        if name == "promote":
            command.add_argument("--model-config-file", required=True, help="the server's model_config_list file")
            command.add_argument("--model-name", default="babyweight")
    simulation = commands.add_parser("simulate", help="replay real rows through policies between versions")
    simulation.add_argument("--model-dir", required=True, help="the pushed models folder")
    simulation.add_argument("--versions", required=True, help="comma-separated, the incumbent first")
    simulation.add_argument("--data", type=pathlib.Path, required=True, help="CSV rows with weight_pounds")
    simulation.add_argument("--requests", type=int, default=20_000)
    simulation.add_argument("--delay", type=int, default=500, help="requests between an answer and its outcome")
    simulation.add_argument("--seed", type=int, default=1)
    vertex = commands.add_parser("vertex", help="set a Vertex AI endpoint's traffic split by the experiment's policy")
    vertex.add_argument("--experiment-file", required=True, help="its policy and reward (its arms: the endpoint's)")
    for flag in ("project", "region", "endpoint", "log-table", "outcomes-table"):
        vertex.add_argument(f"--{flag}", required=True)
    vertex.add_argument("--dry-run", action="store_true", help="print the split without setting it")
    args = parser.parse_args(argv)
    try:
        if args.command == "vertex":
            split = vertex_split(
                experiment.load_config(args.experiment_file),
                args.project,
                args.region,
                args.endpoint,
                args.log_table,
                args.outcomes_table,
                args.dry_run,
            )
            print(
                ("would set" if args.dry_run else "set")
                + f" {args.endpoint}'s traffic_split: "
                + ", ".join(f"{arm} {share}%" for arm, share in split.items())
            )
            return 0
        if args.command == "simulate":
            versions = args.versions.split(",")
            predictions, actual = version_predictions(args.model_dir, versions, args.data)
            arms = tuple(versions)
            even = tuple(1 / len(arms) for _ in arms)
            print(
                f"{args.requests} requests replayed from {len(actual)} rows of {args.data}, outcomes "
                f"{args.delay} requests late; MAE per version: "
                + ", ".join(f"{v} {np.abs(actual - predictions[v]).mean():.3f}" for v in versions)
            )
            print(f"{'policy':<24} {'regret (lb)':>12} {'best share, last half':>22}")
            for config in (
                ExperimentConfig(arms, "thompson"),
                ExperimentConfig(arms, "split", split=even),
                ExperimentConfig(arms, "split", split=(1.0,) + (0.0,) * (len(arms) - 1)),
            ):
                result = simulate(predictions, actual, config, args.requests, args.delay, args.seed)
                print(f"{result.policy:<24} {result.regret:>12.1f} {result.best_share_last_half:>22.3f}")
            return 0
        config = experiment.load_config(args.experiment_file)
        if args.command == "feedback":
            store = experiment.Store(config)
            try:
                result = store.feedback(read_feedback_file(args.outcomes))
            finally:
                store.close()
            print(
                f"{result.accepted} outcome(s) joined; {len(result.unknown)} unknown request id(s)"
                + (f": {', '.join(result.unknown[:10])}" if result.unknown else "")
                + f"; {len(result.duplicate)} duplicate(s)"
                + (f": {', '.join(result.duplicate[:10])}" if result.duplicate else "")
            )
            return 1 if result.unknown or result.duplicate else 0
        if args.command == "report":
            result = report(config)
            if args.output:
                write_html(result, args.output)
            if args.json:
                print(json.dumps(result, indent=1))
            else:
                for arm, a in result["arms"].items():
                    mae_low, mae_high = a["mae_interval"]
                    rmse_low, rmse_high = a["rmse_interval"]
                    print(
                        f"{arm:<12} versions {a['versions']} requests {a['requests']} outcomes {a['outcomes']} "
                        f"MAE {a['mae']:.3f} [{mae_low:.3f}, {mae_high:.3f}] RMSE {a['rmse']:.3f} "
                        f"[{rmse_low:.3f}, {rmse_high:.3f}] P(best) {a['probability_best']:.3f}"
                    )
                if args.output:
                    print(f"report: {args.output}")
            return 0
        print(promote(config, args.model_config_file, args.model_name))
        return 0
    except ExperimentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
