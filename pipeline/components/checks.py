"""The six questions that data validation answers, and which TFDV anomaly kinds answer each.

Kept apart from the validator (and free of heavy imports) so that the config can check the names
of `warning_checks` without loading TFDV.
"""

from typing import Any, Dict, Tuple

from tensorflow_metadata.proto.v0 import anomalies_pb2

# The questions, in the order the run summary and report answer them, and the checks answering each.
QUESTIONS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("Is the new distribution close enough to the previous span's?", ("drift",)),
    ("Are all expected features present?", ("missing",)),
    ("Are any unexpected features present?", ("unexpected",)),
    ("Does each feature have the expected type?", ("type",)),
    ("Does the expected fraction of examples contain each feature?", ("presence",)),
    ("Do examples have the expected number of values, inside their domains?", ("value_count", "domain")),
)
CHECKS: Tuple[str, ...] = tuple(check for _, checks in QUESTIONS for check in checks) + ("other",)

_KINDS: Dict[str, Tuple[str, ...]] = {
    "drift": (
        "COMPARATOR_L_INFTY_HIGH",
        "COMPARATOR_JENSEN_SHANNON_DIVERGENCE_HIGH",
        "COMPARATOR_NORMALIZED_ABSOLUTE_DIFFERENCE_HIGH",
        "COMPARATOR_LOW_NUM_EXAMPLES",
        "COMPARATOR_HIGH_NUM_EXAMPLES",
        "SCHEMA_TRAINING_SERVING_SKEW",
    ),
    "missing": ("SCHEMA_MISSING_COLUMN",),
    "unexpected": ("SCHEMA_NEW_COLUMN",),
    "type": (
        "BOOL_TYPE_BYTES_NOT_INT",
        "BOOL_TYPE_BYTES_NOT_STRING",
        "BOOL_TYPE_FLOAT_NOT_INT",
        "BOOL_TYPE_FLOAT_NOT_STRING",
        "BOOL_TYPE_INT_NOT_STRING",
        "BOOL_TYPE_STRING_NOT_INT",
        "ENUM_TYPE_BYTES_NOT_STRING",
        "ENUM_TYPE_FLOAT_NOT_STRING",
        "ENUM_TYPE_INT_NOT_STRING",
        "FLOAT_TYPE_NOT_FLOAT",
        "FLOAT_TYPE_STRING_NOT_FLOAT",
        "FLOAT_TYPE_NON_STRING",
        "FLOAT_TYPE_UNKNOWN_TYPE_NUMBER",
        "INT_TYPE_INT_EXPECTED",
        "INT_TYPE_NOT_INT_STRING",
        "INT_TYPE_NOT_STRING",
        "INT_TYPE_STRING_EXPECTED",
        "INT_TYPE_UNKNOWN_TYPE_NUMBER",
        "STRING_TYPE_NOW_FLOAT",
        "STRING_TYPE_NOW_INT",
        "UNEXPECTED_DATA_TYPE",
        "DOMAIN_INVALID_FOR_TYPE",
    ),
    "presence": (
        "FEATURE_TYPE_LOW_FRACTION_PRESENT",
        "FEATURE_TYPE_LOW_NUMBER_PRESENT",
        "FEATURE_TYPE_NOT_PRESENT",
        "DATASET_LOW_NUM_EXAMPLES",
    ),
    "value_count": (
        "FEATURE_TYPE_HIGH_NUMBER_VALUES",
        "FEATURE_TYPE_LOW_NUMBER_VALUES",
        "FEATURE_TYPE_NO_VALUES",
        "FEATURE_TYPE_UNEXPECTED_REPEATED",
        "VALUE_NESTEDNESS_MISMATCH",
    ),
    "domain": (
        "ENUM_TYPE_UNEXPECTED_STRING_VALUES",
        "ENUM_TYPE_INVALID_UTF8",
        "INT_TYPE_BIG_INT",
        "INT_TYPE_SMALL_INT",
        "FLOAT_TYPE_BIG_FLOAT",
        "FLOAT_TYPE_SMALL_FLOAT",
        "FLOAT_TYPE_HAS_NAN",
        "FLOAT_TYPE_HAS_INF",
        "BOOL_TYPE_BIG_INT",
        "BOOL_TYPE_SMALL_INT",
        "BOOL_TYPE_UNEXPECTED_STRING",
        "BOOL_TYPE_UNEXPECTED_FLOAT",
    ),
}
_CHECK_OF_KIND = {
    anomalies_pb2.AnomalyInfo.Type.Value(kind): check for check, kinds in _KINDS.items() for kind in kinds
}


def check_of(kind: int) -> str:
    """The check (one of CHECKS) that a TFDV anomaly kind (AnomalyInfo.Type) answers."""
    return _CHECK_OF_KIND.get(kind, "other")


MEASURES = ("infinity_norm", "jensen_shannon_divergence")


def comparator_thresholds(schema: Any, kind: str) -> Dict[str, Tuple[str, float]]:
    """feature -> (measure, threshold) of the schema's `kind` ('skew' or 'drift') comparators: the one reading of
    them that babyweight watch's floors and Vertex AI Model Monitoring's thresholds share (TFDV reads them itself)."""
    thresholds = {}
    for feature in schema.feature:
        comparator = getattr(feature, f"{kind}_comparator")
        for measure in MEASURES:
            if comparator.HasField(measure) and getattr(comparator, measure).threshold > 0:
                thresholds[feature.name] = (measure, getattr(comparator, measure).threshold)
    return thresholds
