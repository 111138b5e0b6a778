"""`babyweight predict-batch`: the Beam pipeline's files -> files mode on real rows, bad rows in the dead letters."""
import csv
import glob
import json

import numpy as np
import pytest
import tensorflow as tf

from models import features
from serving import batch, client, loader
from tests.serving import toy_model


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    toy_model.save(root / "3", offset=1.5)
    toy_model.save(root / "12", offset=2.5)  # the newest: numbers, not names, decide
    return root


def _read(pattern):
    return [json.loads(line) for path in sorted(glob.glob(pattern)) for line in open(path) if line.strip()]


def test_files_to_files_predict_every_good_row_as_the_signature_does_and_reject_the_bad(version_dir, real_export_csv,
                                                                                      tmp_path, capsys):
    lines = real_export_csv.read_text().splitlines()
    header, rows = lines[0], lines[1:301]
    columns = header.split(",")
    text_in_number = rows[5].split(",")
    text_in_number[columns.index("mother_age")] = "thirty"
    bad = [",".join(text_in_number), ",".join(rows[6].split(",")[:-3])]  # text in a number; 28 fields of 31
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("\n".join([header] + rows[:150] + bad[:1]) + "\n")
    (tmp_path / "in" / "b.csv").write_text("\n".join([header] + rows[150:] + bad[1:]) + "\n")
    assert batch.main(["--input", str(tmp_path / "in" / "*.csv"), "--output", str(tmp_path / "out" / "run"),
                       "--model-dir", str(version_dir)]) == 0
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
                good_rows.append((f"{name}:{number}", client.to_instance({k: v for k, v in row.items() if v})))
            except ValueError:
                assert f"{name}:{number}" in rejects
    assert len(predicted) == len(good_rows) and len(rejects) == 2 + len(lacking)
    signature = tf.saved_model.load(str(version_dir / "12")).signatures["serving_raw"]
    expected = signature(**loader.columns_of([features.instance_key(i) for _, i in good_rows]))["predictions"]
    np.testing.assert_allclose([predicted[i]["prediction"] for i, _ in good_rows], expected.numpy().reshape(-1),
                               rtol=1e-6)
    assert {row["model_version"] for row in predicted.values()} == {12}
    assert f"{len(expected_ids)} row(s) read" in summary and f"{len(predicted)} predicted by version 12" in summary
    assert f"{len(rejects)} rejected" in summary


def test_a_named_version_and_csv_output(version_dir, real_export_csv, tmp_path):
    lines = real_export_csv.read_text().splitlines()[:21]
    (tmp_path / "rows.csv").write_text("\n".join(lines) + "\n")
    assert batch.main(["--input", str(tmp_path / "rows.csv"), "--output", str(tmp_path / "run"),
                       "--model-dir", str(version_dir), "--version", "3", "--format", "csv"]) == 0
    written = [row for path in glob.glob(str(tmp_path / "run-predictions-*.csv"))
               for row in csv.DictReader(open(path))]
    assert written and {row["model_version"] for row in written} == {"3"}
    assert list(written[0]) == ["id", "prediction", "model_version", "timestamp"]


def test_no_pushed_version_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert batch.main(["--input", str(tmp_path / "*.csv"), "--output", str(tmp_path / "o"),
                       "--model-dir", str(tmp_path / "empty")]) == 2
    assert "no pushed version (a folder named by a number) to predict with" in capsys.readouterr().err


def test_streaming_messages_in_windows_a_late_one_and_a_malformed_one(version_dir):
    """Beam's TestStream stands in for Pub/Sub: the same source transforms after the read, the same core."""
    from apache_beam.io.gcp.pubsub import PubsubMessage
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.testing.util import assert_that, equal_to
    from apache_beam.transforms.window import TimestampedValue
    import apache_beam as beam

    def message(number, payload):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return TimestampedValue(PubsubMessage(data, {}, message_id=f"m{number}"), number * 30)

    good = {"mother_age": 30, "gestation_weeks": 39, "is_male": "true"}
    stream = (TestStream()
              .add_elements([message(0, good), message(1, dict(good, mother_age=25))])   # window [0, 60)
              .advance_watermark_to(60)
              .add_elements([message(2, dict(good, gestation_weeks=40)), message(3, b"{not json")])  # [60, 120)
              .advance_watermark_to(130)
              .add_elements([message(4, {"mother_age": 31}),  # lacking a required feature
                             TimestampedValue(PubsubMessage(json.dumps(good).encode(), {}, message_id="m5"), 40)])
              .advance_watermark_to_infinity())  # m5 is late: its window [0, 60) ended before it arrived
    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = True
    source = batch.PubSubMessages("projects/p/subscriptions/s", window_seconds=60)
    with beam.Pipeline(options=options) as pipeline:
        records = source.records(pipeline | stream)
        outputs = records | batch.Predict(str(version_dir))
        windows = (outputs[batch.PREDICTIONS]
                   | beam.Map(lambda row, w=beam.DoFn.WindowParam: (row["id"], round(row["prediction"], 4),
                                                                   row["model_version"], w.start)))
        assert_that(windows, equal_to([
            ("m0", round(toy_model.expected(good, 2.5), 4), 12, 0),
            ("m1", round(toy_model.expected(dict(good, mother_age=25), 2.5), 4), 12, 0),
            ("m2", round(toy_model.expected(dict(good, gestation_weeks=40), 2.5), 4), 12, 60),
            ("m5", round(toy_model.expected(good, 2.5), 4), 12, 0)]), label="predictions")
        reasons = outputs[batch.REJECTED] | beam.Map(lambda row: (row["id"], row["reason"].split(":")[0]))
        assert_that(reasons, equal_to([("m3", "Expecting property name enclosed in double quotes"),
                                       ("m4", "missing required feature 'gestation_weeks' (no value, or an 'unknown' "
                                              "code); every request needs mother_age, gestation_weeks")]),
                    label="rejected")


VERTEX = ["--profile", "vertex", "--set", "gcp_project=my-project", "--set", "gcs_bucket=gs://my-bucket",
          "--set", "pipeline_image=europe-docker.pkg.dev/my-project/babyweight/pipeline:3", "--set", "serving_image=s"]


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
    core = batch.build(pipeline, batch.PubSubMessages("projects/my-project/subscriptions/births"),
                       batch.BigQueryTables("my-project:babyweight.predictions", "my-project:babyweight.errors"),
                       str(version_dir), "3")
    transforms = _transforms(pipeline)
    reads = [t for t in transforms if isinstance(t, beam.io.ReadFromPubSub)]
    assert [r._source.full_subscription for r in reads] == ["projects/my-project/subscriptions/births"]
    writes = {str(t.table_reference.tableId): t for t in transforms if isinstance(t, WriteToBigQuery)}
    assert set(writes) == {"predictions", "errors"}
    schema = [f"{field['name']}:{field['type']}" for field in writes["predictions"].schema["fields"]]
    assert ",".join(schema) == batch.PREDICTION_SCHEMA
    assert writes["predictions"].method == WriteToBigQuery.Method.STREAMING_INSERTS
    options = batch.cloud_options(config, streaming=True)
    assert options.view_as(StandardOptions).streaming and options.view_as(StandardOptions).runner == "DataflowRunner"
    cloud = options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region, cloud.job_name) == ("my-project", "us-central1", "babyweight-stream-predictions")
    assert cloud.temp_location.startswith("gs://my-bucket/")
    assert options.view_as(WorkerOptions).sdk_container_image == "europe-docker.pkg.dev/my-project/babyweight/pipeline:3"
    assert core.version == "3"


@pytest.mark.parametrize("args, message", [
    (["--query", "SELECT 1", "--model-dir", "gs://b/m"], "reads --subscription (streaming) or --query (backfill)"),
    (["--query", "SELECT 1", "--table", "p:d.t", "--model-dir", "gs://b/m"], "a backfill needs --key-column"),
    (["--query", "SELECT 1", "--key-column", "k", "--table", "p:d.t"], "pass --model-dir gs://"),
])
def test_cloud_settings_are_checked_before_any_network_call(args, message, capsys):
    assert batch.main(VERTEX + args) == 2
    assert message in capsys.readouterr().err
    assert batch.main(VERTEX[:-2] + args) == 2
    assert "needs serving_image" in capsys.readouterr().err


def test_a_backfill_job_is_built_from_a_query(capsys):
    assert batch.main(VERTEX + ["--query", "SELECT * FROM t", "--key-column", "record_id", "--table", "my-project:b.p",
                                "--model-dir", "gs://my-bucket/serving_model", "--version", "3", "--dry-run"]) == 0
    assert "built the job for my-project; not submitted" in capsys.readouterr().out


class _File:
    def __init__(self, path, data):
        self.metadata = type("Metadata", (), {"path": path})()
        self.data = data

    def read(self):
        return self.data


def test_csv_rows_are_named_by_their_first_line_and_path_and_unreadable_ones_rejected():
    text = 'a,b\n1,"two\nlines"\n,\n\n3,4\n5\n'
    records = list(batch.csv_records(_File("/in/span-2/x.csv", text.encode()), "/in"))
    assert [(r.id, r.text, r.fields) for r in records] == [
        ("span-2/x.csv:2", '1,"two\nlines"', {"a": "1", "b": "two\nlines"}),
        ("span-2/x.csv:4", ",", {"__error__": "no value in any field"}),
        ("span-2/x.csv:6", "3,4", {"a": "3", "b": "4"}),
        ("span-2/x.csv:7", "5", {"__error__": "1 fields; the header has 2"})]
    broken = list(batch.csv_records(_File("/in/y.csv", b"a,b\n\xff\xfe,1\n"), "/in"))
    assert broken[0].id == "y.csv:0" and "not UTF-8" in broken[0].fields["__error__"]


def test_the_server_never_imports_beam():
    """The serving image installs no Beam: what `babyweight serve` imports must not need it."""
    import subprocess
    import sys

    loaded = subprocess.run([sys.executable, "-c", "import sys, serving.server, serving.app, serving.experiment_cli; "
                             "print('apache_beam' in sys.modules)"], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "False"


def test_the_watched_folder_predicts_a_file_written_after_the_job_started(version_dir, real_export_csv, tmp_path,
                                                                          capsys):
    import threading
    import time

    lines = real_export_csv.read_text().splitlines()
    folder = tmp_path / "landing"
    folder.mkdir()
    (folder / "first.csv").write_text("\n".join(lines[:11]) + "\n")

    def land_later():
        time.sleep(3)
        (folder / "second.csv.tmp").write_text("\n".join([lines[0]] + lines[11:21]) + "\n")
        (folder / "second.csv.tmp").rename(folder / "second.csv")  # whole, as a copy tool would land it

    writer = threading.Thread(target=land_later)
    writer.start()
    assert batch.main(["--input", str(folder / "*.csv"), "--output", str(tmp_path / "out" / "stream"), "--watch",
                       "--poll-seconds", "0.5", "--window-seconds", "2", "--watch-seconds", "8",
                       "--model-dir", str(version_dir)]) == 0
    writer.join()
    ids = {row["id"] for row in _read(str(tmp_path / "out" / "stream-predictions-*.jsonl"))}
    ids |= {row["id"] for row in _read(str(tmp_path / "out" / "stream-rejected-*.jsonl"))}
    assert ids == {f"first.csv:{n}" for n in range(2, 12)} | {f"second.csv:{n}" for n in range(2, 12)}
    assert "20 row(s) read" in capsys.readouterr().out
