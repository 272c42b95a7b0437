"""The broker core in-process: the real :class:`~broker.hub.Hub`, router, request handlers and
outboxes, driven without sockets or an event loop, with a fake clock.

A :class:`FakeIO` stands where the asyncio session would be (it records what the handler writes
and whether it closed or paused reading); :class:`TestHub` replaces only the hub's three ties to
a loop (``later``, ``now``, the per-turn flush scheduling) so a test decides when a loop turn
ends (:meth:`TestHub.turn`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
from helpers_protocol import frame

from tessera_mq.auth.acl import Policy
from tessera_mq.auth.identity import Identity
from tessera_mq.broker.audit import Audit
from tessera_mq.broker.backplane import Publication
from tessera_mq.broker.config import LimitsConfig
from tessera_mq.broker.handler import EVENTS_PER_TURN, RequestHandler
from tessera_mq.broker.hub import Hub
from tessera_mq.broker.store import StoreError
from tessera_mq.client.protocol import ErrorCode
from tessera_mq.client.protocol.codec import decode
from tessera_mq.client.protocol.events import Close, Error, Event, Message, Ok, Ping, Pong, Welcome
from tessera_mq.client.protocol.framing import FrameDecoder

ACL = """
[[allow]]
principals = ["x509:alice", "x509:bob"]
publish = ["t.>"]
subscribe = ["t.>"]
"""


class FakeIO:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed: bool | None = None  # None: open; else graceful?
        self.aborted = False
        self.reading = True
        self._decoder = FrameDecoder(64 * 1024 * 1024)

    def write(self, data: bytes) -> None:
        assert self.closed is None, "write after close"
        self.out += data

    def close(self, *, graceful: bool) -> None:
        self.closed = graceful

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def events(self) -> list[Event]:
        """Every frame written since the last call, decoded."""
        data, self.out = bytes(self.out), bytearray()
        return [decode(body) for body in self._decoder.feed(data)]


class TestHub(Hub):
    __test__ = False

    def __init__(self, limits: LimitsConfig | None = None, **kwargs: Any) -> None:
        super().__init__(
            limits=limits or LimitsConfig(),
            policy=Policy.from_text(ACL),
            audit=Audit(None),
            server_name="tessera/test",
            **kwargs,
        )
        self.clock = 1000.0
        self.soon: list[Callable[[], None]] = []
        self.timers: dict[RequestHandler, float] = {}

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.soon.append(self._flush_turn)

    def later(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)

    def now(self) -> float:
        return self.clock

    def set_timer(self, handler: RequestHandler, when: float | None) -> None:
        if when is None:
            self.timers.pop(handler, None)
        else:
            self.timers[handler] = when

    def turn(self) -> None:
        """End one event-loop turn: run what was scheduled during it."""
        soon, self.soon = self.soon, []
        for callback in soon:
            callback()

    def settle(self, turns: int = 1000) -> None:
        for _ in range(turns):
            if not self.soon:
                return
            self.turn()
        raise AssertionError("the hub never went idle")

    def advance(self, seconds: float) -> None:
        """Move the fake clock and fire every timer that came due."""
        self.clock += seconds
        for handler, when in list(self.timers.items()):
            if when <= self.clock and self.timers.get(handler) == when:
                del self.timers[handler]
                handler.on_timer(self.clock)
        self.settle()


def client(
    hub: TestHub, name: str, *, heartbeat_ms: int | None = None
) -> tuple[RequestHandler, FakeIO]:
    io = FakeIO()
    handler = RequestHandler(hub, io, len(hub.handlers) + 1, peer="127.0.0.1:1", listener="test")
    assert hub.admit(handler)
    handler.start(hub.clock)
    assert handler.authenticated(Identity("x509", name), hub.clock)
    hello: dict[str, Any] = {"op": "hello", "version": 1, "client": "t"}
    if heartbeat_ms is not None:
        hello["heartbeat_ms"] = heartbeat_ms
    handler.receive(frame(hello), hub.clock)
    hub.settle()
    (welcome,) = io.events()
    assert isinstance(welcome, Welcome)
    return handler, io


def send(hub: TestHub, handler: RequestHandler, *frames: Mapping[str, Any]) -> None:
    handler.receive(b"".join(frame(dict(f)) for f in frames), hub.clock)


# --- the pipeline --------------------------------------------------------------------------


def test_publish_reaches_subscribers_once_and_ok_leaves_in_the_same_flush() -> None:
    hub = TestHub()
    alice, a_io = client(hub, "alice")
    bob, b_io = client(hub, "bob")
    send(
        hub,
        bob,
        {"op": "sub", "sid": 1, "pattern": "t.>"},
        {"op": "sub", "sid": 2, "pattern": "t.*"},
    )
    hub.settle()
    assert b_io.events() == [Ok(sid=1), Ok(sid=2)]
    send(hub, alice, {"op": "pub", "topic": "t.x", "payload": b"1", "ack": 7})
    # Nothing is written before the turn ends: the ok and the delivery go out in one flush.
    assert a_io.out == b"" and b_io.out == b""
    hub.turn()
    assert a_io.events() == [Ok(ack=7)]
    (msg,) = b_io.events()  # two matching subscriptions, one copy
    assert isinstance(msg, Message) and msg.topic == "t.x" and msg.payload == b"1"
    assert hub.info()["deliveries_out"] == 1


def test_denied_publish_is_answered_and_not_routed() -> None:
    hub = TestHub()
    alice, a_io = client(hub, "alice")
    bob, b_io = client(hub, "bob")
    send(hub, bob, {"op": "sub", "sid": 1, "pattern": "t.>"})
    send(hub, alice, {"op": "pub", "topic": "secret", "payload": b"x", "ack": 1})
    hub.settle()
    (err,) = a_io.events()
    assert isinstance(err, Error) and err.code == ErrorCode.PERMISSION_DENIED and err.ack == 1
    assert b_io.events() == [Ok(sid=1)]


class RecordingBackplane:
    def __init__(self) -> None:
        self.published: list[Publication] = []
        self.interest_log: list[tuple[str, bool]] = []
        self.inject: Callable[[Publication], None] | None = None

    async def start(self, inject: Callable[[Publication], None]) -> None:
        self.inject = inject

    async def stop(self) -> None:
        pass

    def interest(self, pattern: str, added: bool) -> None:
        self.interest_log.append((pattern, added))

    def publish(self, pub: Publication) -> bool:
        self.published.append(pub)
        return True

    def health(self) -> Mapping[str, object]:
        return {"engine": "recording"}


def test_backplane_sees_local_publishes_with_sender_and_interest_changes() -> None:
    bp = RecordingBackplane()
    hub = TestHub(backplane=bp)
    alice, _ = client(hub, "alice")
    bob, _b_io = client(hub, "bob")
    send(
        hub,
        bob,
        {"op": "sub", "sid": 1, "pattern": "t.>"},
        {"op": "sub", "sid": 2, "pattern": "t.>"},
    )
    send(hub, alice, {"op": "pub", "topic": "t.1", "payload": b"p"})
    hub.settle()
    assert [(p.topic, p.payload, p.sender) for p in bp.published] == [("t.1", b"p", "x509:alice")]
    assert bp.interest_log == [("t.>", True)]  # one interest for two subscriptions
    send(hub, bob, {"op": "unsub", "sid": 1})
    assert bp.interest_log == [("t.>", True)]
    send(hub, bob, {"op": "unsub", "sid": 2})
    assert bp.interest_log == [("t.>", True), ("t.>", False)]


def test_injected_publications_reach_local_subscribers_and_are_not_echoed() -> None:
    bp = RecordingBackplane()
    hub = TestHub(backplane=bp)
    bob, b_io = client(hub, "bob")
    send(hub, bob, {"op": "sub", "sid": 1, "pattern": "t.>"})
    hub.settle()
    b_io.events()
    hub._inject(Publication("t.remote", b"r"))
    hub.settle()
    (msg,) = b_io.events()
    assert isinstance(msg, Message) and msg.payload == b"r"
    assert bp.published == []


class SlowStore:
    """Holds every publication until the test releases it (a durable write in progress)."""

    def __init__(self) -> None:
        self.saved: list[Publication] = []
        self.release: Callable[[BaseException | None], None] | None = None

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def wants(self, pub: Publication) -> bool:
        return pub.topic.startswith("t.keep")

    async def save(self, pubs: Sequence[Publication]) -> None:
        self.saved.extend(pubs)

    def apply(self, pubs: Sequence[Publication]) -> None:
        pass

    def retained(self, pattern: str) -> Sequence[Publication]:
        return ()

    def retained_cursor(self, pattern: str) -> Iterator[Publication | None]:
        return iter(())


def test_stored_publish_holds_the_publishers_later_requests_in_order() -> None:
    """A publish the store must keep is acknowledged only after it is stored and routed, and the
    same connection's next requests wait behind it (per-publisher order)."""
    store = SlowStore()

    async def scenario() -> None:
        hub = Hub(
            limits=LimitsConfig(),
            policy=Policy.from_text(ACL),
            audit=Audit(None),
            server_name="t",
            store=store,
        )
        await hub.start()
        alice_io, bob_io = FakeIO(), FakeIO()
        alice = RequestHandler(hub, alice_io, 1, peer="p", listener="l")
        bob = RequestHandler(hub, bob_io, 2, peer="p", listener="l")
        for h, name in ((alice, "alice"), (bob, "bob")):
            hub.admit(h)
            h.authenticated(Identity("x509", name), hub.now())
            h.receive(frame({"op": "hello", "version": 1, "client": "t"}), hub.now())
        h = bob
        h.receive(frame({"op": "sub", "sid": 1, "pattern": "t.>"}), hub.now())
        alice.receive(
            frame({"op": "pub", "topic": "t.keep", "payload": b"1", "ack": 1})
            + frame({"op": "pub", "topic": "t.plain", "payload": b"2", "ack": 2}),
            hub.now(),
        )
        assert not alice_io.reading  # waiting for the store
        for _ in range(5):
            await asyncio.sleep(0)
        assert alice_io.reading
        answers = [e for e in alice_io.events() if not isinstance(e, Welcome)]
        assert answers == [Ok(ack=1), Ok(ack=2)]
        payloads = [e.payload for e in bob_io.events() if isinstance(e, Message)]
        assert payloads == [b"1", b"2"]
        assert [p.topic for p in store.saved] == ["t.keep"]
        await hub.drain()
        await hub.stop()

    asyncio.run(scenario())


def test_store_refusal_is_an_error_answer_and_nothing_is_routed() -> None:
    class RefusingStore(SlowStore):
        async def save(self, pubs: Sequence[Publication]) -> None:
            raise StoreError("retained values are limited to 10")

    async def scenario() -> None:
        hub = Hub(
            limits=LimitsConfig(),
            policy=Policy.from_text(ACL),
            audit=Audit(None),
            server_name="t",
            store=RefusingStore(),
        )
        await hub.start()
        io = FakeIO()
        h = RequestHandler(hub, io, 1, peer="p", listener="l")
        hub.admit(h)
        h.authenticated(Identity("x509", "alice"), hub.now())
        h.receive(
            frame({"op": "hello", "version": 1, "client": "t"})
            + frame({"op": "sub", "sid": 1, "pattern": "t.>"})
            + frame({"op": "pub", "topic": "t.keep", "payload": b"1", "ack": 5}),
            hub.now(),
        )
        await hub.drain()
        for _ in range(3):
            await asyncio.sleep(0)
        events = io.events()
        err = events[-1]
        assert isinstance(err, Error) and err.ack == 5 and "limited to 10" in err.message
        assert not any(isinstance(e, Message) for e in events)
        await hub.stop()

    asyncio.run(scenario())


# --- bounded in every direction --------------------------------------------------------------


def test_replies_count_against_the_outbox_bound_and_overflow_disconnects() -> None:
    """A client that never reads and keeps asking (pings, unsub of unknown ids) is closed with
    SLOW_CONSUMER once its unanswered replies pass max_pending_bytes."""
    hub = TestHub(LimitsConfig(max_pending_bytes=64 * 1024))
    mallory, io = client(hub, "alice")
    mallory.outbox_paused(True)  # its transport buffer is full: nothing leaves the outbox
    sent = 0
    while io.closed is None and sent < 100_000:
        send(hub, mallory, *({"op": "unsub", "sid": sent + i} for i in range(100)))
        hub.settle()
        sent += 100
    assert io.closed is True, f"not closed after {sent} requests"
    assert sent * 40 < 4 * 64 * 1024  # closed near the bound, not far beyond it
    close = io.events()[-1]
    assert isinstance(close, Close) and close.code == ErrorCode.SLOW_CONSUMER
    assert hub.stats["slow_consumer_disconnects"] == 1


def test_drop_policy_discards_deliveries_counts_them_and_tells_the_client() -> None:
    hub = TestHub(LimitsConfig(max_pending_messages=10, slow_consumer="drop"))
    alice, _ = client(hub, "alice")
    bob, b_io = client(hub, "bob")
    send(hub, bob, {"op": "sub", "sid": 1, "pattern": "t.>"})
    hub.settle()
    b_io.events()
    bob.outbox_paused(True)
    for i in range(25):
        send(hub, alice, {"op": "pub", "topic": "t.x", "payload": b"%d" % i})
        hub.settle()
    bob.outbox_paused(False)
    hub.settle()
    events = b_io.events()
    msgs = [e for e in events if isinstance(e, Message)]
    assert [m.payload for m in msgs] == [b"%d" % i for i in range(10)]
    err = events[-1]
    assert isinstance(err, Error) and err.code == ErrorCode.SLOW_CONSUMER and err.dropped == 15
    assert b_io.closed is None


def test_work_per_turn_is_bounded_and_order_is_kept() -> None:
    """A read holding thousands of publishes is handled EVENTS_PER_TURN at a time, with reading
    paused meanwhile and other connections' output flushed between the slices."""
    hub = TestHub()
    alice, a_io = client(hub, "alice")
    bob, b_io = client(hub, "bob")
    send(hub, bob, {"op": "sub", "sid": 1, "pattern": "t.>"})
    hub.settle()
    b_io.events()
    n = EVENTS_PER_TURN * 5 + 3
    send(
        hub,
        alice,
        *({"op": "pub", "topic": "t.x", "payload": b"%d" % i, "ack": i + 1} for i in range(n)),
    )
    assert not a_io.reading
    turns = 0
    received: list[bytes] = []
    while hub.soon:
        hub.turn()
        turns += 1
        received += [e.payload for e in b_io.events() if isinstance(e, Message)]
    assert a_io.reading
    assert received == [b"%d" % i for i in range(n)]
    assert turns >= 6  # six slices, each followed by its flush
    assert [e.ack for e in a_io.events() if isinstance(e, Ok)] == list(range(1, n + 1))


def test_answers_before_a_fatal_frame_go_out_before_the_close() -> None:
    hub = TestHub()
    alice, io = client(hub, "alice")
    alice.receive(
        frame({"op": "pub", "topic": "t.x", "payload": b"1", "ack": 1})
        + (70 * 1024 * 1024).to_bytes(4, "big"),
        hub.clock,
    )
    hub.settle()
    events = io.events()
    assert events[0] == Ok(ack=1)
    assert isinstance(events[1], Close) and events[1].code == ErrorCode.FRAME_TOO_LARGE
    assert io.closed is True


# --- timers (fake clock) ---------------------------------------------------------------------


def test_negotiated_heartbeat_pings_at_its_interval_and_closes_after_two() -> None:
    hub = TestHub(LimitsConfig(heartbeat_interval=30.0))
    _alice, io = client(hub, "alice", heartbeat_ms=1000)
    hub.advance(0.9)
    assert io.events() == []
    hub.advance(0.2)  # 1.1 s of silence: one ping
    assert io.events() == [Ping()]
    hub.advance(0.5)
    assert io.events() == []
    hub.advance(0.5)  # 2.1 s: closed
    (close,) = io.events()
    assert isinstance(close, Close) and close.code == ErrorCode.HEARTBEAT_TIMEOUT
    assert io.closed is True


def test_traffic_defers_the_heartbeat() -> None:
    hub = TestHub(LimitsConfig(heartbeat_interval=30.0))
    alice, io = client(hub, "alice", heartbeat_ms=1000)
    for _ in range(5):
        hub.advance(0.6)
        send(hub, alice, {"op": "ping"})
        hub.settle()
        assert io.events() == [Pong()]
    assert io.closed is None


def test_hello_deadline_closes_a_silent_authenticated_connection() -> None:
    hub = TestHub(LimitsConfig(hello_timeout=0.5))
    io = FakeIO()
    h = RequestHandler(hub, io, 1, peer="p", listener="l")
    hub.admit(h)
    h.start(hub.clock)
    h.authenticated(Identity("x509", "alice"), hub.clock)
    hub.advance(0.4)
    assert io.closed is None
    hub.advance(0.2)
    assert io.closed is True
    (close,) = io.events()
    assert isinstance(close, Close) and close.code == ErrorCode.HANDSHAKE_TIMEOUT


def test_security_handshake_deadline_aborts() -> None:
    hub = TestHub(LimitsConfig(handshake_timeout=1.0))
    io = FakeIO()
    h = RequestHandler(hub, io, 1, peer="p", listener="l")
    hub.admit(h)
    h.start(hub.clock)
    hub.advance(1.1)
    assert io.aborted


# --- live policy -----------------------------------------------------------------------------


def test_set_policy_removes_subscriptions_no_longer_allowed_and_tells_the_owner() -> None:
    hub = TestHub()
    alice, _ = client(hub, "alice")
    bob, b_io = client(hub, "bob")
    send(
        hub,
        bob,
        {"op": "sub", "sid": 1, "pattern": "t.a.>"},
        {"op": "sub", "sid": 2, "pattern": "t.b.>"},
    )
    hub.settle()
    b_io.events()
    removed = hub.set_policy(
        Policy.from_text(
            '[[allow]]\nprincipals = ["x509:alice", "x509:bob"]\n'
            'publish = ["t.>"]\nsubscribe = ["t.b.>"]\n'
        )
    )
    hub.settle()
    assert removed == 1
    (err,) = b_io.events()
    assert isinstance(err, Error) and err.sid == 1 and err.code == ErrorCode.PERMISSION_DENIED
    assert bob.subs == {2: "t.b.>"}
    send(
        hub,
        alice,
        {"op": "pub", "topic": "t.a.1", "payload": b"a"},
        {"op": "pub", "topic": "t.b.1", "payload": b"b"},
    )
    hub.settle()
    assert [e.payload for e in b_io.events() if isinstance(e, Message)] == [b"b"]


def test_lost_connection_releases_everything() -> None:
    hub = TestHub()
    bob, _ = client(hub, "bob")
    send(hub, bob, {"op": "sub", "sid": 1, "pattern": "t.>"})
    bob.lost()
    assert hub.info()["connections"] == 0
    assert hub.info()["subscriptions"] == 0
    assert bob not in hub.timers


@pytest.mark.parametrize("n", [1, 3])
def test_per_identity_limit(n: int) -> None:
    hub = TestHub(LimitsConfig(max_connections_per_identity=n))
    for _ in range(n):
        client(hub, "alice")
    io = FakeIO()
    h = RequestHandler(hub, io, 99, peer="p", listener="l")
    hub.admit(h)
    assert not h.authenticated(Identity("x509", "alice"), hub.clock)
    (close,) = io.events()
    assert isinstance(close, Close) and close.code == ErrorCode.LIMIT_EXCEEDED


# --- found in review (each failed before its fix) ---------------------------------------------


def test_a_continuation_after_the_connection_is_lost_does_nothing() -> None:
    hub = TestHub()
    alice, _ = client(hub, "alice")
    bob, b_io = client(hub, "bob")
    send(hub, bob, {"op": "sub", "sid": 1, "pattern": "t.>"})
    hub.settle()
    b_io.events()
    send(hub, alice, *({"op": "pub", "topic": "t.x", "payload": b"p"} for _ in range(400)))
    assert hub.soon  # the rest of the read waits for the next turns
    alice.lost()  # connection_lost (a reset noticed on the flush write)
    hub.settle()  # the scheduled continuation neither raises nor routes a dead peer's frames
    routed = [e for e in b_io.events() if isinstance(e, Message)]
    assert len(routed) <= EVENTS_PER_TURN


def test_reading_stays_paused_while_the_store_holds_a_publish_from_a_continued_slice() -> None:
    class GateStore(SlowStore):
        def __init__(self) -> None:
            super().__init__()
            self.gate: asyncio.Future[None] | None = None

        def wants(self, pub: Publication) -> bool:
            return pub.retain

        async def save(self, pubs: Sequence[Publication]) -> None:
            self.gate = asyncio.get_running_loop().create_future()
            await self.gate

        def apply(self, pubs: Sequence[Publication]) -> None:
            pass

        def retained(self, pattern: str) -> Sequence[Any]:
            return ()

    async def scenario() -> None:
        store = GateStore()
        hub = TestHub(store=store)
        await hub.start()
        alice, io = client(hub, "alice")
        frames: list[dict[str, Any]] = [
            {"op": "pub", "topic": "t.x", "payload": b"p"} for _ in range(EVENTS_PER_TURN)
        ]
        frames.append({"op": "pub", "topic": "t.k", "payload": b"r", "retain": True, "ack": 1})
        send(hub, alice, *frames)
        hub.settle()  # the second slice ends on the retained publish: the store has it
        await asyncio.sleep(0)
        assert store.gate is not None and not store.gate.done()
        assert not io.reading, "reading resumed while the store still holds a publish"
        store.gate.set_result(None)
        for _ in range(5):
            await asyncio.sleep(0)
        hub.settle()
        assert io.reading
        assert Ok(ack=1) in io.events()

    asyncio.run(scenario())


def test_a_queue_group_member_registers_interest_with_the_backplane() -> None:
    bp = RecordingBackplane()
    hub = TestHub(backplane=bp)
    bob, _ = client(hub, "bob")
    send(hub, bob, {"op": "sub", "sid": 1, "pattern": "t.jobs.>", "group": "workers"})
    hub.settle()
    assert bp.interest_log == [("t.jobs.>", True)]
    send(hub, bob, {"op": "unsub", "sid": 1})
    assert bp.interest_log == [("t.jobs.>", True), ("t.jobs.>", False)]
