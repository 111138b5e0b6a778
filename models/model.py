"""Wide-and-deep Keras regressor of birth weight, and the TFX Trainer's `run_fn`.

The exported SavedModel carries the TF Transform graph, so every signature takes raw features:
- `serving_default`: serialized tf.Example (no label) -> {"predictions": pounds};
- `serving_raw`: one tensor per raw feature (NaN or "" = missing) -> {"predictions": pounds};
- `transform_features`: serialized tf.Example -> transformed features (TFMA slices and labels on it).
"""
import logging
import math
from typing import Any, Dict, List, Tuple

import tensorflow as tf
import tensorflow_transform as tft
from tensorflow.python.autograph.core import config as autograph_config
from tfx import v1 as tfx

from models import features
from models.distribution import global_batch_size, select_strategy

PREDICTIONS = "predictions"
SHUFFLE_BUFFER = 20_000
TRANSFORM_BATCH = 1024
FILE_SPANS_KEY = "file_spans"  # set by the pipeline's Trainer executor: {file pattern: span}

# TensorFlow's AutoGraph leaves the `keras` package unconverted, as Keras code runs as it is in graphs,
# but not its Keras 2 twin `tf_keras` that TFX 1.16 needs: converting it costs about 30 s of the
# Trainer's first epoch. Treat tf_keras as TensorFlow treats keras.
if not any(getattr(rule, "_prefix", None) == "tf_keras" for rule in autograph_config.CONVERSION_RULES):
    autograph_config.CONVERSION_RULES = (
        (autograph_config.DoNotConvert("tf_keras"),) + tuple(autograph_config.CONVERSION_RULES))


def build_keras_model(hidden_units: List[int], embedding_dim: int, learning_rate: float) -> tf.keras.Model:
    """Wide part: one-hot ids, buckets and crosses; deep part: embeddings and scaled numerics."""
    inputs: Dict[str, tf.keras.Input] = {}
    wide, deep = [], []
    for name, size in features.id_sizes().items():
        key = features.transformed_name(name)
        inputs[key] = tf.keras.Input(shape=(), name=key, dtype=tf.int64)
        # A one-dimensional embedding is a linear model over the one-hot id: the wide part's weights.
        wide.append(tf.keras.layers.Embedding(size, 1)(inputs[key]))
        deep.append(tf.keras.layers.Embedding(size, embedding_dim)(inputs[key]))
    for column in features.numeric_features():
        for key in (features.transformed_name(column.name), features.missing_key(column)):
            inputs[key] = tf.keras.Input(shape=(), name=key, dtype=tf.float32)
            deep.append(tf.keras.layers.Reshape((1,))(inputs[key]))
    hidden = tf.keras.layers.concatenate(deep)
    for units in hidden_units:
        hidden = tf.keras.layers.Dense(units, activation="relu")(hidden)
    output = tf.keras.layers.add([
        tf.keras.layers.Dense(1, name="wide")(tf.keras.layers.concatenate(wide)),
        tf.keras.layers.Dense(1, name="deep")(hidden),
    ])
    model = tf.keras.Model(inputs=inputs, outputs=output)
    # jit_compile=False: Keras' default XLA compilation costs about 25 s on CPU for a model that then
    # trains an epoch of 16k rows in under a second.
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate), loss="mse",
                  weighted_metrics=[tf.keras.metrics.RootMeanSquaredError(name="rmse")], jit_compile=False)
    return model


def recency_weights(file_spans: Dict[str, int], half_life_spans: float) -> Dict[str, float]:
    """Weight of each file pattern's examples: 1 for the newest span, halving every `half_life_spans` of age."""
    newest = max(file_spans.values())
    if not half_life_spans:
        return {pattern: 1.0 for pattern in file_spans}
    return {pattern: 0.5 ** ((newest - span) / half_life_spans) for pattern, span in file_spans.items()}


def _input_fn(file_patterns: List[str], weights: Dict[str, float], tf_transform_output: tft.TFTransformOutput,
              batch_size: int, shuffle: bool) -> tf.data.Dataset:
    """Raw examples of each span, transformed by the Transform graph, as (features, label, weight).

    The weight is the span's recency weight, and 0 where the row has no label. Examples are transformed
    once and cached, so later epochs cost only the model's own work.
    """
    raw_spec = _raw_feature_spec(tf_transform_output, with_label=True)
    tft_layer = tf_transform_output.transform_features_layer()

    def transform(records: tf.Tensor, recency: tf.Tensor):
        transformed = tft_layer(tf.io.parse_example(records, raw_spec))
        batch = {key: tf.reshape(value, [-1]) for key, value in transformed.items()}
        label = batch.pop(features.label_key())
        weight = batch.pop(features.label_weight_key()) * recency
        return batch, label, weight

    parts = []
    for pattern in file_patterns:
        records = tf.data.TFRecordDataset(tf.io.gfile.glob(pattern), compression_type="GZIP")
        recency = tf.constant(weights.get(pattern, 1.0), tf.float32)
        parts.append(records.batch(TRANSFORM_BATCH).map(lambda batch, w=recency: transform(batch, tf.fill(
            tf.shape(batch), w)), num_parallel_calls=tf.data.AUTOTUNE).unbatch())
    dataset = parts[0]
    for part in parts[1:]:
        dataset = dataset.concatenate(part)
    dataset = dataset.cache()
    if shuffle:
        dataset = dataset.shuffle(SHUFFLE_BUFFER, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _raw_feature_spec(tf_transform_output: tft.TFTransformOutput, with_label: bool) -> Dict[str, Any]:
    spec = tf_transform_output.raw_feature_spec()
    if not with_label:
        spec.pop(features.LABEL.name)
    return spec


def serving_signatures(model: tf.keras.Model, tf_transform_output: tft.TFTransformOutput) -> Dict[str, Any]:
    """The exported model's signatures, each applying the transform graph to raw features."""
    model.tft_layer = tf_transform_output.transform_features_layer()
    label_keys = (features.label_key(), features.label_weight_key())

    def predict(raw_features: Dict[str, Any]) -> Dict[str, tf.Tensor]:
        transformed = model.tft_layer(raw_features)
        inputs = {key: value for key, value in transformed.items() if key not in label_keys}
        return {PREDICTIONS: model(inputs)}

    raw_spec = _raw_feature_spec(tf_transform_output, with_label=False)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")], autograph=False)
    def serve_examples(serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
        return predict(tf.io.parse_example(serialized, raw_spec))

    raw_inputs = [
        tf.TensorSpec([None], tf.string if raw_spec[c.name].dtype == tf.string else tf.float32, name=c.name)
        for c in features.FEATURES]

    @tf.function(input_signature=raw_inputs, autograph=False)
    def serve_raw(*values: tf.Tensor) -> Dict[str, tf.Tensor]:
        raw = {}
        for column, value in zip(features.FEATURES, values):
            present = tf.not_equal(value, "") if value.dtype == tf.string else ~tf.math.is_nan(value)
            indices = tf.where(present)
            kept = tf.cast(tf.boolean_mask(value, present), raw_spec[column.name].dtype)
            raw[column.name] = tf.sparse.SparseTensor(
                tf.concat([indices, tf.zeros_like(indices)], axis=1), kept,
                tf.stack([tf.shape(value, out_type=tf.int64)[0], tf.constant(1, tf.int64)]))
        return predict(raw)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")], autograph=False)
    def transform_features(serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
        return model.tft_layer(tf.io.parse_example(serialized, _raw_feature_spec(tf_transform_output, True)))

    return {
        "serving_default": serve_examples,
        "serving_raw": serve_raw,
        "transform_features": transform_features,
    }


def _count_records(file_pattern: List[str]) -> int:
    """Number of examples in gzipped TFRecord files, counted without parsing them."""
    files = tf.io.gfile.glob(file_pattern)
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP")
    return int(dataset.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))


def training_schedule(train_examples: int, batch_size: int, epochs: int, min_steps: int) -> Tuple[int, int]:
    """Steps per epoch and epochs: `epochs` passes over the data, but at least `min_steps` steps in all,
    so that a small data set still trains to convergence and a large one isn't cut short."""
    steps_per_epoch = max(1, math.ceil(train_examples / batch_size))
    return steps_per_epoch, max(epochs, math.ceil(min_steps / steps_per_epoch))


def run_fn(fn_args: tfx.components.FnArgs) -> None:
    """TFX Trainer entry point: trains on the train split of the window's spans and exports the serving model."""
    hyperparameters = fn_args.custom_config
    tf_transform_output = tft.TFTransformOutput(fn_args.transform_output)
    strategy = select_strategy(hyperparameters["strategy"], hyperparameters["tpu_address"])
    batch_size = global_batch_size(hyperparameters["batch_size"], strategy)
    weights = recency_weights(hyperparameters.get(FILE_SPANS_KEY) or {p: 0 for p in fn_args.train_files},
                              hyperparameters["recency_half_life_spans"])
    logging.info("training files and their recency weights: %s", weights)
    train_dataset = _input_fn(fn_args.train_files, weights, tf_transform_output, batch_size, shuffle=True)
    eval_dataset = _input_fn(fn_args.eval_files, weights, tf_transform_output, batch_size, shuffle=False)
    steps_per_epoch, epochs = training_schedule(
        _count_records(fn_args.train_files), batch_size, hyperparameters["train_epochs"],
        hyperparameters["min_train_steps"])
    with strategy.scope():
        model = build_keras_model(
            hyperparameters["hidden_units"], hyperparameters["embedding_dim"], hyperparameters["learning_rate"])
    model.fit(
        train_dataset.repeat(),
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        validation_data=eval_dataset,
        callbacks=[
            tf.keras.callbacks.TensorBoard(log_dir=fn_args.model_run_dir, update_freq="epoch"),
            tf.keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: logging.info("epoch %d/%d: %s", epoch + 1, epochs, logs)),
        ],
        verbose=0)
    # save_traces=False: the signatures are all that serving and TFMA call, and tracing every layer
    # for Keras' own reloading would double the export time and the model's load time.
    model.save(fn_args.serving_model_dir, save_format="tf", save_traces=False,
               signatures=serving_signatures(model, tf_transform_output))
