"""Queue groups and requests across broker processes, through a REAL redis-server
(docs/messaging.md "Several broker processes", docs/scaling.md "Queue groups and requests").

Sans-I/O parts first (the directory of other nodes' groups with a fake clock, the pending-request
table's indexes), then real broker processes: two nodes with group members on both (each
publication delivered once to the group in total), ``--workers 2`` on one port, a request from
node A served on node B, no responder anywhere, a responder node stopped and killed, a Redis
outage (local-only groups and requests).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

import msgpack
import pytest
import redis.asyncio as aioredis
from brokerproc import BrokerProcess
from redisproc import RedisProcess
from test_cluster_brokers import _worker_pids, cluster_config, connect, wait_subscribed
from test_hub import TestHub, client, send
from timing import scaled

from tessera_mq import client as client_sdk
from tessera_mq.broker.cluster import (
    DIRECTORY_TTL_SECONDS,
    decode_batch,
    encode_batch,
    encode_publication,
)
from tessera_mq.broker.config import LimitsConfig
from tessera_mq.broker.messaging import GROUP, SERVICE, Directory, Peer, Pending, PendingRequests
from tessera_mq.client import NoResponders, RequestTimeout
from tessera_mq.client.protocol.events import Message

TIMEOUT = scaled(5.0)

# --- sans-I/O: the directory ----------------------------------------------------------------


def test_directory_tracks_other_nodes_until_their_ttl() -> None:
    d = Directory(ttl=5.0)
    assert d.update(b"A", [("jobs.>", "w")], [("cmd.*", "svc"), ("cmd.x", None)], now=0.0)
    assert d.update(b"B", [], [], now=0.0)  # B is new too
    assert d.update(b"B", [("jobs.>", "w")], [], now=1.0) is False  # known: not new
    assert len(d) == 2
    assert d.matching(GROUP, "jobs.a") == ((("jobs.>", "w"), (b"A", b"B")),)
    assert d.matching(GROUP, "other.a") == ()
    assert sorted(k for k, _ in d.matching(SERVICE, "cmd.x")) == [("cmd.*", "svc"), ("cmd.x", None)]
    # round robin over the nodes of one group
    key = ("jobs.>", "w")
    assert [d.pick(GROUP, key, (b"A", b"B")) for _ in range(4)] == [b"A", b"B", b"A", b"B"]
    # A stops advertising: gone after its TTL; B, heard at 1.0, until 6.0
    assert d.expire(4.9) == []
    assert d.expire(5.0) == [b"A"]
    assert d.matching(GROUP, "jobs.a") == ((key, (b"B",)),)
    assert d.matching(SERVICE, "cmd.x") == ()
    d.update(b"B", [], [], now=5.5)  # B's members left: its entries go, the node stays
    assert d.matching(GROUP, "jobs.a") == () and len(d) == 1
    assert d.drop(b"B") and not d.drop(b"B")
    assert d.clear() == []


def test_directory_local_side_changes_only_on_first_join_and_last_leave() -> None:
    d = Directory(ttl=5.0)
    key = ("jobs.>", "w")
    assert d.add_local(GROUP, key)
    assert not d.add_local(GROUP, key)
    assert d.local(GROUP) == [key]
    assert not d.remove_local(GROUP, key)
    assert d.remove_local(GROUP, key)
    assert not d.remove_local(GROUP, key)  # harmless
    assert d.local(GROUP) == []


# --- sans-I/O: the pending-request table --------------------------------------------------


def test_pending_requests_are_indexed_by_requester_and_by_responder() -> None:
    table: PendingRequests[str | Peer] = PendingRequests()
    for rid in range(100):
        table.add(Pending("busy", rid, {"svc": table.token_for("svc")}))
    table.add(Pending("alice", 1, {"svc": table.token_for("svc"), Peer(b"B"): 7}))
    assert table.count_for("busy") == 100
    assert table.count_for("alice") == 1
    assert table.count_for("nobody") == 0
    assert [p.rid for p in table.asked("alice")] == [1]
    assert len(table) == 101
    # the responder on node B has no member left: alice still has svc
    assert table.withdraw(Peer(b"B"), 7) is None
    assert table.withdraw(Peer(b"B"), 7) is None  # once
    # svc goes: every request it held is orphaned (alice's included), nothing else scanned
    orphans = table.forget("svc")
    assert sorted((p.requester, p.rid) for p in orphans)[:2] == [("alice", 1), ("busy", 0)]
    assert len(orphans) == 101 and len(table) == 0
    assert table.count_for("busy") == 0
    # a request forwarded by node A (requester Peer(A), rid = A's id) and answered here
    token = table.token_for("svc")
    table.add(Pending(Peer(b"A"), 42, {"svc": token}))
    assert table.waiting(Peer(b"A"), 42)
    answered = table.answer("svc", token)
    assert answered is not None and answered.requester == Peer(b"A")
    assert table.answer("svc", token) is None  # first reply wins
    # a node that is the only responder goes away: orphaned
    table.add(Pending("carol", 5, {Peer(b"B"): 9}))
    assert [p.rid for p in table.forget(Peer(b"B"))] == [5]
    assert len(table) == 0


# --- sans-I/O: two hubs, the choice named in each publication --------------------------------


class PairBackplane:
    """The seam between two in-process hubs (no Redis): what a hub hands over is encoded and
    decoded exactly as Redis carries it (broker/cluster.py) and waits in ``sent`` until the
    test delivers it; the directory is filled by the test from the other hub's local side."""

    def __init__(self, node: bytes) -> None:
        self.node = node
        self.directory = Directory(ttl=5.0)
        self.sent: list[bytes] = []

    async def start(self, inject: Any) -> None:
        pass

    async def stop(self) -> None:
        pass

    def interest(self, pattern: str, added: bool) -> None:
        pass

    def publish(self, pub: Any) -> bool:
        self.sent.append(encode_batch(self.node, len(self.sent) + 1, [encode_publication(pub)]))
        return True

    def health(self) -> dict[str, object]:
        return {"engine": "pair", "connected": True}

    def attach(self, events: Any) -> None:
        pass

    def advertise(self, kind: str, key: Any, added: bool) -> None:
        if added:
            self.directory.add_local(kind, key)
        else:
            self.directory.remove_local(kind, key)

    def send_request(self, node: bytes, xid: int, request: Any) -> bool:
        return False

    def send_reply(self, *args: Any) -> bool:
        return False

    def send_withdraw(self, node: bytes, xid: int) -> bool:
        return False


def learn(hub: TestHub, other: TestHub) -> None:
    """``hub`` hears ``other``'s advertisement."""
    theirs = other.backplane
    assert isinstance(theirs, PairBackplane)
    ours = hub.backplane
    assert isinstance(ours, PairBackplane)
    d = theirs.directory
    ours.directory.update(theirs.node, d.local(GROUP), d.local(SERVICE), now=0.0)


def carry(src: TestHub, dst: TestHub) -> None:
    bp = src.backplane
    assert isinstance(bp, PairBackplane)
    for data in bp.sent:
        _, _, pubs = decode_batch(data)
        for pub in pubs:
            dst._inject(pub)
    bp.sent.clear()
    dst.settle()


def payloads(io: Any) -> list[int]:
    return [int(e.payload) for e in io.events() if isinstance(e, Message)]


def test_two_hubs_give_each_publication_to_one_member_of_the_group() -> None:
    a = TestHub(LimitsConfig(max_pending_bytes=64 * 1024), backplane=PairBackplane(b"A" * 8))
    b = TestHub(backplane=PairBackplane(b"B" * 8))
    pub, _ = client(a, "alice")
    on_a, io_a = client(a, "bob")
    on_b, io_b = client(b, "bob")
    send(a, on_a, {"op": "sub", "sid": 1, "pattern": "t.>", "group": "g"})
    send(b, on_b, {"op": "sub", "sid": 1, "pattern": "t.>", "group": "g"})
    a.settle()
    b.settle()
    io_a.events()
    io_b.events()

    # A publisher that has heard of no member anywhere names no node for the group: each
    # node with members gives it a copy (the documented window: never a loss, possibly a
    # duplicate).
    c = TestHub(backplane=PairBackplane(b"C" * 8))
    pub_c, _ = client(c, "alice")
    send(c, pub_c, {"op": "pub", "topic": "t.x", "payload": b"0"})
    c.settle()
    sent = c.backplane.sent  # type: ignore[attr-defined]
    for dst in (a, b):
        c.backplane.sent = list(sent)  # type: ignore[attr-defined]
        carry(c, dst)
    assert payloads(io_a) == [0] and payloads(io_b) == [0]
    # Once it has heard of both: one node per publication, alternating.
    learn(c, a)
    learn(c, b)
    for i in range(10):
        send(c, pub_c, {"op": "pub", "topic": "t.x", "payload": str(i).encode()})
    c.settle()
    sent = list(c.backplane.sent)  # type: ignore[attr-defined]
    for dst in (a, b):
        c.backplane.sent = list(sent)  # type: ignore[attr-defined]
        carry(c, dst)
    got_a, got_b = payloads(io_a), payloads(io_b)
    assert sorted(got_a + got_b) == list(range(10)) and len(got_a) == len(got_b) == 5

    # A publisher with an idle member of its own: its member takes them, even before it has
    # heard of B (it names itself for the group, so B leaves them alone).
    send(a, pub, {"op": "pub", "topic": "t.x", "payload": b"0"})
    a.settle()
    carry(a, b)
    assert payloads(io_a) == [0] and payloads(io_b) == []
    learn(a, b)
    learn(b, a)
    for i in range(1, 6):
        send(a, pub, {"op": "pub", "topic": "t.x", "payload": str(i).encode()})
    a.settle()
    carry(a, b)
    assert payloads(io_a) == [1, 2, 3, 4, 5] and payloads(io_b) == []

    # A's member backed up (its socket stopped draining): the group's copy goes to B.
    on_a.outbox_paused(True)
    big = b"x" * 40_000
    send(a, pub, {"op": "pub", "topic": "t.x", "payload": big})
    a.settle()
    carry(a, b)
    assert on_a.load >= 0.5
    send(a, pub, {"op": "pub", "topic": "t.x", "payload": b"7"})
    a.settle()
    carry(a, b)
    assert payloads(io_b) == [7]
    on_a.outbox_paused(False)
    a.settle()
    io_a.events()

    # B's member leaves after A chose B, before the publication arrives: lost for the group,
    # and counted.
    on_a.outbox_paused(True)
    send(a, pub, {"op": "pub", "topic": "t.x", "payload": big})
    a.settle()
    carry(a, b)
    send(a, pub, {"op": "pub", "topic": "t.x", "payload": b"8"})
    a.settle()
    send(b, on_b, {"op": "unsub", "sid": 1})
    b.settle()
    io_b.events()
    carry(a, b)
    assert payloads(io_b) == []
    assert b.info()["group_copies_lost"] == 1
    # A hears that B has no member left: even backed up, its own member gets the next one.
    learn(a, b)
    send(a, pub, {"op": "pub", "topic": "t.x", "payload": b"9"})
    a.settle()
    carry(a, b)
    on_a.outbox_paused(False)
    a.settle()
    got = [e.payload for e in io_a.events() if isinstance(e, Message)]
    assert got[-1] == b"9" and b"8" not in got
    assert b.info()["group_copies_lost"] == 1


# --- real brokers and Redis ------------------------------------------------------------------


async def wait_advertised(
    redis: RedisProcess, field: int, key: tuple[str, Any], nodes: int
) -> None:
    """Until exactly ``nodes`` broker processes advertise ``key`` (``field`` 4: queue groups, 5:
    services) on the directory channel, then a moment for every node to take it in."""
    r = aioredis.Redis.from_url(redis.url)
    ps = r.pubsub()
    await ps.subscribe("tessera:\x00dir")
    latest: dict[bytes, Any] = {}
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            have = sum(1 for entry in latest.values() if key in entry)
            if have == nodes and (nodes or len(latest) >= 1):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{key}: advertised by {have} node(s), wanted {nodes}")
            msg = await ps.get_message(timeout=0.2)
            if msg is None or msg["type"] != "message":
                continue
            obj = msgpack.unpackb(msg["data"], raw=False)
            if obj[1] == "dir":
                latest[obj[2]] = [tuple(k) for k in obj[field]]
    finally:
        await ps.aclose()  # type: ignore[no-untyped-call]
        await r.aclose()
    await asyncio.sleep(scaled(0.2))


async def take_all(subs: list[client_sdk.Subscription], total: int) -> list[list[int]]:
    """What each subscription received, until ``total`` messages in all, then a pause to
    catch any extra copy."""
    got: list[list[int]] = [[] for _ in subs]
    deadline = time.monotonic() + TIMEOUT * 2

    async def reader(i: int, sub: client_sdk.Subscription) -> None:
        while True:
            m = await sub.get(timeout=TIMEOUT * 2)
            got[i].append(int(m.payload))

    tasks = [asyncio.create_task(reader(i, s)) for i, s in enumerate(subs)]
    try:
        while sum(map(len, got)) < total:
            assert time.monotonic() < deadline, f"{sum(map(len, got))} of {total}"
            await asyncio.sleep(0.02)
        await asyncio.sleep(scaled(0.3))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return got


async def next_request(service: client_sdk.Service, timeout: float) -> client_sdk.IncomingRequest:
    return await asyncio.wait_for(anext(service), timeout)


def assert_once_each(got: list[list[int]], n: int) -> None:
    everything = sorted(x for member in got for x in member)
    counts = collections.Counter(everything)
    assert [x for x, c in counts.items() if c > 1] == [], "delivered to the group twice"
    assert everything == list(range(n))
    for member in got:
        assert member == sorted(member), "order per member is publish order"


async def test_a_queue_group_spread_over_two_nodes_gets_each_publication_once(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a = broker_factory.serve(cluster_config(broker_factory, redis_server))
    b = broker_factory.serve(cluster_config(broker_factory, redis_server))
    c = broker_factory.serve(cluster_config(broker_factory, redis_server))
    async with contextlib.AsyncExitStack() as stack:
        members = []
        for node in (a, a, b, b):
            client = await stack.enter_async_context(connect(node.url, pki, "alice"))
            members.append(await client.subscribe("jobs.>", group="workers"))
        plain_client = await stack.enter_async_context(connect(b.url, pki, "alice"))
        plain = await plain_client.subscribe("jobs.>")  # not in the group: every message
        await wait_subscribed(redis_server, "tessera:jobs", 2)
        await wait_advertised(redis_server, 4, ("jobs.>", "workers"), 2)

        # A publisher on a node without members: the group's messages spread over A and B.
        pub_c = await stack.enter_async_context(connect(c.url, pki, "alice"))
        n = 200
        for i in range(n):
            await pub_c.publish(f"jobs.{i % 3}", str(i).encode())
        got = await take_all(members, n)
        assert_once_each(got, n)
        assert all(len(member) > 10 for member in got), [len(m) for m in got]
        assert [int(m.payload) for m in [await plain.get(timeout=TIMEOUT) for _ in range(n)]] == (
            list(range(n))
        )

        # A publisher on a node with members: its own members take them (prefer local).
        pub_a = await stack.enter_async_context(connect(a.url, pki, "alice"))
        for i in range(n):
            await pub_a.publish("jobs.x", str(i).encode())
        got = await take_all(members, n)
        assert_once_each(got, n)
        assert got[2] == [] and got[3] == []  # B's members: nothing
        assert got[0] and got[1]


async def test_a_member_node_that_leaves_is_no_longer_chosen(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a = broker_factory.serve(cluster_config(broker_factory, redis_server))
    b = broker_factory.serve(cluster_config(broker_factory, redis_server))
    c = broker_factory.serve(cluster_config(broker_factory, redis_server))
    async with (
        connect(a.url, pki, "alice") as on_a,
        connect(c.url, pki, "alice") as pub,
    ):
        member_a = await on_a.subscribe("jobs.>", group="workers")
        async with connect(b.url, pki, "alice") as on_b:
            await on_b.subscribe("jobs.>", group="workers")
            await wait_advertised(redis_server, 4, ("jobs.>", "workers"), 2)
        # B's only member left: B advertises it at once (no more copies chosen for B)
        await wait_advertised(redis_server, 4, ("jobs.>", "workers"), 1)
        for i in range(40):
            await pub.publish("jobs.x", str(i).encode())
        got = await take_all([member_a], 40)
        assert got == [list(range(40))]
        # B stops: it says goodbye, and the group is still served by A alone
        b.stop()
        for i in range(40, 60):
            await pub.publish("jobs.x", str(i).encode())
        assert (await take_all([member_a], 20)) == [list(range(40, 60))]


async def test_two_workers_share_a_queue_group_once(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    cfg = cluster_config(broker_factory, redis_server)
    proc = broker_factory.track(
        BrokerProcess(["serve", "--config", str(cfg), "--workers", "2"], workdir=cfg.parent)
    ).start()
    _worker_pids(proc)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(connect(proc.url, pki, "alice")) for _ in range(12)
        ]
        members = [await c.subscribe("w.>", group="g") for c in clients]
        opened = proc.wait_for_log(r"session open", count=12)
        assert any("[worker 0]" in line for line in opened)
        assert any("[worker 1]" in line for line in opened)  # 2**-11 odds otherwise
        await wait_subscribed(redis_server, "tessera:w", 2)
        await wait_advertised(redis_server, 4, ("w.>", "g"), 2)
        n = 240
        # every connection publishes (so both workers have publishers and members)
        for i in range(n):
            await clients[i % 12].publish("w.job", str(i).encode())
        got = await take_all(members, n)
        everything = sorted(x for m in got for x in m)
        assert everything == list(range(n)), "each publication exactly once to the group"
        assert all(got), [len(m) for m in got]  # every member got some

        # one responder on one worker: a request from any connection (either worker) is served
        service = await clients[0].serve("svc.x", group="svc").start()
        await wait_advertised(redis_server, 5, ("svc.x", "svc"), 1)

        async def serve() -> None:
            async for req in service:
                await req.respond(b"re:" + req.payload)

        task = asyncio.create_task(serve())
        try:
            replies = await asyncio.gather(
                *(c.request("svc.x", str(i), timeout=TIMEOUT) for i, c in enumerate(clients))
            )
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert [r.payload for r in replies] == [f"re:{i}".encode() for i in range(12)]


async def test_a_request_on_one_node_is_served_on_another(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a = broker_factory.serve(cluster_config(broker_factory, redis_server))
    b = broker_factory.serve(cluster_config(broker_factory, redis_server))
    async with (
        connect(a.url, pki, "alice") as requester,
        connect(b.url, pki, "alice") as responder,
    ):
        with pytest.raises(NoResponders):  # nobody serves it anywhere: at once
            await requester.request("cmd.device.d1", b"x", timeout=TIMEOUT)
        service = await responder.serve("cmd.device.*", group="svc").start()
        await wait_advertised(redis_server, 5, ("cmd.device.*", "svc"), 1)

        async def serve() -> None:
            async for req in service:
                assert req.sender == "x509:alice"
                await req.respond(b"done:" + req.payload, headers={"by": "b"})

        task = asyncio.create_task(serve())
        try:
            for i in range(20):
                reply = await requester.request("cmd.device.d1", str(i).encode(), timeout=TIMEOUT)
                assert reply.payload == b"done:" + str(i).encode()
                assert reply.headers == {"by": "b"}
                assert reply.sender == "x509:alice"
            # concurrent requests: each answered once, to the right request
            replies = await asyncio.gather(
                *(requester.request("cmd.device.d2", str(i), timeout=TIMEOUT) for i in range(50))
            )
            assert [r.payload for r in replies] == [f"done:{i}".encode() for i in range(50)]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        # a responder that never answers: the requester times out on its own node
        slow = await responder.serve("cmd.slow", group="slow").start()
        await wait_advertised(redis_server, 5, ("cmd.slow", "slow"), 1)
        with pytest.raises(RequestTimeout):
            await requester.request("cmd.slow", b"q", timeout=0.5)
        late = await next_request(slow, TIMEOUT)
        # B forgets it after the same timeout, counted from its arrival there
        await asyncio.sleep(scaled(0.6))
        with pytest.raises(client_sdk.BrokerError, match=r"UNKNOWN_REQUEST|no such request"):
            await late.respond(b"too late")  # expired on B too: reaches nobody


async def test_a_local_responder_is_preferred_and_a_departing_one_fails_fast(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a = broker_factory.serve(cluster_config(broker_factory, redis_server))
    b = broker_factory.serve(cluster_config(broker_factory, redis_server))
    async with (
        connect(a.url, pki, "alice") as requester,
        connect(a.url, pki, "alice") as local_c,
        connect(b.url, pki, "alice") as remote_c,
    ):
        remote = await remote_c.serve("cmd.>", group="svc").start()
        local = await local_c.serve("cmd.>", group="svc").start()
        await wait_advertised(redis_server, 5, ("cmd.>", "svc"), 2)
        pending = asyncio.create_task(requester.request("cmd.x", b"q", timeout=TIMEOUT))
        req = await next_request(local, TIMEOUT)
        await req.respond(b"local")
        assert (await pending).payload == b"local"
        with pytest.raises(TimeoutError):
            await next_request(remote, 0.3)  # one member of the group: the local one
        # the local member leaves: the request goes to B; B's member disconnects before
        # answering: the requester is told at once, not after its timeout
        await local.unsubscribe()
        started = time.monotonic()
        pending = asyncio.create_task(requester.request("cmd.x", b"q2", timeout=30))
        assert (await next_request(remote, TIMEOUT)).payload == b"q2"
        await remote_c.close()
        with pytest.raises(NoResponders):
            await pending
        assert time.monotonic() - started < scaled(10.0)


async def test_a_responder_node_that_stops_or_is_killed(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a = broker_factory.serve(cluster_config(broker_factory, redis_server))
    b = broker_factory.serve(cluster_config(broker_factory, redis_server))
    c = broker_factory.serve(cluster_config(broker_factory, redis_server))
    async with connect(a.url, pki, "alice") as requester:
        async with connect(b.url, pki, "alice") as on_b, connect(c.url, pki, "alice") as on_c:
            svc_b = await on_b.serve("cmd.b", group="svc").start()
            svc_c = await on_c.serve("cmd.c", group="svc").start()
            await wait_advertised(redis_server, 5, ("cmd.b", "svc"), 1)
            await wait_advertised(redis_server, 5, ("cmd.c", "svc"), 1)
            waiting_b = asyncio.create_task(requester.request("cmd.b", b"1", timeout=30))
            await next_request(svc_b, TIMEOUT)
            waiting_c = asyncio.create_task(requester.request("cmd.c", b"1", timeout=30))
            await next_request(svc_c, TIMEOUT)
            short_c = asyncio.create_task(requester.request("cmd.c", b"2", timeout=1.0))
            await next_request(svc_c, TIMEOUT)

            # B stops (SIGTERM): it says goodbye; A fails what waited on it at once
            mark = a.log_mark()
            b.stop()
            with pytest.raises(NoResponders):
                await asyncio.wait_for(waiting_b, TIMEOUT)
            a.wait_for_log(r"node [0-9a-f]+ left", since=mark)

            # C is killed: nothing is said; a short request times out first ...
            c.kill()
            killed_at = time.monotonic()
            with pytest.raises(RequestTimeout):
                await short_c
            # ... a long one fails with NO_RESPONDERS once C is forgotten (its TTL)
            with pytest.raises(NoResponders):
                await asyncio.wait_for(waiting_c, DIRECTORY_TTL_SECONDS + TIMEOUT)
            assert time.monotonic() - killed_at >= DIRECTORY_TTL_SECONDS - 1.5
            a.wait_for_log(r"node [0-9a-f]+ not heard from", since=mark)
        # and a new request: nobody serves it anywhere
        with pytest.raises(NoResponders):
            await requester.request("cmd.c", b"3", timeout=TIMEOUT)


async def test_during_a_redis_outage_groups_and_requests_are_local_only(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a = broker_factory.serve(cluster_config(broker_factory, redis_server))
    b = broker_factory.serve(cluster_config(broker_factory, redis_server))
    async with (
        connect(a.url, pki, "alice") as pub,
        connect(a.url, pki, "alice") as on_a,
        connect(b.url, pki, "alice") as on_b,
        connect(b.url, pki, "alice") as pub_b,
    ):
        member_a = await on_a.subscribe("jobs.>", group="workers")
        member_b = await on_b.subscribe("jobs.>", group="workers")
        svc_b = await on_b.serve("cmd.>", group="svc").start()
        await wait_advertised(redis_server, 4, ("jobs.>", "workers"), 2)
        await wait_advertised(redis_server, 5, ("cmd.>", "svc"), 1)
        waiting = asyncio.create_task(pub.request("cmd.x", b"before", timeout=30))
        await next_request(svc_b, TIMEOUT)

        mark_a, mark_b = a.log_mark(), b.log_mark()
        redis_server.kill()
        a.wait_for_log(r"redis backplane lost", since=mark_a)
        b.wait_for_log(r"redis backplane lost", since=mark_b)
        # the request waiting on B fails at once: its reply could not come back
        with pytest.raises(NoResponders):
            await asyncio.wait_for(waiting, TIMEOUT)
        # requests: local responders only (none on A)
        with pytest.raises(NoResponders):
            await pub.request("cmd.x", b"during", timeout=TIMEOUT)
        # groups: each node's publications go to its own members, once each
        for i in range(30):
            await pub.publish("jobs.x", str(i).encode())
            await pub_b.publish("jobs.y", str(100 + i).encode())
        got = await take_all([member_a, member_b], 60)
        assert got == [list(range(30)), list(range(100, 130))]

        redis_server.start()
        a.wait_for_log(r"redis backplane reconnected", since=mark_a, timeout=15)
        b.wait_for_log(r"redis backplane reconnected", since=mark_b, timeout=15)
        await wait_advertised(redis_server, 5, ("cmd.>", "svc"), 1)
        waiting = asyncio.create_task(pub.request("cmd.x", b"after", timeout=TIMEOUT))
        req = await next_request(svc_b, TIMEOUT)
        assert req.payload == b"after"
        await req.respond(b"ok")
        assert (await waiting).payload == b"ok"
