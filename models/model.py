"""Wide-and-deep Keras regressor of birth weight, its training (`fit`, the masking of optional inputs), and the
TFX Trainer's `run_fn`, which exports the model with the signatures of models/signatures.py."""

import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf
import tensorflow_transform as tft
from tensorflow.python.autograph.core import config as autograph_config
from tfx import v1 as tfx

from models import features, masking, signatures
from models.distribution import global_batch_size, select_strategy, write_dir
from models.preprocessing import dense_raw

SHUFFLE_BUFFER = 20_000
DTYPES = (tf.float32, tf.int64)  # the transformed features' types
COUNT_BATCH = 65_536
# The transformed training rows are kept in memory for the epochs after the first up to this size, and transformed
# again each epoch beyond it (a million rows take about 150 MB).
CACHE_MAX_BYTES = 4 * 2**30
# The Trainer validates at this many evenly spaced epochs (the last among them), not after each: a small data set
# trains in hundreds of short epochs, and validating after each took as long as training.
VALIDATIONS = 10
# Training steps per call into the graph: with the input cached, Keras' per-step round trip from Python
# costs about as much as a step of this model (1,500 steps: 16 s -> 12 s).
STEPS_PER_EXECUTION = 20
FILE_SPANS_KEY = "file_spans"  # set by the pipeline's Trainer executor: {file pattern: span}
WEIGHTS_FILE = "recency_weights.json"  # {file pattern: weight} the Trainer used, in its ModelRun folder
SETTINGS_FILE = "settings.json"  # the settings the Trainer trained with (the Tuner's values in), in the same folder
FIT_FILE = "fit.json"  # model.fit's examples, seconds and examples/s, in the same folder
# The Tuner's trials hold out one training row in this many (every fifth, by its place: `_records`) to validate on.
HOLDOUT_BUCKETS = 5
# {feature: share of training rows that keep its value}, the rest lose it: 0 trains a model "without" the
# feature, the reference that the serving-contract tests and `make quality --ablations` compare a model asked
# without it against; a share between 0 and 1 is a span where the feature is that rare (`make quality
# --presence`, the measurement behind the pipeline's min_imputed_presence).
PRESENCE_KEY = "feature_presence"

# TensorFlow's AutoGraph leaves the `keras` package unconverted, as Keras code runs as it is in graphs,
# but not its Keras 2 twin `tf_keras` that TFX 1.16 needs: converting it costs about 30 s of the
# Trainer's first epoch. Treat tf_keras as TensorFlow treats keras.
if not any(getattr(rule, "_prefix", None) == "tf_keras" for rule in autograph_config.CONVERSION_RULES):
    autograph_config.CONVERSION_RULES = (autograph_config.DoNotConvert("tf_keras"),) + tuple(
        autograph_config.CONVERSION_RULES
    )


def build_keras_model(
    hidden_units: List[int], embedding_dim: int, learning_rate: float, decay_steps: int = 0
) -> tf.keras.Model:
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
    output = tf.keras.layers.add(
        [
            tf.keras.layers.Dense(1, name="wide")(tf.keras.layers.concatenate(wide)),
            tf.keras.layers.Dense(1, name="deep")(hidden),
        ]
    )
    model = tf.keras.Model(inputs=inputs, outputs=output)
    # jit_compile=False: Keras' default XLA compilation costs about 25 s on CPU for a model that then
    # trains an epoch of 16k rows in under a second.
    # Cosine decay to 0 over the training steps: the last steps settle instead of jittering at the full
    # rate, so the exported model doesn't depend on where in a noisy last epoch training stopped.
    schedule = tf.keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps) if decay_steps else learning_rate
    model.compile(
        optimizer=tf.keras.optimizers.Adam(schedule),
        loss="mse",
        weighted_metrics=[tf.keras.metrics.RootMeanSquaredError(name="rmse")],
        jit_compile=False,
        steps_per_execution=STEPS_PER_EXECUTION,
    )
    return model


def recency_weights(file_spans: Dict[str, int], half_life_spans: float) -> Dict[str, float]:
    """Weight of each file pattern's examples: 1 for the newest span, halving every `half_life_spans` of age."""
    newest = max(file_spans.values())
    if not half_life_spans:
        return {pattern: 1.0 for pattern in file_spans}
    return {pattern: 0.5 ** ((newest - span) / half_life_spans) for pattern, span in file_spans.items()}


def file_weights(
    train_files: List[str], eval_files: List[str], file_spans: Optional[Dict[str, int]], half_life_spans: float
) -> Dict[str, float]:
    """The recency weight of each train and eval file pattern, from the span map the pipeline's Trainer
    executor adds (pipeline/components/spans.py). Without a map (one span, or `run_fn` called outside the pipeline)
    every file weighs 1; a map that misses a file is an error, not a silent weight of 1."""
    if file_spans is None:
        logging.info("no span map: every file weighs 1")
        return {pattern: 1.0 for pattern in train_files + eval_files}
    unmapped = [pattern for pattern in train_files + eval_files if pattern not in file_spans]
    if unmapped:
        raise ValueError(
            f"the span map ({', '.join(sorted(file_spans))}) has no span for the Trainer's file "
            f"pattern(s) {', '.join(unmapped)}: recency weights can't be given"
        )
    return recency_weights(file_spans, half_life_spans)


def _input_fn(
    file_patterns: List[str],
    weights: Dict[str, float],
    tf_transform_output: tft.TFTransformOutput,
    batch_size: int,
    shuffle: bool,
    mask_rate: float = 0.0,
    presence: Optional[Mapping[str, float]] = None,
    seed: int = 0,
    repeat: bool = False,
    holdout: Optional[bool] = None,
    cache: bool = False,
) -> tf.data.Dataset:
    """Raw examples of each span, transformed by the Transform graph, masked in transformed space
    (models/masking.py), as (features, label, weight).

    The weight is the span's recency weight, and 0 where the row has no label. The rows are transformed once
    and, with `cache`, kept in memory as the transform's batches (a few bytes a feature: `cache_fits`). Each
    transform batch (TRANSFORM_BATCH rows) is masked with its own seed, from `seed` and the batch's place in the
    input, so the same rows lose the same values whatever the batch size (every Tuner trial is scored on the same
    gaps), and each pass over repeated rows masks them afresh. With `repeat` the rows repeat without end before
    they are shuffled and batched, so every batch is full: workers of MultiWorkerMirroredStrategy must all step
    with batches of one shape. `holdout` picks rows as `_records` does.
    """
    raw_spec = signatures.raw_feature_spec(tf_transform_output, with_label=True)
    tft_layer = tf_transform_output.transform_features_layer()

    def transform(records: tf.Tensor, recency: tf.Tensor):
        parsed = tf.io.parse_example(records, raw_spec)
        transformed = tft_layer(
            signatures.sparse_raw({name: dense_raw(value) for name, value in parsed.items()}, raw_spec)
        )
        batch = {key: tf.reshape(value, [-1]) for key, value in transformed.items()}
        label = batch.pop(features.label_key())
        weight = batch.pop(features.label_weight_key()) * recency
        return batch, label, weight

    parts = []
    for pattern in file_patterns:
        recency = tf.constant(weights[pattern], tf.float32)
        parts.append(
            _records([pattern], holdout)
            .batch(signatures.TRANSFORM_BATCH)
            .map(lambda batch, w=recency: transform(batch, w), num_parallel_calls=tf.data.AUTOTUNE)
        )
    dataset = parts[0]
    for part in parts[1:]:
        dataset = dataset.concatenate(part)
    # Rows cross unbatch, shuffle and batch as two matrices (floats and ids) and their label and weight: tf.data's
    # cost is per element and per tensor, and a dict of every feature made that 13 s an epoch at 800,000 rows (2 s).
    keys = {d.name: sorted(k for k, s in dataset.element_spec[0].items() if s.dtype == d) for d in DTYPES}
    unpackable = sorted(set(dataset.element_spec[0]) - {key for names in keys.values() for key in names})
    if unpackable:
        raise ValueError(f"transformed features {', '.join(unpackable)} are none of {', '.join(keys)}: not packed")
    if cache:
        dataset = dataset.cache()
    if repeat:
        dataset = dataset.repeat()
    mask = (
        masking.TransformedMask(tft_layer, signatures.raw_feature_spec(tf_transform_output, with_label=False))
        if mask_rate or presence
        else None
    )

    def packed(index: tf.Tensor, batch: Tuple[Dict[str, tf.Tensor], tf.Tensor, tf.Tensor]):
        rows, label, weight = batch
        if mask:
            seed_index = tf.stack([tf.constant(seed, tf.int64), index])
            rows = mask(rows, masking.drops(tf.shape(label)[0], mask_rate, presence, seed_index))
        return {d: tf.stack([rows[k] for k in keys[d]], 1) for d in keys}, label, weight

    dataset = dataset.enumerate().map(packed).unbatch()
    if shuffle:
        # Each window of about SHUFFLE_BUFFER rows in a random order, cut into batches: tf.data's shuffle buffer did
        # as much row by row and took 4 times as long (10 s an epoch at 800,000 rows).
        window = -(-SHUFFLE_BUFFER // batch_size) * batch_size

        def shuffled(index: tf.Tensor, rows: Tuple[Dict[str, tf.Tensor], tf.Tensor, tf.Tensor]):
            draws = tf.random.stateless_uniform(tf.shape(rows[1]), tf.stack([tf.constant(seed, tf.int64), -1 - index]))
            order = tf.argsort(draws)
            return tf.nest.map_structure(lambda value: tf.gather(value, order), rows)

        dataset = dataset.batch(window).enumerate().map(shuffled).rebatch(batch_size)
    else:
        dataset = dataset.batch(batch_size)

    def unpacked(matrices: Dict[str, tf.Tensor], label: tf.Tensor, weight: tf.Tensor):
        return {key: matrices[d][:, i] for d in keys for i, key in enumerate(keys[d])}, label, weight

    return dataset.map(unpacked).prefetch(tf.data.AUTOTUNE)


def cache_fits(tf_transform_output: tft.TFTransformOutput, rows: int) -> bool:
    """Whether `rows` transformed rows fit in CACHE_MAX_BYTES (8 bytes a transformed feature, as int64 or less)."""
    return rows * 8 * len(tf_transform_output.transformed_feature_spec()) <= CACHE_MAX_BYTES


def _records(file_patterns: List[str], holdout: Optional[bool] = None) -> tf.data.Dataset:
    """The serialized examples of gzipped TFRecord files: all of them, only the held-out ones (`holdout` True:
    one row in HOLDOUT_BUCKETS, every fifth of each file pattern), or all but those (False).

    Rows are held out by their place: ExampleGen writes the same rows in the same order on every run.
    """
    parts = []
    for pattern in file_patterns:
        part = tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern)), compression_type="GZIP")
        if holdout is not None:
            part = (
                part.enumerate()
                .filter(lambda index, _: tf.equal(tf.equal(index % HOLDOUT_BUCKETS, 0), holdout))
                .map(lambda _, record: record)
            )
        parts.append(part)
    records = parts[0]
    for part in parts[1:]:
        records = records.concatenate(part)
    return records


def _count_records(file_patterns: List[str], holdout: Optional[bool] = None) -> int:
    """Number of examples in gzipped TFRecord files (see `_records`), counted without parsing them, a batch at a
    time (one at a time, tf.data's per-element cost made counting a million rows take seconds). The held-out
    rows are every HOLDOUT_BUCKETS-th of each pattern's, the first included: counted from each pattern's total."""
    count = 0
    for pattern in file_patterns:
        rows = int(
            _records([pattern])
            .batch(COUNT_BATCH)
            .reduce(tf.constant(0, tf.int64), lambda total, batch: total + tf.size(batch, out_type=tf.int64))
        )
        held = -(-rows // HOLDOUT_BUCKETS)
        count += rows if holdout is None else held if holdout else rows - held
    return count


def training_schedule(train_examples: int, batch_size: int, epochs: int, min_steps: int) -> Tuple[int, int]:
    """Steps per epoch and epochs: `epochs` passes over the data, but at least `min_steps` steps in all,
    so that a small data set still trains to convergence and a large one isn't cut short."""
    steps_per_epoch = max(1, math.ceil(train_examples / batch_size))
    return steps_per_epoch, max(epochs, math.ceil(min_steps / steps_per_epoch))


def validation_epochs(epochs: int) -> List[int]:
    """The epochs (1-based) after which the Trainer validates: VALIDATIONS of them (or each, if fewer), evenly
    spaced, the last one among them."""
    return sorted({math.ceil(epochs * k / VALIDATIONS) for k in range(1, VALIDATIONS + 1)})


def trainer_settings(fn_args: tfx.components.FnArgs) -> Dict[str, Any]:
    """The pipeline's settings for the model (custom_config), with the Tuner's best values, where the Trainer
    was given them (fn_args.hyperparameters: a KerasTuner HyperParameters config), in place of the profile's."""
    settings = dict(fn_args.custom_config)
    tuned = (getattr(fn_args, "hyperparameters", None) or {}).get("values", {})
    unknown = sorted(set(tuned) - set(settings))
    if unknown:
        raise ValueError(
            f"the Tuner's best hyperparameters name {', '.join(unknown)}, which the Trainer's settings "
            f"({', '.join(sorted(settings))}) don't have"
        )
    settings.update(tuned)
    return settings


def hidden_units(value: Any) -> List[int]:
    """Units of each hidden layer: a list, or text as the profile and the Tuner write it ('256,128')."""
    return [int(units) for units in value.split(",")] if isinstance(value, str) else [int(units) for units in value]


def fit(
    settings: Mapping[str, Any],
    tf_transform_output: tft.TFTransformOutput,
    train_files: List[str],
    eval_files: List[str],
    weights: Dict[str, float],
    strategy: tf.distribute.Strategy,
    holdout: bool = False,
    validation_mask_rate: float = 0.0,
    callbacks: Sequence[tf.keras.callbacks.Callback] = (),
) -> Tuple[tf.keras.Model, Dict[str, List[float]]]:
    """A model trained with `settings` (the Trainer's, or a Tuner trial's), and its history.

    It trains on `train_files` and is validated on `eval_files` after `validation_epochs(epochs)`. With `holdout`
    (the Tuner's trials) it trains on the train files' rows but one in HOLDOUT_BUCKETS and is validated once, at
    the end, on that one, each held-out row once whatever the batch size, masked as `masking.drops` says at
    `validation_mask_rate` (with the seed, so every trial is scored on the same rows and the same gaps), so that
    the search never sees the eval split the Evaluator scores the chosen model on.
    """
    # Seeded: the same data, code and settings give the same model (initial weights, shuffling, masking).
    tf.keras.utils.set_random_seed(settings["seed"])
    batch_size = global_batch_size(settings["batch_size"], strategy)
    train_part, validation_files, validation_part = (False, train_files, True) if holdout else (None, eval_files, None)
    train_examples = _count_records(train_files, train_part)
    validation_examples = _count_records(validation_files, validation_part)
    steps_per_epoch, epochs = training_schedule(
        train_examples, batch_size, settings["train_epochs"], settings["min_train_steps"]
    )
    validations = [epochs] if holdout else validation_epochs(epochs)
    train_dataset = _input_fn(
        train_files,
        weights,
        tf_transform_output,
        batch_size,
        shuffle=True,
        mask_rate=settings["mask_rate"],
        presence=settings.get(PRESENCE_KEY),
        seed=settings["seed"],
        repeat=True,
        holdout=train_part,
        cache=epochs > 1 and cache_fits(tf_transform_output, train_examples),
    )
    # The Trainer's eval batches repeat so that every step has a full batch (MultiWorkerMirroredStrategy's
    # workers must step alike); a trial's are read once, so that no held-out row counts twice.
    validation_dataset = _input_fn(
        validation_files,
        weights,
        tf_transform_output,
        batch_size,
        shuffle=False,
        mask_rate=validation_mask_rate,
        seed=settings["seed"],
        repeat=not holdout,
        holdout=validation_part,
        # One budget for both: the validation rows are kept only if they fit beside the training rows.
        cache=len(validations) > 1 and cache_fits(tf_transform_output, train_examples + validation_examples),
    )
    with strategy.scope():
        model = build_keras_model(
            hidden_units(settings["hidden_units"]),
            int(settings["embedding_dim"]),
            float(settings["learning_rate"]),
            decay_steps=steps_per_epoch * epochs,
        )
    history = model.fit(
        train_dataset,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        validation_data=validation_dataset,
        validation_steps=max(1, math.ceil(validation_examples / batch_size)),
        validation_freq=validations,
        callbacks=[
            *callbacks,
            tf.keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs: logging.info("epoch %d/%d: %s", epoch + 1, epochs, logs)
            ),
        ],
        verbose=0,
    )
    return model, history.history


class FitTimer(tf.keras.callbacks.Callback):
    """The training throughput of a model.fit: examples trained, seconds (masking and transforming the rows,
    and validating, included: the Trainer's own pace) and examples/s."""

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        self._started, self._epochs = time.time(), 0

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        self._epochs += 1

    def on_train_end(self, logs: Optional[Dict[str, Any]] = None) -> None:
        self._seconds = time.time() - self._started

    def record(self, batch_size: int) -> Dict[str, Any]:
        examples = self.params["steps"] * self._epochs * batch_size
        return {
            "examples": examples,
            "steps": self.params["steps"] * self._epochs,
            "batch_size": batch_size,
            "seconds": round(self._seconds, 1),
            "examples_per_second": round(examples / self._seconds),
        }


def run_fn(fn_args: tfx.components.FnArgs) -> None:
    """TFX Trainer entry point: trains on the train split of the window's spans and exports the serving model."""
    settings = trainer_settings(fn_args)
    tf_transform_output = tft.TFTransformOutput(fn_args.transform_output)
    strategy = select_strategy(settings["strategy"], settings["tpu_address"])
    weights = file_weights(
        fn_args.train_files, fn_args.eval_files, settings.get(FILE_SPANS_KEY), settings["recency_half_life_spans"]
    )
    logging.info("training files and their recency weights: %s", weights)
    # Only the chief writes the model and the logs where TFX expects them (the other workers to temporary folders).
    serving_dir, log_dir = write_dir(fn_args.serving_model_dir, strategy), write_dir(fn_args.model_run_dir, strategy)
    tf.io.gfile.makedirs(log_dir)
    with tf.io.gfile.GFile(os.path.join(log_dir, WEIGHTS_FILE), "w") as handle:  # the weights, for whoever asks
        json.dump(weights, handle, indent=1)
    with tf.io.gfile.GFile(os.path.join(log_dir, SETTINGS_FILE), "w") as handle:  # what this model was trained with
        json.dump({key: value for key, value in settings.items() if key != FILE_SPANS_KEY}, handle, indent=1)
    timer = FitTimer()
    model, _ = fit(
        settings,
        tf_transform_output,
        fn_args.train_files,
        fn_args.eval_files,
        weights,
        strategy,
        callbacks=[tf.keras.callbacks.TensorBoard(log_dir=log_dir, update_freq="epoch"), timer],
    )
    with tf.io.gfile.GFile(os.path.join(log_dir, FIT_FILE), "w") as handle:  # for `make bench`
        json.dump(timer.record(global_batch_size(settings["batch_size"], strategy)), handle, indent=1)
    # save_traces=False: the signatures are all that serving and TFMA call, and tracing every layer
    # for Keras' own reloading would double the export time and the model's load time.
    model.save(
        serving_dir,
        save_format="tf",
        save_traces=False,
        signatures=signatures.serving_signatures(model, tf_transform_output),
    )
    frequent_path = os.path.join(serving_dir, features.FREQUENT_INSTANCES_FILE)
    tf.io.gfile.makedirs(os.path.dirname(frequent_path))
    with tf.io.gfile.GFile(frequent_path, "w") as handle:
        json.dump(signatures.frequent_instances(fn_args.train_files, tf_transform_output), handle)
    for own, shared in ((serving_dir, fn_args.serving_model_dir), (log_dir, fn_args.model_run_dir)):
        if own != shared:  # a worker's copy, written only because saving is collective
            tf.io.gfile.rmtree(own)
    # Every worker waits here until the chief has written the model: TFX's executor then checks, on each
    # worker, that the model exists.
    strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1.0)), axis=None)
