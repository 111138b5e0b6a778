"""Infra validation: toy candidates served by `babyweight serve` and judged; the requests it sends; no server left."""

import os
import pathlib
import re

import pandas as pd
import psutil
import pytest
import tensorflow_data_validation as tfdv

from models import features
from pipeline import config as config_lib
from pipeline.components import infra_validator
from serving.model_server.settings import ServerSettings
from tests.serving import toy_model

SCHEMA = tfdv.load_schema_text(config_lib.load_config().schema_path)
GOOD = infra_validator.Budget(max_memory_mb=4096, max_p99_ms=1000, load_timeout_seconds=120)


@pytest.fixture(scope="module")
def instances(real_export_csv):
    """Real rows (their NULLs and 'unknown' codes as exported), as the validator reads the eval split."""
    kinds = {c.name: (str if c.dtype == "string" else float) for c in features.FEATURES}
    rows = pd.read_csv(
        real_export_csv,
        nrows=300,
        usecols=list(kinds),
        dtype=kinds,
        keep_default_na=False,
        na_values={name: [""] for name, kind in kinds.items() if kind is float},
    )
    return [infra_validator.instance_of(row) for row in rows.to_dict("records")]


def servers_of(model_dir: pathlib.Path):
    """Processes serving `model_dir` (a validating server left behind would be one)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "serve" in cmdline and str(model_dir) in cmdline:
            found.append(process)
    return found


def validate(model_dir, instances, budget, tmp_path):
    checks, figures = infra_validator.validate(str(model_dir), instances, SCHEMA, budget, str(tmp_path))
    assert not servers_of(model_dir), "the validating server is still running"
    return {check.name: check for check in checks}, figures


def test_requests_cover_the_contracts_edge_cases_with_the_answers_it_promises(instances):
    cases = {case.name: case for case in infra_validator.request_cases(instances, SCHEMA, max_instances=50)}
    for column in features.OPTIONAL_FEATURES:
        assert cases[f"{column.name} missing"].status == 200
        assert column.name not in cases[f"{column.name} missing"].instances[0]
        for code in column.missing_codes:
            assert cases[f"{column.name} = {code:g} (its 'unknown' code)"].status == 200
    for column in features.REQUIRED_FEATURES:  # refused, naming the feature
        assert (cases[f"{column.name} missing"].status, cases[f"{column.name} missing"].names) == (400, (column.name,))
    assert cases["gestation_weeks = 99 (its 'unknown' code)"].status == 400
    # Bounds from the curated schema, texts from its domains.
    assert cases["mother_age = 10 (its schema minimum)"].instances[0]["mother_age"] == 10
    assert cases["mother_age = 64 (its schema maximum)"].status == 200
    # A bound that is the 'unknown' code (99 weeks): the next value is asked instead, and answered.
    assert cases["gestation_weeks = 98 (its schema maximum, next to the 'unknown' code)"].status == 200
    assert "father_age = 98 (its schema maximum, next to the 'unknown' code)" in cases
    assert {"is_male = true (a value of its domain)", "is_male = false (a value of its domain)"} <= set(cases)
    only_required = cases["only the required features"].instances[0]
    assert set(only_required) == {c.name for c in features.REQUIRED_FEATURES}
    assert len(cases["the largest request the server takes (50 instances)"].instances) == 50
    assert cases["one instance over the limit (51)"].status == 413
    assert cases["64 eval rows through :regress"].route == "regress"
    # Each eval row one by one; those lacking a required feature are expected refused, and not timed (the model
    # never sees them).
    rows = [case for name, case in cases.items() if name.startswith("eval row ")]
    assert len(rows) == len(instances)
    assert {(case.status, case.timed) for case in rows} == {(200, True), (400, False)}, "some real rows lack one"


@pytest.mark.parametrize(
    "status, body, reason",
    [
        (200, {"predictions": [[7.5]]}, None),
        (200, {"predictions": [[None]]}, "prediction null is not a number within the label's schema domain [0.2, 20]"),
        (200, {"predictions": [[25.0]]}, "prediction 25.0 is not a number"),
        (200, {"predictions": [[float("inf")]]}, "prediction Infinity is not a number"),
        (200, {"predictions": [[7.5], [7.1]]}, "expected 1 predictions"),
        (500, {"error": "internal error"}, "expected predictions, got 500"),
    ],
)
def test_an_answer_is_judged_by_the_contract_and_the_labels_schema_domain(status, body, reason):
    case = infra_validator.expect("eval row 0", [{"mother_age": 30, "gestation_weeks": 39}])
    found = infra_validator.judge(case, status, body, infra_validator.label_bounds(SCHEMA))
    assert found == reason if reason is None else reason in found
    # Without a label domain in the schema a prediction must still be a finite number.
    if reason and ("Infinity" in reason or "null" in reason):
        assert infra_validator.judge(case, status, body, (-float("inf"), float("inf"))) is not None


def test_a_refusal_must_name_the_lacking_feature():
    case = infra_validator.expect("gestation_weeks missing", [{"mother_age": 30}])
    assert infra_validator.judge(case, 400, {"error": "missing required feature 'gestation_weeks'"}, (0, 1)) is None
    assert "without naming the lacking feature 'gestation_weeks'" in infra_validator.judge(
        case, 400, {"error": "bad request"}, (0, 1)
    )
    # The server's refusals list the required features at their end: naming the wrong one must not pass.
    wrong = (
        "instance 0: missing required feature 'mother_age' (no value, or an 'unknown' code); every request "
        "needs mother_age, gestation_weeks"
    )
    assert "without naming" in infra_validator.judge(case, 400, {"error": wrong}, (0, 1))
    assert "expected a refusal (400), got 200" in infra_validator.judge(case, 200, {"predictions": [[7.0]]}, (0, 9))


def test_a_good_candidate_passes_every_check_with_its_figures(tmp_path, instances):
    model = toy_model.save(tmp_path / "model", offset=1.0)
    checks, figures = validate(model, instances, GOOD, tmp_path / "scratch")
    assert all(check.passed for check in checks.values()), checks
    assert list(checks) == ["load", "answers", "memory", "latency"]
    sent = len(infra_validator.request_cases(instances, SCHEMA, ServerSettings().max_instances))
    assert checks["answers"].figure.startswith(f"{sent} of {sent} requests answered")
    assert 50 < figures["peak_memory_mb"] < GOOD.max_memory_mb and 0 < figures["p50_ms"] <= figures["p99_ms"]
    assert "-m serving.model_server.server" in (tmp_path / "scratch" / infra_validator.SERVER_LOG).read_text()


def test_a_damaged_savedmodel_is_refused_at_load_with_the_servers_reason(tmp_path, instances):
    model = toy_model.save(tmp_path / "model", offset=1.0)
    (model / "saved_model.pb").write_bytes(b"not a SavedModel")
    checks, _ = validate(model, instances, GOOD, tmp_path / "scratch")
    assert list(checks) == ["load"] and not checks["load"].passed
    assert checks["load"].figure.startswith("the server refused the model: ")
    assert "saved_model.pb" in checks["load"].figure or "SavedModel" in checks["load"].figure, checks["load"].figure


def test_a_model_answering_nonsense_on_an_edge_case_is_refused_naming_it(tmp_path, instances):
    """Quintuplets: a valid, rare value, at the schema's bound; the server's warm-up on frequent instances passes."""
    model = toy_model.save(tmp_path / "model", offset=1.0, nonsense_when=("plurality", 5.0))
    checks, _ = validate(model, instances, GOOD, tmp_path / "scratch")
    answers = checks["answers"]
    assert checks["load"].passed and not answers.passed
    assert answers.failures == [
        # The server refuses to serve the NaN (a 500 naming the version), which the check reports as it got it.
        'plurality = 5 (its schema maximum): expected predictions, got 500: {"error": "version 1 answered nan for '
        'instance 0, not a weight: nothing served"}'
    ]


def test_a_budget_below_the_figures_is_refused_with_both(tmp_path, instances):
    model = toy_model.save(tmp_path / "model", offset=1.0)
    tight = infra_validator.Budget(max_memory_mb=50, max_p99_ms=0.01, load_timeout_seconds=120)
    checks, figures = validate(model, instances, tight, tmp_path / "scratch")
    assert checks["answers"].passed and not checks["memory"].passed and not checks["latency"].passed
    assert checks["memory"].figure == f"peak {figures['peak_memory_mb']:.0f} MiB resident (budget 50 MiB)"
    assert checks["latency"].figure.startswith(f"p99 {figures['p99_ms']:.1f} ms")
    assert checks["latency"].figure.endswith("(budget p99 0.01 ms)")


def test_a_server_dying_mid_way_fails_the_answers_and_no_more_is_sent(tmp_path, instances):
    model = toy_model.save(tmp_path / "model", offset=1.0)
    server = infra_validator.Server(str(model), str(tmp_path / "scratch"))
    try:
        assert server.wait_until_loaded(120).passed
        server.process.kill()  # as a crash in the model's kernels would
        cases = infra_validator.request_cases(instances, SCHEMA, max_instances=8)
        answers, latencies = infra_validator.send(server, cases, infra_validator.label_bounds(SCHEMA))
    finally:
        server.stop()
    assert not answers.passed and not latencies and answers.figure.startswith(f"0 of {len(cases)} requests")
    assert answers.failures == [answers.failures[0]] and answers.failures[0].startswith(
        "eval row 0: the server died answering it (exit code -9)"
    )
    assert answers.failures[0].endswith(f"the {len(cases) - 1} request(s) after it were not sent")
    assert not servers_of(model)


@pytest.mark.slow
def test_a_taken_port_is_retried_on_another(tmp_path, instances, monkeypatch):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))  # bound by another process between the validator's pick and the server's bind
    ports = iter([taken.getsockname()[1]])
    free = infra_validator.free_port
    monkeypatch.setattr(infra_validator, "free_port", lambda: next(ports, None) or free())
    model = toy_model.save(tmp_path / "model", offset=1.0)
    with taken:
        checks, _ = validate(model, instances[:20], GOOD, tmp_path / "scratch")
    assert all(check.passed for check in checks.values()), checks
    log = (tmp_path / "scratch" / infra_validator.SERVER_LOG).read_text()
    assert log.count("-m serving.model_server.server") == 2 and "address already in use" in log.lower()


def test_a_server_not_loaded_in_time_is_stopped_at_the_timeout(tmp_path, instances):
    model = toy_model.save(tmp_path / "model", offset=1.0)
    slow = infra_validator.Budget(4096, 1000, load_timeout_seconds=0.5)  # the server's start alone takes longer
    checks, _ = validate(model, instances, slow, tmp_path / "scratch")
    assert list(checks) == ["load"] and checks["load"].figure.startswith("not loaded after 0.5 s"), checks


def test_a_folder_without_a_savedmodel_is_refused_without_starting_a_server(tmp_path, instances):
    empty = tmp_path / "no_model_here"
    empty.mkdir()
    checks, _ = validate(empty, instances, GOOD, tmp_path / "scratch")
    assert checks["load"].figure == f"no SavedModel in {empty} (no saved_model.pb)"
    assert not (tmp_path / "scratch" / infra_validator.SERVER_LOG).exists()


def test_the_server_gets_neither_vertex_variables_nor_gpus(monkeypatch):
    monkeypatch.setenv("AIP_STORAGE_URI", "gs://another/model")
    monkeypatch.setenv("AIP_HTTP_PORT", "8080")
    environment = infra_validator.server_environment()
    assert not [name for name in environment if name.startswith("AIP_")]
    assert environment["CUDA_VISIBLE_DEVICES"] == "" and environment["PATH"] == os.environ["PATH"]


def _examples(rows: pd.DataFrame, folder: pathlib.Path) -> pathlib.Path:
    """An Examples artifact's folder as ExampleGen writes it: gzipped tf.Examples per split (the label too if the
    rows have it)."""
    import tensorflow as tf

    for split in ("train", "eval"):
        (folder / f"Split-{split}").mkdir(parents=True)
        with tf.io.TFRecordWriter(str(folder / f"Split-{split}" / "data.gz"), "GZIP") as writer:
            for row in rows.to_dict("records"):
                example = tf.train.Example()
                for column in features.FEATURES + ((features.LABEL,) if features.LABEL.name in row else ()):
                    value = row[column.name]
                    if column.dtype == "string" and value:
                        example.features.feature[column.name].bytes_list.value.append(value.encode())
                    elif column.dtype != "string" and not pd.isna(value):
                        feature = example.features.feature[column.name]
                        if column.dtype == "int":
                            feature.int64_list.value.append(int(value))
                        else:
                            feature.float_list.value.append(value)
                writer.write(example.SerializeToString())
    return folder


def _run_infra_then_push(
    tmp_path: pathlib.Path,
    rows: pd.DataFrame,
    damaged: bool = False,
    evaluator_blessed: bool = True,
    nonsense_when=None,
    max_memory_mb: float = 4096.0,
):
    """Importers of a toy model, its Evaluator blessing, eval examples and the schema, then InfraValidator and
    TFX's Pusher, run by TFX's LocalDagRunner; the pushed versions and the run's ML Metadata steps."""
    from tfx import v1 as tfx

    from pipeline.metadata import mlmd

    model = toy_model.save(tmp_path / "model" / "Format-Serving", offset=1.0, nonsense_when=nonsense_when)
    if damaged:
        (model / "saved_model.pb").write_bytes(b"")
    config = config_lib.load_config(overrides={"output_dir": str(tmp_path / "out")})
    standard = tfx.types.standard_artifacts
    imported = {
        "model": tfx.dsl.Importer(source_uri=str(tmp_path / "model"), artifact_type=standard.Model),
        "model_blessing": tfx.dsl.Importer(
            source_uri=str(tmp_path / "model"),
            artifact_type=standard.ModelBlessing,
            custom_properties={"blessed": int(evaluator_blessed)},
        ),
        "examples": tfx.dsl.Importer(
            source_uri=str(_examples(rows, tmp_path / "examples")),
            artifact_type=standard.Examples,
            properties={"split_names": '["train", "eval"]'},
        ),
        "schema": tfx.dsl.Importer(
            source_uri=str(pathlib.Path(config.schema_path).parent), artifact_type=standard.Schema
        ),
    }
    for name, importer in imported.items():
        importer.with_id(f"import_{name}")
    inputs = {name: importer.outputs["result"] for name, importer in imported.items()}
    validator = infra_validator.InfraValidator(
        **inputs,
        eval_requests=100,
        max_memory_mb=max_memory_mb,
        max_p99_ms=1000.0,
        load_timeout_seconds=120.0,
        code_fingerprint="test",
    )
    pusher = tfx.components.Pusher(
        model=inputs["model"],
        model_blessing=inputs["model_blessing"],
        infra_blessing=validator.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(base_directory=config.serving_dir)
        ),
    )
    tfx.orchestration.LocalDagRunner().run(
        tfx.dsl.Pipeline(
            pipeline_name="infra",
            pipeline_root=str(tmp_path / "root"),
            components=[*imported.values(), validator, pusher],
            metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
                config.metadata_path
            ),
        )
    )
    assert not servers_of(model), "the validating server is still running"
    store = mlmd.open_sqlite(config.metadata_path)
    steps = store.steps(store.runs()[-1])
    pushed = sorted(p.name for p in pathlib.Path(config.serving_dir).glob("*"))
    return config, steps, pushed


@pytest.fixture(scope="module")
def eval_rows(real_export_csv):
    kinds = {c.name: (str if c.dtype == "string" else float) for c in features.FEATURES}
    return pd.read_csv(
        real_export_csv,
        nrows=100,
        usecols=list(kinds),
        dtype=kinds,
        keep_default_na=False,
        na_values={name: [""] for name, kind in kinds.items() if kind is float},
    )


@pytest.mark.parametrize(
    "candidate, pushed_count, verdict",
    [
        ({}, 1, "infra validation (the candidate served by babyweight serve): blessed"),
        ({"damaged": True}, 0, "pushed: no (infra validation failed: load)"),
        ({"nonsense_when": ("plurality", 5.0)}, 0, "pushed: no (infra validation failed: answers)"),
        ({"max_memory_mb": 50.0}, 0, "pushed: no (infra validation failed: memory)"),
        (
            {"evaluator_blessed": False},
            0,
            "infra validation: not run (the Evaluator did not bless the model, so it was not served)",
        ),
    ],
)
def test_tfx_pusher_pushes_only_a_model_with_both_blessings(tmp_path, eval_rows, candidate, pushed_count, verdict):
    from pipeline.reports import summary

    config, steps, pushed = _run_infra_then_push(tmp_path, eval_rows, **candidate)
    assert len(pushed) == pushed_count
    blessing = summary.output_of(steps, "InfraValidator", "blessing")
    assert blessing.custom_properties["blessed"].int_value == (pushed_count == 1)
    marker = "INFRA_BLESSED" if pushed_count else "INFRA_NOT_BLESSED"
    assert (pathlib.Path(blessing.uri) / marker).is_file()  # TFX's own marks
    text = summary.summarize_run(config, "run", steps)
    assert verdict in text, text
    if candidate.get("damaged"):
        assert "    load     FAILED the server refused the model: " in text, text
    if "nonsense_when" in candidate:
        assert "      plurality = 5 (its schema maximum): expected predictions, got 500" in text, text
    if "max_memory_mb" in candidate:
        assert re.search(r"^    memory   FAILED peak \d+ MiB resident \(budget 50 MiB\)$", text, re.M), text
    if pushed_count == 0 and candidate.get("evaluator_blessed", True):
        assert blessing.custom_properties["failed_checks"].string_value == verdict.split(": ")[-1].rstrip(")")
    if candidate.get("evaluator_blessed", True):  # the server's log is kept beside the verdict
        assert "-m serving.model_server.server" in (pathlib.Path(blessing.uri) / infra_validator.SERVER_LOG).read_text()
