"""History in Redis, shared by broker nodes through a REAL redis-server (issue #11,
broker/history_redis.py), with REAL broker processes over REAL TLS: a client that loses its
connection to one node resumes on another without a gap or a duplicate; the replay obeys the
subscription's wildcard and the ACL of the node that sends it; publishers on two nodes make one
sequence that a third node delivers strictly in order; a replay racing live publishes joins them
exactly; Redis killed (history publishes fail with STORE_FAILED, resumptions answer
``recovered: false``) and restarted empty (a new epoch, the client is told of the gap)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from brokerproc import BrokerProcess
from helpers_protocol import frame
from redisproc import RedisProcess
from test_broker_recovery import FAST, Proxy
from test_cluster_brokers import cluster_config, connect, wait_subscribed
from test_hub import FakeIO
from timing import scaled

from tessera_mq import client as client_sdk
from tessera_mq.auth.acl import Policy
from tessera_mq.auth.identity import Identity
from tessera_mq.broker.audit import Audit
from tessera_mq.broker.backplane import Publication
from tessera_mq.broker.config import LimitsConfig
from tessera_mq.broker.handler import RequestHandler
from tessera_mq.broker.history import Page, Resumption
from tessera_mq.broker.hub import Hub
from tessera_mq.broker.store import StoreError
from tessera_mq.client import BrokerError, HistoryGap
from tessera_mq.client.protocol.errors import ErrorCode
from tessera_mq.client.protocol.events import Error, Message, Ok, Welcome

TIMEOUT = scaled(10.0)
FEED = "tessera:\x00history:events.>"
ALLOW_ALL = '[[allow]]\nprincipals = ["*"]\npublish = [">"]\nsubscribe = [">"]\n'

ACL = """\
[[allow]]
principals = ["x509:alice"]
publish = [">"]
subscribe = [">"]

[[allow]]
principals = ["x509:bob"]
subscribe = ["events.public.>"]
"""


def history_config(factory: Any, redis: RedisProcess, max_messages: int = 10_000) -> Path:
    path = cluster_config(factory, redis, acl=ACL)
    with path.open("a", encoding="utf-8") as f:
        f.write(
            f'\n[messaging]\nhistory = [{{pattern = "events.>", max_messages = {max_messages}}}]\n'
        )
    return path


async def collect(sub: client_sdk.Subscription, n: int) -> list[Any]:
    return [await sub.get(timeout=TIMEOUT) for _ in range(n)]


async def assert_nothing_more(sub: client_sdk.Subscription) -> None:
    with contextlib.suppress(TimeoutError):
        extra = await sub.get(timeout=scaled(0.3))
        raise AssertionError(f"duplicate or stray delivery {extra}")


async def test_a_client_resumes_on_another_node_without_gap_or_duplicate(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a = broker_factory.serve(history_config(broker_factory, redis_server))
    b = broker_factory.serve(history_config(broker_factory, redis_server))
    proxy = Proxy(a.port)
    proxy_port = await proxy.start()
    gaps: list[HistoryGap] = []
    try:
        async with (
            connect(a.url, pki, "alice") as pub,
            connect(
                f"tls://127.0.0.1:{proxy_port}",
                pki,
                "alice",
                reconnect=FAST,
                server_hostname="localhost",
            ) as client,
        ):
            assert "history" in (client.welcome.features or ())
            sub = await client.subscribe("events.>", on_gap=gaps.append)
            for i in range(10):
                await pub.publish(f"events.e{i % 3}", str(i).encode())
            got = await collect(sub, 10)
            assert [int(m.payload) for m in got] == list(range(10))
            assert [m.seq for m in got] == list(range(1, 11))
            epoch = got[0].epoch
            proxy.target_port = b.port  # the next connection goes to the other node
            proxy.cut()
            for i in range(10, 60):  # published on A while the client is away
                await pub.publish(f"events.e{i % 3}", str(i).encode())
            for i in range(60, 70):  # and some racing the resumption on B
                await pub.publish(f"events.e{i % 3}", str(i).encode())
                await asyncio.sleep(0.01)
            rest = await collect(sub, 60)
            assert [int(m.payload) for m in rest] == list(range(10, 70))
            assert [m.seq for m in rest] == list(range(11, 71))
            assert {m.epoch for m in rest} == {epoch}
            assert client.reconnects >= 1
            assert gaps == []
            await assert_nothing_more(sub)
    finally:
        await proxy.close()
    # the resumption was served by B, from Redis
    assert b.wait_for_log(r"x509:alice\] session open", timeout=TIMEOUT)


async def test_the_replay_obeys_the_wildcard_and_the_acl_of_the_node_sending_it(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a = broker_factory.serve(history_config(broker_factory, redis_server))
    b = broker_factory.serve(history_config(broker_factory, redis_server))
    async with connect(a.url, pki, "alice") as pub:
        first = await pub.subscribe("events.>")
        topics = ["events.public.x", "events.secret.x", "events.public.y", "events.secret.y"]
        for i, topic in enumerate(topics * 3):
            await pub.publish(topic, str(i).encode())
        sent = await collect(first, 12)
        epoch = sent[0].epoch
    async with connect(b.url, pki, "bob") as bob, connect(b.url, pki, "alice") as alice:
        # bob may see events.public.> only: his events.> is ACL-filtered, the replay too
        bob_sub = await bob.subscribe("events.>", since=0, epoch=epoch)
        got = await collect(bob_sub, 6)
        assert [m.topic for m in got] == ["events.public.x", "events.public.y"] * 3
        assert [m.seq for m in got] == [1, 3, 5, 7, 9, 11]
        assert bob_sub.gaps == 0
        await assert_nothing_more(bob_sub)
        # a wildcard in the middle: only what it matches, from seq 4 on
        x_sub = await alice.subscribe("events.*.x", since=4, epoch=epoch)
        got = await collect(x_sub, 4)
        assert [(m.seq, m.topic) for m in got] == [
            (5, "events.public.x"),
            (6, "events.secret.x"),
            (9, "events.public.x"),
            (10, "events.secret.x"),
        ]
        await assert_nothing_more(x_sub)
        # and live after the replay, numbered in the same stream
        async with connect(a.url, pki, "alice") as pub:
            await pub.publish("events.public.x", b"live")
            await pub.publish("events.secret.x", b"hidden from bob")
        live = await bob_sub.get(timeout=TIMEOUT)
        assert (live.payload, live.seq, live.epoch) == (b"live", 13, epoch)
        assert [(m.payload, m.seq) for m in await collect(x_sub, 2)] == [
            (b"live", 13),
            (b"hidden from bob", 14),
        ]
        await assert_nothing_more(bob_sub)


async def test_publishers_on_two_nodes_make_one_sequence_a_third_node_delivers_in_order(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a, b, c = (broker_factory.serve(history_config(broker_factory, redis_server)) for _ in "abc")
    per_node = 300
    async with (
        connect(a.url, pki, "alice") as on_a,
        connect(b.url, pki, "alice") as on_b,
        connect(c.url, pki, "alice") as on_c,
    ):
        watch_c = await on_c.subscribe("events.>")
        watch_a = await on_a.subscribe("events.>")  # the publishing node delivers from the feed too

        async def publish(client: Any, name: str) -> None:
            for i in range(per_node):
                await client.publish(f"events.{name}", f"{name}{i}".encode())

        await asyncio.gather(publish(on_a, "a"), publish(on_b, "b"))
        got_c = await collect(watch_c, 2 * per_node)
        got_a = await collect(watch_a, 2 * per_node)
    seqs = [m.seq for m in got_c]
    assert seqs == list(range(1, 2 * per_node + 1))  # strictly increasing, no gap
    # every node has the same numbering, and each publisher's order is kept
    assert [(m.seq, m.payload) for m in got_a] == [(m.seq, m.payload) for m in got_c]
    for name in ("a", "b"):
        mine = [m.payload for m in got_c if m.topic == f"events.{name}"]
        assert mine == [f"{name}{i}".encode() for i in range(per_node)]


async def test_a_long_replay_racing_live_publishes_has_no_gap_and_no_duplicate(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a = broker_factory.serve(history_config(broker_factory, redis_server))
    b = broker_factory.serve(history_config(broker_factory, redis_server))
    before, during = 1200, 400  # more than REPLAY_PAGE_ENTRIES (256): several pages
    async with connect(a.url, pki, "alice") as pub, connect(b.url, pki, "alice") as late:
        for i in range(before):
            await pub.publish("events.n", str(i).encode())
        await late.subscribe("events.other")  # B follows the stream's feed already

        async def keep_publishing() -> None:
            for i in range(before, before + during):
                await pub.publish("events.n", str(i).encode())
                if i % 20 == 0:
                    await asyncio.sleep(0)

        task = asyncio.create_task(keep_publishing())
        await asyncio.sleep(0.02)
        sub = await late.subscribe("events.n", since=0)
        got = await collect(sub, before + during)
        await task
        await assert_nothing_more(sub)
    assert [int(m.payload) for m in got] == list(range(before + during))
    assert [m.seq for m in got] == list(range(1, before + during + 1))
    assert sub.gaps == 0


async def test_redis_killed_then_restarted_empty_is_an_explicit_gap_under_a_new_epoch(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a = broker_factory.serve(history_config(broker_factory, redis_server))
    b = broker_factory.serve(history_config(broker_factory, redis_server))
    async with connect(a.url, pki, "alice") as pub, connect(b.url, pki, "alice") as on_b:
        watch = await on_b.subscribe("events.>")
        for i in range(5):
            await pub.publish("events.x", str(i).encode())
        got = await collect(watch, 5)
        old_epoch = got[0].epoch
        assert old_epoch and [m.seq for m in got] == [1, 2, 3, 4, 5]
        mark_a, mark_b = a.log_mark(), b.log_mark()
        redis_server.kill()
        b.wait_for_log(r"history feed from .* lost", since=mark_b, timeout=TIMEOUT)
        # a history publish cannot be kept: refused with a typed error, not silently lost
        with pytest.raises(BrokerError) as info:
            await pub.publish("events.x", b"during the outage")
        assert info.value.code == ErrorCode.STORE_FAILED
        a.wait_for_log(r"history append to .* failed", since=mark_a)
        # a resumption during the outage: told of the gap at once, no hang
        resumed = await asyncio.wait_for(
            on_b.subscribe("events.>", since=3, epoch=old_epoch), timeout=scaled(3.0)
        )
        assert resumed.gaps == 1
        await resumed.unsubscribe()
        redis_server.start()  # empty: no persistence
        b.wait_for_log(r"history feed from .* is back", since=mark_b, timeout=scaled(15))
        a.wait_for_log(r"history feed from .* is back", since=mark_a, timeout=scaled(15))
        await wait_subscribed(redis_server, FEED, 1)
        codes = []
        for _ in range(50):  # A's writer finds Redis back at its next append
            try:
                await pub.publish("events.x", b"after")
                break
            except BrokerError as exc:
                codes.append(exc.code)
                await asyncio.sleep(0.1)
        assert set(codes) <= {ErrorCode.STORE_FAILED}
        new = await watch.get(timeout=TIMEOUT)
        assert (new.payload, new.seq) == (b"after", 1)
        assert new.epoch and new.epoch != old_epoch
        # a client resuming with the old epoch is told it has a gap, with the new position
        again = await on_b.subscribe("events.>", since=5, epoch=old_epoch)
        assert again.gaps == 1
        assert (again.epoch, again.last_seq) == (new.epoch, 1)
        await assert_nothing_more(again)
    # counted and visible in the stats
    mark = b.log_mark()
    b.send_signal(signal.SIGUSR1)
    (line,) = b.wait_for_log(r"stats \{", since=mark)
    history = json.loads(line.split("stats ", 1)[1])["history"]
    assert history["engine"] == "redis"
    assert history["feed_outages"] == 1
    assert history["feed_connected"] is True
    assert history["epochs_changed"] == 1  # seen when B read the stream's position again
    assert history["positions_unavailable"] >= 1  # the resumption during the outage
    b.wait_for_log(r"history stream 'events.>' has a new epoch", since=mark_b)
    r = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await r.xlen("tessera:history:events.>") == 1
    finally:
        await r.aclose()


async def test_a_retained_history_topic_is_numbered_once_and_in_every_nodes_snapshot(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a = broker_factory.serve(history_config(broker_factory, redis_server))
    b = broker_factory.serve(history_config(broker_factory, redis_server))
    async with connect(a.url, pki, "alice") as pub, connect(b.url, pki, "alice") as on_b:
        live = await on_b.subscribe("events.>")
        await pub.publish("events.state", b"on", retain=True)
        got = await live.get(timeout=TIMEOUT)
        assert (got.payload, got.seq, got.retained) == (b"on", 1, False)
        await assert_nothing_more(live)  # once: not also through the backplane
        for url in (a.url, b.url):  # A has no subscriber of its own: visible there too
            async with connect(url, pki, "alice") as late:
                snap = await late.subscribe("events.state")
                first = await snap.get(timeout=TIMEOUT)
                assert (first.payload, first.retained) == (b"on", True)


async def test_a_node_whose_feed_connection_broke_delivers_what_it_missed_from_the_stream(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a = broker_factory.serve(history_config(broker_factory, redis_server))
    b = broker_factory.serve(history_config(broker_factory, redis_server))
    total = 1000
    async with connect(a.url, pki, "alice") as pub, connect(b.url, pki, "alice") as on_b:
        watch = await on_b.subscribe("events.>")
        mark = b.log_mark()

        async def publish() -> None:
            for i in range(total):
                await pub.publish("events.x", str(i).encode())

        task = asyncio.create_task(publish())
        got = await collect(watch, 50)
        r = aioredis.Redis.from_url(redis_server.url)
        try:  # every pub/sub connection of every node: Redis itself stays up
            assert await r.client_kill_filter(_type="pubsub") >= 2
        finally:
            await r.aclose()
        got += await collect(watch, total - 50)
        await task
        await assert_nothing_more(watch)
        b.wait_for_log(r"history feed from .* is back", since=mark, timeout=TIMEOUT)
    assert [m.seq for m in got] == list(range(1, total + 1))  # no gap, no duplicate
    assert [int(m.payload) for m in got] == list(range(total))
    b.send_signal(signal.SIGUSR1)
    (line,) = b.wait_for_log(r"stats \{", since=mark)
    history = json.loads(line.split("stats ", 1)[1])["history"]
    assert history["feed_outages"] == 1
    assert history["caught_up"] > 0  # published while B's feed was down: read from the stream


# --- the asynchronous replay in-process: the real Hub and handlers, an engine the test drives --


class ScriptedHistory:
    """A history engine (the hub's ``HistoryEngine`` seam) whose answers the test releases:
    the stream ``t.>`` is numbered by the hub (``number``) and every resumption waits for the
    test's ``answer``, then reads its further pages from ``pages``."""

    def __init__(self) -> None:
        self.seq = 0
        self.answer: asyncio.Future[Resumption] | None = None
        self.pages: list[Page | Exception] = []

    def __bool__(self) -> bool:
        return True

    def for_topic(self, topic: str) -> object | None:
        return self if topic.startswith("t.") else None

    def number(self, pub: Publication, now: float) -> tuple[int, str] | None:
        self.seq += 1
        return self.seq, "e1"

    def appends(self, topic: str) -> bool:
        return False

    async def append(self, pub: Publication) -> None:
        raise AssertionError("not used")

    def interest(self, pattern: str, added: bool) -> None:
        pass

    def resume(
        self, pattern: str, since: int | None, epoch: str | None, now: float
    ) -> asyncio.Future[Resumption]:
        self.answer = asyncio.get_running_loop().create_future()
        return self.answer

    async def next_page(self) -> Page:
        page = self.pages.pop(0)
        if isinstance(page, Exception):
            raise page
        return page

    async def start(self, deliver: Any) -> None:
        pass

    async def stop(self) -> None:
        pass

    def health(self) -> dict[str, object]:
        return {}


def _in_process(history: ScriptedHistory) -> tuple[Hub, list[tuple[RequestHandler, FakeIO]]]:
    hub = Hub(
        limits=LimitsConfig(),
        policy=Policy.from_text(ALLOW_ALL),
        audit=Audit(None),
        server_name="t",
        history=history,
    )
    return hub, []


async def _open(hub: Hub, name: str, n: int) -> tuple[RequestHandler, FakeIO]:
    io = FakeIO()
    handler = RequestHandler(hub, io, n, peer="p", listener="l")
    hub.admit(handler)
    handler.authenticated(Identity("x509", name), hub.now())
    handler.receive(frame({"op": "hello", "version": 1, "client": "t"}), hub.now())
    await _turns()
    assert isinstance(io.events()[0], Welcome)
    return handler, io


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def _pub(topic: str, payload: bytes) -> Publication:
    return Publication(topic, payload)


def test_live_deliveries_wait_behind_a_replay_read_in_pages_then_follow_it() -> None:
    history = ScriptedHistory()

    async def scenario() -> None:
        hub, _ = _in_process(history)
        await hub.start()
        alice, _alice_io = await _open(hub, "alice", 1)
        bob, bob_io = await _open(hub, "bob", 2)
        for i in (1, 2, 3):  # numbered 1-3 before bob resumes
            alice.receive(frame({"op": "pub", "topic": "t.a", "payload": str(i).encode()}), 0)
        bob.receive(frame({"op": "sub", "sid": 1, "pattern": "t.>", "since": 1}), hub.now())
        alice.receive(frame({"op": "pub", "topic": "t.a", "payload": b"4"}), hub.now())  # live
        await _turns()
        assert bob_io.events() == []  # the ok and the live one wait for the replay
        assert history.answer is not None
        history.pages = [([(3, _pub("t.a", b"3"))], None)]
        history.answer.set_result(
            Resumption("e1", 3, True, [(2, _pub("t.a", b"2"))], history.next_page)
        )
        await _turns(20)
        got = bob_io.events()
        assert got[0] == Ok(sid=1, epoch="e1", seq=3, recovered=True)
        assert [(m.payload, m.seq, m.sid) for m in got[1:] if isinstance(m, Message)] == [
            (b"2", 2, 1),
            (b"3", 3, 1),
            (b"4", 4, None),  # live, after the replay
        ]
        assert len(got) == 4
        await hub.drain()
        await hub.stop()

    asyncio.run(scenario())


def test_a_replay_that_cannot_be_read_to_its_end_ends_the_subscription_with_an_error() -> None:
    history = ScriptedHistory()

    async def scenario() -> None:
        hub, _ = _in_process(history)
        await hub.start()
        alice, _alice_io = await _open(hub, "alice", 1)
        bob, bob_io = await _open(hub, "bob", 2)
        bob.receive(frame({"op": "sub", "sid": 1, "pattern": "t.>", "since": 0}), hub.now())
        alice.receive(frame({"op": "pub", "topic": "t.a", "payload": b"live"}), hub.now())
        await _turns()
        assert history.answer is not None
        history.pages = [StoreError("trimmed meanwhile")]
        history.answer.set_result(
            Resumption("e1", 9, True, [(1, _pub("t.a", b"1"))], history.next_page)
        )
        await _turns(20)
        got = bob_io.events()
        assert got[0] == Ok(sid=1, epoch="e1", seq=9, recovered=True)
        assert isinstance(got[1], Message) and (got[1].payload, got[1].sid) == (b"1", 1)
        assert isinstance(got[2], Error) and (got[2].code, got[2].sid) == (
            ErrorCode.STORE_FAILED,
            1,
        )
        # what was routed while it waited follows the error (the client dropped the sub)
        assert [m.payload for m in got[3:] if isinstance(m, Message)] == [b"live"]
        assert bob.subs == {}
        alice.receive(frame({"op": "pub", "topic": "t.a", "payload": b"after"}), hub.now())
        await _turns()
        assert bob_io.events() == []  # the subscription is gone
        assert hub.info()["recoveries_failed"] == 1
        await hub.drain()
        await hub.stop()

    asyncio.run(scenario())


def test_an_unsubscribe_while_the_position_is_read_answers_in_order_and_stops_the_replay() -> None:
    history = ScriptedHistory()

    async def scenario() -> None:
        hub, _ = _in_process(history)
        await hub.start()
        bob, bob_io = await _open(hub, "bob", 2)
        bob.receive(frame({"op": "sub", "sid": 1, "pattern": "t.>", "since": 0}), hub.now())
        bob.receive(frame({"op": "unsub", "sid": 1}), hub.now())
        await _turns()
        assert history.answer is not None
        history.answer.set_result(Resumption("e1", 5, True, [(1, _pub("t.a", b"1"))], None))
        await _turns(20)
        got = bob_io.events()
        assert Ok(sid=1) in got  # both answered, nothing replayed to a gone subscription
        assert not [m for m in got if isinstance(m, Message)]
        await hub.drain()
        await hub.stop()

    asyncio.run(scenario())


async def test_two_workers_on_one_port_share_the_streams(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    cfg = history_config(broker_factory, redis_server)
    proc = broker_factory.track(
        BrokerProcess(["serve", "--config", str(cfg), "--workers", "2"], workdir=cfg.parent)
    ).start()
    async with connect(proc.url, pki, "alice") as pub:
        await pub.publish("events.w", b"0")
        last_seq, epoch, n = 1, None, 1
        for _ in range(12):  # each a new connection: the kernel picks the worker
            for _ in range(3):  # published while no one listens
                await pub.publish("events.w", str(n).encode())
                n += 1
            async with connect(proc.url, pki, "alice") as client:
                sub = await client.subscribe("events.w", since=last_seq, epoch=epoch)
                got = await collect(sub, 3)
                assert [m.seq for m in got] == [last_seq + 1, last_seq + 2, last_seq + 3]
                assert [int(m.payload) for m in got] == list(range(n - 3, n))
                assert sub.gaps == 0
                last_seq, epoch = got[-1].seq, got[-1].epoch
    opened = proc.wait_for_log(r"session open", count=13)
    # both workers served resumptions (2**-12 odds otherwise)
    assert any("[worker 0]" in line for line in opened)
    assert any("[worker 1]" in line for line in opened)


async def test_a_queue_group_on_a_history_topic_gets_each_publication_once_across_nodes(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    """History publications travel through the history feed, not the backplane: the node
    chosen per queue group must travel with them too, or a group spread over N nodes would
    get each one N times."""
    from test_cluster_messaging import assert_once_each, take_all, wait_advertised  # noqa: PLC0415

    a = broker_factory.serve(history_config(broker_factory, redis_server))
    b = broker_factory.serve(history_config(broker_factory, redis_server))
    c = broker_factory.serve(history_config(broker_factory, redis_server))
    async with contextlib.AsyncExitStack() as stack:
        members = []
        for node in (a, b):
            client = await stack.enter_async_context(connect(node.url, pki, "alice"))
            members.append(await client.subscribe("events.>", group="workers"))
        await wait_advertised(redis_server, 4, ("events.>", "workers"), 2)
        pub = await stack.enter_async_context(connect(c.url, pki, "alice"))
        n = 120
        for i in range(n):
            await pub.publish(f"events.e{i % 3}", str(i).encode())
        got = await take_all(members, n)
        assert_once_each(got, n)
        assert all(got), [len(m) for m in got]  # spread over both nodes' members
