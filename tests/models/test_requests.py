"""Request files as validate-serving and babyweight predict read them: plain rows, the server's log, Vertex's log."""

import json

import pytest

from models import requests


def test_plain_json_lines_and_csv(tmp_path):
    lines = tmp_path / "requests.jsonl"
    lines.write_text('{"mother_age": 31, "gestation_weeks": 39}\n\n{"mother_age": 20, "gestation_weeks": null}\n')
    assert requests.read_requests(lines) == [
        {"mother_age": 31, "gestation_weeks": 39},
        {"mother_age": 20, "gestation_weeks": None},
    ]
    table = tmp_path / "rows.csv"
    table.write_text("mother_age,gestation_weeks,is_male\n31,39,\n")
    assert requests.read_requests(table) == [{"mother_age": "31", "gestation_weeks": "39", "is_male": None}]


def test_the_servers_request_log_gives_its_instances(tmp_path):
    folder = tmp_path / "serving_logs"
    folder.mkdir()
    records = [
        {"request_id": "a-1", "index": 0, "signature": "serving_raw", "instance": {"mother_age": 31}},
        {"request_id": "a-2", "index": 0, "signature": "serving_default", "instance": {}},
    ]  # a tf.Example
    (folder / "requests-20261129T100000-1-000001.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    assert requests.read_requests(folder) == [{"mother_age": 31}]
    with (folder / "requests-20261129T100000-1-000001.jsonl").open("a") as log:
        log.write('{"request_id": "a-3", "index": 0, "instance": {"mother_a')  # a live log's last line, half written
    assert requests.read_requests(folder) == [{"mother_age": 31}]


def test_vertex_request_response_log_rows_give_each_payloads_instances(tmp_path):
    row = {
        "endpoint": "projects/p/locations/l/endpoints/1",
        "deployed_model_id": "9",
        "logging_time": "2026-11-29",
        "request_payload": [
            json.dumps(
                {"instances": [{"mother_age": 31, "gestation_weeks": 39}, {"mother_age": 22, "gestation_weeks": 41}]}
            )
        ],
        "response_payload": [json.dumps({"predictions": [[7.1], [7.4]]})],
    }
    exported = tmp_path / "served.json"
    exported.write_text(json.dumps(row) + "\n")
    assert [r["mother_age"] for r in requests.read_requests(exported)] == [31, 22]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**row, "request_payload": ["{not json"]}) + "\n")
    with pytest.raises(requests.RequestsError, match="broken.json, line 1: request_payload is not JSON"):
        requests.read_requests(broken)


def test_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"mother_age": 31}\n[1, 2]\n')
    with pytest.raises(requests.RequestsError, match="bad.jsonl, line 2: expected an object"):
        requests.read_requests(bad)
    with pytest.raises(requests.RequestsError, match="no such file or folder"):
        requests.read_requests(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(requests.RequestsError, match="no .jsonl, .json or .csv files"):
        requests.read_requests(tmp_path / "empty")
