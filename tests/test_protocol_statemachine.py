"""A client and a server Connection driven together by hypothesis (RuleBasedStateMachine).

Two byte pipes join them; a pump moves bytes in random cuts, partly or all the way. The server
side is driven as the broker session drives it (welcome on hello, ok/error for every request,
one delivery per matching publish), the client as the SDK does; rules send hello, sub, unsub,
pub, ping and close from either side and inject garbage into either pipe. Checked throughout:

* no exception escapes ``receive_data`` (any exception fails the run);
* states move only along the documented tables (``RECEIVABLE``/``SENDABLE`` in
  client_sdk/protocol/connection.py): every event a side returns was receivable in its state,
  every send the tables forbid raises ``LocalProtocolError``, transitions are the allowed ones;
* every request the server core receives is answered exactly once: the answers the server
  *driver* gives (ok/error for valid requests, carrying the request's ``sid``/``ack``) arrive in
  request order, and so do the answers the *core* gives by itself (pong for ping, INVALID_TOPIC
  for a bad topic or pattern); deliveries arrive in publish order. The two kinds are not ordered
  with each other: the core queues its answers while it decodes a read, before the driver has
  answered the earlier requests of that read (see the last test below; docs/protocol.md 5.2 has
  clients correlate by id, not by order);
* whatever a core writes is a well-formed frame stream;
* a close (sent, or queued by a protocol failure) ends both sides once the pipes are drained.

The same invariants, with the inputs chosen by a coverage-guided fuzzer instead of by rules, are
in tests/fuzz/fuzz_connection.py.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import msgpack
from helpers_protocol import pattern_st, topic_st
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tessera_mq.client.protocol import (
    Close,
    Connection,
    EndOfStream,
    Error,
    ErrorCode,
    Event,
    Hello,
    InvalidTopic,
    LocalProtocolError,
    Message,
    Ok,
    Ping,
    Pong,
    ProtocolFailure,
    Publish,
    Rejected,
    Role,
    State,
    Subscribe,
    Unsubscribe,
    Welcome,
    matches,
    validate_pattern,
    validate_topic,
)
from tessera_mq.client.protocol.codec import decode, encode_frame
from tessera_mq.client.protocol.connection import RECEIVABLE, SENDABLE
from tessera_mq.client.protocol.framing import FrameDecoder
from tessera_mq.client.protocol.limits import MAX_FRAME_BYTES_CEILING

CLIENT, SERVER = Role.CLIENT, Role.SERVER
HANDSHAKE, OPEN, CLOSING, CLOSED = State.HANDSHAKE, State.OPEN, State.CLOSING, State.CLOSED

#: The moves receive_data may make (CLOSING is entered only by our own close).
ALLOWED_ON_RECEIVE = {
    HANDSHAKE: {HANDSHAKE, OPEN, CLOSED},
    OPEN: {OPEN, CLOSED},
    CLOSING: {CLOSING, CLOSED},
    CLOSED: {CLOSED},
}

#: What a server may send before its welcome.
BEFORE_WELCOME = (Welcome, Error, Close)

WIRE_TYPES = (
    Hello,
    Welcome,
    Subscribe,
    Unsubscribe,
    Publish,
    Message,
    Ok,
    Error,
    Ping,
    Pong,
    Close,
)

#: Garbage that keeps the byte stream in frame: an unknown operation (answered, or ignored by a
#: client; fatal before the session is open), a frame that is not msgpack, an oversize prefix,
#: a map without ``op``, a ``sub`` with a wrong type (the last four are fatal).
FRAMED_GARBAGE = (
    b"\x00\x00\x00\x0b" + msgpack.packb({"op": "later.v2"}),
    b"\x00\x00\x00\x03\xc1\xc1\xc1",
    b"\xff\xff\xff\xff",
    b"\x00\x00\x00\x01\x80",
    b"\x00\x00\x00\x13" + msgpack.packb({"op": "sub", "sid": "1", "pattern": 1}),
)

#: Closes and garbage happen in one draw out of RARE + 1.
RARE = 5

#: Topics and patterns over a tiny alphabet, so that subscriptions and publishes meet.
_token = st.sampled_from(["a", "b"])
small_topics = st.lists(_token, min_size=1, max_size=2).map(".".join)
small_patterns = st.builds(
    lambda toks, tail: ".".join([*toks, *tail]),
    st.lists(_token | st.just("*"), min_size=0, max_size=2),
    st.sampled_from([[], [">"]]),
).filter(bool)
bad_patterns = st.sampled_from(["", "a..b", "a.>.b", "x*", "a b", ">.a", "\x00"])
bad_topics = st.sampled_from(["", "a.*", "a.>", "a..b", "a b", "\x7f"])


def frames_of(data: bytes) -> list[Event]:
    decoder = FrameDecoder(MAX_FRAME_BYTES_CEILING)
    bodies = decoder.feed(data)
    assert decoder.buffered == 0, "a core wrote a partial frame"
    return [decode(b) for b in bodies]


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    pieces = []
    pos = 0
    for n in sizes:
        if pos >= len(data):
            break
        pieces.append(data[pos : pos + n])
        pos += n
    if pos < len(data):
        pieces.append(data[pos:])
    return pieces


@dataclass(frozen=True)
class Answer:
    """An answer the client is owed: ("sid", n), ("ack", n) or ("pong",), and the error code it
    must carry when that is known in advance (INVALID_TOPIC)."""

    key: tuple[object, ...]
    code: ErrorCode | None = None


class Side:
    """One end: its Connection, the bytes on their way to it, and the driver's bookkeeping."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.conn = Connection(role)
        self.inbound = bytearray()  #: bytes sent by the peer, not yet delivered here
        self.eof_pending = False  #: the peer closed its transport after those bytes
        self.eof_seen = False
        self.tainted = False  #: raw garbage went into ``inbound``: the stream may be out of frame
        self.events: list[Event] = []


class TwoConnections(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.client = Side(CLIENT)
        self.server = Side(SERVER)
        self.hello_sent = False
        # The answers the client is owed, in request order, in two queues: those the server
        # *driver* gives (ok/error for valid requests) and those the server *core* gives by itself
        # while decoding (pong, INVALID_TOPIC). Each queue is answered in order; the core's can
        # overtake the driver's within one read (see the module docstring).
        self.owed_by_driver: deque[Answer] = deque()
        self.owed_by_core: deque[Answer] = deque()
        self.server_pongs_due = 0
        self.subs: dict[int, str] = {}  #: the server driver's live subscriptions
        #: Deliveries the server sent, in order, that the client has not received yet.
        self.deliveries_due: deque[tuple[str, bytes]] = deque()
        self.close_sent = {CLIENT: False, SERVER: False}

    # --- plumbing ---------------------------------------------------------------------------

    def side(self, role: Role) -> Side:
        return self.client if role is CLIENT else self.server

    def peer(self, role: Role) -> Side:
        return self.server if role is CLIENT else self.client

    def flush(self, role: Role) -> None:
        """Move what ``role``'s core queued into the pipe to its peer; a core that is closed
        has its transport closed by the driver after that."""
        me, other = self.side(role), self.peer(role)
        out = me.conn.data_to_send()
        frames_of(out)  # a core only ever writes whole, decodable frames
        other.inbound += out
        if me.conn.closed:
            other.eof_pending = True

    def send(self, role: Role, event: Event) -> None:
        me = self.side(role)
        state = me.conn.state
        assert type(event) in SENDABLE[role, state]
        me.conn.send(event)
        if isinstance(event, Close):
            assert me.conn.state is CLOSING
        else:
            assert me.conn.state is state
        self.flush(role)

    def deliver(self, role: Role, sizes: list[int], limit: int | None) -> None:
        """Deliver up to ``limit`` bytes (all if None) of what is on its way to ``role``."""
        me = self.side(role)
        n = len(me.inbound) if limit is None else min(limit, len(me.inbound))
        data = bytes(me.inbound[:n])
        del me.inbound[:n]
        for piece in cut(data, sizes):
            self.receive(role, piece)
        if me.eof_pending and not me.inbound and not me.eof_seen:
            me.eof_seen = True
            self.receive(role, b"")

    def receive(self, role: Role, data: bytes) -> None:
        me = self.side(role)
        before = me.conn.state
        events = me.conn.receive_data(data)  # must never raise
        after = me.conn.state
        if not data:
            assert len(events) == 1 and isinstance(events[0], EndOfStream), events
            assert after is CLOSED
            closed_normally = self.close_sent[role] or any(isinstance(e, Close) for e in me.events)
            failed = any(isinstance(e, ProtocolFailure) for e in me.events)
            assert events[0].clean == (closed_normally and not failed), (events, me.events)
        else:
            assert after in ALLOWED_ON_RECEIVE[before], (role, before, after)
            if before is CLOSED:
                assert events == []
        receivable = set(RECEIVABLE.get((role, before), ()))
        if before is HANDSHAKE:
            receivable |= RECEIVABLE[role, OPEN]
        for i, event in enumerate(events):
            if isinstance(event, WIRE_TYPES) and not isinstance(event, Close):
                assert before is not CLOSING, f"{event!r} while closing"
                assert type(event) in receivable, (role, before, event)
            if isinstance(event, ProtocolFailure | Close):
                assert i == len(events) - 1 and after is CLOSED, events
        me.events += events
        if role is SERVER:
            self.drive_server(events)
        else:
            self.drive_client(events)
        self.flush(role)

    # --- the drivers ------------------------------------------------------------------------

    def drive_server(self, events: list[Event]) -> None:
        conn = self.server.conn
        for event in events:
            if conn.state is not OPEN:
                # The same read carried the client's close (or broke the stream) after this
                # request: there is no one left to answer (send would raise LocalProtocolError).
                break
            if isinstance(event, Hello):
                conn.send(Welcome(server="statemachine", max_frame=256 * 1024))
            elif isinstance(event, Subscribe):
                if event.sid in self.subs:
                    conn.send(Error(ErrorCode.INVALID_SUBSCRIPTION, "in use", sid=event.sid))
                else:
                    self.subs[event.sid] = event.pattern
                    conn.send(Ok(sid=event.sid))
            elif isinstance(event, Unsubscribe):
                if self.subs.pop(event.sid, None) is None:
                    conn.send(Error(ErrorCode.INVALID_SUBSCRIPTION, "unknown", sid=event.sid))
                else:
                    conn.send(Ok(sid=event.sid))
            elif isinstance(event, Publish):
                if any(matches(p, event.topic) for p in self.subs.values()):
                    conn.send(Message(event.topic, event.payload, event.headers))
                    self.deliveries_due.append((event.topic, event.payload))
                if event.ack is not None:
                    conn.send(Ok(ack=event.ack))
            elif isinstance(event, Pong):
                if not (self.server.tainted or self.client.tainted):
                    assert self.server_pongs_due > 0, "a pong nobody asked for"
                self.server_pongs_due -= 1

    def drive_client(self, events: list[Event]) -> None:
        for event in events:
            key: tuple[object, ...] | None = None
            if isinstance(event, Ok | Error):
                if event.sid is not None:
                    key = ("sid", event.sid)
                elif event.ack is not None:
                    key = ("ack", event.ack)
            elif isinstance(event, Pong):
                key = ("pong",)
            elif isinstance(event, Message) and not self.client.tainted:
                assert self.deliveries_due, f"unexpected delivery {event!r}"
                sent = self.deliveries_due.popleft()
                assert (event.topic, event.payload) == sent, "deliveries out of order"
            if key is None or self.client.tainted or self.server.tainted:
                continue
            code = event.code if isinstance(event, Error) else None
            # The core's INVALID_TOPIC answers first: a driver never sends that code, and the
            # same sid may be owed by both queues at once.
            for owed in (self.owed_by_core, self.owed_by_driver):
                if owed and owed[0].key == key and owed[0].code in (None, code):
                    owed.popleft()
                    break
            else:
                raise AssertionError(
                    f"answer {event!r} out of order or to nothing; owed by the driver: "
                    f"{list(self.owed_by_driver)}, by the core: {list(self.owed_by_core)}"
                )

    # --- rules: the client ------------------------------------------------------------------

    def client_open(self) -> bool:
        return self.client.conn.state is OPEN

    @initialize(open_now=st.sampled_from([True, True, True, False]))
    def start(self, open_now: bool) -> None:
        """Most runs start with the session open (hello, welcome); the others leave the
        handshake to the rules."""
        if open_now:
            self.hello()
            self.drain([])
            assert self.client.conn.state is OPEN and self.server.conn.state is OPEN

    @precondition(lambda self: not self.hello_sent and self.client.conn.state is HANDSHAKE)
    @rule()
    def hello(self) -> None:
        self.hello_sent = True
        self.send(CLIENT, Hello(client="statemachine/1"))

    @precondition(client_open)
    @rule(
        sid=st.integers(0, 5),
        pattern=st.one_of(small_patterns, small_patterns, pattern_st, bad_patterns),
        then_pump=st.booleans(),
    )
    def subscribe(self, sid: int, pattern: str, then_pump: bool) -> None:
        self.send(CLIENT, Subscribe(sid, pattern))
        try:
            validate_pattern(pattern)
        except InvalidTopic:
            self.owed_by_core.append(Answer(("sid", sid), ErrorCode.INVALID_TOPIC))
        else:
            self.owed_by_driver.append(Answer(("sid", sid)))
        self.maybe_pump(then_pump)

    @precondition(client_open)
    @rule(sid=st.integers(0, 5), then_pump=st.booleans())
    def unsubscribe(self, sid: int, then_pump: bool) -> None:
        self.send(CLIENT, Unsubscribe(sid))
        self.owed_by_driver.append(Answer(("sid", sid)))
        self.maybe_pump(then_pump)

    @precondition(client_open)
    @rule(
        topic=st.one_of(small_topics, small_topics, topic_st, bad_topics),
        payload=st.binary(max_size=64),
        ack=st.none() | st.integers(0, 2**32 - 1),
        then_pump=st.booleans(),
    )
    def publish(self, topic: str, payload: bytes, ack: int | None, then_pump: bool) -> None:
        self.send(CLIENT, Publish(topic, payload, ack=ack))
        if ack is not None:
            try:
                validate_topic(topic)
            except InvalidTopic:
                self.owed_by_core.append(Answer(("ack", ack), ErrorCode.INVALID_TOPIC))
            else:
                self.owed_by_driver.append(Answer(("ack", ack)))
        self.maybe_pump(then_pump)

    @precondition(lambda self: self.client_open() and self.subs)
    @rule(data=st.data(), payload=st.binary(max_size=16), then_pump=st.booleans())
    def publish_to_a_subscription(
        self, data: st.DataObject, payload: bytes, then_pump: bool
    ) -> None:
        """A publish that a live subscription matches (so deliveries are common)."""
        pattern = data.draw(st.sampled_from(sorted(self.subs.values())))
        tokens = ["a" if t == "*" else "a.b" if t == ">" else t for t in pattern.split(".")]
        self.publish(".".join(tokens), payload, None, then_pump)

    @precondition(client_open)
    @rule(then_pump=st.booleans())
    def client_ping(self, then_pump: bool) -> None:
        self.send(CLIENT, Ping())
        self.owed_by_core.append(Answer(("pong",)))
        self.maybe_pump(then_pump)

    def maybe_pump(self, then_pump: bool) -> None:
        """Deliver the request and its answers now (so that runs in which hypothesis' swarm
        testing disabled the pump rules still get their requests processed)."""
        if then_pump:
            self.drain([])

    # --- rules: the server ------------------------------------------------------------------

    @precondition(lambda self: self.server.conn.state is OPEN and self.server.conn._welcome_sent)
    @rule()
    def server_ping(self) -> None:
        self.send(SERVER, Ping())
        self.server_pongs_due += 1

    # --- rules: either side -----------------------------------------------------------------

    @rule(
        role=st.sampled_from([CLIENT, SERVER]),
        code=st.sampled_from(list(ErrorCode)),
        roll=st.integers(0, RARE),
    )
    def close(self, role: Role, code: ErrorCode, roll: int) -> None:
        if roll:
            return  # rare, so that most runs get far before a close ends them
        conn = self.side(role).conn
        if conn.state in (HANDSHAKE, OPEN):
            self.send(role, Close(code, "statemachine"))
            self.close_sent[role] = True
        else:
            try:
                conn.send(Close(code))
            except LocalProtocolError:
                return
            raise AssertionError(f"sent close in state {conn.state}")

    @rule(
        role=st.sampled_from([CLIENT, SERVER]),
        kind=st.sampled_from(WIRE_TYPES),
    )
    def forbidden_send(self, role: Role, kind: type) -> None:
        """Whatever the tables forbid raises LocalProtocolError and changes nothing."""
        conn = self.side(role).conn
        legal = (
            kind in SENDABLE.get((role, conn.state), frozenset())
            and not (role is SERVER and not conn._welcome_sent and kind not in BEFORE_WELCOME)
            and not (kind is Hello and self.hello_sent)
            and not (kind is Welcome and conn._welcome_sent)
        )
        if legal:
            return  # the other rules send what is legal
        event = {
            Hello: Hello(),
            Welcome: Welcome(),
            Subscribe: Subscribe(1, "a"),
            Unsubscribe: Unsubscribe(1),
            Publish: Publish("a", b""),
            Message: Message("a", b""),
            Ok: Ok(),
            Error: Error(1),
            Ping: Ping(),
            Pong: Pong(),
            Close: Close(),
        }[kind]
        state = conn.state
        queued = conn.has_data_to_send
        try:
            conn.send(event)
        except LocalProtocolError:
            pass
        else:
            raise AssertionError(f"{role.value} sent {kind.__name__} in state {state.value}")
        assert conn.state is state
        assert conn.has_data_to_send == queued

    @rule(
        role=st.sampled_from([CLIENT, SERVER]),
        garbage=st.sampled_from(FRAMED_GARBAGE) | st.binary(min_size=1, max_size=24),
        roll=st.integers(0, RARE),
    )
    def inject_garbage(self, role: Role, garbage: bytes, roll: int) -> None:
        """Garbage on its way to ``role``, appended at a frame boundary. An unknown operation
        is answered with an error that names no request (not in the expected answers)."""
        me = self.side(role)
        if roll or me.eof_pending:
            return
        if garbage not in FRAMED_GARBAGE:
            me.tainted = True
        me.inbound += garbage

    @rule(
        role=st.sampled_from([CLIENT, SERVER]),
        sizes=st.lists(st.integers(1, 40), max_size=6),
        limit=st.none() | st.integers(0, 80),
    )
    def pump(self, role: Role, sizes: list[int], limit: int | None) -> None:
        self.deliver(role, sizes, limit)

    @rule(sizes=st.lists(st.integers(1, 40), max_size=6))
    def settle(self, sizes: list[int]) -> None:
        """Deliver everything both ways until nothing moves, then check the quiet state."""
        self.drain(sizes)
        self.check_quiet()

    def drain(self, sizes: list[int]) -> None:
        for _ in range(20):
            moved = False
            for role in (SERVER, CLIENT):
                me = self.side(role)
                if me.inbound or (me.eof_pending and not me.eof_seen):
                    self.deliver(role, sizes, None)
                    moved = True
            if not moved:
                return
        raise AssertionError("the pipes did not drain")

    def check_quiet(self) -> None:
        client, server = self.client.conn, self.server.conn
        if CLOSED in (client.state, server.state) or CLOSING in (client.state, server.state):
            # A close, sent or queued by a failure, ends both sides once the pipes are drained.
            stuck = self.client.tainted or self.server.tainted
            if not stuck:
                assert client.state is CLOSED and server.state is CLOSED, (
                    client.state,
                    server.state,
                )
            return
        if self.client.tainted or self.server.tainted:
            return
        if client.state is OPEN and server.state is OPEN:
            assert not self.owed_by_driver, f"unanswered: {list(self.owed_by_driver)}"
            assert not self.owed_by_core, f"unanswered: {list(self.owed_by_core)}"
            assert self.server_pongs_due == 0
            assert not self.deliveries_due, f"not delivered: {list(self.deliveries_due)}"

    @invariant()
    def closed_stays_silent(self) -> None:
        for side in (self.client, self.server):
            if side.conn.closed:
                assert not side.conn.has_data_to_send
            failures = [e for e in side.events if isinstance(e, ProtocolFailure)]
            assert len(failures) <= 1
            if failures:
                assert side.conn.state is CLOSED and side.conn.failure is not None

    def teardown(self) -> None:
        # Everything in flight is delivered and answered; then EOF both ways ends both sides.
        self.drain([])
        self.check_quiet()
        for side in (self.client, self.server):
            if not side.eof_seen:
                side.eof_seen = True
                events = side.conn.receive_data(b"")
                assert len(events) == 1 and isinstance(events[0], EndOfStream)
            assert side.conn.state is CLOSED


TwoConnections.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_two_connections = TwoConnections.TestCase


# --- two facts about the driver contract, found by the machine above ------------------------------


def test_requests_in_the_same_read_as_a_close_come_with_the_connection_closed() -> None:
    """A peer may pipeline requests and its close in one write. ``receive_data`` returns them all,
    and the connection is already closed: a driver must check ``state`` before answering (an
    answer raises LocalProtocolError). The broker session once did not (test_fuzz_smoke.py)."""
    server = Connection(SERVER)
    data = b"".join(
        encode_frame(e)
        for e in (Hello(), Subscribe(1, "a.>"), Publish("a.b", b"x", ack=2), Close(0, "bye"))
    )
    events = server.receive_data(data)
    assert events == [Hello(), Subscribe(1, "a.>"), Publish("a.b", b"x", ack=2), Close(0, "bye")]
    assert server.state is CLOSED
    for answer in (Welcome(), Ok(sid=1), Ok(ack=2)):
        try:
            server.send(answer)
        except LocalProtocolError:
            continue
        raise AssertionError(f"{answer!r} was accepted after the peer's close")


def test_core_answers_can_overtake_driver_answers_in_one_read() -> None:
    """[pub(ack=1), ping, sub(2, bad pattern)] in one read: the core queues pong and the
    INVALID_TOPIC error while decoding, so they go out before the driver's ok(ack=1)."""
    server = Connection(SERVER)
    server.receive_data(encode_frame(Hello()))
    server.send(Welcome())
    server.data_to_send()
    data = b"".join(
        encode_frame(e) for e in (Publish("a.b", b"x", ack=1), Ping(), Subscribe(2, "a..b"))
    )
    events = server.receive_data(data)
    assert [type(e) for e in events] == [Publish, Ping, Rejected]
    server.send(Ok(ack=1))  # the driver answers the publish after receive_data returned
    out = frames_of(server.data_to_send())
    assert [type(e) for e in out] == [Pong, Error, Ok]
