"""The pipeline's ExampleGen reads CSV files as people's tools save them exactly like plain ones."""
import pathlib

import apache_beam as beam
import pytest
import tensorflow as tf
from tfx.components.example_gen.csv_example_gen import executor as tfx_csv_executor

from models import features
from pipeline import csv_example_gen

ROWS = 300


@pytest.fixture(scope="module")
def plain_text(real_export_csv) -> str:
    """The real export's header and first rows, as BigQuery wrote them."""
    with real_export_csv.open() as handle:
        return "".join(next(handle) for _ in range(ROWS + 1))


def _examples(folder: pathlib.Path, to_example=csv_example_gen._CsvToExample):
    """The tf.Examples an ExampleGen transform makes of the CSV files in `folder`, sorted."""
    output = folder.parent / f"{folder.name}-examples"
    with beam.Pipeline() as pipeline:
        _ = (pipeline | to_example({"input_base": str(folder)}, "*.csv")
             | beam.Map(lambda example: example.SerializeToString(deterministic=True))
             | beam.io.WriteToTFRecord(str(output / "part")))
    return sorted(record.numpy() for record in tf.data.TFRecordDataset(sorted(map(str, output.glob("part*")))))


def _write(folder: pathlib.Path, data: bytes) -> pathlib.Path:
    folder.mkdir(parents=True)
    (folder / "natality.csv").write_bytes(data)
    return folder


def _quoted_header(text: str) -> str:
    header, rest = text.split("\n", 1)
    return ",".join(f'"{name}"' for name in header.split(",")) + "\n" + rest


@pytest.mark.parametrize("variant, encode", [
    ("byte-order mark and CRLF (Excel's CSV UTF-8)",
     lambda text: b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode()),
    ("byte-order mark only", lambda text: b"\xef\xbb\xbf" + text.encode()),
    ("quoted header (R's write.csv)", lambda text: _quoted_header(text).encode()),
])
def test_saved_by_other_tools_reads_like_the_plain_file(tmp_path, plain_text, variant, encode):
    plain = _examples(_write(tmp_path / "plain", plain_text.encode()))
    other = _examples(_write(tmp_path / "other", encode(plain_text)))
    assert len(plain) == ROWS
    assert other == plain, variant
    names = set(tf.train.Example.FromString(plain[0]).features.feature)
    assert names == set(features.COLUMN_NAMES)


def test_tfx_own_reader_is_what_this_fixes(tmp_path, plain_text):
    """TFX 1.16 keeps the mark in the first name; if it stops doing so, this executor can go."""
    folder = _write(tmp_path / "bom", b"\xef\xbb\xbf" + plain_text.encode())
    names = set(tf.train.Example.FromString(_examples(folder, tfx_csv_executor._CsvToExample)[0]).features.feature)
    assert "\ufeffsource_year" in names and "source_year" not in names


def test_column_names_strip_the_mark_and_quotes(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b'\xef\xbb\xbf"source_year", year ,month\r\n2005,2005,1\r\n')
    assert csv_example_gen.column_names(str(path)) == ["source_year", "year", "month"]
