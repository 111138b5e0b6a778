"""Which spans count: the previous validated span and the training window, from ML Metadata records."""

import pytest
from ml_metadata.proto import metadata_store_pb2

from models.model import file_weights, recency_weights
from pipeline.components import spans


def _examples(artifact_id: int, span: int) -> metadata_store_pb2.Artifact:
    artifact = metadata_store_pb2.Artifact(id=artifact_id)
    artifact.custom_properties["span"].int_value = span  # where TFX 1.16's ExampleGen records it
    return artifact


def test_previous_span_is_the_newest_validated_earlier_span():
    validated = [_examples(1, 1), _examples(5, 3), _examples(9, 2)]
    assert spans.previous_span(_examples(12, 4), validated).id == 5
    assert spans.previous_span(_examples(12, 1), []) is None
    # A span ingested again (the same folder with new files) compares with its version validated before.
    assert spans.previous_span(_examples(12, 1), [_examples(1, 1)]).id == 1
    assert spans.previous_span(_examples(1, 1), [_examples(1, 1)]) is None


def test_window_takes_the_newest_version_of_the_last_validated_spans():
    validated = [_examples(1, 1), _examples(2, 2), _examples(3, 2), _examples(4, 5)]
    current = _examples(7, 6)
    assert [a.id for a in spans.window(current, validated, 3)] == [3, 4, 7]
    assert [a.id for a in spans.window(current, validated, 1)] == [7]
    assert [a.id for a in spans.window(_examples(2, 2), validated, 5)] == [1, 2]  # no later spans


def test_recency_weights_halve_every_half_life_and_are_equal_when_off():
    file_spans = {"a": 4, "b": 2, "c": 3}
    assert recency_weights(file_spans, 2) == {"a": 1.0, "b": 0.5, "c": 2**-0.5}
    assert recency_weights(file_spans, 0) == {"a": 1.0, "b": 1.0, "c": 1.0}


def test_the_baseline_resolver_skips_blessed_models_the_evaluator_cannot_score(tmp_path):
    import tensorflow as tf
    from tfx.types import standard_artifacts

    from models.signatures import SCORE_SIGNATURE

    identity = tf.function(lambda x: {"predictions": x}, input_signature=[tf.TensorSpec([None], tf.float32)])
    models, blessings = [], []
    for model_id, signatures in ((1, ("serving_default", SCORE_SIGNATURE)), (2, ("serving_default",))):
        model = standard_artifacts.Model()
        model.uri, model.id = str(tmp_path / str(model_id)), model_id
        tf.saved_model.save(tf.Module(), f"{model.uri}/Format-Serving", signatures={s: identity for s in signatures})
        blessing = standard_artifacts.ModelBlessing()
        blessing.set_int_custom_property("current_model_id", model_id)
        blessing.set_int_custom_property("blessed", 1)
        models.append(model)
        blessings.append(blessing)
    strategy = spans.LatestBlessedScorableModel()
    resolved = strategy.resolve_artifacts(None, {"model": models, "model_blessing": blessings})
    assert [m.id for m in resolved["model"]] == [1]  # model 2 is newer, but was exported before the contract
    assert [b.get_int_custom_property("current_model_id") for b in resolved["model_blessing"]] == [1]
    assert strategy.resolve_artifacts(None, {"model": models[1:], "model_blessing": blessings}) == {
        "model": [],
        "model_blessing": [],
    }
    gone = standard_artifacts.Model()  # a newer blessed model whose folder was deleted: skipped, not an error
    gone.uri, gone.id = str(tmp_path / "deleted"), 3
    blessing = standard_artifacts.ModelBlessing()
    blessing.set_int_custom_property("current_model_id", 3)
    blessing.set_int_custom_property("blessed", 1)
    resolved = strategy.resolve_artifacts(None, {"model": models + [gone], "model_blessing": blessings + [blessing]})
    assert [m.id for m in resolved["model"]] == [1]


def test_a_span_map_that_misses_a_file_is_an_error_and_no_map_weighs_every_file_the_same():
    spans = {"s1/Split-train/*": 1, "s2/Split-train/*": 2, "s2/Split-eval/*": 2}
    weights = file_weights(["s1/Split-train/*", "s2/Split-train/*"], ["s2/Split-eval/*"], spans, 1)
    assert weights == {"s1/Split-train/*": 0.5, "s2/Split-train/*": 1.0, "s2/Split-eval/*": 1.0}
    with pytest.raises(ValueError, match=r"no span for the Trainer's file pattern\(s\) s3/Split-train/\*"):
        file_weights(["s3/Split-train/*"], [], spans, 1)
    assert file_weights(["a"], ["b"], None, 1) == {"a": 1.0, "b": 1.0}
