"""The pipeline's ExampleGen reads CSV files as people's tools save them exactly like plain ones."""

import pathlib

import apache_beam as beam
import pytest
import tensorflow as tf
from tfx.components.example_gen.csv_example_gen import executor as tfx_csv_executor
from tfx.proto import example_gen_pb2
from tfx.types import standard_artifacts
from tfx.utils import proto_utils

from models import features
from pipeline.components import csv_example_gen

ROWS = 300


@pytest.fixture(scope="module")
def plain_text(real_export_csv) -> str:
    """The real export's header and first rows, as BigQuery wrote them."""
    with real_export_csv.open() as handle:
        return "".join(next(handle) for _ in range(ROWS + 1))


def _examples(folder: pathlib.Path, to_example=csv_example_gen._CsvToExample):
    """The records an ExampleGen transform makes of the CSV files in `folder` (TFX's tf.Examples serialized
    deterministically), sorted."""
    output = folder.parent / f"{folder.name}-examples"
    with beam.Pipeline() as pipeline:
        records = pipeline | to_example({"input_base": str(folder)}, "*.csv")
        if to_example is tfx_csv_executor._CsvToExample:
            records |= beam.Map(lambda example: example.SerializeToString(deterministic=True))
        else:
            records |= beam.FlatMap(lambda batch: batch[1])
        _ = records | beam.io.WriteToTFRecord(str(output / "part"))
    return sorted(record.numpy() for record in tf.data.TFRecordDataset(sorted(map(str, output.glob("part*")))))


def _write(folder: pathlib.Path, data: bytes) -> pathlib.Path:
    folder.mkdir(parents=True)
    (folder / "natality.csv").write_bytes(data)
    return folder


def _quoted_header(text: str) -> str:
    header, rest = text.split("\n", 1)
    return ",".join(f'"{name}"' for name in header.split(",")) + "\n" + rest


@pytest.mark.parametrize(
    "variant, encode",
    [
        (
            "byte-order mark and CRLF (Excel's CSV UTF-8)",
            lambda text: b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode(),
        ),
        ("byte-order mark only", lambda text: b"\xef\xbb\xbf" + text.encode()),
        ("quoted header (R's write.csv)", lambda text: _quoted_header(text).encode()),
    ],
)
def test_saved_by_other_tools_reads_like_the_plain_file(tmp_path, plain_text, variant, encode):
    plain = _examples(_write(tmp_path / "plain", plain_text.encode()))
    other = _examples(_write(tmp_path / "other", encode(plain_text)))
    assert len(plain) == ROWS
    assert other == plain, variant
    names = set(tf.train.Example.FromString(plain[0]).features.feature)
    assert names == set(features.COLUMN_NAMES)


def test_tfx_own_reader_is_what_this_fixes(tmp_path, plain_text):
    """TFX 1.16 keeps the mark in the first name; if it stops doing so, `column_names` can go."""
    folder = _write(tmp_path / "bom", b"\xef\xbb\xbf" + plain_text.encode())
    names = set(tf.train.Example.FromString(_examples(folder, tfx_csv_executor._CsvToExample)[0]).features.feature)
    assert "\ufeffsource_year" in names and "source_year" not in names


def test_column_names_strip_the_mark_and_quotes(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b'\xef\xbb\xbf"source_year", year ,month\r\n2005,2005,1\r\n')
    assert csv_example_gen.column_names(str(path)) == ["source_year", "year", "month"]


@pytest.mark.slow
def test_the_real_export_gives_tfx_own_bytes(tmp_path, real_export_csv):
    """Every row of the real export is the record TFX's CsvExampleGen makes of it, byte for byte, so TFX's hash
    split puts it in the same split."""
    folder = tmp_path / "real"
    folder.mkdir()
    (folder / "natality.csv").symlink_to(real_export_csv)
    ours = _examples(folder)
    assert len(ours) == 16000
    assert ours == _examples(folder, tfx_csv_executor._CsvToExample)


EDGE_FILES = {
    # Quoted commas and line breaks, a blank line, CRLF, numbers Python reads and Arrow doesn't (' 7', '1_000'),
    # an integer beyond int64 (text, as TFX infers it), nan and inf, text that isn't ASCII, a value too long
    # for one byte of length, a column without a value, a column that is integer in one file and float in
    # the other (the type is the split's, over both files), and a hexadecimal integer (Arrow reads it, TFX doesn't).
    "a.csv": (
        "id,padded,big,special,name,empty,mixed,hex\r\n"
        '1, 7,1,nan,"Smith, J.",,3,0x1F\r\n'
        "\r\n"
        '2,1_000,99999999999999999999,inf,"two\nlines",,4,2\r\n'
    ),
    "b.csv": (f"id,padded,big,special,name,empty,mixed,hex\n3,8,2,-1e3,Zoë {'x' * 200},,4.5,3\n"),
}


def test_edge_cases_give_tfx_own_bytes(tmp_path):
    folder = tmp_path / "edge"
    folder.mkdir()
    for name, text in EDGE_FILES.items():
        (folder / name).write_bytes(text.encode())
    ours = _examples(folder)
    assert len(ours) == 3
    assert ours == _examples(folder, tfx_csv_executor._CsvToExample)
    example = tf.train.Example.FromString(ours[0])
    assert example.features.feature["mixed"].HasField("float_list")
    assert example.features.feature["big"].HasField("bytes_list")
    assert example.features.feature["hex"].HasField("bytes_list")
    assert example.features.feature["padded"].HasField("int64_list")
    assert example.features.feature["empty"].WhichOneof("kind") is None


def test_a_row_with_the_wrong_number_of_fields_names_its_file(tmp_path):
    folder = _write(tmp_path / "bad", b"a,b\n1,2\n3\n")
    with pytest.raises(Exception, match=r"bad/natality.csv: .*Expected 2 columns, got 1"):
        _examples(folder)


def _run_executor(executor_class, input_base: pathlib.Path, output: pathlib.Path):
    """The executor's Do on `input_base`, split 4:1 by hash as the pipeline splits: the output artifact and each
    split's records (deterministic bytes), sorted."""
    examples = standard_artifacts.Examples()
    examples.uri = str(output)
    executor_class().Do(
        {},
        {"examples": [examples]},
        {
            "input_base": str(input_base),
            "input_config": proto_utils.proto_to_json(
                example_gen_pb2.Input(splits=[example_gen_pb2.Input.Split(name="all", pattern="*.csv")])
            ),
            "output_config": proto_utils.proto_to_json(
                example_gen_pb2.Output(
                    split_config=example_gen_pb2.SplitConfig(
                        splits=[
                            example_gen_pb2.SplitConfig.Split(name="train", hash_buckets=4),
                            example_gen_pb2.SplitConfig.Split(name="eval", hash_buckets=1),
                        ]
                    )
                )
            ),
            "output_data_format": example_gen_pb2.FORMAT_TF_EXAMPLE,
            "output_file_format": example_gen_pb2.FORMAT_TFRECORDS_GZIP,
        },
    )
    splits = {}
    for split in ("train", "eval"):
        files = sorted(str(path) for path in (output / f"Split-{split}").glob("*"))
        splits[split] = sorted(
            tf.train.Example.FromString(record.numpy()).SerializeToString(deterministic=True)
            for record in tf.data.TFRecordDataset(files, compression_type="GZIP")
        )
    return examples, splits


@pytest.mark.slow
def test_the_executor_splits_and_records_as_tfx_own(tmp_path, real_export_csv):
    """The pipeline's executor and TFX's on the real export: the same rows in each split, the same artifact."""
    folder = tmp_path / "real"
    folder.mkdir()
    (folder / "natality.csv").symlink_to(real_export_csv)
    ours, our_splits = _run_executor(csv_example_gen.Executor, folder, tmp_path / "ours")
    theirs, their_splits = _run_executor(tfx_csv_executor.Executor, folder, tmp_path / "tfx")
    assert 2000 < len(our_splits["eval"]) < 5000 and len(our_splits["train"]) + len(our_splits["eval"]) == 16000
    assert our_splits == their_splits
    assert ours.split_names == theirs.split_names
    assert ours.get_string_custom_property("payload_format") == theirs.get_string_custom_property("payload_format")
    assert ours.get_string_custom_property("file_format") == theirs.get_string_custom_property("file_format")
    assert not list((tmp_path / "ours").rglob(".*")), "no temporary file is left behind"


@pytest.mark.parametrize(
    "text, kinds",
    [
        ("a,b\n,\n,\n", {"a": None, "b": None}),  # no column has a value: every feature has no kind, as TFX writes
        ("a,b\n1.5,nan(1)\n2,2\n", {"a": "float_list", "b": "bytes_list"}),  # Arrow reads nan(1); Python doesn't
    ],
)
def test_more_edge_cases_give_tfx_own_bytes(tmp_path, text, kinds):
    folder = _write(tmp_path / "more", text.encode())
    ours = _examples(folder)
    assert ours == _examples(folder, tfx_csv_executor._CsvToExample)
    example = tf.train.Example.FromString(ours[0])
    assert {name: example.features.feature[name].WhichOneof("kind") for name in kinds} == kinds


def test_a_split_without_rows_has_a_readable_empty_file(tmp_path, plain_text):
    folder = _write(tmp_path / "one", "\n".join(plain_text.split("\n")[:2]).encode() + b"\n")
    _, splits = _run_executor(csv_example_gen.Executor, folder, tmp_path / "out")
    assert sorted(len(records) for records in splits.values()) == [0, 1]
    assert all(list((tmp_path / "out" / f"Split-{split}").glob("data_tfrecord-*.gz")) for split in splits)
