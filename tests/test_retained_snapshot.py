"""Retained snapshots are lazy cursors, pulled a bounded budget per connection per loop turn.

In-process, as tests/test_hub.py: the real hub, router, request handlers, outboxes and the real
embedded store's in-memory view (:class:`~broker.store_sqlite.SQLiteStore`), a fake clock, no
sleeps; the change-mid-snapshot case runs the real pipeline (save in SQLite, then apply and route)
on a real event loop. A new subscription fixes what its snapshot covers in the step it starts (a
copy of references), builds messages and frames only as they go out, and leaves every other
connection its turns in between.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from brokerproc import RawClient, pack
from helpers_protocol import frame
from test_broker_messaging import TIMEOUT, connect, start
from test_hub import ACL, FakeIO, TestHub, client, send

from tessera_mq.auth.acl import Policy
from tessera_mq.auth.identity import Identity
from tessera_mq.auth.tls import client_context
from tessera_mq.broker.audit import Audit
from tessera_mq.broker.backplane import Publication
from tessera_mq.broker.config import LimitsConfig
from tessera_mq.broker.handler import SNAPSHOT_BLOCK_FRAMES, SNAPSHOT_STEPS_PER_TURN, RequestHandler
from tessera_mq.broker.hub import Hub
from tessera_mq.broker.store_sqlite import SQLiteStore
from tessera_mq.client.protocol.events import Message, Ok, Pong

N_TOPICS = 20_000


def retained(n: int = N_TOPICS) -> list[Publication]:
    return [Publication(f"t.k{i}", b"v%d" % i, retain=True) for i in range(n)]


def loaded_store(tmp_path: Path, n: int = N_TOPICS) -> SQLiteStore:
    """The embedded store's visible view holding ``n`` values (the read path under test; the
    durable write path is exercised by the event-loop test below)."""
    store = SQLiteStore(tmp_path)
    store.apply(retained(n))
    return store


def by_sid(events: list[object]) -> dict[int | None, list[Message]]:
    out: dict[int | None, list[Message]] = {}
    for e in events:
        if isinstance(e, Message):
            out.setdefault(e.sid, []).append(e)
    return out


def test_snapshots_are_paced_per_turn_and_other_connections_are_answered_in_between(
    tmp_path: Path,
) -> None:
    hub = TestHub(store=loaded_store(tmp_path))
    alice, a_io = client(hub, "alice")
    bob, b_io = client(hub, "bob")
    subs = 4
    send(hub, bob, *({"op": "sub", "sid": s, "pattern": ">"} for s in range(1, subs + 1)))
    # The read that asked for 4 x 20,000 values built one turn's share, not the snapshots.
    assert hub.stats["retained_sent"] <= SNAPSHOT_BLOCK_FRAMES
    hub.turn()
    # Alice pings and publishes while Bob's snapshots are going out.
    send(
        hub,
        alice,
        {"op": "ping"},
        {"op": "pub", "topic": "t.live", "payload": b"live", "ack": 7},
    )
    turns = 0
    while not any(isinstance(e, Pong) for e in a_io.events()):
        hub.turn()
        turns += 1
        assert turns <= 2, "alice's pong waited behind bob's snapshots"
    sent_when_answered = hub.stats["retained_sent"]
    assert sent_when_answered < subs * N_TOPICS // 10, sent_when_answered
    # Each turn builds at most one block of Bob's snapshot frames.
    while hub.soon:
        before = hub.stats["retained_sent"]
        hub.turn()
        turns += 1
        assert hub.stats["retained_sent"] - before <= SNAPSHOT_BLOCK_FRAMES
    assert turns >= subs * N_TOPICS // SNAPSHOT_BLOCK_FRAMES
    events = b_io.events()
    oks = [e.sid for e in events if isinstance(e, Ok)]
    assert oks == list(range(1, subs + 1))
    got = by_sid(events)
    expected = {f"t.k{i}" for i in range(N_TOPICS)}
    for sid in range(1, subs + 1):
        topics = [m.topic for m in got[sid]]
        assert all(m.retained for m in got[sid])
        assert len(topics) == N_TOPICS and set(topics) == expected, sid  # complete, no duplicate
    # The live publish reached the connection once (one frame however many patterns match),
    # after every snapshot that was going out when it was routed.
    msgs = [e for e in events if isinstance(e, Message)]
    assert [(m.sid, m.payload, m.retained) for m in got[None]] == [(None, b"live", False)]
    assert msgs[-1] is got[None][0]
    assert b_io.closed is None


def test_pending_snapshots_hold_references_not_messages(tmp_path: Path) -> None:
    """32 pending ``sub >`` of 20,000 values each: what waits is a cursor per subscription (a
    copy of references, ~8 bytes a value), not 640,000 messages (the eager snapshot held ~115
    bytes of objects per value: 2.3 MB per subscription, a 73 MB peak here; measured with
    /work/main's code in the same scenario)."""
    hub = TestHub(store=loaded_store(tmp_path))
    bob, b_io = client(hub, "bob")
    subs = 32
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        send(hub, bob, *({"op": "sub", "sid": s, "pattern": ">"} for s in range(1, subs + 1)))
        for _ in range(20):
            hub.turn()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert bob._ordered, "the snapshots should still be pending"
    per_snapshot = (peak - base) / subs
    assert per_snapshot < 300_000, per_snapshot  # < 15 bytes per value
    assert current - base < subs * 300_000
    hub.settle(100_000)
    assert sum(1 for e in b_io.events() if isinstance(e, Message)) == subs * N_TOPICS


def test_a_scan_passing_over_most_values_is_paced_too(tmp_path: Path) -> None:
    """``*.k19999`` matches one of 20,000 candidates: the scan is spread over turns (steps
    bounded per turn), and the one match still arrives."""
    hub = TestHub(store=loaded_store(tmp_path))
    bob, b_io = client(hub, "bob")
    send(hub, bob, {"op": "sub", "sid": 1, "pattern": "*.k19999"})
    turns = 0
    while hub.soon:
        hub.turn()
        turns += 1
    assert turns >= N_TOPICS // SNAPSHOT_STEPS_PER_TURN
    events = b_io.events()
    assert isinstance(events[0], Ok)
    assert [(m.topic, m.payload) for m in events[1:] if isinstance(m, Message)] == [
        ("t.k19999", b"v19999")
    ]


def test_unsubscribe_mid_snapshot_stops_it(tmp_path: Path) -> None:
    hub = TestHub(store=loaded_store(tmp_path))
    bob, b_io = client(hub, "bob")
    send(hub, bob, {"op": "sub", "sid": 1, "pattern": "t.>"})
    hub.turn()
    send(hub, bob, {"op": "unsub", "sid": 1})
    hub.settle()
    sent = hub.stats["retained_sent"]
    assert sent < N_TOPICS // 10, sent  # nothing more was built for it
    assert bob._ordered is None
    events = b_io.events()
    assert [e for e in events if isinstance(e, Ok)] == [Ok(sid=1), Ok(sid=1)]  # sub, unsub
    assert sum(1 for e in events if isinstance(e, Message)) == sent


def test_values_changed_mid_snapshot_are_sent_once_in_it_or_live(tmp_path: Path) -> None:
    """Through the real pipeline (SQLite save, then apply and route in one step) while a
    snapshot of 20,000 values is still going out: the snapshot has each value as it was when
    the subscription started (also one replaced or cleared since), changes arrive live after
    it, a topic created meanwhile only live: each value once, none missing."""

    async def scenario() -> None:
        store = SQLiteStore(tmp_path)
        hub = Hub(
            limits=LimitsConfig(max_pending_bytes=64 * 1024),
            policy=Policy.from_text(ACL),
            audit=Audit(None),
            server_name="t",
            store=store,
        )
        await hub.start()
        pubs = retained()
        await store.save(pubs)
        store.apply(pubs)
        a_io, b_io = FakeIO(), FakeIO()
        alice = RequestHandler(hub, a_io, 1, peer="p", listener="l")
        bob = RequestHandler(hub, b_io, 2, peer="p", listener="l")
        for h, name in ((alice, "alice"), (bob, "bob")):
            hub.admit(h)
            h.authenticated(Identity("x509", name), hub.now())
            h.receive(frame({"op": "hello", "version": 1, "client": "t"}), hub.now())
        await asyncio.sleep(0)
        b_io.events()
        a_io.events()
        bob.outbox_paused(True)  # bob's socket is slow: his snapshot stalls part way
        bob.receive(frame({"op": "sub", "sid": 1, "pattern": "t.>"}), hub.now())
        for _ in range(10):
            await asyncio.sleep(0)
        assert bob._ordered, "the snapshot should be going out still"
        changes = [
            ("t.k0", b"new0"),  # already in bob's outbox
            ("t.k19999", b"new19999"),  # not pulled yet
            ("t.k10000", b""),  # cleared before it was pulled
            ("t.fresh", b"fresh"),  # created meanwhile
        ]
        alice.receive(
            b"".join(
                frame({"op": "pub", "topic": t, "payload": p, "retain": True, "ack": i + 1})
                for i, (t, p) in enumerate(changes)
            ),
            hub.now(),
        )
        acks: list[int] = []
        for _ in range(1000):
            if len(acks) == len(changes):
                break
            await asyncio.sleep(0.001)
            acks += [e.ack for e in a_io.events() if isinstance(e, Ok) and e.ack is not None]
        assert acks == [1, 2, 3, 4]
        assert bob._ordered, "the changes should have come while the snapshot was pending"
        bob.outbox_paused(False)
        for _ in range(2000):
            await asyncio.sleep(0)
            if bob._ordered is None and not bob.outbox:
                break
        events = b_io.events()
        msgs = [e for e in events if isinstance(e, Message)]
        snap = [m for m in msgs if m.retained]
        live = [m for m in msgs if not m.retained]
        assert {m.topic: m.payload for m in snap} == {p.topic: p.payload for p in pubs}
        assert len(snap) == N_TOPICS  # no duplicate
        assert [(m.topic, m.payload) for m in live] == changes
        assert msgs[-len(changes) :] == live  # live changes after the whole snapshot
        # A subscription started now sees the new state in its snapshot and nothing twice.
        bob.receive(frame({"op": "sub", "sid": 2, "pattern": "t.>"}), hub.now())
        for _ in range(500):
            await asyncio.sleep(0)
            if bob._ordered is None and not bob.outbox:
                break
        now = {m.topic: m.payload for m in b_io.events() if isinstance(m, Message)}
        assert len(now) == N_TOPICS  # 20,000 - cleared + fresh
        assert now["t.k0"] == b"new0" and now["t.fresh"] == b"fresh" and "t.k10000" not in now
        await hub.drain()
        await hub.stop()

    asyncio.run(scenario())


def test_store_cursors_are_fixed_when_made_and_match_lazily(tmp_path: Path) -> None:
    store = loaded_store(tmp_path, 10)
    cursor = store.retained_cursor("t.*")
    store.apply(
        [
            Publication("t.k0", b"new", retain=True),
            Publication("t.k1", b"", retain=True),
            Publication("t.fresh", b"x", retain=True),
        ]
    )
    got = [p for p in cursor if p is not None]
    assert [(p.topic, p.payload) for p in got] == [(f"t.k{i}", b"v%d" % i) for i in range(10)]
    assert [p is None for p in store.retained_cursor("*.k3")].count(False) == 1
    assert list(store.retained_cursor("nothing.>")) == []
    assert [p.payload for p in store.retained_cursor("t.k0") if p] == [b"new"]
    assert list(store.retained_cursor("t")) == []  # one token: looked up, no scan
    assert {p.topic for p in store.retained(">")} == {f"t.k{i}" for i in range(2, 10)} | {
        "t.k0",
        "t.fresh",
    }


# --- a real broker ------------------------------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
async def test_a_broker_serves_others_while_one_client_holds_32_snapshots_of_20000_values(
    broker_factory: Any, pki: Any, tmp_path: Path
) -> None:
    """A real broker process over mutual TLS: a client that asks for 32 snapshots of 20,000
    retained values in one write and then does not read neither delays another client's round
    trip nor grows the broker by the snapshots' size (measured: 5 MB; the eager snapshot of
    /work/main grew it by 85 MB and fails this test)."""
    broker, _ = start(broker_factory, tmp_path / "data")
    async with connect(broker, pki, "bob") as svc, connect(broker, pki, "mallory") as other:
        for first in range(0, N_TOPICS, 1000):
            await asyncio.gather(
                *(
                    svc.publish(f"status.d{i}.public", b"x" * 20, retain=True)
                    for i in range(first, first + 1000)
                )
            )
        chat = await other.subscribe("chat.>")
        await svc.publish("chat.warmup", b"0")
        assert (await chat.get(timeout=TIMEOUT)).payload == b"0"
        await asyncio.sleep(0.2)
        before = _rss_bytes(broker.pid)
        cred = pki.clients["alice"]

        def ask_and_stall() -> RawClient:
            raw = RawClient(
                broker.host,
                broker.port,
                client_context(pki.ca, cred.cert, cred.key),
                recv_buffer_bytes=4096,
                timeout=TIMEOUT,
            )
            raw.hello()
            raw.send_raw(
                b"".join(
                    pack({"op": "sub", "sid": s, "pattern": "status.*.public"})
                    for s in range(1, 33)
                )
            )
            return raw  # and now it stops reading

        raw = await asyncio.to_thread(ask_and_stall)
        try:
            for n in range(20):  # other clients' round trips go on meanwhile
                await svc.publish("chat.x", b"%d" % n)
                assert (await chat.get(timeout=TIMEOUT)).payload == b"%d" % n
            await asyncio.sleep(0.5)
            grown = _rss_bytes(broker.pid) - before
            assert grown < 40 * 1024 * 1024, grown
            first_frames = await asyncio.to_thread(lambda: [raw.recv() for _ in range(300)])
            assert first_frames[0] == {"op": "ok", "sid": 1}
            assert all(f and f["op"] == "msg" and f["retained"] for f in first_frames[1:])
        finally:
            raw.close()
