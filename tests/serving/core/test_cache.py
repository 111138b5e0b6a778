"""The prediction table: bounded in entries and bytes, room made by dropping traffic's oldest answers (the head
stays), only the schema's text values and finite answers admitted."""

import math

import numpy

from models import features
from serving.core import cache


def _key(age: float, **values) -> features.InstanceKey:
    return features.instance_key({"mother_age": age, "gestation_weeks": 39, **values})


def _offered(table: cache.PredictionTable, keys, answer: float = 7.0, times: int = 2) -> None:
    for _ in range(times):
        table.offer(keys, [answer] * len(keys))


def test_traffic_fills_the_table_to_its_bytes_then_its_oldest_answers_make_room_and_the_head_stays():
    head = [_key(20 + n / 10) for n in range(10)]
    size = cache.entry_bytes(head[0])
    table = cache.PredictionTable(capacity=1000, admit_after=2, max_bytes=25 * size)
    table.fill(head, lambda keys: numpy.full(len(keys), 6.0))
    junk = [_key(30 + n / 10) for n in range(100)]
    for key in junk:  # each asked twice: kept
        _offered(table, [key])
    assert table.bytes <= 25 * size and len(table) == 25 and table.evicted == 85
    assert all(table.get(key) == 6.0 for key in head)  # the head is never dropped
    assert [table.get(key) for key in junk[-15:]] == [7.0] * 15 and table.get(junk[0]) is None
    frequent = _key(41.5)
    _offered(table, [frequent])  # after a flood, a frequent instance still gets in (before, the table was full)
    assert table.get(frequent) == 7.0 and len(table) == 25


def test_the_capacity_in_entries_holds_too():
    table = cache.PredictionTable(capacity=5, admit_after=1)
    _offered(table, [_key(20 + n) for n in range(12)], times=1)
    assert len(table) == 5 and table.get(_key(31)) == 7.0 and table.get(_key(20)) is None


def test_only_texts_the_schema_lists_and_finite_answers_are_admitted():
    table = cache.PredictionTable(capacity=100, admit_after=1)
    listed = _key(25, is_male="true", mother_married="false")
    made_up = _key(25, is_male="x" * 64)
    _offered(table, [listed, made_up])
    assert table.get(listed) == 7.0 and table.get(made_up) is None
    for answer in (math.nan, math.inf):
        _offered(table, [_key(26)], answer)
    assert table.get(_key(26)) is None
    table.fill([_key(27)], lambda keys: numpy.array([numpy.nan]))
    assert table.get(_key(27)) is None


def test_the_counts_of_instances_not_kept_yet_are_bounded_in_bytes():
    size = cache.entry_bytes(_key(20))
    table = cache.PredictionTable(capacity=10_000, admit_after=3, max_bytes=50 * size)
    for n in range(200):  # each seen once: counted, never kept
        table.offer([_key(20 + n / 100)], [7.0])
    assert len(table._seen) <= 50 and len(table) == 0
