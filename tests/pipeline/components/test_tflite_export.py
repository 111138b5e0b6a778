"""TFLite export: conversion to builtin ops, the parity checks, and the step in a TFX pipeline (toy models)."""

import pathlib
import re
import shutil
from typing import Optional

import numpy as np
import pandas as pd
import pytest

from models import features, lite
from pipeline import config as config_lib
from pipeline.components import tflite_export
from tests.pipeline.components.test_infra_validator import _examples
from tests.serving import toy_model


@pytest.fixture(scope="module")
def eval_rows(real_export_csv):
    kinds = {c.name: (str if c.dtype == "string" else float) for c in features.FEATURES + (features.LABEL,)}
    return pd.read_csv(
        real_export_csv,
        nrows=1000,
        usecols=list(kinds),
        dtype=kinds,
        keep_default_na=False,
        na_values={name: [""] for name, kind in kinds.items() if kind is float},
    )


def test_a_model_converts_to_builtin_ops_and_the_interpreter_predicts_what_the_savedmodel_does(tmp_path, eval_rows):
    model = toy_model.save(tmp_path / "model", offset=1.0)
    keys, _ = tflite_export.accepted_rows(eval_rows.to_dict("records"))
    assert 0 < len(keys) < len(eval_rows)  # real rows: some lack gestation weeks, and are left out
    columns = features.raw_columns(keys)
    reference = tflite_export.saved_model_predictions(str(model), columns)
    for quantization in lite.QUANTIZATIONS:
        predictions = tflite_export.tflite_predictions(lite.convert(str(model), quantization), columns)
        np.testing.assert_allclose(predictions, reference, atol=1e-4 if quantization == "float32" else 0.01)
    with pytest.raises(ValueError, match="quantization 'int4': expected one of float32, float16, dynamic_range"):
        lite.convert(str(model), "int4")


@pytest.mark.parametrize(
    "float32_shift, float16_shift, failed",
    [
        (0.0, 0.0, []),
        (0.009, 0.0, []),
        (0.02, 0.0, ["float32"]),
        (0.0, 0.5, ["float16"]),
        (0.0, "one row", ["float16"]),
        (float("nan"), 0.0, ["float32", "float16"]),
    ],
)
def test_each_check_passes_only_within_its_limit(float32_shift, float16_shift, failed):
    rng = np.random.default_rng(0)
    labels = rng.normal(7.3, 1.2, 500)
    reference = labels + rng.normal(0, 0.9, 500)
    float32 = reference.copy()
    float32[17] += float32_shift  # one row off
    float16 = reference.copy()
    if float16_shift == "one row":  # one row 0.1 lb off: the RMSE hardly moves, the row does
        float16[3] += 0.1
    else:
        float16 += float16_shift  # every row off: the RMSE moves
    verdict = tflite_export.check(reference, float32, float16, labels)
    assert [c["name"] for c in verdict["checks"] if not c["passed"]] == failed
    if failed == ["float32"]:
        assert "0.020000 lb (row 18 of 500; limit 0.01 lb)" in verdict["checks"][0]["figure"]
    if failed == ["float16"]:
        assert f"RMSE {verdict['figures']['rmse_float16']:.4f} lb against" in verdict["checks"][1]["figure"]
        assert (
            f"largest difference {verdict['figures']['float16_max_difference']:.4f} lb (limit 0.05 lb)"
            in (verdict["checks"][1]["figure"])
        )


def _run_export(
    tmp_path: pathlib.Path,
    rows: pd.DataFrame,
    pushed: bool = True,
    destination: str = "",
    served: Optional[float] = None,
):
    """Importers of a toy model, a push of it (by default TFX's filesystem Pusher's: version 7 of serving_dir, a copy
    of the model, or another toy model of offset `served`) and eval examples, then the TFLiteExporter, run by TFX's
    LocalDagRunner; the config and the run's steps."""
    from tfx import v1 as tfx

    from pipeline.metadata import mlmd

    model = toy_model.save(tmp_path / "model" / "Format-Serving", offset=1.0)
    shutil.copytree(model, tmp_path / "pushed")  # the Pusher's copy, which Vertex AI uploads
    config = config_lib.load_config(overrides={"output_dir": str(tmp_path / "out")})
    if served is None:
        shutil.copytree(model, pathlib.Path(config.serving_dir) / "7")
    else:
        toy_model.save(pathlib.Path(config.serving_dir) / "7", offset=served)
    standard = tfx.types.standard_artifacts
    imported = {
        "model": tfx.dsl.Importer(source_uri=str(tmp_path / "model"), artifact_type=standard.Model),
        "pushed_model": tfx.dsl.Importer(
            source_uri=str(tmp_path / "pushed"),
            artifact_type=standard.PushedModel,
            custom_properties={
                "pushed": int(pushed),
                "pushed_destination": destination or str(pathlib.Path(config.serving_dir) / "7"),
            },
        ),
        "examples": tfx.dsl.Importer(
            source_uri=str(_examples(rows, tmp_path / "examples")),
            artifact_type=standard.Examples,
            properties={"split_names": '["train", "eval"]'},
        ),
    }
    for name, importer in imported.items():
        importer.with_id(f"import_{name}")
    exporter = tflite_export.TFLiteExporter(
        **{name: i.outputs["result"] for name, i in imported.items()}, code_fingerprint="test"
    )
    tfx.orchestration.LocalDagRunner().run(
        tfx.dsl.Pipeline(
            pipeline_name="tflite",
            pipeline_root=str(tmp_path / "root"),
            components=[*imported.values(), exporter],
            metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
                config.metadata_path
            ),
        )
    )
    store = mlmd.open_sqlite(config.metadata_path)
    return config, store.steps(store.runs()[-1])


def _tflite_files(folder: pathlib.Path):
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".tflite" or p.name.endswith(".incomplete"))


def test_the_step_pushes_both_models_beside_the_savedmodel_and_records_them_with_their_lineage(tmp_path, eval_rows):
    from pipeline.reports import summary

    config, steps = _run_export(tmp_path, eval_rows)
    version = pathlib.Path(config.serving_dir) / "7"
    assert _tflite_files(version) == sorted(lite.FILES.values())  # and no temporary file left
    exported = summary.output_of(steps, "TFLiteExporter", "tflite_model")
    record = tflite_export.read(exported.uri)
    assert record["pushed"] and record["destination"] == str(version)
    for variant, name in lite.FILES.items():
        assert (version / name).read_bytes() == (pathlib.Path(exported.uri) / name).read_bytes()
        assert exported.custom_properties[f"{variant}_bytes"].int_value == (version / name).stat().st_size
    step = next(s for s in steps if s.node_id == "TFLiteExporter")
    assert [a.uri for a in step.inputs["model"]] == [str(tmp_path / "model")]
    text = summary.summarize_run(config, "run", steps)
    assert f"pushed to {version}" in text and "      float32  ok     largest difference from the SavedModel" in text


def test_on_vertex_the_models_go_beside_the_copy_vertex_ai_uploaded(tmp_path, eval_rows):
    """Vertex's Pusher records a resource name as its destination; the model was uploaded from the push's folder."""
    from pipeline.reports import summary

    config, steps = _run_export(tmp_path, eval_rows, destination="projects/p/locations/l/models/42")
    assert _tflite_files(tmp_path / "pushed") == sorted(lite.FILES.values())
    assert not _tflite_files(pathlib.Path(config.serving_dir) / "7")
    record = tflite_export.read(summary.output_of(steps, "TFLiteExporter", "tflite_model").uri)
    assert record["destination"] == str(tmp_path / "pushed")


def test_models_unlike_the_savedmodel_are_not_pushed_and_the_summary_says_why(tmp_path, eval_rows, monkeypatch):
    from pipeline.reports import summary

    other = toy_model.save(tmp_path / "other", offset=1.5)  # a conversion gone wrong: half a pound off
    converted = lite.convert(str(other), "float32")
    monkeypatch.setattr(lite, "convert", lambda saved_model_dir, quantization: converted)
    config, steps = _run_export(tmp_path, eval_rows)
    assert not _tflite_files(pathlib.Path(config.serving_dir) / "7")
    exported = summary.output_of(steps, "TFLiteExporter", "tflite_model")
    assert exported.custom_properties["pushed"].int_value == 0
    assert exported.custom_properties["failed_checks"].string_value == "float32,float16"
    text = summary.summarize_run(config, "run", steps)
    assert "NOT pushed: the float32 and float16 checks failed (below)" in text, text
    assert re.search(r"^      float32  FAILED largest difference from the SavedModel 0.50000\d lb", text, re.M), text


def test_a_version_folder_holding_another_model_gets_nothing(tmp_path, eval_rows):
    """TFX's Pusher skips its copy when the version folder exists (two pushes in one second): the folder holds
    the other model, and this one's device models must not land beside it."""
    from pipeline.reports import summary

    config, steps = _run_export(tmp_path, eval_rows, served=1.5)
    assert not _tflite_files(pathlib.Path(config.serving_dir) / "7")
    record = tflite_export.read(summary.output_of(steps, "TFLiteExporter", "tflite_model").uri)
    assert not record["pushed"] and record["skipped"] == (
        f"{pathlib.Path(config.serving_dir) / '7'} does not hold this model's SavedModel"
    )


def test_a_conversion_that_fails_is_recorded_and_the_run_goes_on(tmp_path, eval_rows, monkeypatch):
    from pipeline.reports import summary

    def broken(saved_model_dir, quantization):
        raise RuntimeError("ConverterError: 'tf.Foo' op is neither a custom op nor a flex op")

    monkeypatch.setattr(lite, "convert", broken)
    config, steps = _run_export(tmp_path, eval_rows)
    assert {step.state for step in steps} == {"complete"}
    record = tflite_export.read(summary.output_of(steps, "TFLiteExporter", "tflite_model").uri)
    assert not record["pushed"] and "neither a custom op nor a flex op" in record["skipped"]
    assert "  TFLite: not exported (the export failed: RuntimeError(" in summary.summarize_run(config, "run", steps)


def test_without_an_eval_row_to_check_them_on_nothing_is_pushed_and_the_step_says_so(tmp_path, eval_rows):
    from pipeline.reports import summary

    lacking = eval_rows[eval_rows.gestation_weeks.isna() | (eval_rows.gestation_weeks == 99)]
    assert len(lacking)  # every row lacks a required feature: the contract accepts none
    config, steps = _run_export(tmp_path, lacking)
    assert not _tflite_files(pathlib.Path(config.serving_dir) / "7")
    record = tflite_export.read(summary.output_of(steps, "TFLiteExporter", "tflite_model").uri)
    assert not record["pushed"] and not record["checks"]
    assert ": NOT pushed: no eval row the serving contract accepts to check them on" in summary.summarize_run(
        config, "run", steps
    )


def test_a_model_that_was_not_pushed_is_not_exported(tmp_path, eval_rows):
    from pipeline.reports import summary

    config, steps = _run_export(tmp_path, eval_rows, pushed=False)
    assert not _tflite_files(pathlib.Path(config.serving_dir) / "7")
    record = tflite_export.read(summary.output_of(steps, "TFLiteExporter", "tflite_model").uri)
    assert record == {
        "pushed": False,
        "checks": [],
        "figures": {},
        "files": {},
        "skipped": "the model was not pushed, so it was not exported",
    }
    assert "  TFLite: not exported (the model was not pushed, so it was not exported)" in summary.summarize_run(
        config, "run", steps
    )
