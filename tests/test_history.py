"""History streams without I/O: numbering, bounds by count and age (a fake clock), resumption
answers (everything after ``since``, or a gap), and the pattern relations the config relies on."""

from __future__ import annotations

import pytest

from tessera_mq.broker.backplane import Publication
from tessera_mq.broker.history import History, HistoryConfig, Stream, covers, overlaps
from tessera_mq.client.protocol.topics import split_pattern


def pub(topic: str, payload: bytes = b"x") -> Publication:
    return Publication(topic, payload)


def test_sequence_numbers_and_resumption() -> None:
    s = Stream(HistoryConfig("events.>", max_messages=5))
    assert [s.append(pub(f"events.{i}"), 0.0) for i in range(3)] == [1, 2, 3]
    assert [n for n, _ in s.since(1, 0.0) or []] == [2, 3]
    assert s.since(3, 0.0) == []
    assert s.since(0, 0.0) is not None
    assert s.since(4, 0.0) is None  # ahead of the stream: another epoch's number


def test_count_bound_makes_old_positions_a_gap() -> None:
    s = Stream(HistoryConfig("e.>", max_messages=3))
    for i in range(10):
        s.append(pub("e.a", str(i).encode()), 0.0)
    assert len(s) == 3
    assert [n for n, _ in s.since(7, 0.0) or []] == [8, 9, 10]
    assert s.since(6, 0.0) is None  # message 7 is gone


def test_age_bound_uses_the_clock_passed_in() -> None:
    s = Stream(HistoryConfig("e.>", max_messages=100, max_age=10.0))
    s.append(pub("e.a"), 0.0)
    s.append(pub("e.a"), 5.0)
    assert [n for n, _ in s.since(0, 9.0) or []] == [1, 2]
    assert s.since(0, 12.0) is None  # message 1 expired at 10 s
    assert [n for n, _ in s.since(1, 12.0) or []] == [2]
    assert s.since(2, 100.0) == []  # nothing missed, nothing kept: no gap


def test_an_empty_stream_resumes_from_its_position() -> None:
    s = Stream(HistoryConfig("e.>"))
    assert s.since(0, 0.0) == []


def test_epochs_differ_between_streams_and_restarts() -> None:
    cfg = HistoryConfig("e.>")
    assert len({Stream(cfg).epoch for _ in range(20)}) == 20


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        ("events.>", "events.>", True),
        ("events.>", "events.eu.>", True),
        ("events.>", "events.*", True),
        ("events.>", "events", False),
        ("events.>", ">", False),
        ("events.*", "events.eu", True),
        ("events.*", "events.*", True),
        ("events.*", "events.>", False),
        ("events.*", "events.eu.x", False),
        ("a.b", "a.b", True),
        ("a.b", "a.*", False),
        (">", "anything.>", True),
    ],
)
def test_covers(outer: str, inner: str, expected: bool) -> None:
    assert covers(split_pattern(outer), split_pattern(inner)) is expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("events.>", "events.eu", True),
        ("events.>", "events", False),
        ("a.*", "a.b", True),
        ("a.*", "b.*", False),
        ("a.b", "a.b.c", False),
        ("*.x", "a.*", True),
    ],
)
def test_overlaps(a: str, b: str, expected: bool) -> None:
    assert overlaps(a.split("."), b.split(".")) is expected
    assert overlaps(b.split("."), a.split(".")) is expected


def test_topics_and_patterns_find_their_stream() -> None:
    h = History([HistoryConfig("events.>"), HistoryConfig("audit.*")])
    assert h.for_topic("events.eu.x") is h.streams[0]
    assert h.for_topic("audit.login") is h.streams[1]
    assert h.for_topic("status.x") is None
    assert h.for_pattern("events.eu.>") is h.streams[0]
    assert h.for_pattern(">") is None
    assert not History([])
