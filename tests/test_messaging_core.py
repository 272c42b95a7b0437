"""The broker's status-and-commands core in-process with a fake clock (no sockets): the retained
snapshot's place in the connection's stream (after what was routed before the subscription,
before what is routed after, paced through a small outbox), queue-group choice (round robin,
passing over a backed-up member), and the pending-request table."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from test_hub import TestHub, client, send

from tessera_mq.broker.backplane import Publication
from tessera_mq.broker.config import LimitsConfig
from tessera_mq.broker.messaging import Group, Groups, Pending, PendingRequests
from tessera_mq.client.protocol.events import Message, Ok


class MemoryStore:
    """Retained values in a dict (the Store protocol without durability)."""

    def __init__(self, values: dict[str, bytes]) -> None:
        self.values = {t: Publication(t, v, retain=True) for t, v in values.items()}

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def wants(self, pub: Publication) -> bool:
        return False  # the tests publish live only

    async def save(self, pubs: Sequence[Publication]) -> None:
        pass

    def apply(self, pubs: Sequence[Publication]) -> None:
        pass

    def retained(self, pattern: str) -> Sequence[Publication]:
        return list(self.values.values())

    def retained_cursor(self, pattern: str) -> Iterator[Publication | None]:
        return iter(list(self.values.values()))


def test_what_was_routed_before_a_subscription_goes_out_before_its_ok() -> None:
    hub = TestHub(store=MemoryStore({"t.x": b"retained"}))
    alice, _ = client(hub, "alice")
    carol, carol_io = client(hub, "bob")
    send(hub, carol, {"op": "sub", "sid": 1, "pattern": "t.>"})
    hub.settle()
    carol_io.events()
    # In one turn: alice publishes (the delivery waits in a per-turn block), then carol adds a
    # second subscription whose snapshot holds the same topic.
    send(hub, alice, {"op": "pub", "topic": "t.x", "payload": b"live-before"})
    send(hub, carol, {"op": "sub", "sid": 2, "pattern": "t.*"})
    hub.settle()
    events = carol_io.events()
    kinds = [
        (type(e).__name__, getattr(e, "sid", None), getattr(e, "payload", None)) for e in events
    ]
    assert kinds == [
        ("Message", None, b"live-before"),  # routed before sub 2 existed: before its ok
        ("Ok", 2, None),
        ("Message", 2, b"retained"),
    ], kinds
    assert isinstance(events[2], Message) and events[2].retained


def test_a_large_snapshot_is_paced_and_live_deliveries_wait_behind_it() -> None:
    values = {f"t.k{i}": b"v" * 100 for i in range(2000)}  # ~250 KB of frames
    hub = TestHub(LimitsConfig(max_pending_bytes=64 * 1024), store=MemoryStore(values))
    alice, _ = client(hub, "alice")
    bob, bob_io = client(hub, "bob")
    send(hub, bob, {"op": "sub", "sid": 1, "pattern": "t.>"})
    hub.turn()  # the first blocks of the snapshot are queued, not all of it
    assert bob._ordered, "the snapshot should still be going out"
    send(hub, alice, {"op": "pub", "topic": "t.k0", "payload": b"new"})
    hub.settle()
    events = bob_io.events()
    assert isinstance(events[0], Ok)
    msgs = [e for e in events if isinstance(e, Message)]
    assert len(msgs) == 2001
    assert all(m.retained and m.sid == 1 for m in msgs[:2000])
    assert (msgs[-1].topic, msgs[-1].payload, msgs[-1].retained) == ("t.k0", b"new", False)
    assert bob_io.closed is None  # never a slow consumer: the outbox bound held


def test_queue_group_round_robin_passes_over_a_backed_up_member() -> None:
    hub = TestHub(LimitsConfig(max_pending_bytes=64 * 1024))
    alice, _ = client(hub, "alice")
    m1, io1 = client(hub, "bob")
    m2, io2 = client(hub, "bob")
    for m in (m1, m2):
        send(hub, m, {"op": "sub", "sid": 5, "pattern": "t.>", "group": "g"})
    hub.settle()
    io1.events()
    io2.events()
    for i in range(10):
        send(hub, alice, {"op": "pub", "topic": "t.a", "payload": str(i).encode()})
    hub.settle()
    got1 = [int(e.payload) for e in io1.events() if isinstance(e, Message)]
    got2 = [int(e.payload) for e in io2.events() if isinstance(e, Message)]
    assert sorted(got1 + got2) == list(range(10))
    assert len(got1) == len(got2) == 5
    m1.outbox_paused(True)  # member 1's socket stops draining: its outbox fills
    big = b"x" * 40_000
    for _ in range(6):
        send(hub, alice, {"op": "pub", "topic": "t.a", "payload": big})
        hub.settle()
    m1.outbox_paused(False)
    hub.settle()
    n1 = sum(1 for e in io1.events() if isinstance(e, Message))
    n2 = sum(1 for e in io2.events() if isinstance(e, Message))
    assert n1 + n2 == 6
    assert n1 == 1  # once backed up (over half its outbox), member 1 was passed over
    assert io1.closed is None


def test_group_pick_prefers_idle_members_and_falls_back_to_the_least_loaded() -> None:
    g: Group[str] = Group("a.>", "g", ("a", ">"), [("m1", 1), ("m2", 2), ("m3", 3)])
    load = {"m1": 0.0, "m2": 0.0, "m3": 0.0}
    assert [g.pick(load.__getitem__) for _ in range(4)] == [
        ("m1", 1),
        ("m2", 2),
        ("m3", 3),
        ("m1", 1),
    ]
    load["m2"] = 0.9
    assert [g.pick(load.__getitem__)[0] for _ in range(4)] == ["m3", "m1", "m3", "m1"]  # type: ignore[index]
    load.update(m1=0.8, m3=0.7)
    assert g.pick(load.__getitem__) == ("m3", 3)  # all backed up: the least loaded


def test_groups_join_leave_and_match() -> None:
    groups: Groups[str] = Groups()
    groups.join("a.>", "g", "c1", 1)
    groups.join("a.>", "g", "c2", 1)
    groups.join("a.*", None, "c3", 7)  # no name: a group of its own
    groups.join("a.*", None, "c4", 7)
    assert len(groups) == 3
    assert sorted(m for m, _ in groups.choose("a.b", lambda m: 0.0)) in (
        ["c1", "c3", "c4"],
        ["c2", "c3", "c4"],
    )
    groups.leave("a.>", "g", "c1", 1)
    groups.leave("a.>", "g", "c2", 1)
    assert [m for m, _ in groups.choose("a.b.c", lambda m: 0.0)] == []
    groups.leave("a.>", "g", "nobody", 1)  # harmless


def test_pending_requests_answer_once_and_forget_orphans() -> None:
    table: PendingRequests[str] = PendingRequests()
    t1 = table.token_for("svc1")
    t2 = table.token_for("svc2")
    table.add(Pending("alice", 7, {"svc1": t1, "svc2": t2}))
    assert table.waiting("alice", 7)
    assert table.answer("mallory", t1) is None  # a token is valid only where it was delivered
    assert table.answer("svc1", t1 + 1) is None
    first = table.answer("svc2", t2)
    assert first is not None and first.rid == 7
    assert table.answer("svc1", t1) is None  # answered already
    assert not table.waiting("alice", 7)
    table.add(Pending("alice", 8, {"svc1": table.token_for("svc1")}))
    table.add(Pending("bob", 9, {"svc1": table.token_for("svc1"), "svc2": table.token_for("svc2")}))
    orphans = table.forget("svc1")
    assert [(p.requester, p.rid) for p in orphans] == [("alice", 8)]  # bob still has svc2
    assert table.waiting("bob", 9)
    assert table.forget("bob") == [] and len(table) == 0
