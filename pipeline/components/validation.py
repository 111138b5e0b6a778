"""Data validation of each new span: TFDV against the curated schema and the previous span, and the gate.

TFX 1.16's ExampleValidator checks statistics against a schema but takes no previous statistics, so it
can't answer "is the new distribution close to the previous one". `DataValidator` calls TFDV's own
`validate_statistics` with the schema (its drift comparators included) and the statistics of the
previous validated span, classes each anomaly by the question it answers (pipeline/components/checks.py) as
blocking or warning, and writes TFX's usual ExampleAnomalies artifact plus a `verdict.json`.
`DataGate` fails the run when the verdict has a blocking anomaly, before Transform and Trainer run.
"""

import dataclasses
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow_data_validation as tfdv
from tensorflow_metadata.proto.v0 import anomalies_pb2, schema_pb2, statistics_pb2
from tfx import v1 as tfx
from tfx.types import artifact_utils
from tfx.utils import io_utils

from models import features
from pipeline.artifacts import TRAIN_SPLIT, span_of
from pipeline.components.checks import QUESTIONS, check_of

ANOMALIES_FILE = "SchemaDiff.pb"
STATISTICS_FILE = "FeatureStats.pb"
VERDICT_FILE = "verdict.json"
ENVIRONMENT = "TRAINING"
# Drift is measured on the train split only: the eval split is a hash sample of the same span, a
# quarter of the size, so its distances would add sampling noise and no information.
DRIFT_SPLIT = TRAIN_SPLIT
WHAT_TO_DO = (
    "What to do (docs/validation-and-spans.md, When a run is blocked): if the data is wrong, fix the files "
    "and rerun; if the change is real, update schema/schema.pbtxt, or let the check warn for a run with "
    "--set warning_checks={checks}, and rerun."
)


class DataValidationError(RuntimeError):
    """The new data has blocking anomalies; the message lists each one."""


@dataclasses.dataclass(frozen=True)
class Finding:
    """One anomaly: where, which check it fails, what TFDV found, and whether it stops the run."""

    split: str
    feature: str  # '' for an anomaly of the whole data set
    check: str  # one of pipeline.components.checks.CHECKS
    kind: str  # TFDV's AnomalyInfo.Type name
    description: str
    blocking: bool

    def line(self, splits: str = "") -> str:
        where = f"feature {self.feature!r}" if self.feature else "whole data set"
        return (
            f"[{'BLOCKING' if self.blocking else 'warning'}] {self.check}: {where} ({splits or self.split}): "
            f"{self.description}"
        )


@dataclasses.dataclass
class Verdict:
    """What validation found in one span, as written to verdict.json next to the anomalies."""

    span: int
    baseline_span: Optional[int]  # the previous validated span compared against (None: no drift check)
    baseline_statistics: str
    findings: List[Finding]

    @property
    def blocking(self) -> List[Finding]:
        return [f for f in self.findings if f.blocking]

    def lines(self, blocking_only: bool = False) -> List[str]:
        """One line per anomaly, naming the splits it was found in (the first split's numbers)."""
        splits: Dict[tuple, List[str]] = {}
        first: Dict[tuple, Finding] = {}
        for finding in self.blocking if blocking_only else self.findings:
            key = (finding.check, finding.feature, finding.kind, finding.blocking)
            splits.setdefault(key, []).append(finding.split)
            first.setdefault(key, finding)
        return [first[key].line(", ".join(names)) for key, names in splits.items()]

    def answers(self) -> List[Dict[str, object]]:
        """Each of the six questions with its answer: ok, or BLOCKING or warning with the features at fault."""
        result = []
        for question, checks in QUESTIONS:
            found = [f for f in self.findings if f.check in checks]
            if "drift" in checks and self.baseline_span is None:
                status = "not checked: no earlier validated span to compare with"
            elif not found:
                status = "ok"
            else:
                status = "BLOCKING" if any(f.blocking for f in found) else "warning"
            result.append(
                {"question": question, "status": status, "features": sorted({f.feature or "(data set)" for f in found})}
            )
        other = [f for f in self.findings if f.check == "other"]
        if other:
            result.append(
                {
                    "question": "Other anomalies",
                    "status": "BLOCKING" if any(f.blocking for f in other) else "warning",
                    "features": sorted({f.feature or "(data set)" for f in other}),
                }
            )
        return result

    def to_json(self) -> str:
        return json.dumps(
            {
                "span": self.span,
                "baseline_span": self.baseline_span,
                "baseline_statistics": self.baseline_statistics,
                "findings": [dataclasses.asdict(f) for f in self.findings],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> "Verdict":
        values = json.loads(text)
        return cls(
            values["span"],
            values["baseline_span"],
            values["baseline_statistics"],
            [Finding(**f) for f in values["findings"]],
        )


def split_file(uri: str, split: str, name: str) -> str:
    """A file of one split in a TFX artifact's folder (TFX's Split-<name> layout)."""
    return os.path.join(uri, f"Split-{split}", name)


def load_statistics(uri: str, split: str) -> statistics_pb2.DatasetFeatureStatisticsList:
    """One split's statistics from a StatisticsGen output folder."""
    return tfdv.load_stats_binary(split_file(uri, split, STATISTICS_FILE))


def read_verdict(anomalies_uri: str) -> Verdict:
    """The verdict DataValidator wrote into its anomalies artifact."""
    return Verdict.from_json(io_utils.read_string_file(os.path.join(anomalies_uri, VERDICT_FILE)))


def csv_presence(
    statistics: statistics_pb2.DatasetFeatureStatisticsList,
) -> statistics_pb2.DatasetFeatureStatisticsList:
    """Statistics in which a NULL CSV field counts as a missing value.

    CsvExampleGen turns an empty field into a feature with no values, which TFDV counts as present;
    for features of at most one value per example, the examples that have one are `tot_num_values`.
    With this, the schema's `presence` constraints see NULLs, and `value_count` sees only real values.
    """
    result = statistics_pb2.DatasetFeatureStatisticsList()
    result.CopyFrom(statistics)
    for dataset in result.datasets:
        for feature in dataset.features:
            kind = feature.WhichOneof("stats")
            if kind not in ("num_stats", "string_stats", "bytes_stats"):
                continue
            common = getattr(feature, kind).common_stats
            if common.max_num_values > 1:
                continue
            empty = common.num_non_missing - common.tot_num_values
            if empty > 0:
                common.num_non_missing -= empty
                common.num_missing += empty
                common.min_num_values = 1 if common.num_non_missing else 0
                common.avg_num_values = 1.0 if common.num_non_missing else 0.0
    return result


def findings(anomalies: anomalies_pb2.Anomalies, split: str, warning_checks: Sequence[str]) -> List[Finding]:
    """One Finding per reason TFDV gives, classed by check and by whether that check blocks."""
    result = []
    entries = list(sorted(anomalies.anomaly_info.items()))
    if anomalies.HasField("dataset_anomaly_info"):
        entries.append(("", anomalies.dataset_anomaly_info))
    for feature, info in entries:
        for reason in info.reason:
            check = check_of(reason.type)
            result.append(
                Finding(
                    split,
                    feature,
                    check,
                    anomalies_pb2.AnomalyInfo.Type.Name(reason.type),
                    f"{reason.short_description}: {reason.description}",
                    blocking=check not in warning_checks,
                )
            )
    return result


def presence_fractions(statistics: statistics_pb2.DatasetFeatureStatisticsList) -> Dict[str, float]:
    """The share of examples with a value of each feature (a NULL CSV field counts as none)."""
    result = {}
    for feature in csv_presence(statistics).datasets[0].features:
        kind = feature.WhichOneof("stats")
        if kind in ("num_stats", "string_stats", "bytes_stats"):
            common = getattr(feature, kind).common_stats
            total = common.num_non_missing + common.num_missing
            result[feature.path.step[-1]] = common.num_non_missing / total if total else 0.0
    return result


def imputed_presence(found: List[Finding], fractions: Dict[str, float], min_fraction: float) -> List[Finding]:
    """`found` with the presence anomalies of features the model imputes blocking only where it can't be trusted.

    The schema's presence floors come from the real export's years: a feature below its floor is unusual
    and reported. For a feature the model imputes (an optional feature of the serving contract) that alone
    is no reason to stop a span: it blocks only when also below `min_fraction` of the training rows, where
    the model's answers get markedly worse (docs/validation-and-spans.md, Presence by year). So a span blocks
    below the lower of the two levels. The eval split only warns: it trains nothing.
    """
    result = []
    for finding in found:
        if finding.check != "presence" or finding.feature not in features.OPTIONAL_NAMES or not finding.blocking:
            result.append(finding)
            continue
        fraction = fractions.get(finding.feature, 0.0)
        untrusted = finding.split == TRAIN_SPLIT and fraction < min_fraction
        note = f" [the model imputes {finding.feature}; present in {fraction:.1%} of {finding.split} rows, " + (
            f"below {min_fraction:.0%}: too few to train on]"
            if untrusted
            else f"at least {min_fraction:.0%} of training rows: reported, not blocking]"
            if finding.split == TRAIN_SPLIT
            else "the eval split trains nothing: reported, not blocking]"
        )
        result.append(dataclasses.replace(finding, description=finding.description + note, blocking=untrusted))
    return result


def validate_split(
    current: statistics_pb2.DatasetFeatureStatisticsList,
    schema: schema_pb2.Schema,
    previous: Optional[statistics_pb2.DatasetFeatureStatisticsList],
    environment: str = ENVIRONMENT,
) -> anomalies_pb2.Anomalies:
    """TFDV's validation of one split against the schema and, where given, the previous span's split."""
    return tfdv.validate_statistics(
        csv_presence(current),
        schema,
        environment=environment,
        previous_statistics=csv_presence(previous) if previous is not None else None,
    )


def small_span_drift(found: List[Finding], rows: int, previous_rows: int, min_rows: int) -> List[Finding]:
    """`found` with drift reported, not blocking, when either span's train split has fewer than `min_rows` rows.

    Between two random halves of one year of the real export, TFDV's distances at 150 rows reach the
    thresholds by chance alone (docs/validation-and-spans.md, Presence by year, and small spans), so a distance
    between small spans says little.
    """
    if rows >= min_rows and previous_rows >= min_rows:
        return found
    note = (
        f" [{rows} rows against {previous_rows}: under min_drift_rows ({min_rows}) a distance is mostly "
        "sampling noise: reported, not blocking]"
    )
    return [
        dataclasses.replace(f, description=f.description + note, blocking=False)
        if f.check == "drift" and f.blocking
        else f
        for f in found
    ]


def validate_span(
    current: Dict[str, statistics_pb2.DatasetFeatureStatisticsList],
    schema: schema_pb2.Schema,
    previous: Optional[statistics_pb2.DatasetFeatureStatisticsList],
    warning_checks: Sequence[str],
    min_imputed_presence: float,
    min_drift_rows: int,
) -> Tuple[Dict[str, anomalies_pb2.Anomalies], List[Finding]]:
    """TFDV's anomalies of each split of a span (drift on the train split only), and the findings they make."""
    results, found = {}, []
    for split, statistics in current.items():
        results[split] = validate_split(statistics, schema, previous if split == DRIFT_SPLIT else None)
        split_found = imputed_presence(
            findings(results[split], split, warning_checks), presence_fractions(statistics), min_imputed_presence
        )
        if split == DRIFT_SPLIT and previous is not None:
            split_found = small_span_drift(
                split_found, statistics.datasets[0].num_examples, previous.datasets[0].num_examples, min_drift_rows
            )
        found.extend(split_found)
    return results, found


@tfx.dsl.components.component
def DataValidator(
    examples: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Examples],
    statistics: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.ExampleStatistics],
    schema: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Schema],
    anomalies: tfx.dsl.components.OutputArtifact[tfx.types.standard_artifacts.ExampleAnomalies],
    min_imputed_presence: tfx.dsl.components.Parameter[float],
    min_drift_rows: tfx.dsl.components.Parameter[int],
    code_fingerprint: tfx.dsl.components.Parameter[str],  # pipeline/cache.py: reruns the step when its code changes
    previous_examples: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Examples] = None,
    previous_statistics: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.ExampleStatistics] = None,
    warning_checks: tfx.dsl.components.Parameter[str] = "",
) -> None:
    """Validates each split of the new span (`statistics` of `examples`) against the schema and, when given,
    its train split against the previous validated span's; checks named in `warning_checks` (comma-separated)
    report but don't block, a feature the model imputes blocks on presence only below
    `min_imputed_presence` of the training rows (`imputed_presence`), and drift blocks only between train
    splits of at least `min_drift_rows` rows (`small_span_drift`)."""
    schema_proto = tfdv.load_schema_text(io_utils.get_only_uri_in_dir(schema.uri))
    current = {
        split: load_statistics(statistics.uri, split)
        for split in artifact_utils.decode_split_names(statistics.split_names)
    }
    previous = load_statistics(previous_statistics.uri, DRIFT_SPLIT) if previous_statistics is not None else None
    warn = [check for check in warning_checks.split(",") if check]
    span = span_of(examples.mlmd_artifact)
    anomalies.split_names = artifact_utils.encode_split_names(list(current))
    anomalies.span = span
    results, found = validate_span(current, schema_proto, previous, warn, min_imputed_presence, min_drift_rows)
    for split, result in results.items():
        io_utils.write_bytes_file(split_file(anomalies.uri, split, ANOMALIES_FILE), result.SerializeToString())
    has_baseline = previous_statistics is not None and previous_examples is not None
    verdict = Verdict(
        span,
        span_of(previous_examples.mlmd_artifact) if has_baseline else None,
        previous_statistics.uri if has_baseline else "",
        found,
    )
    io_utils.write_string_file(os.path.join(anomalies.uri, VERDICT_FILE), verdict.to_json())
    anomalies.set_int_custom_property("blocking", len(verdict.blocking))
    anomalies.set_int_custom_property("warnings", len(found) - len(verdict.blocking))
    for line in verdict.lines():
        logging.warning("data anomaly: %s", line)


@tfx.dsl.components.component
def DataGate(
    anomalies: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.ExampleAnomalies],
    statistics: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.ExampleStatistics],
    examples: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Examples],
    code_fingerprint: tfx.dsl.components.Parameter[str],  # pipeline/cache.py: reruns the step when its code changes
) -> None:
    """Fails the run when validation found a blocking anomaly.

    It takes the span's statistics and examples too, so that ML Metadata records which spans passed:
    later runs compare against, and train on, only those (pipeline/components/spans.py).
    """
    verdict = read_verdict(anomalies.uri)
    blocking = verdict.lines(blocking_only=True)
    if blocking:
        raise DataValidationError(
            f"span {verdict.span} failed data validation ({len(blocking)} blocking "
            f"anomal{'y' if len(blocking) == 1 else 'ies'}):\n  "
            + "\n  ".join(blocking)
            + "\n"
            + WHAT_TO_DO.format(checks=",".join(sorted({f.check for f in verdict.blocking})))
        )
    logging.info("span %d passed validation: examples %s, statistics %s", verdict.span, examples.uri, statistics.uri)
