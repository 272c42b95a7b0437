"""RedisBackplane against a REAL redis-server (tests/redisproc.py): two backplanes in one event
loop stand for two nodes; what one publishes must reach the other's ``inject``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import msgpack
import pytest
import redis.asyncio as aioredis
from redisproc import RedisProcess

from tessera_mq.broker.backplane import Publication
from tessera_mq.broker.cluster import (
    BackplaneError,
    RedisBackplane,
    decode_batch,
    encode_batch,
    encode_publication,
    glob_escape,
)


class Node:
    """A backplane and what it injected."""

    def __init__(self, url: str, **kwargs: object) -> None:
        self.bp = RedisBackplane(url, **kwargs)  # type: ignore[arg-type]
        self.got: list[Publication] = []

    async def start(self) -> Node:
        await self.bp.start(self.got.append)
        return self

    def topics(self) -> list[str]:
        return [p.topic for p in self.got]


async def until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.01)


async def settle() -> None:
    """Let SUBSCRIBE/UNSUBSCRIBE reach Redis (a PING round trip after them would also do)."""
    await asyncio.sleep(0.1)


@pytest.fixture
async def pair(redis_server: RedisProcess) -> AsyncIterator[tuple[Node, Node]]:
    a = await Node(redis_server.url).start()
    b = await Node(redis_server.url).start()
    try:
        yield a, b
    finally:
        await a.bp.stop()
        await b.bp.stop()


async def test_publication_crosses_once_with_every_field_and_no_echo(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    a.bp.interest("status.>", True)
    b.bp.interest("status.>", True)
    await settle()
    pub = Publication(
        topic="status.eu.node-17",
        payload=b"\x00\xffhello",
        headers={"content-type": "text/plain"},
        sender="tls:alice",
        retain=True,
        extra={"seq": 7, "epoch": "e1"},
    )
    assert a.bp.publish(pub)
    await until(lambda: len(b.got) == 1, what="b receives")
    await settle()
    assert b.got == [pub]
    assert a.got == []  # no echo to the origin node
    assert a.bp.health()["published"] == 1
    assert b.bp.health()["received"] == 1


async def test_order_per_publisher_is_kept_and_nothing_is_duplicated(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    b.bp.interest("load.*", True)
    await settle()
    n = 3000
    for i in range(n):
        while not a.bp.publish(Publication(f"load.{i % 7}", str(i).encode())):
            await asyncio.sleep(0.001)  # the queue is bounded; wait for the writer
        if i % 500 == 0:
            await asyncio.sleep(0)
    await until(lambda: len(b.got) >= n, what=f"{n} publications")
    await settle()
    assert [int(p.payload) for p in b.got] == list(range(n))


async def test_a_node_receives_only_topics_its_patterns_name(pair: tuple[Node, Node]) -> None:
    a, b = pair
    b.bp.interest("status.eu.*", True)
    await settle()
    for topic in ("status.eu.x", "metrics.cpu", "statusx.eu.y", "status.us.z"):
        assert a.bp.publish(Publication(topic, b"."))
    assert a.bp.publish(Publication("marker.end", b"."))
    b.bp.interest("marker.>", True)  # too late for the one above: Redis has no history
    await settle()
    assert a.bp.publish(Publication("marker.end", b"."))
    await until(lambda: "marker.end" in b.topics(), what="marker")
    # Interest is by first token: status.us.z reaches the node (its router matches nothing);
    # other first tokens never leave Redis towards it.
    assert b.topics() == ["status.eu.x", "status.us.z", "marker.end"]
    assert b.bp.health()["channels"] == 2
    # The last local pattern of a first token goes: its channel goes too.
    b.bp.interest("status.eu.*", False)
    await settle()
    assert a.bp.publish(Publication("status.eu.x", b"late"))
    assert a.bp.publish(Publication("marker.end", b"2"))
    await until(lambda: b.got[-1].payload == b"2", what="second marker")
    assert [p.payload for p in b.got if p.topic.startswith("status.")] == [b".", b"."]


async def test_wildcard_first_pattern_switches_to_the_glob_without_gap_or_duplicate(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    b.bp.interest("feed.>", True)
    await settle()
    stop = asyncio.Event()

    async def publisher() -> None:
        i = 0
        while not stop.is_set():
            if a.bp.publish(Publication("feed.x", str(i).encode())):
                i += 1
            await asyncio.sleep(0.0005)

    task = asyncio.create_task(publisher())
    await asyncio.sleep(0.1)
    b.bp.interest("*.x", True)  # a wildcard first token: one PSUBSCRIBE replaces the channels
    await asyncio.sleep(0.2)
    assert b.bp.health()["glob"] is True
    assert b.bp.health()["channels"] == 0
    b.bp.interest("*.x", False)  # and back
    await asyncio.sleep(0.2)
    stop.set()
    await task
    await settle()
    h = b.bp.health()
    assert h["glob"] is False
    assert h["channels"] == 1
    got = [int(p.payload) for p in b.got]
    assert got == list(range(len(got)))  # contiguous from 0: no gap, no duplicate, in order
    assert len(got) == a.bp.health()["published"]


async def test_glob_escapes_the_prefix(redis_server: RedisProcess) -> None:
    a = await Node(redis_server.url, channel_prefix="t[1]").start()
    other = await Node(redis_server.url, channel_prefix="t1").start()
    b = await Node(redis_server.url, channel_prefix="t[1]").start()
    try:
        b.bp.interest(">", True)
        await settle()
        assert other.bp.publish(Publication("x.y", b"other space"))
        assert a.bp.publish(Publication("x.y", b"our space"))
        await until(lambda: len(b.got) == 1)
        await settle()
        assert [p.payload for p in b.got] == [b"our space"]
    finally:
        for n in (a, other, b):
            await n.bp.stop()
    assert glob_escape("a*b?c[d]e\\") == "a\\*b\\?c\\[d\\]e\\\\"


async def test_the_outgoing_queue_is_bounded(redis_server: RedisProcess) -> None:
    a = await Node(redis_server.url, max_queue_messages=5).start()
    try:
        results = [a.bp.publish(Publication("q.x", b".")) for _ in range(8)]  # no await between
        assert results == [True] * 5 + [False] * 3
        assert a.bp.health()["refused_queue_full"] == 3
        await until(lambda: a.bp.health()["queue"] == 0)
        assert a.bp.publish(Publication("q.x", b"."))
    finally:
        await a.bp.stop()


async def test_malformed_messages_on_our_channels_are_counted_not_fatal(
    pair: tuple[Node, Node], redis_server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair
    b.bp.interest("x.>", True)
    await settle()
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await raw.publish("tessera:x", b"\xc1 not msgpack")
        await raw.publish("tessera:x", msgpack.packb([1, b"n", "seq?", []]))
        await raw.publish("tessera:x", msgpack.packb([1, b"n", 5, [["x.y", "not bytes"]]]))
    finally:
        await raw.aclose()
    assert a.bp.publish(Publication("x.y", b"fine"))
    await until(lambda: len(b.got) == 1)
    assert b.bp.health()["bad_messages"] == 3
    assert [p.payload for p in b.got] == [b"fine"]
    assert sum("malformed" in r.getMessage() for r in caplog.records) == 1  # not per message


async def test_redis_outage_is_survived_logged_once_and_recovered(
    pair: tuple[Node, Node], redis_server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tessera.broker.cluster")
    a, b = pair
    b.bp.interest("o.>", True)
    await settle()
    assert a.bp.publish(Publication("o.1", b"before"))
    await until(lambda: len(b.got) == 1)

    redis_server.kill()
    await until(lambda: not a.bp.health()["connected"], what="a notices")
    await until(lambda: not b.bp.health()["connected"], what="b notices")
    assert a.bp.publish(Publication("o.2", b"during")) is False  # refused: local only
    assert a.bp.health()["refused_disconnected"] >= 1
    assert a.bp.health()["outages"] == 1
    assert "outage_seconds" in a.bp.health()
    await asyncio.sleep(0.5)  # several reconnect attempts fail meanwhile
    lost_lines = [r for r in caplog.records if "lost" in r.getMessage()]
    assert len(lost_lines) == 2  # once per node, not once per attempt
    assert all("redis://127.0.0.1" in r.getMessage() for r in lost_lines)

    redis_server.start()  # same port, empty (no persistence)
    await until(lambda: bool(a.bp.health()["connected"]), timeout=10, what="a reconnects")
    await until(lambda: bool(b.bp.health()["connected"]), timeout=10, what="b reconnects")
    await settle()
    assert a.bp.publish(Publication("o.3", b"after"))
    await until(lambda: len(b.got) == 2, what="after the outage")
    assert [p.payload for p in b.got] == [b"before", b"after"]  # "during" was local only
    assert any("reconnected" in r.getMessage() for r in caplog.records)
    assert "outage_seconds" not in a.bp.health()


async def test_start_fails_clearly_when_redis_is_unreachable(redis_server: RedisProcess) -> None:
    redis_server.kill()
    bp = RedisBackplane(f"redis://user:secret@127.0.0.1:{redis_server.port}")
    with pytest.raises(BackplaneError, match=r"cannot reach redis at redis://127\.0\.0\.1") as ei:
        await bp.start(lambda pub: None)
    assert "secret" not in str(ei.value)


async def test_password_auth(redis_server: RedisProcess) -> None:
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        # the rules docs/scaling.md recommends: our channels and commands only
        rules = "on >s3cret &tessera:* +publish +subscribe +psubscribe +unsubscribe"
        await raw.execute_command(
            "ACL", "SETUSER", "tessera", *rules.split(), "+punsubscribe", "+ping"
        )
    finally:
        await raw.aclose()
    wrong = RedisBackplane(redis_server.url, username="tessera", password="nope")
    with pytest.raises(BackplaneError):
        await wrong.start(lambda pub: None)
    a = Node(redis_server.url, username="tessera", password="s3cret")
    b = Node(redis_server.url, username="tessera", password="s3cret")
    await a.start()
    await b.start()
    try:
        b.bp.interest("z", True)
        b.bp.interest("*.y", True)  # the glob too
        await settle()
        assert a.bp.publish(Publication("z", b"authenticated"))
        await until(lambda: len(b.got) == 1)
        b.bp.interest("*.y", False)
        await settle()
        assert a.bp.publish(Publication("z", b"still"))
        await until(lambda: len(b.got) == 2)
        assert a.bp.health()["connected"] and b.bp.health()["connected"]
    finally:
        await a.bp.stop()
        await b.bp.stop()


def test_encoding_round_trip_and_size() -> None:
    pub = Publication("status.eu", b"x" * 10, headers=None, sender="tls:alice")
    item = encode_publication(pub)
    # array(6) + topic str(9) + bin8(10) + nil + sender str(9) + false + nil
    assert len(item) == 1 + 10 + 12 + 1 + 10 + 1 + 1
    data = encode_batch(b"\x01" * 8, 42, [item, item])
    # array(4) + version + bin8 node + seq + array(2) + the two publications
    assert len(data) == 1 + 1 + 10 + 1 + 1 + 2 * len(item)
    assert decode_batch(data) == (b"\x01" * 8, 42, [pub, pub])
    many = encode_batch(b"n", 2**40, [item] * 70_000)  # array16 -> array32 headers
    node, seq, pubs = decode_batch(many)
    assert (node, seq, len(pubs)) == (b"n", 2**40, 70_000)
    for bad in (
        b"",
        b"\x91\x02",
        msgpack.packb({"a": 1}),
        msgpack.packb([1] * 4),
        msgpack.packb([1, b"n", 1, [[1] * 6]]),
        msgpack.packb([1, b"n", 1, [["t", b"", {"k": 1}, None, False, None]]]),
    ):
        with pytest.raises(ValueError, match=r"msgpack|array|type|headers"):
            decode_batch(bad)


async def test_batches_keep_order_across_channels_and_split_by_size(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    b.bp.interest(">", True)  # the glob: every channel, one connection
    await settle()
    big = b"x" * 100_000  # three of these exceed one batch's 256 KiB
    sent = []
    for i in range(60):  # no await in between: one writer round takes them all
        topic = ("alpha.x", "beta.y", "alpha.z")[i % 3]
        payload = big if i % 10 == 0 else str(i).encode()
        assert a.bp.publish(Publication(topic, payload))
        sent.append((topic, payload))
    await until(lambda: len(b.got) == 60)
    assert [(p.topic, p.payload) for p in b.got] == sent
    # (the sender counts once its pipeline call returns, which may be after b has them all)
    await until(lambda: a.bp.health()["published"] >= 60)
    h = a.bp.health()
    # consecutive publications to one channel share a message; a channel change starts one
    assert 40 <= h["redis_messages"] < 60
    before = h["redis_messages"]
    for _ in range(5):  # 500 KB to one channel: more than one 256 KiB message
        assert a.bp.publish(Publication("alpha.big", big))
    await until(lambda: len(b.got) == 65)
    await until(lambda: a.bp.health()["published"] >= 65)
    assert a.bp.health()["redis_messages"] - before >= 2
    assert all(p.payload == big for p in b.got[60:])


async def test_without_fail_fast_it_starts_in_an_outage_and_connects_later(
    redis_server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tessera.broker.cluster")
    redis_server.kill()
    a = Node(redis_server.url, fail_fast=False)
    await a.start()  # no exception: local delivery may start at once
    b = Node(redis_server.url)
    try:
        h = a.bp.health()
        assert h["connected"] is False and h["outages"] == 1
        a.bp.interest("late.>", True)  # interest recorded while down, applied on connect
        assert a.bp.publish(Publication("late.x", b"lost")) is False
        redis_server.start()
        await until(lambda: bool(a.bp.health()["connected"]), timeout=10, what="a connects")
        assert any("reconnected" in r.getMessage() for r in caplog.records)
        await b.start()
        await settle()
        assert b.bp.publish(Publication("late.x", b"arrives"))
        await until(lambda: len(a.got) == 1)
        assert a.got[0].payload == b"arrives"
    finally:
        await a.bp.stop()
        await b.bp.stop()


async def test_stop_with_interest_changes_in_flight_is_prompt_and_clean(
    redis_server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Shutdown drops every subscription at once; redis-py may swallow the cancel of an
    UNSUBSCRIBE in flight: stop must still end at once, leaving no task behind."""
    loop = asyncio.get_running_loop()
    for _ in range(10):
        bp = RedisBackplane(redis_server.url)
        await bp.start(lambda pub: None)
        for k in range(50):
            bp.interest(f"t{k}.>", True)
        await asyncio.sleep(0.02)
        for k in range(50):
            bp.interest(f"t{k}.>", False)
        started = loop.time()
        await bp.stop()
        assert loop.time() - started < 0.5
    await asyncio.sleep(0.05)
    assert not [r for r in caplog.records if "did not stop" in r.getMessage()]
    leftovers = [t for t in asyncio.all_tasks() if t.get_name().startswith("redis-backplane")]
    assert not [t for t in leftovers if not t.done()]
