"""`babyweight predict-batch`: the Beam pipeline's files -> files mode on real rows, bad rows in the dead letters."""

import csv
import glob
import json

import numpy as np
import pytest
import tensorflow as tf

from models import features
from serving.batch import cli as batch_cli
from serving.batch import core as batch_core
from serving.batch import io as batch_io
from serving.core import contract, loader
from tests.serving import toy_model


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    toy_model.save(root / "3", offset=1.5)
    toy_model.save(root / "12", offset=2.5)  # the newest: numbers, not names, decide
    return root


def _read(pattern):
    return [json.loads(line) for path in sorted(glob.glob(pattern)) for line in open(path) if line.strip()]


def test_files_to_files_predict_every_good_row_as_the_signature_does_and_reject_the_bad(
    version_dir, real_export_csv, tmp_path, capsys
):
    lines = real_export_csv.read_text().splitlines()
    header, rows = lines[0], lines[1:301]
    columns = header.split(",")
    text_in_number = rows[5].split(",")
    text_in_number[columns.index("mother_age")] = "thirty"
    bad = [",".join(text_in_number), ",".join(rows[6].split(",")[:-3])]  # text in a number; 28 fields of 31
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("\n".join([header] + rows[:150] + bad[:1]) + "\n")
    (tmp_path / "in" / "b.csv").write_text("\n".join([header] + rows[150:] + bad[1:]) + "\n")
    assert _files_to_files(tmp_path, version_dir) == 0
    summary = capsys.readouterr().out
    predicted_rows = _read(str(tmp_path / "out" / "run-predictions-*.jsonl"))
    rejected_rows = _read(str(tmp_path / "out" / "run-rejected-*.jsonl"))
    predicted = {row["id"]: row for row in predicted_rows}
    rejects = {row["id"]: row for row in rejected_rows}
    assert len(predicted) == len(predicted_rows) and len(rejects) == len(rejected_rows)  # none doubled
    # Every row is predicted or rejected, never both, never lost; rows lacking a required feature are rejected.
    expected_ids = {f"a.csv:{n}" for n in range(2, 153)} | {f"b.csv:{n}" for n in range(2, 153)}
    assert set(predicted) | set(rejects) == expected_ids and not set(predicted) & set(rejects)
    assert rejects["a.csv:152"]["reason"] == "feature 'mother_age': 'thirty' is not a number"
    assert rejects["a.csv:152"]["text"] == bad[0]
    assert rejects["b.csv:152"]["reason"] == "28 fields; the header has 31"
    lacking = [r for r in rejects.values() if "missing required feature" in r["reason"]]
    good_rows = []
    for name, chunk, first in (("a.csv", rows[:150], 2), ("b.csv", rows[150:], 2)):
        for number, line in enumerate(chunk, start=first):
            row = dict(zip(columns, next(csv.reader([line]))))
            try:
                good_rows.append((f"{name}:{number}", contract.to_instance({k: v for k, v in row.items() if v})))
            except ValueError:
                assert f"{name}:{number}" in rejects
    assert len(predicted) == len(good_rows) and len(rejects) == 2 + len(lacking)
    signature = tf.saved_model.load(str(version_dir / "12")).signatures["serving_raw"]
    expected = signature(**loader.columns_of([features.instance_key(i) for _, i in good_rows]))["predictions"]
    np.testing.assert_allclose(
        [predicted[i]["prediction"] for i, _ in good_rows], expected.numpy().reshape(-1), rtol=1e-6
    )
    assert {row["model_version"] for row in predicted.values()} == {12}
    assert f"{len(expected_ids)} row(s) read" in summary and f"{len(predicted)} predicted by version 12" in summary
    assert f"{len(rejects)} rejected" in summary


def test_a_named_version_and_csv_output(version_dir, real_export_csv, tmp_path):
    lines = real_export_csv.read_text().splitlines()[:21]
    (tmp_path / "rows.csv").write_text("\n".join(lines) + "\n")
    assert (
        batch_cli.main(
            [
                "--input",
                str(tmp_path / "rows.csv"),
                "--output",
                str(tmp_path / "run"),
                "--model-dir",
                str(version_dir),
                "--version",
                "3",
                "--format",
                "csv",
            ]
        )
        == 0
    )
    written = [row for path in glob.glob(str(tmp_path / "run-predictions-*.csv")) for row in csv.DictReader(open(path))]
    assert written and {row["model_version"] for row in written} == {"3"}
    assert list(written[0]) == ["id", "prediction", "model_version", "timestamp"]


def test_no_pushed_version_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "rows.csv").write_text("mother_age,gestation_weeks\n30,39\n")
    assert (
        batch_cli.main(
            [
                "--input",
                str(tmp_path / "*.csv"),
                "--output",
                str(tmp_path / "o"),
                "--model-dir",
                str(tmp_path / "empty"),
            ]
        )
        == 2
    )
    assert "no pushed version (a folder named by a number) to predict with" in capsys.readouterr().err


def test_streaming_messages_in_windows_a_late_one_and_a_malformed_one(version_dir):
    """Beam's TestStream stands in for Pub/Sub: the same source transforms after the read, the same core."""
    import apache_beam as beam
    from apache_beam.io.gcp.pubsub import PubsubMessage
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.testing.util import assert_that, equal_to
    from apache_beam.transforms.window import TimestampedValue

    def message(number, payload):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return TimestampedValue(PubsubMessage(data, {}, message_id=f"m{number}"), number * 30)

    good = {"mother_age": 30, "gestation_weeks": 39, "is_male": "true"}
    stream = (
        TestStream()
        .add_elements([message(0, good), message(1, dict(good, mother_age=25))])  # window [0, 60)
        .advance_watermark_to(60)
        .add_elements([message(2, dict(good, gestation_weeks=40)), message(3, b"{not json")])  # [60, 120)
        .advance_watermark_to(130)
        .add_elements(
            [
                message(4, {"mother_age": 31}),  # lacking a required feature
                TimestampedValue(PubsubMessage(json.dumps(good).encode(), {}, message_id="m5"), 40),
            ]
        )
        .advance_watermark_to_infinity()
    )  # m5 is late: its window [0, 60) ended before it arrived
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    source = batch_io.PubSubMessages("projects/p/subscriptions/s", window_seconds=60)
    with beam.Pipeline(options=options) as pipeline:
        records = source.records(pipeline | stream)
        outputs = records | batch_core.Predict(str(version_dir))
        windows = outputs[batch_core.PREDICTIONS] | beam.FlatMap(
            lambda rows, w=beam.DoFn.WindowParam: [
                (row["id"], round(row["prediction"], 4), row["model_version"], w.start) for row in rows
            ]
        )
        assert_that(
            windows,
            equal_to(
                [
                    ("m0", round(toy_model.expected(good, 2.5), 4), 12, 0),
                    ("m1", round(toy_model.expected(dict(good, mother_age=25), 2.5), 4), 12, 0),
                    ("m2", round(toy_model.expected(dict(good, gestation_weeks=40), 2.5), 4), 12, 60),
                    ("m5", round(toy_model.expected(good, 2.5), 4), 12, 0),
                ]
            ),
            label="predictions",
        )
        reasons = outputs[batch_core.REJECTED] | beam.Map(lambda row: (row["id"], row["reason"].split(":")[0]))
        assert_that(
            reasons,
            equal_to(
                [
                    ("m3", "not JSON"),
                    (
                        "m4",
                        "missing required feature 'gestation_weeks' (no value, or an 'unknown' "
                        "code); every request needs mother_age, gestation_weeks",
                    ),
                ]
            ),
            label="rejected",
        )


VERTEX = [
    "--profile",
    "vertex",
    "--set",
    "gcp_project=my-project",
    "--set",
    "gcs_bucket=gs://my-bucket",
    "--set",
    "pipeline_image=europe-docker.pkg.dev/my-project/babyweight/pipeline:3",
    "--set",
    "serving_image=s",
]


def _transforms(pipeline):
    import apache_beam as beam

    class Collect(beam.pipeline.PipelineVisitor):
        def __init__(self):
            self.found = []

        def enter_composite_transform(self, node):
            self.found.append(node.transform)

        def visit_transform(self, node):
            self.found.append(node.transform)

    visitor = Collect()
    pipeline.visit(visitor)
    return visitor.found


def test_the_production_graph_reads_the_subscription_and_streams_into_the_tables_on_dataflow(version_dir):
    """Built offline with the real source and sink transforms, as the vertex profile configures them."""
    import apache_beam as beam
    from apache_beam.io.gcp.bigquery import WriteToBigQuery
    from apache_beam.options.pipeline_options import GoogleCloudOptions, StandardOptions, WorkerOptions

    from pipeline import config as config_lib

    config = config_lib.load_config("vertex", config_lib.parse_overrides(VERTEX[3::2]))
    pipeline = beam.Pipeline()  # the graph; Dataflow's options below (with them, Beam's checks call Google Cloud)
    core = batch_core.build(
        pipeline,
        batch_io.PubSubMessages("projects/my-project/subscriptions/births"),
        batch_io.BigQueryTables("my-project:babyweight.predictions", "my-project:babyweight.errors"),
        str(version_dir),
        "3",
    )
    transforms = _transforms(pipeline)
    reads = [t for t in transforms if isinstance(t, beam.io.ReadFromPubSub)]
    assert [r._source.full_subscription for r in reads] == ["projects/my-project/subscriptions/births"]
    writes = {str(t.table_reference.tableId): t for t in transforms if isinstance(t, WriteToBigQuery)}
    assert set(writes) == {"predictions", "errors"}
    schema = [f"{field['name']}:{field['type']}" for field in writes["predictions"].schema["fields"]]
    assert ",".join(schema) == batch_io.PREDICTION_SCHEMA
    assert writes["predictions"].method == WriteToBigQuery.Method.STREAMING_INSERTS
    options = batch_cli.cloud_options(config, streaming=True)
    assert options.view_as(StandardOptions).streaming and options.view_as(StandardOptions).runner == "DataflowRunner"
    cloud = options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region, cloud.job_name) == (
        "my-project",
        "us-central1",
        "babyweight-stream-predictions",
    )
    assert cloud.temp_location.startswith("gs://my-bucket/")
    assert (
        options.view_as(WorkerOptions).sdk_container_image == "europe-docker.pkg.dev/my-project/babyweight/pipeline:3"
    )
    assert core.version == "3"


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test (Google Cloud's clients connect with sockets)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"a network call: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--query", "SELECT 1", "--model-dir", "gs://b/m"], "reads --subscription (streaming) or --query (backfill)"),
        (["--query", "SELECT 1", "--table", "p:d.t", "--model-dir", "gs://b/m"], "a backfill needs --key-column"),
        (["--query", "SELECT 1", "--key-column", "k", "--table", "p:d.t"], "pass --model-dir gs://"),
    ],
)
def test_cloud_settings_are_checked_before_any_network_call(args, message, capsys, no_network):
    assert batch_cli.main(VERTEX + args) == 2
    assert message in capsys.readouterr().err
    assert batch_cli.main(VERTEX[:-2] + args) == 2
    assert "needs serving_image" in capsys.readouterr().err


def test_a_backfill_job_is_built_from_a_query(capsys, no_network):
    job = VERTEX + [
        "--query",
        "SELECT * FROM t",
        "--key-column",
        "record_id",
        "--table",
        "my-project:b.p",
        "--model-dir",
        "gs://my-bucket/serving_model",
        "--dry-run",
    ]
    assert batch_cli.main(job + ["--version", "3"]) == 0
    assert "built the job for my-project; not submitted" in capsys.readouterr().out
    assert batch_cli.main(job) == 2
    assert "a dry run needs --version N" in capsys.readouterr().err
    assert batch_cli.main(["--input", "x.csv", "--output", "o", "--dry-run", "--version", "3"]) == 2
    assert "--dry-run builds a Dataflow job: it needs --profile vertex" in capsys.readouterr().err


class _File:
    def __init__(self, path, data):
        self.metadata = type("Metadata", (), {"path": path})()
        self.data = data

    def read(self):
        return self.data


def test_csv_rows_are_named_by_their_first_line_and_path_and_unreadable_ones_rejected():
    text = 'mother_age,state,is_male\n1,"two\nlines",true\n,,\n\n3,4,\n5\n'
    batches = list(batch_io.csv_batches(_File("/in/span-2/x.csv", text.encode()), "/in", size=2))
    assert [len(b) for b in batches] == [2, 2] and all(isinstance(b, batch_core.Batch) for b in batches)
    assert [(r.id, r.text, r.fields) for b in batches for r in b] == [
        ("span-2/x.csv:2", '1,"two\nlines",true', {"mother_age": "1", "is_male": "true"}),  # the model's features
        ("span-2/x.csv:4", ",,", {"__error__": "no value in any field"}),
        ("span-2/x.csv:6", "3,4,", {"mother_age": "3"}),
        ("span-2/x.csv:7", "5", {"__error__": "1 fields; the header has 3"}),
    ]
    broken = [r for b in batch_io.csv_batches(_File("/in/y.csv", b"a,b\n\xff\xfe,1\n"), "/in") for r in b]
    assert broken[0].id == "y.csv:0" and "not UTF-8" in broken[0].fields["__error__"]
    # A NUL byte is one broken row, the rows after it are read; a file of old Mac line ends (\r) is read too.
    nul = [r for b in batch_io.csv_batches(_File("/z.csv", b"mother_age\n30\n3\x001\n31\n")) for r in b]
    assert [(r.id, r.fields) for r in nul] == [
        ("z.csv:2", {"mother_age": "30"}),
        ("z.csv:3", {"__error__": "lines 3-3 can't be read as CSV: line contains NUL"}),
        ("z.csv:4", {"mother_age": "31"}),
    ]
    # A file without a header (its first row taken for one) is one rejected record that says so.
    bare = [
        r
        for b in batch_io.csv_batches(_File("/b.csv", b"7.58,True,23,Unknown,1,39.0\n8.1,False,30,,1,40\n"))
        for r in b
    ]
    assert [(r.id, r.text) for r in bare] == [("b.csv:1", "7.58,True,23,Unknown,1,39.0")]
    assert bare[0].fields["__error__"].startswith("the first line names none of the model's features")
    mac = [r for b in batch_io.csv_batches(_File("/m.csv", b"mother_age\r30\r31\r")) for r in b]
    assert [(r.id, r.text, r.fields) for r in mac] == [
        ("m.csv:2", "30", {"mother_age": "30"}),
        ("m.csv:3", "31", {"mother_age": "31"}),
    ]


def test_the_server_never_imports_beam():
    """The serving image installs no Beam: what `babyweight serve` imports must not need it."""
    import subprocess
    import sys

    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, serving.model_server.server, serving.model_server.app, serving.experiments.experiment_cli; "
            "print('apache_beam' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "False"


@pytest.mark.slow
def test_the_watched_folder_predicts_each_file_as_it_lands_while_the_job_runs(
    version_dir, real_export_csv, tmp_path, capsys
):
    import threading
    import time

    lines = real_export_csv.read_text().splitlines()
    folder, out = tmp_path / "landing", tmp_path / "out"
    folder.mkdir()
    (folder / "first.csv").write_text("\n".join(lines[:11]) + "\n")
    landed = []

    def land_after_the_first_is_predicted():
        deadline = time.time() + 60
        while not glob.glob(str(out / "stream-predictions-*.csv")) and time.time() < deadline:
            time.sleep(0.2)
        landed.append(bool(glob.glob(str(out / "stream-predictions-*.csv"))))  # written while the job runs
        (folder / "second.csv.tmp").write_text("\n".join([lines[0]] + lines[11:21]) + "\n")
        (folder / "second.csv.tmp").rename(folder / "second.csv")  # whole, as a copy tool would land it

    writer = threading.Thread(target=land_after_the_first_is_predicted)
    writer.start()
    assert (
        batch_cli.main(
            [
                "--input",
                str(folder / "*.csv"),
                "--output",
                str(out / "stream"),
                "--watch",
                "--format",
                "csv",
                "--poll-seconds",
                "0.5",
                "--window-seconds",
                "2",
                "--watch-seconds",
                "12",
                "--model-dir",
                str(version_dir),
            ]
        )
        == 0
    )
    writer.join()
    assert landed == [True]
    files = sorted(glob.glob(str(out / "stream-predictions-*.csv")))
    assert len(files) >= 2 and all(
        open(path).readline().strip() == "id,prediction,model_version,timestamp" for path in files
    )
    ids = {row["id"] for path in files for row in csv.DictReader(open(path))}
    ids |= {row["id"] for row in _read(str(out / "stream-rejected-*.jsonl"))}
    assert ids == {f"first.csv:{n}" for n in range(2, 12)} | {f"second.csv:{n}" for n in range(2, 12)}
    assert f"20 row(s) of {folder / '*.csv'} written" in capsys.readouterr().out


def test_ctrl_c_stops_a_watching_job_and_says_what_it_wrote(version_dir, real_export_csv, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("\n".join(real_export_csv.read_text().splitlines()[:31]) + "\n")
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "babyweight_cli",
            "predict-batch",
            "--input",
            str(tmp_path / "in" / "*.csv"),
            "--output",
            str(tmp_path / "out" / "s"),
            "--watch",
            "--poll-seconds",
            "0.5",
            "--model-dir",
            str(version_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    try:
        deadline = time.time() + 90
        while not glob.glob(str(tmp_path / "out" / "s-predictions-*")) and time.time() < deadline:
            time.sleep(0.2)
        job.send_signal(signal.SIGINT)
        out, err = job.communicate(timeout=60)
    finally:
        job.kill()
    predicted = len(_read(str(tmp_path / "out" / "s-predictions-*.jsonl")))
    rejected = len(_read(str(tmp_path / "out" / "s-rejected-*.jsonl")))
    assert job.returncode == 0, err[-2000:]
    assert predicted + rejected == 30 and predicted > 0
    assert f"stopped (Ctrl-C): {predicted} prediction(s) and {rejected} rejected row(s) written" in out


def _one_by_one(records):
    """The contract applied to each record's values alone (the server's path): accepted id -> model input,
    rejected -> why."""
    accepted, reasons = {}, {}
    for record in records:
        try:
            accepted[record.id] = features.instance_key(contract.to_instance(record.fields))
        except ValueError as error:
            reasons[record.id] = str(error)
    return accepted, reasons


def _assert_parsed_as_one_by_one(records):
    parsed, rejects = batch_core.parse(records)
    accepted, reasons = _one_by_one(records)
    assert {row["id"]: row["reason"] for row in rejects} == reasons
    assert parsed.ids == [record.id for record in records if record.id in accepted]
    expected = loader.columns_of([accepted[record_id] for record_id in parsed.ids])
    for name, values in expected.items():
        if values.dtype == tf.string:
            texts = [value.decode() if isinstance(value, bytes) else value for value in parsed.columns[name]]
            assert texts == [value.decode() for value in values.numpy()], name
        else:
            np.testing.assert_array_equal(parsed.columns[name], values.numpy())


def test_a_batch_is_read_column_by_column_exactly_as_the_contract_reads_each_row(real_export_csv):
    """Real rows (plain values, some lacking a required feature) take the column path, and give what each row
    gives through the server's contract; so does a batch of odd values, which goes row by row."""
    plain = [
        r for b in batch_io.csv_batches(_File(str(real_export_csv), real_export_csv.read_bytes()), size=2000) for r in b
    ][:2000]
    assert batch_core._plain_columns([r.fields for r in plain]) is not None  # the column path really runs
    lacking = [r for r in plain if "gestation_weeks" not in r.fields or r.fields["gestation_weeks"] == "99"]
    assert lacking  # real rows lack gestation weeks: they are checked one by one and rejected
    _assert_parsed_as_one_by_one(plain)
    good = {"mother_age": 30, "gestation_weeks": 39}
    # Plain values near the contract's edges: an 'unknown' code hidden in a fraction, in text, beyond float32;
    # true/false as a BigQuery BOOL column gives them.
    edges = [
        dict(good, gestation_weeks=99.5),
        dict(good, gestation_weeks="99.2"),
        dict(good, gestation_weeks=98.9),
        dict(good, mother_age="1e400"),
        dict(good, father_age=99),
        dict(good, mother_age=" 31 "),
        dict(good, mother_age=2**70),
        dict(good, gestation_weeks=float("nan")),
        dict(good, is_male=""),
        dict(good, is_male=True),
        dict(good, mother_married=False),
        dict(good, father_age="nan"),
        dict(good, gestation_weeks="NaN"),
        dict(good, father_age=float("nan")),
    ]
    edge_records = [batch_core.Record(f"e{n}", "", values) for n, values in enumerate(edges)]
    assert batch_core._plain_columns(edges) is not None
    _assert_parsed_as_one_by_one(edge_records)
    odd = [
        dict(good),
        dict(good, mother_age="31"),
        dict(good, mother_age=True),
        dict(good, mother_age=[32]),
        dict(good, mother_age=[32, 33]),
        dict(good, is_male=True),
        dict(good, is_male=1),
        dict(good, plurality=""),
        dict(good, gestation_weeks=99),
        dict(good, gestation_weeks=None),
        dict(good, year=2005),
        dict(good, mother_age="thirty"),
        dict(good, father_age=float("nan")),
    ]
    assert batch_core._plain_columns(odd) is None
    _assert_parsed_as_one_by_one([batch_core.Record(f"m{n}", "", values) for n, values in enumerate(odd)])
    cut = batch_core.Record("cut", "", {"__error__": "2 fields; the header has 31"})
    assert batch_core.parse([cut]) == (None, [{"id": "cut", "reason": "2 fields; the header has 31", "text": ""}])


def test_a_message_is_read_as_the_server_reads_a_body_and_never_stops_the_job():
    """JSON as orjson reads it (the server's reader: numbers a double holds, nesting limited), any of the table's
    columns, no other name: each bad message is rejected with its reason, the good one predicted."""
    row = '{"mother_age": 30, "gestation_weeks": 39, "weight_pounds": 7.1, "year": 2005, "is_male": true}'
    records = [
        batch_core.Record("big", '{"mother_age": 1' + "0" * 400 + ', "gestation_weeks": 39}'),  # beyond a double
        batch_core.Record("deep", "[" * 100_000),
        batch_core.Record("list", "[1, 2]"),
        batch_core.Record("nan", '{"a": NaN}'),
        batch_core.Record("broken", "{not json"),
        batch_core.Record("ok", row),
        batch_core.Record("typo", '{"mother_age": 30, "gestation_weeks": 39, "father_agee": 40}'),
        batch_core.Record("sentinel", '{"__error__": "not from a source"}'),
    ]
    parsed, rejects = batch_core.parse(records)
    reasons = {row["id"]: row["reason"] for row in rejects}
    assert parsed.ids == ["ok"] and list(parsed.columns["is_male"]) == ["true"]
    assert all(reasons[name].startswith("not JSON: ") for name in ("big", "deep", "nan", "broken")), reasons
    assert reasons["list"] == "expected an object of feature values"
    assert reasons["typo"].startswith("unknown column 'father_agee' (a message takes the natality table's columns")
    assert reasons["sentinel"].startswith("unknown column '__error__'")


def test_an_instance_the_model_refuses_or_answers_without_a_number_is_rejected_and_the_rest_predicted(tmp_path):
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    toy_model.save(tmp_path / "5", offset=2.0, nonsense_when=("father_age", 77))
    good = {"mother_age": 30, "gestation_weeks": 39}
    records = batch_core.Batch(
        batch_core.Record(f"r{n}", json.dumps(dict(good, father_age=age))) for n, age in enumerate([40, 77, 41])
    )
    with beam.Pipeline() as pipeline:
        outputs = pipeline | beam.Create([records]) | batch_core.Predict(str(tmp_path))
        assert_that(
            outputs[batch_core.PREDICTIONS]
            | beam.FlatMap(lambda rows: [(r["id"], round(r["prediction"], 4)) for r in rows]),
            equal_to(
                [("r0", round(toy_model.expected(good, 2.0), 4)), ("r2", round(toy_model.expected(good, 2.0), 4))]
            ),
            label="predicted",
        )
        assert_that(
            outputs[batch_core.REJECTED] | beam.Map(lambda row: (row["id"], row["reason"])),
            equal_to([("r1", "the model's prediction is not a number: nan")]),
            label="rejected",
        )
    # A batch the model refuses as a whole is predicted one by one: only the instance it refuses is rejected.
    handler = batch_core.VersionHandler(str(tmp_path / "5"))
    keys = [features.instance_key(good), features.instance_key({"mother_age": 30}), features.instance_key(good)]
    parsed = batch_core.Parsed(
        ["a", "b", "c"], ["", "", ""], {name: tensor.numpy() for name, tensor in loader.columns_of(keys).items()}
    )
    (result,) = handler.run_inference([parsed], handler.load_model())
    predictions, refused = result.inference
    assert list(refused) == [1] and "missing required feature in instance(s)" in refused[1]
    np.testing.assert_allclose(predictions[[0, 2]], [toy_model.expected(good, 2.0)] * 2, rtol=1e-6)


def test_a_batch_whose_prediction_raises_is_rejected_row_by_row_with_the_error(tmp_path, monkeypatch):
    """Anything else the model call raises goes to RunInference's dead letters: each row of the batch rejected."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    toy_model.save(tmp_path / "5", offset=2.0)

    def broken(self, batch_, model, inference_args=None):
        raise ValueError("boom")

    monkeypatch.setattr(batch_core.VersionHandler, "run_inference", broken)
    records = batch_core.Batch(
        batch_core.Record(f"r{n}", json.dumps({"mother_age": 30, "gestation_weeks": 39})) for n in range(3)
    )
    with beam.Pipeline() as pipeline:
        outputs = pipeline | beam.Create([records]) | batch_core.Predict(str(tmp_path))
        assert_that(outputs[batch_core.PREDICTIONS], equal_to([]), label="predicted")
        assert_that(
            outputs[batch_core.REJECTED] | beam.Map(lambda row: (row["id"], row["reason"])),
            equal_to([(f"r{n}", "prediction failed: ValueError('boom')") for n in range(3)]),
            label="rejected",
        )


def _files_to_files(tmp_path, version_dir, *extra):
    return batch_cli.main(
        [
            "--input",
            str(tmp_path / "in" / "*.csv"),
            "--output",
            str(tmp_path / "out" / "run"),
            "--model-dir",
            str(version_dir),
            *extra,
        ]
    )


def test_a_glob_that_matches_no_file_is_an_error_naming_it_before_any_pipeline_starts(
    version_dir, tmp_path, capsys, monkeypatch
):
    import apache_beam as beam

    def never(self, *args, **kwargs):
        raise AssertionError("a pipeline started")

    monkeypatch.setattr(beam.Pipeline, "run", never)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "rows.txt").write_text("mother_age,gestation_weeks\n30,39\n")  # not *.csv
    (tmp_path / "in" / "folder.csv").mkdir()  # a folder is no file
    assert _files_to_files(tmp_path, version_dir) == 2
    err = capsys.readouterr().err
    assert f"error: --input {str(tmp_path / 'in' / '*.csv')!r} matches no file" in err
    assert not (tmp_path / "out").exists()


def test_a_run_that_rejects_every_row_writes_them_and_exits_non_zero_saying_so(version_dir, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("mother_age,gestation_weeks\n30,\n31,99\nthirty,39\n")
    assert _files_to_files(tmp_path, version_dir) == 1
    captured = capsys.readouterr()
    rejected = _read(str(tmp_path / "out" / "run-rejected-*.jsonl"))
    assert sorted(row["id"] for row in rejected) == ["a.csv:2", "a.csv:3", "a.csv:4"]
    assert _read(str(tmp_path / "out" / "run-predictions-*.jsonl")) == []
    assert "3 row(s) read from" in captured.out and "0 predicted" in captured.out
    assert (
        f"error: every row was rejected (3 of 3); the rows and the reasons: {tmp_path / 'out' / 'run'}-rejected-*.jsonl"
        in captured.err
    )
    (tmp_path / "in" / "a.csv").write_text("mother_age,gestation_weeks\n")  # a header alone: nothing to predict
    assert _files_to_files(tmp_path, version_dir) == 1
    assert f"error: the files matching {str(tmp_path / 'in' / '*.csv')!r} hold no row" in capsys.readouterr().err


def test_a_new_run_removes_the_earlier_runs_files_of_its_prefix_and_nothing_else(version_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    stale = [  # an earlier run's three shards, one in CSV, and a watching job's window files
        "run-predictions-00000-of-00003.jsonl",
        "run-predictions-00001-of-00003.jsonl",
        "run-predictions-00002-of-00003.jsonl",
        "run-predictions-00000-of-00001.csv",
        "run-rejected-00000-of-00003.jsonl",
        "run-predictions-20240101T000000-0123abcd.jsonl",
        "run-rejected-20240101T000000-0123abcd.jsonl",
    ]
    kept = [  # not this command's outputs for the prefix "run"
        "run-notes.txt",
        "run-predictions-final.jsonl",
        "run-predictions-00000-of-00003.jsonl.bak",
        "run2-predictions-00000-of-00001.jsonl",
        "rerun-predictions-00000-of-00001.jsonl",
    ]
    for name in stale + kept:
        (out / name).write_text('{"id": "stale.csv:2", "prediction": 1.0}\n')
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("mother_age,gestation_weeks\n30,39\n31,\n")
    # A run that fails before writing (a version that isn't there) leaves the earlier output as it was.
    assert _files_to_files(tmp_path, version_dir, "--version", "7") == 2
    assert sorted(path.name for path in out.iterdir() if not path.name.startswith("beam-temp-")) == sorted(stale + kept)
    assert _files_to_files(tmp_path, version_dir) == 0
    left = sorted(path.name for path in out.iterdir() if not path.name.startswith("beam-temp-"))
    assert set(kept) <= set(left) and not set(stale) & set(left)
    written = sorted(set(left) - set(kept))  # this run's shards
    assert [row["id"] for name in written if "-predictions-" in name for row in _read(str(out / name))] == ["a.csv:2"]
    assert [row["id"] for name in written if "-rejected-" in name for row in _read(str(out / name))] == ["a.csv:3"]
    assert f"removed {len(stale)} file(s) an earlier run wrote beside {out / 'run'}" in capsys.readouterr().out
    # Run again with the same shards: the files it rewrote are this run's, and stay.
    assert _files_to_files(tmp_path, version_dir) == 0
    assert sorted(path.name for path in out.iterdir() if not path.name.startswith("beam-temp-")) == left


def test_a_key_column_the_query_does_not_return_is_an_error_naming_it_and_the_columns(monkeypatch):
    """BigQuery's read stands in as the rows it gives (dicts); no network: the source's own transforms after it."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    rows = [
        {"record_id": "r1", "mother_age": 30, "gestation_weeks": 39, "is_male": True},
        {"record_id": "r2", "mother_age": 31, "gestation_weeks": None},
    ]

    class FakeQuery(beam.PTransform):
        def __init__(self, query, use_standard_sql):
            super().__init__()

        def expand(self, begin):
            return begin | beam.Create(rows)

    monkeypatch.setattr(beam.io, "ReadFromBigQuery", FakeQuery)
    with beam.Pipeline() as pipeline:
        records = batch_io.BigQueryRows("SELECT ...", "record_id").read(pipeline)
        assert_that(
            records | beam.FlatMap(lambda batch: [(r.id, r.fields) for r in batch]),
            equal_to(
                [
                    ("r1", {"record_id": "r1", "mother_age": 30, "gestation_weeks": 39, "is_male": True}),
                    ("r2", {"record_id": "r2", "mother_age": 31}),
                ]
            ),
        )
    with pytest.raises(Exception, match="--key-column 'recordid' is not a column of the query") as raised:
        with beam.Pipeline() as pipeline:
            batch_io.BigQueryRows("SELECT ...", "recordid").read(pipeline)
    assert "the query returns record_id, mother_age, gestation_weeks, is_male" in str(raised.value)
