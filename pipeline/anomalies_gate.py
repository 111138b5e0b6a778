"""AnomaliesGate: stops the run before Transform when ExampleValidator found anomalies.

TFX 1.16's ExampleValidator records anomalies but lets the pipeline go on; this small component
reads what it wrote and fails, listing each anomaly by split, feature and what was found, so that
nothing is trained or pushed from bad data.
"""
import logging
from typing import List

from tensorflow_metadata.proto.v0 import anomalies_pb2
from tfx import v1 as tfx
from tfx.types import artifact_utils
from tfx.utils import io_utils

ANOMALIES_FILE = "SchemaDiff.pb"


class DataValidationError(RuntimeError):
    """The data failed validation against the curated schema."""


def describe_anomalies(anomalies_artifact: tfx.types.standard_artifacts.ExampleAnomalies) -> List[str]:
    """One line per anomaly: split, feature, short description and detail."""
    lines = []
    for split in artifact_utils.decode_split_names(anomalies_artifact.split_names):
        path = f"{artifact_utils.get_split_uri([anomalies_artifact], split)}/{ANOMALIES_FILE}"
        anomalies = anomalies_pb2.Anomalies()
        anomalies.ParseFromString(io_utils.read_bytes_file(path))
        for feature, info in sorted(anomalies.anomaly_info.items()):
            lines.append(f"split {split}, feature {feature!r}: {info.short_description}: {info.description}")
        if anomalies.HasField("dataset_anomaly_info"):
            info = anomalies.dataset_anomaly_info
            lines.append(f"split {split}, whole dataset: {info.short_description}: {info.description}")
    return lines


@tfx.dsl.components.component
def AnomaliesGate(
    anomalies: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.ExampleAnomalies],
    block: tfx.dsl.components.Parameter[bool] = True,
) -> None:
    """Fails the run when `anomalies` holds any anomaly and `block` is set; logs them either way."""
    found = describe_anomalies(anomalies)
    for line in found:
        logging.warning("data anomaly: %s", line)
    if found and block:
        raise DataValidationError(
            f"data failed validation against the schema ({len(found)} anomal{'y' if len(found) == 1 else 'ies'}):\n  "
            + "\n  ".join(found))
