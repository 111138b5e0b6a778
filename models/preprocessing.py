"""`preprocessing_fn` for TF Transform: every mapping the model needs, saved in its serving graph.

Vocabularies, means and variances are computed by TFT analyzers over the training split and frozen
into the transform graph, which the exported model applies to raw examples at serving time, so
training and serving cannot skew. 'Unknown' codes (e.g. 99 for father_age) are missing values here
(`is_missing`), as they are to the serving contract's check and to training's masking of inputs.

Each mapping is a function of the raw values and of what the analyzers learnt (`Analyzed`), and has one
definition here: `preprocessing_fn` calls it with the analyzers' tensors, and `transform_dense` (the exported
model's `serving_raw`, models/signatures.py) with the same values as constants, read back from the run's
transform graph (`read_analyzed`), on every numeric feature at once: [rows, features] in one clip, one
imputation and one division.
"""

import dataclasses
import math
from typing import Any, Dict, Sequence, Tuple, Union

import tensorflow as tf
import tensorflow_transform as tft

from models import features
from models.features import Column, Transform

# The features each kind of mapping takes, in FEATURES order (Analyzed's values follow it).
NUMERIC_FEATURES: Tuple[Column, ...] = tuple(features.numeric_features())
CATEGORY_FEATURES: Tuple[Column, ...] = tuple(c for c in features.FEATURES if c.transform is Transform.CATEGORY)
VOCABULARY_FEATURES: Tuple[Column, ...] = tuple(c for c in features.FEATURES if c.transform is Transform.VOCABULARY)
# serving_raw's float32 inputs, read side by side (numeric and category features).
NUMBER_FEATURES: Tuple[Column, ...] = tuple(c for c in features.FEATURES if c.dtype != "string")
# Each analyzer value's name in the transform graph: this prefix and its field of `Analyzed`.
ANALYZED_PREFIX = "analyzed_"


@dataclasses.dataclass(frozen=True)
class Analyzed:
    """What the analyzers learnt from the training split, as the mappings take it: tensors in `preprocessing_fn`,
    constants in `transform_dense`. One value per numeric feature (NUMERIC_FEATURES order), one vocabulary per
    text feature (VOCABULARY_FEATURES order)."""

    lows: Any  # [numeric features] each one's smallest known value
    highs: Any  # [numeric features] its largest
    means: Any  # [numeric features] the mean of its known values
    variances: Any  # [numeric features] their variance
    vocabularies: Any  # [text features, VOCABULARY_SIZE] the most frequent values, most frequent first, then ""


def dense_raw(value: tf.Tensor) -> tf.Tensor:
    """A raw feature as one value per row: text ("" where none) or float32 (NaN where none).

    Takes the sparse tensor parsed from tf.Examples (a row may have no value) or a dense one.
    """
    if isinstance(value, tf.sparse.SparseTensor):
        if value.dtype != tf.string:
            value = tf.sparse.map_values(tf.cast, value, tf.float32)
        return _one_per_row(value, "" if value.dtype == tf.string else float("nan"))
    if value.dtype != tf.string:
        value = tf.cast(value, tf.float32)
    return tf.reshape(value, [-1])


def _one_per_row(value: tf.sparse.SparseTensor, default: Any) -> tf.Tensor:
    """A sparse feature's value in each row, `default` where a row has none (the schema allows one value a row)."""
    return tf.reshape(
        tf.sparse.to_dense(tf.sparse.SparseTensor(value.indices, value.values, [value.dense_shape[0], 1]), default),
        [-1],
    )


def is_missing(columns: Union[Column, Sequence[Column]], value: tf.Tensor) -> tf.Tensor:
    """The one definition of a missing value: none ("" or NaN in `dense_raw`'s form), or an 'unknown' code.

    `value` is one column's values, or several numeric columns' side by side ([rows, len(columns)]): each code is
    then compared once for all of them.
    """
    if value.dtype == tf.string:
        return tf.equal(value, "")
    columns = [columns] if isinstance(columns, Column) else columns
    missing = tf.math.is_nan(value)
    for place in range(max(len(c.missing_codes) for c in columns)):
        # Each column's code at this place; NaN, equal to nothing, for a column with fewer codes.
        codes = [c.missing_codes[place] if place < len(c.missing_codes) else math.nan for c in columns]
        missing = missing | tf.equal(value, tf.constant(codes, value.dtype))
    return missing


def numeric_inputs(numbers: tf.Tensor, missing: tf.Tensor, analyzed: Analyzed) -> Dict[str, tf.Tensor]:
    """The model's inputs of the numeric features: each one's imputed z-score and missing indicator (plus bucket id),
    from their values side by side ([rows, NUMERIC_FEATURES] as `dense_raw` gives them) and which are missing."""
    # A value beyond the training data's range (98 earlier births, 98 weeks: the schema allows up to the
    # 'unknown' code 99) is taken as the range's end: the model has learnt nothing out there, and a linear
    # extrapolation answered 64 lb (the infra validator's edge cases found it).
    clipped = tf.clip_by_value(numbers, analyzed.lows, analyzed.highs)
    std = tf.sqrt(analyzed.variances)
    zscores = (tf.where(missing, analyzed.means, clipped) - analyzed.means) / tf.maximum(std, 1e-6)
    outputs = {}
    for place, (column, zscore, indicator) in enumerate(
        zip(NUMERIC_FEATURES, tf.unstack(zscores, axis=1), tf.unstack(tf.cast(missing, tf.float32), axis=1))
    ):
        outputs[features.transformed_name(column.name)] = zscore
        outputs[features.missing_key(column)] = indicator
        if column.transform is Transform.ZSCORE_AND_BUCKETS:
            outputs[features.transformed_name(features.bucket_name(column))] = _bucket_ids(
                column, clipped[:, place], missing[:, place]
            )
    return outputs


def _bucket_ids(column: Column, clipped: tf.Tensor, missing: tf.Tensor) -> tf.Tensor:
    """Bucket of a numeric feature's value (within the training range) at column.bucket_boundaries; missing values
    share the id after the last bucket."""
    buckets = tf.raw_ops.Bucketize(input=tf.where(missing, 0.0, clipped), boundaries=list(column.bucket_boundaries))
    return tf.where(missing, tf.constant(len(column.bucket_boundaries) + 1, tf.int64), tf.cast(buckets, tf.int64))


def category_ids(column: Column, value: tf.Tensor) -> tf.Tensor:
    """Position of an integer code (float32, as `dense_raw` gives it) in column.categories; unknown or missing codes
    share the last id."""
    matches = tf.equal(tf.expand_dims(value, 1), tf.constant(column.categories, tf.float32))
    # ArgMax of float32, not of int64: TensorFlow Lite's builtin ArgMax takes no int64 input.
    return tf.where(
        tf.reduce_any(matches, axis=1),
        tf.argmax(tf.cast(matches, tf.float32), axis=1),
        tf.constant(len(column.categories), tf.int64),
    )


def vocabulary_ids(value: tf.Tensor, vocabulary: tf.Tensor) -> tf.Tensor:
    """Position of each text in `vocabulary` (Analyzed.vocabularies' row: VOCABULARY_SIZE texts, "" after the training
    data's values); a text never seen and a missing one ("" matches the padding) share the id VOCABULARY_SIZE.

    The values are compared with the vocabulary as a constant of the graph, not looked up in a table read from a file:
    TensorFlow Lite's builtin ops have no hashed out-of-vocabulary buckets, its tables need an initialisation the
    converter doesn't carry over from a SavedModel, and the TFLite model runs on builtin ops alone (models/lite.py).
    The id is arithmetic on the matches, the smallest of (position - VOCABULARY_SIZE) where a text matches, 0
    elsewhere, plus VOCABULARY_SIZE: a Select of them took twice as long on 64 rows, and an ArgMax fails on an empty
    vocabulary (no value in training).
    """
    size = features.VOCABULARY_SIZE
    matches = tf.cast(tf.equal(tf.expand_dims(value, -1), vocabulary), tf.float32)
    offsets = tf.where(tf.equal(vocabulary, ""), 0.0, tf.range(size, dtype=tf.float32) - size)
    return tf.cast(tf.reduce_min(matches * offsets, axis=-1), tf.int64) + size


def crosses(outputs: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """The crossed ids (features.CROSSES) of transformed features: the transform's, and training's masking's."""
    sizes = features.id_sizes()
    return {
        features.transformed_name(features.cross_name(first, second)): outputs[features.transformed_name(first)]
        * sizes[second]
        + outputs[features.transformed_name(second)]
        for first, second in features.CROSSES
    }


def _present_texts(value: tf.Tensor) -> tf.sparse.SparseTensor:
    """A text feature's values as a sparse tensor without "" (a tf.Example may hold "" as a value): only the values
    present are compared with the vocabulary, as TensorFlow Lite's builtin ops have no text made dense (SparseToDense
    of strings) for the transform graph's conversion."""
    if not isinstance(value, tf.sparse.SparseTensor):
        value = tf.sparse.from_dense(tf.reshape(value, [-1, 1]))
    return tf.sparse.retain(value, tf.not_equal(value.values, ""))


def _analyze(numbers: tf.Tensor, missing: tf.Tensor, texts: Sequence[tf.sparse.SparseTensor]) -> Analyzed:
    """The analyzers over the training split, each value named in the graph for `read_analyzed`."""
    known = [tf.boolean_mask(numbers[:, place], ~missing[:, place]) for place in range(len(NUMERIC_FEATURES))]
    vocabularies = []
    for value in texts:
        # One pass over the data, with the means and variances: the values and their counts, as tensors.
        # Ties go to the value first in byte order (TFT returns the keys sorted; the sort by count is stable).
        keys, counts = tft.count_per_key(value)
        vocabulary = tf.gather(keys, tf.argsort(-counts, stable=True))[: features.VOCABULARY_SIZE]
        vocabularies.append(
            tf.pad(vocabulary, [[0, features.VOCABULARY_SIZE - tf.size(vocabulary)]], constant_values="")
        )
    analyzed = Analyzed(
        lows=tft.min(tf.where(missing, math.inf, numbers), reduce_instance_dims=False),
        highs=tft.max(tf.where(missing, -math.inf, numbers), reduce_instance_dims=False),
        means=tf.stack([tft.mean(values) for values in known]),
        variances=tf.stack([tft.var(values) for values in known]),
        vocabularies=tf.stack(vocabularies),
    )
    return Analyzed(
        **{
            field.name: tf.identity(getattr(analyzed, field.name), name=ANALYZED_PREFIX + field.name)
            for field in dataclasses.fields(Analyzed)
        }
    )


def read_analyzed(tf_transform_output: tft.TFTransformOutput) -> Analyzed:
    """The analyzers' values in a run's transform graph, where `preprocessing_fn` named them, as numpy arrays.

    Passed on in the graph itself: TF Transform's way to attach values to the transformed schema
    (tft.schema_inference.annotate) writes nothing in its open-source build, which lacks its annotations_pb2.
    """
    imported = tf.saved_model.load(tf_transform_output.transform_savedmodel_dir)
    names = {field.name: ANALYZED_PREFIX + field.name for field in dataclasses.fields(Analyzed)}
    found = {
        op.name.rpartition("/")[2]: op.outputs[0]
        for op in imported.graph.get_operations()
        if op.name.rpartition("/")[2] in names.values()
    }
    lacking = sorted(set(names.values()) - set(found))
    if lacking:
        raise ValueError(
            f"the transform graph in {tf_transform_output.transform_savedmodel_dir} has no {', '.join(lacking)}: "
            "an older preprocessing_fn wrote it; run the Transform again"
        )
    values = imported.prune(feeds=[], fetches={field: found[name] for field, name in names.items()})()
    return Analyzed(**{field: value.numpy() for field, value in values.items()})


def transform_dense(columns: Dict[str, tf.Tensor], analyzed: Analyzed) -> Tuple[Dict[str, tf.Tensor], tf.Tensor]:
    """serving_raw's transform: the model's inputs from one dense tensor per raw feature (float32 with NaN, or text
    with "", where a row has none), and which rows lack each required feature ([rows, REQUIRED_FEATURES]).

    The mappings of `preprocessing_fn` with `analyzed` as constants, taking the dense tensors as they come: TF
    Transform's graph takes a tf.Example's sparse tensors, which serving_raw used to build for it. A number is read
    as training read it (`_as_read`). The required features are numbers.
    """
    numbers = _as_read(NUMBER_FEATURES, tf.stack([columns[c.name] for c in NUMBER_FEATURES], axis=1))
    missing = is_missing(NUMBER_FEATURES, numbers)
    numeric = [NUMBER_FEATURES.index(c) for c in NUMERIC_FEATURES]
    outputs = numeric_inputs(tf.gather(numbers, numeric, axis=1), tf.gather(missing, numeric, axis=1), analyzed)
    for column in CATEGORY_FEATURES:
        outputs[features.transformed_name(column.name)] = category_ids(
            column, numbers[:, NUMBER_FEATURES.index(column)]
        )
    # A vocabulary a feature at a time: TensorFlow's comparison of texts broadcast over [rows, features, vocabulary]
    # took about twice as long on 64 rows as over [rows, vocabulary] twice.
    for column, vocabulary in zip(VOCABULARY_FEATURES, analyzed.vocabularies):
        outputs[features.transformed_name(column.name)] = vocabulary_ids(columns[column.name], vocabulary)
    outputs.update(crosses(outputs))
    required = [NUMBER_FEATURES.index(c) for c in features.REQUIRED_FEATURES]
    return outputs, tf.gather(missing, required, axis=1)


def _as_read(columns: Sequence[Column], numbers: tf.Tensor) -> tf.Tensor:
    """Numbers ([rows, len(columns)], float32) as training read them from tf.Examples: an integer column's as its
    int64 (99.5 weeks is 99, the 'unknown' code), NaN (no value) kept."""
    integers = tf.constant([c.dtype == "int" for c in columns])
    read = tf.cast(tf.cast(numbers, tf.int64), tf.float32)
    return tf.where(integers & ~tf.math.is_nan(numbers), read, numbers)


def preprocessing_fn(inputs: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """Maps raw natality features to the model's inputs, and the label to a label plus a weight."""
    numbers = tf.stack([dense_raw(inputs[c.name]) for c in NUMERIC_FEATURES], axis=1)
    missing = is_missing(NUMERIC_FEATURES, numbers)
    texts = [_present_texts(inputs[c.name]) for c in VOCABULARY_FEATURES]
    analyzed = _analyze(numbers, missing, texts)
    outputs = numeric_inputs(numbers, missing, analyzed)
    for column in CATEGORY_FEATURES:
        outputs[features.transformed_name(column.name)] = category_ids(column, dense_raw(inputs[column.name]))
    for column, value, vocabulary in zip(VOCABULARY_FEATURES, texts, tf.unstack(analyzed.vocabularies)):
        ids = tf.sparse.SparseTensor(value.indices, vocabulary_ids(value.values, vocabulary), value.dense_shape)
        outputs[features.transformed_name(column.name)] = _one_per_row(
            ids, tf.constant(features.VOCABULARY_SIZE, tf.int64)
        )
    outputs.update(crosses(outputs))
    if features.LABEL.name in inputs:  # absent at serving time
        label = dense_raw(inputs[features.LABEL.name])
        present = ~tf.math.is_nan(label)
        outputs[features.label_key()] = tf.where(present, label, 0.0)
        outputs[features.label_weight_key()] = tf.cast(present, tf.float32)
    return outputs
