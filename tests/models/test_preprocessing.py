"""preprocessing_fn, run through TF Transform's Beam implementation on a few rows."""

import tempfile

import numpy as np
import pytest
import tensorflow_transform.beam as tft_beam
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils

from models import features, preprocessing
from pipeline import config as config_lib
from pipeline.commands.run import load_schema

USED = [c.name for c in features.FEATURES] + [features.LABEL.name]
ROWS = [  # father_age 99 and weight_gain_pounds 99 are the table's 'unknown' codes
    dict(
        is_male=[b"true"],
        mother_age=[20],
        plurality=[1],
        gestation_weeks=[40],
        mother_married=[b"true"],
        weight_gain_pounds=[30],
        ever_born=[1],
        father_age=[22],
        weight_pounds=[8.0],
    ),
    dict(
        is_male=[b"false"],
        mother_age=[30],
        plurality=[2],
        gestation_weeks=[30],
        mother_married=[b"false"],
        weight_gain_pounds=[99],
        ever_born=[2],
        father_age=[99],
        weight_pounds=[3.0],
    ),
    dict(
        is_male=[b"true"],
        mother_age=[40],
        plurality=[9],
        gestation_weeks=[],
        mother_married=[],
        weight_gain_pounds=[10],
        ever_born=[],
        father_age=[42],
        weight_pounds=[],
    ),
]


def _rows_and_metadata():
    """ROWS as TF Transform's Beam API takes them, with their metadata from the schema."""
    spec = schema_utils.schema_as_feature_spec(load_schema(config_lib.load_config())).feature_spec
    metadata = dataset_metadata.DatasetMetadata(
        schema_utils.schema_from_feature_spec({name: spec[name] for name in USED})
    )
    rows = [
        {k: np.array(v, dtype=np.object_ if v and isinstance(v[0], bytes) else None) for k, v in row.items()}
        for row in ROWS
    ]
    return rows, metadata


@pytest.fixture(scope="module")
def transformed():
    rows, metadata = _rows_and_metadata()
    # TF1 mode, as the pipeline's Transform runs it (pipeline/pipeline.py, force_tf_compat_v1=True).
    with tempfile.TemporaryDirectory() as temp_dir, tft_beam.Context(temp_dir=temp_dir, force_tf_compat_v1=True):
        (outputs, _), _ = (rows, metadata) | tft_beam.AnalyzeAndTransformDataset(
            preprocessing.preprocessing_fn, output_record_batches=False
        )
    return outputs


def _column(transformed, name):
    return [row[features.transformed_name(name)] for row in transformed]


def test_unknown_codes_are_missing_and_imputed_with_the_mean_of_known_values(transformed):
    # father_age known values 22 and 42: mean 32, so the 99 row is imputed to z = 0, not pulled up by 99
    z = _column(transformed, "father_age")
    assert z[1] == pytest.approx(0.0, abs=1e-6)
    assert z[0] == pytest.approx(-z[2], abs=1e-5) and z[0] < 0
    assert _column(transformed, "father_age_missing") == [0.0, 1.0, 0.0]
    assert _column(transformed, "weight_gain_pounds_missing") == [0.0, 1.0, 0.0]


def test_numeric_features_are_z_scored(transformed):
    z = np.array(_column(transformed, "mother_age"))  # 20, 30, 40
    np.testing.assert_allclose(z, [-1.2247449, 0.0, 1.2247449], atol=1e-5)


def test_categories_and_buckets_map_to_ids_with_unknown_or_missing_ids(transformed):
    assert _column(transformed, "plurality") == [0, 1, 5]  # 9 is not a plurality code: unknown id
    assert _column(transformed, "gestation_weeks_bucket") == [3, 1, 5]  # term, very preterm, missing
    vocabulary_ids = _column(transformed, "is_male")
    assert vocabulary_ids[0] == vocabulary_ids[2] != vocabulary_ids[1]
    sizes = features.id_sizes()
    assert _column(transformed, "gestation_weeks_bucket_x_plurality") == [
        3 * sizes["plurality"] + 0,
        1 * sizes["plurality"] + 1,
        5 * sizes["plurality"] + 5,
    ]


def test_text_values_get_ids_by_frequency_and_a_missing_one_the_shared_last_id(transformed):
    assert _column(transformed, "is_male") == [0, 1, 0]  # "true" twice, "false" once
    # mother_married: "true" and "false" once each, a tie: the first in byte order takes the first id.
    assert _column(transformed, "mother_married") == [1, 0, features.VOCABULARY_SIZE]


def test_an_empty_text_is_no_value_and_a_feature_never_present_in_training_only_has_the_shared_id():
    spec = schema_utils.schema_as_feature_spec(load_schema(config_lib.load_config())).feature_spec
    metadata = dataset_metadata.DatasetMetadata(
        schema_utils.schema_from_feature_spec({name: spec[name] for name in USED})
    )
    rows = [
        dict(row, is_male=[b""] if index < 2 else [b"false"], mother_married=[]) for index, row in enumerate(ROWS)
    ]  # "" written as a value twice: it must not take an id
    rows = [
        {k: np.array(v, dtype=np.object_ if k in ("is_male", "mother_married") else None) for k, v in row.items()}
        for row in rows
    ]
    with tempfile.TemporaryDirectory() as temp_dir, tft_beam.Context(temp_dir=temp_dir, force_tf_compat_v1=True):
        (outputs, _), _ = (rows, metadata) | tft_beam.AnalyzeAndTransformDataset(
            preprocessing.preprocessing_fn, output_record_batches=False
        )
    size = features.VOCABULARY_SIZE
    assert _column(outputs, "is_male") == [size, size, 0]
    assert _column(outputs, "mother_married") == [size, size, size]


def test_missing_label_gets_weight_zero(transformed):
    assert [row[features.label_key()] for row in transformed] == [8.0, 3.0, 0.0]
    assert [row[features.label_weight_key()] for row in transformed] == [1.0, 1.0, 0.0]


def test_every_model_input_is_produced(transformed):
    expected = {features.transformed_name(name) for name in features.id_sizes()}
    for column in features.numeric_features():
        expected |= {features.transformed_name(column.name), features.missing_key(column)}
    expected |= {features.label_key(), features.label_weight_key()}
    assert set(transformed[0]) == expected


def test_values_beyond_the_training_range_are_taken_as_its_ends():
    """98 earlier births or a mother of 64 when training saw at most 2 and 40: the model is asked about the
    range's end, not about a z-score it never saw (an extrapolation the infra validator caught at 64 lb)."""
    spec = schema_utils.schema_as_feature_spec(load_schema(config_lib.load_config())).feature_spec
    metadata = dataset_metadata.DatasetMetadata(
        schema_utils.schema_from_feature_spec({name: spec[name] for name in USED})
    )

    def arrays(rows):
        return [
            {k: np.array(v, dtype=np.object_ if v and isinstance(v[0], bytes) else None) for k, v in row.items()}
            for row in rows
        ]

    beyond = [
        dict(ROWS[0], mother_age=[64], ever_born=[98], gestation_weeks=[98]),
        dict(ROWS[0], mother_age=[12], ever_born=[0]),
    ]
    with tempfile.TemporaryDirectory() as temp_dir, tft_beam.Context(temp_dir=temp_dir, force_tf_compat_v1=True):
        transform_fn = (arrays(ROWS), metadata) | tft_beam.AnalyzeDataset(preprocessing.preprocessing_fn)
        (served, _) = ((arrays(beyond), metadata), transform_fn) | tft_beam.TransformDataset(
            output_record_batches=False
        )
        (trained, _) = ((arrays(ROWS), metadata), transform_fn) | tft_beam.TransformDataset(output_record_batches=False)
    for name, highest in (("mother_age", 2), ("ever_born", 1), ("gestation_weeks", 0)):  # rows of the maximum
        assert _column(served, name)[0] == pytest.approx(_column(trained, name)[highest]), name
    for name in ("mother_age", "ever_born"):  # 12 and 0 below the minimum, which row 0 has
        assert _column(served, name)[1] == pytest.approx(_column(trained, name)[0]), name
    assert _column(served, "gestation_weeks_bucket")[0] == 3  # 98 weeks: as 40, the training maximum


@pytest.mark.slow
def test_the_transform_converts_to_tflite_builtin_ops_and_maps_every_value_as_tensorflow_does(
    tmp_path, transform_output
):
    """The device's model runs on builtin ops alone (models/lite.py): a transform op without one (a vocabulary's
    hash table, text made dense, ArgMax of int64) fails this conversion, and any difference in a mapping shows."""
    import tensorflow as tf
    from tflite_runtime.interpreter import Interpreter

    from models import lite, signatures

    spec = schema_utils.schema_as_feature_spec(load_schema(config_lib.load_config())).feature_spec
    output = transform_output
    raw_spec = {name: spec[name] for name in features.FEATURE_NAMES}
    module = tf.Module()
    module.layer = output.transform_features_layer()

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.string if c.dtype == "string" else tf.float32, name=c.name)
            for c in features.FEATURES
        ]
    )
    def transform(*values):
        transformed = module.layer(signatures.sparse_raw(dict(zip(features.FEATURE_NAMES, values)), raw_spec))
        return {name: tf.cast(tf.reshape(value, [-1]), tf.float32) for name, value in transformed.items()}

    tf.saved_model.save(module, str(tmp_path / "saved"), signatures={lite.SIGNATURE: transform})
    runner = Interpreter(model_content=lite.convert(str(tmp_path / "saved"), "float32")).get_signature_runner(
        lite.SIGNATURE
    )
    instances = [
        {"is_male": "true", "mother_age": 25, "gestation_weeks": 39, "mother_married": "false", "plurality": 2},
        {"is_male": "maybe", "mother_age": 70, "gestation_weeks": 99, "mother_married": "", "plurality": 7},
        {"mother_age": 12, "gestation_weeks": 20.5, "father_age": 99, "weight_gain_pounds": 45, "ever_born": 3},
    ]
    columns = features.raw_columns([features.instance_key(instance) for instance in instances])
    expected = {
        name: value.numpy()
        for name, value in transform(*[tf.constant(columns[name]) for name in features.FEATURE_NAMES]).items()
    }
    got = runner(**columns)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-5, err_msg=name)
    # Unseen text ("maybe"), "" and no value all take the shared last id, on the device as in TensorFlow.
    assert got[features.transformed_name("is_male")].tolist() == [0, features.VOCABULARY_SIZE, features.VOCABULARY_SIZE]
    assert got[features.transformed_name("mother_married")].tolist()[1:] == [features.VOCABULARY_SIZE] * 2


@pytest.fixture(scope="module")
def transform_output(tmp_path_factory):
    """The transform graph of ROWS, written as the pipeline's Transform writes it."""
    import apache_beam as beam
    import tensorflow_transform as tft

    folder = tmp_path_factory.mktemp("transform")
    rows, metadata = _rows_and_metadata()
    with beam.Pipeline() as pipeline, tft_beam.Context(temp_dir=str(folder / "tmp"), force_tf_compat_v1=True):
        transform_fn = (pipeline | beam.Create(rows, reshuffle=False), metadata) | tft_beam.AnalyzeDataset(
            preprocessing.preprocessing_fn
        )
        _ = transform_fn | tft_beam.WriteTransformFn(str(folder / "transform"))
    return tft.TFTransformOutput(str(folder / "transform"))


def test_the_analyzers_values_are_read_back_from_the_transform_graph(transform_output):
    analyzed = preprocessing.read_analyzed(transform_output)
    ages = [20, 30, 40]  # mother_age's known values; father_age's are 22 and 42 (99 is 'unknown')
    place = {c.name: i for i, c in enumerate(preprocessing.NUMERIC_FEATURES)}
    assert analyzed.lows[place["mother_age"]] == 20 and analyzed.highs[place["father_age"]] == 42
    assert analyzed.means[place["mother_age"]] == pytest.approx(np.mean(ages))
    assert analyzed.variances[place["father_age"]] == pytest.approx(100.0)
    empty = [b""] * (features.VOCABULARY_SIZE - 2)
    assert analyzed.vocabularies.tolist() == [[b"true", b"false", *empty], [b"false", b"true", *empty]]


def test_the_dense_transform_maps_every_raw_value_as_the_transform_graph_does(transform_output):
    """serving_raw's transform (`transform_dense`, dense inputs, the analyzers' values as constants) against TF
    Transform's graph on the sparse tensors serving_raw built for it: missing values and 'unknown' codes, values
    beyond the training range or between integers, unseen and empty texts, unknown categories."""
    import tensorflow as tf

    from models import signatures

    instances = [
        {"is_male": "true", "mother_age": 25, "plurality": 2, "gestation_weeks": 39, "mother_married": "false"},
        {"is_male": "maybe", "mother_age": 70, "plurality": 7, "gestation_weeks": 98, "mother_married": ""},
        {"mother_age": 12, "gestation_weeks": 20.5, "father_age": 99, "weight_gain_pounds": 45, "ever_born": 3},
        {"mother_age": 33.7, "gestation_weeks": 99.5, "father_age": 99.9, "weight_gain_pounds": 99, "ever_born": -1},
        {"mother_age": 1e30, "gestation_weeks": -1e30, "plurality": 1.5, "father_age": 30},
        {},
    ]
    columns = {
        name: tf.constant(value)
        for name, value in features.raw_columns([features.instance_key(i) for i in instances]).items()
    }
    spec = schema_utils.schema_as_feature_spec(load_schema(config_lib.load_config())).feature_spec
    raw_spec = {name: spec[name] for name in features.FEATURE_NAMES}
    expected = transform_output.transform_features_layer()(signatures.sparse_raw(columns, raw_spec))
    got, missing = preprocessing.transform_dense(columns, preprocessing.read_analyzed(transform_output))
    assert set(got) == set(expected) - {features.label_key(), features.label_weight_key()}
    for key, value in got.items():
        np.testing.assert_allclose(value.numpy(), tf.reshape(expected[key], [-1]).numpy(), atol=1e-6, err_msg=key)
    # Which rows lack each required feature (mother_age, gestation_weeks): 99.5 weeks is read as 99, 'unknown'.
    assert missing.numpy().tolist() == [[False, False]] * 3 + [[False, True], [False, False], [True, True]]
