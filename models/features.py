"""The one table of natality columns: name, type, role and transform of each.

Everything that needs to know about a column (the CSV check, the generator, `preprocessing_fn`,
the model, the serving signatures, the evaluation slices) reads it from `COLUMNS` here.
"""

import dataclasses
import enum
import math
import numbers
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy


class Role(enum.Enum):
    LABEL = "label"
    FEATURE = "feature"
    UNUSED = "unused"  # ingested, validated and kept in the data, but not fed to the model


class Transform(enum.Enum):
    NONE = "none"
    VOCABULARY = "vocabulary"  # string -> integer id (missing and unseen values share one id)
    CATEGORY = "category"  # small integer code -> integer id (missing gets its own id)
    ZSCORE = "zscore"  # numeric -> imputed z-score plus a missing indicator
    ZSCORE_AND_BUCKETS = "zscore_and_buckets"  # ZSCORE, plus buckets at fixed boundaries


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of the BigQuery natality table."""

    name: str
    dtype: str  # "int", "float" or "string"; schema/schema.pbtxt declares the same (a test checks)
    role: Role = Role.UNUSED
    transform: Transform = Transform.NONE
    # Codes the table uses for 'unknown' (e.g. 99 for father_age): treated as missing, never as values.
    missing_codes: Tuple[float, ...] = ()
    # Known values of a CATEGORY column; anything else maps to the out-of-vocabulary id.
    categories: Tuple[int, ...] = ()
    # Bucket boundaries of a ZSCORE_AND_BUCKETS column (also used to slice evaluation).
    bucket_boundaries: Tuple[float, ...] = ()
    # Serving contract of a FEATURE: a request must carry it (a known value, not NULL or an 'unknown'
    # code), or it is refused naming it. The other features may be missing; the model is trained for that.
    required: bool = False


# The 31 columns of bigquery-public-data.samples.natality, in the table's (and the export's) order.
COLUMNS: Tuple[Column, ...] = (
    Column("source_year", "int"),
    Column("year", "int"),
    Column("month", "int"),
    Column("day", "int"),
    Column("wday", "int"),
    Column("state", "string"),
    Column("is_male", "string", Role.FEATURE, Transform.VOCABULARY),
    Column("child_race", "int"),
    Column("weight_pounds", "float", Role.LABEL),
    Column("plurality", "int", Role.FEATURE, Transform.CATEGORY, categories=(1, 2, 3, 4, 5)),
    Column("apgar_1min", "int", missing_codes=(99,)),
    Column("apgar_5min", "int", missing_codes=(99,)),
    Column("mother_residence_state", "string"),
    Column("mother_race", "int"),
    Column("mother_age", "int", Role.FEATURE, Transform.ZSCORE, required=True),
    Column(
        "gestation_weeks",
        "int",
        Role.FEATURE,
        Transform.ZSCORE_AND_BUCKETS,
        missing_codes=(99,),
        # extremely / very / moderately preterm, term, post-term
        bucket_boundaries=(28, 32, 37, 42),
        required=True,
    ),
    Column("lmp", "int", missing_codes=(99999999,)),  # MMDDYYYY of the last menstrual period
    Column("mother_married", "string", Role.FEATURE, Transform.VOCABULARY),
    Column("mother_birth_state", "string"),
    Column("cigarette_use", "string"),
    Column("cigarettes_per_day", "int", missing_codes=(99,)),
    Column("alcohol_use", "string"),
    Column("drinks_per_week", "int", missing_codes=(99,)),
    Column("weight_gain_pounds", "int", Role.FEATURE, Transform.ZSCORE, missing_codes=(99,)),
    Column("born_alive_alive", "int", missing_codes=(99,)),
    Column("born_alive_dead", "int", missing_codes=(99,)),
    Column("born_dead", "int", missing_codes=(99,)),
    Column("ever_born", "int", Role.FEATURE, Transform.ZSCORE, missing_codes=(99,)),
    Column("father_race", "int"),
    Column("father_age", "int", Role.FEATURE, Transform.ZSCORE, missing_codes=(99,)),
    Column("record_weight", "int"),
)

COLUMN_NAMES: Tuple[str, ...] = tuple(c.name for c in COLUMNS)
BY_NAME: Dict[str, Column] = {c.name: c for c in COLUMNS}
LABEL: Column = next(c for c in COLUMNS if c.role is Role.LABEL)
FEATURES: Tuple[Column, ...] = tuple(c for c in COLUMNS if c.role is Role.FEATURE)
FEATURE_NAMES: Tuple[str, ...] = tuple(c.name for c in FEATURES)
# Who asks is a clinician or a parent before the birth: the mother's age and the weeks of gestation
# (from the last period or the dating scan) are always known and carry most of what the model can say;
# the baby's sex, plurality (before an ultrasound), marital status, weight gain so far, earlier births
# and the father's age may be unknown, and a request may leave them out.
REQUIRED_FEATURES: Tuple[Column, ...] = tuple(c for c in FEATURES if c.required)
OPTIONAL_FEATURES: Tuple[Column, ...] = tuple(c for c in FEATURES if not c.required)
# The features the model imputes (it has a missing indicator for them and is trained with them removed).
OPTIONAL_NAMES = frozenset(c.name for c in OPTIONAL_FEATURES)

# Pairs of categorical ids (see `id_sizes`) crossed for the wide part of the model: multiples are
# born earlier, and the gestation effect differs between boys and girls.
CROSSES: Tuple[Tuple[str, str], ...] = (
    ("gestation_weeks_bucket", "plurality"),
    ("gestation_weeks_bucket", "is_male"),
)
# Raw features that slice the evaluation, besides the transformed bucket ids.
SLICE_FEATURES: Tuple[str, ...] = ("is_male", "plurality")
# VOCABULARY features are low-cardinality flags (true/false): a small cap, plus one OOV/missing id.
VOCABULARY_SIZE = 8


def transformed_name(name: str) -> str:
    """Name of a transformed feature in the Transform output."""
    return f"{name}_xf"


def label_key() -> str:
    """Transformed label: the weight in pounds, 0 where the row has none."""
    return transformed_name(LABEL.name)


def label_weight_key() -> str:
    """Transformed example weight: 1 where the row has a label, 0 where it has none."""
    return transformed_name(LABEL.name + "_present")


def predicted(answers: Sequence[Any]) -> numpy.ndarray:
    """Which of a model's answers (one per instance) are predictions: finite numbers. None (JSON's null), NaN, an
    infinity, a text or a bool is none; `predict-batch`, `predict --tflite` and `predict --url` reject such a row."""
    if isinstance(answers, numpy.ndarray) and answers.dtype.kind == "f":
        return numpy.isfinite(answers)  # a model's own output: one step for a batch
    return numpy.array(
        [isinstance(a, numbers.Real) and not isinstance(a, (bool, numpy.bool_)) and math.isfinite(a) for a in answers],
        bool,
    )


def not_a_prediction(answer: Any) -> str:
    """Why an answer `predicted` refuses is no prediction, in the words every prediction path reports."""
    shown = "null" if answer is None else repr(answer) if isinstance(answer, str) else answer
    return f"the model's prediction is not a number: {shown}"


def bucket_name(column: Column) -> str:
    """Name of the bucket id of a ZSCORE_AND_BUCKETS column."""
    return column.name + "_bucket"


def missing_key(column: Column) -> str:
    """Transformed 0/1 indicator that a numeric feature was missing or an 'unknown' code."""
    return transformed_name(column.name + "_missing")


def transformed_keys(column: Column) -> List[str]:
    """The transformed features a feature's value decides, crosses aside (`preprocessing.crosses`)."""
    keys = [transformed_name(column.name)]
    if column.transform in (Transform.ZSCORE, Transform.ZSCORE_AND_BUCKETS):
        keys.append(missing_key(column))
    if column.transform is Transform.ZSCORE_AND_BUCKETS:
        keys.append(transformed_name(bucket_name(column)))
    return keys


def cross_name(first: str, second: str) -> str:
    """Name of the crossed id of two categorical ids."""
    return f"{first}_x_{second}"


def numeric_features() -> List[Column]:
    """Features fed to the model as imputed z-scores with a missing indicator."""
    return [c for c in FEATURES if c.transform in (Transform.ZSCORE, Transform.ZSCORE_AND_BUCKETS)]


def id_sizes() -> Dict[str, int]:
    """Every categorical id the model gets (features, buckets, crosses) and how many values it takes."""
    sizes: Dict[str, int] = {}
    for column in FEATURES:
        if column.transform is Transform.CATEGORY:
            sizes[column.name] = len(column.categories) + 1  # + unknown or missing
        elif column.transform is Transform.VOCABULARY:
            sizes[column.name] = VOCABULARY_SIZE + 1  # + out of vocabulary
        elif column.transform is Transform.ZSCORE_AND_BUCKETS:
            sizes[bucket_name(column)] = len(column.bucket_boundaries) + 2  # + missing
    for first, second in CROSSES:
        sizes[cross_name(first, second)] = sizes[first] * sizes[second]
    return sizes


def slice_keys() -> List[List[str]]:
    """Evaluation slices: overall, each raw slice feature, and each transformed bucket id."""
    buckets = [transformed_name(bucket_name(c)) for c in FEATURES if c.transform is Transform.ZSCORE_AND_BUCKETS]
    return [[]] + [[name] for name in SLICE_FEATURES] + [[key] for key in buckets]


FLOAT32_EXACT = 2**24  # integers below this are exact in float32


def is_missing_value(column: Column, value: Any) -> bool:
    """Python twin of `models.preprocessing.is_missing` for one request value: None, '', NaN or an 'unknown' code.

    A list is judged by its first value (the transform reads one value per row). A value of the wrong type
    is not missing here: naming it is the type check's job. Numbers are compared as the graph holds them:
    in float32, and an integer column's as the integer the transform reads (99.5 weeks is 99, 'unknown').
    """
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None or value in ("", b""):
        return True
    if column.dtype == "string" or isinstance(value, (bool, bytes)):
        return False
    if value.__class__ is int and -FLOAT32_EXACT < value < FLOAT32_EXACT:
        number = float(value)  # the same in float32: no conversion needed (most requests: ages, weeks)
    else:
        try:
            number = float(numpy.float32(value))
        except (TypeError, ValueError):
            return False
        if column.dtype == "int" and math.isfinite(number):
            number = float(math.trunc(number))  # serving_raw casts to the column's int64, as training read it
    return math.isnan(number) or number in column.missing_codes


def missing_required(request: Mapping[str, Any]) -> List[str]:
    """The names of the required features (the serving contract) that a request lacks."""
    return [c.name for c in REQUIRED_FEATURES if is_missing_value(c, request.get(c.name))]


# The training data's most frequent instances, with their counts, written by the Trainer beside the SavedModel
# (TF Serving's assets.extra folder, which the Pusher copies with it): a server predicts them when it loads the
# version and answers them from a table (serving/core/cache.py).
FREQUENT_INSTANCES_FILE = "assets.extra/frequent_instances.json"

InstanceKey = Tuple[Any, ...]


_KEY_COLUMNS: Tuple[Tuple[str, bool], ...] = tuple((c.name, c.dtype == "string") for c in FEATURES)


def instance_key(values: Mapping[str, Any]) -> InstanceKey:
    """An instance as the model is fed it: one value per feature in FEATURES order, None where it has none.

    Numbers are floats (`serving_raw` takes them as float32, so two numbers that differ only beyond float32's
    precision are two keys with one answer), texts are str (true/false for booleans); None, "", NaN and an
    empty list are no value. Two instances with the same key get the same prediction: the key of the
    prediction cache. Called once per request instance, so written for speed.
    """
    key = []
    append = key.append
    for name, text in _KEY_COLUMNS:
        value = values.get(name)
        if value.__class__ in (list, tuple):
            value = value[0] if value else None
        if value is None or value == "" or value == b"":
            append(None)
        elif text:
            if value.__class__ is bool:
                append("true" if value else "false")
            else:
                append(value.decode() if isinstance(value, bytes) else str(value))
        else:
            number = float(value)
            append(None if number != number else number)  # NaN is no value
    return tuple(key)


def raw_columns(keys: Sequence[InstanceKey]) -> Dict[str, numpy.ndarray]:
    """The `serving_raw` signature's inputs for instances: one array per feature, float32 with NaN or text with ""
    where an instance has no value. NumPy only: the TFLite model on a device takes the same arrays."""
    columns = {}
    for index, column in enumerate(FEATURES):
        if column.dtype == "string":
            columns[column.name] = numpy.array(["" if key[index] is None else key[index] for key in keys], object)
        else:
            columns[column.name] = numpy.array(
                [numpy.nan if key[index] is None else key[index] for key in keys], numpy.float32
            )
    return columns
