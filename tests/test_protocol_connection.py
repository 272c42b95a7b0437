"""The connection state machine, without sockets or an event loop: a client/server pair moves
bytes between two Connection objects, whole and byte by byte; the receive and send tables are
checked for every (role, state, operation); peer input never raises."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
from helpers_protocol import (
    STRATEGIES,
    WIRE_TYPES,
    Pair,
    body,
    bytewise,
    decode_stream,
    events_st,
    frame,
    open_client,
    open_server,
    sample,
    whole,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera_mq.client.protocol import (
    Close,
    Connection,
    EndOfStream,
    Error,
    ErrorCode,
    Event,
    Hello,
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
)
from tessera_mq.client.protocol.codec import OPS, encode_frame, encode_message_frame
from tessera_mq.client.protocol.connection import negotiate_version
from tessera_mq.client.protocol.limits import (
    MAX_FRAME_BYTES,
    MAX_FRAME_BYTES_BEFORE_HELLO,
    MAX_FRAME_BYTES_CEILING,
    MAX_REASON_BYTES,
)

CLIENT, SERVER = Role.CLIENT, Role.SERVER
HANDSHAKE, OPEN, CLOSING, CLOSED = State.HANDSHAKE, State.OPEN, State.CLOSING, State.CLOSED

CHUNKERS: dict[str, Callable[[bytes], Iterable[bytes]]] = {"whole": whole, "bytewise": bytewise}


@pytest.fixture(params=list(CHUNKERS))
def chunker(request: pytest.FixtureRequest) -> Callable[[bytes], Iterable[bytes]]:
    return CHUNKERS[request.param]


def sent(conn: Connection) -> list[Event]:
    """Decode what ``conn`` has queued for its peer (and forget it)."""
    return decode_stream(conn.data_to_send())


def failed_with(conn: Connection, events: list[Event], code: ErrorCode) -> None:
    """The connection failed because of its peer: one ProtocolFailure, a close frame, CLOSED."""
    assert len(events) >= 1
    assert isinstance(events[-1], ProtocolFailure), events
    assert events[-1].code is code
    assert conn.state is CLOSED
    assert conn.failure is not None
    assert conn.failure.code is code
    out = sent(conn)
    assert isinstance(out[-1], Close), out
    assert out[-1].code == code
    assert len(out[-1].reason) <= MAX_REASON_BYTES


# --- a whole session, whole and byte by byte --------------------------------------------------


def test_session(chunker: Callable[[bytes], Iterable[bytes]]) -> None:
    pair = Pair(chunker)
    _, at_client = pair.open(Welcome(server="s", mechanism="x509", identity="alice"))
    assert at_client == [Welcome(server="s", mechanism="x509", identity="alice")]
    assert pair.client.state is OPEN
    assert pair.server.state is OPEN

    assert pair.send(CLIENT, Subscribe(1, "status.>"), Subscribe(2, "status.*")) == [
        Subscribe(1, "status.>"),
        Subscribe(2, "status.*"),
    ]
    assert pair.send(SERVER, Ok(sid=1), Ok(sid=2)) == [Ok(sid=1), Ok(sid=2)]

    pub = Publish("status.eu", b"up", {"enc": "text"}, ack=3)
    assert pair.send(CLIENT, pub, Publish("status.us", b"down")) == [
        pub,
        Publish("status.us", b"down"),
    ]
    # The broker encodes a delivery once and writes the same bytes to each subscriber.
    delivery = encode_message_frame(pub.topic, pub.payload, pub.headers)
    events: list[Event] = []
    for chunk in chunker(delivery + delivery):
        events += pair.client.receive_data(chunk)
    assert events == [Message("status.eu", b"up", {"enc": "text"})] * 2
    assert pair.send(SERVER, Ok(ack=3), Message("status.us", b"down")) == [
        Ok(ack=3),
        Message("status.us", b"down"),
    ]

    assert pair.send(CLIENT, Unsubscribe(2), Ping()) == [Unsubscribe(2), Ping()]
    assert pair.deliver(SERVER) == [Pong()]  # the server's core answered the ping itself
    assert pair.send(SERVER, Ok(sid=2)) == [Ok(sid=2)]

    assert pair.send(CLIENT, Close(ErrorCode.NORMAL, "done")) == [Close(0, "done")]
    assert pair.client.state is CLOSING
    assert pair.server.state is CLOSED
    # The receiver of a close closes the transport; both ends see a clean end of stream.
    assert pair.server.receive_data(b"") == [EndOfStream(clean=True)]
    assert pair.client.receive_data(b"") == [EndOfStream(clean=True)]
    assert pair.client.state is CLOSED


def test_server_close_going_away(chunker: Callable[[bytes], Iterable[bytes]]) -> None:
    pair = Pair(chunker)
    pair.open()
    assert pair.send(SERVER, Close(ErrorCode.GOING_AWAY, "bye")) == [Close(13, "bye")]
    assert pair.client.state is CLOSED
    assert pair.client.failure is None
    assert pair.client.receive_data(b"") == [EndOfStream(clean=True)]


# --- what may be received in each state (every role x state x operation) ----------------------

#: What each side may receive in each state, written out independently of the implementation.
RECEIVABLE: dict[tuple[Role, State], set[type[Any]]] = {
    (SERVER, HANDSHAKE): {Hello, Close},
    (SERVER, OPEN): {Subscribe, Unsubscribe, Publish, Ping, Pong, Close},
    (CLIENT, HANDSHAKE): {Welcome, Error, Close},
    (CLIENT, OPEN): {Message, Ok, Error, Ping, Pong, Close},
}


def in_state(role: Role, state: State) -> Connection:
    """A connection in ``state``: HANDSHAKE (a client has sent hello), OPEN, CLOSING or CLOSED."""
    if state is HANDSHAKE:
        conn = Connection(role)
        if role is CLIENT:
            conn.send(Hello())
            conn.data_to_send()
        return conn
    conn = open_client() if role is CLIENT else open_server()
    if state is CLOSING:
        conn.send(Close())
        conn.data_to_send()
    elif state is CLOSED:
        conn.receive_data(encode_frame(Close()))
    assert conn.state is state
    return conn


def after_accepting(role: Role, state: State, kind: type[Any]) -> State:
    if kind is Close:
        return CLOSED
    if state is HANDSHAKE and kind in (Hello, Welcome):
        return OPEN
    return state


@pytest.mark.parametrize("kind", WIRE_TYPES, ids=lambda k: OPS[k])
@pytest.mark.parametrize("state", [HANDSHAKE, OPEN], ids=lambda s: s.value)
@pytest.mark.parametrize("role", [CLIENT, SERVER], ids=lambda r: r.value)
def test_receive_table(role: Role, state: State, kind: type[Any]) -> None:
    conn = in_state(role, state)
    event = sample(kind)
    events = conn.receive_data(encode_frame(event))
    if kind in RECEIVABLE[role, state]:
        assert events == [event]
        assert conn.failure is None
        assert conn.state is after_accepting(role, state, kind)
        assert sent(conn) == ([Pong()] if kind is Ping else [])
    else:
        # Not allowed here: the connection fails with a close frame; nothing is raised.
        code = ErrorCode.NOT_READY if state is HANDSHAKE else ErrorCode.PROTOCOL_ERROR
        assert events == [ProtocolFailure(code, events[0].message)]  # type: ignore[union-attr]
        failed_with(conn, events, code)
        assert OPS[kind] in events[0].message  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", WIRE_TYPES, ids=lambda k: OPS[k])
@pytest.mark.parametrize("role", [CLIENT, SERVER], ids=lambda r: r.value)
def test_closing_drops_everything_but_close(role: Role, kind: type[Any]) -> None:
    conn = in_state(role, CLOSING)
    events = conn.receive_data(encode_frame(sample(kind)))
    assert sent(conn) == []  # no pong, no error, no second close
    assert conn.failure is None
    if kind is Close:
        assert events == [sample(Close)]
        assert conn.state is CLOSED
    else:
        assert events == []
        assert conn.state is CLOSING


@pytest.mark.parametrize("kind", WIRE_TYPES, ids=lambda k: OPS[k])
@pytest.mark.parametrize("role", [CLIENT, SERVER], ids=lambda r: r.value)
def test_closed_reads_nothing(role: Role, kind: type[Any]) -> None:
    conn = in_state(role, CLOSED)
    assert conn.receive_data(encode_frame(sample(kind))) == []
    assert conn.receive_data(b"\xff\xff\xff\xff garbage") == []
    assert sent(conn) == []


@given(data=st.data())
@settings(deadline=None, max_examples=100)
def test_receive_table_with_random_events(data: st.DataObject) -> None:
    # Any instance of an operation not allowed in the state fails the connection the same way.
    role = data.draw(st.sampled_from([CLIENT, SERVER]))
    state = data.draw(st.sampled_from([HANDSHAKE, OPEN]))
    kind = data.draw(st.sampled_from([k for k in WIRE_TYPES if k not in RECEIVABLE[role, state]]))
    event = data.draw(STRATEGIES[kind])
    conn = in_state(role, state)
    events = conn.receive_data(encode_frame(event))
    code = ErrorCode.NOT_READY if state is HANDSHAKE else ErrorCode.PROTOCOL_ERROR
    failed_with(conn, events, code)


# --- what may be sent in each state ------------------------------------------------------------

#: What each side may send, written out independently of the implementation. "WELCOMING" is a
#: server that has received hello but not yet sent its welcome.
SENDABLE: dict[tuple[Role, str], set[type[Any]]] = {
    (CLIENT, "handshake"): {Hello, Close},
    (CLIENT, "open"): {Subscribe, Unsubscribe, Publish, Ping, Pong, Close},
    (CLIENT, "closing"): set(),
    (CLIENT, "closed"): set(),
    (SERVER, "handshake"): {Error, Close},
    (SERVER, "welcoming"): {Welcome, Error, Close},
    (SERVER, "open"): {Message, Ok, Error, Ping, Pong, Close},
    (SERVER, "closing"): set(),
    (SERVER, "closed"): set(),
}


def for_sending(role: Role, where: str) -> Connection:
    if where == "handshake":
        return Connection(role)  # a client that has not sent hello yet
    if where == "welcoming":
        conn = Connection(SERVER)
        conn.receive_data(encode_frame(Hello()))
        return conn
    return in_state(role, State(where))


@pytest.mark.parametrize("kind", [*WIRE_TYPES, Rejected, ProtocolFailure, EndOfStream])
@pytest.mark.parametrize(("role", "where"), list(SENDABLE), ids=lambda v: getattr(v, "value", v))
def test_send_table(role: Role, where: str, kind: type[Any]) -> None:
    conn = for_sending(role, where)
    state = conn.state
    event = (
        sample(kind)
        if kind in WIRE_TYPES
        else EndOfStream()
        if kind is EndOfStream
        else kind(ErrorCode.PROTOCOL_ERROR, "x")
    )
    if kind in SENDABLE[role, where]:
        conn.send(event)
        assert sent(conn) == [event]
        assert conn.state is (CLOSING if kind is Close else state)
    else:
        with pytest.raises(LocalProtocolError):
            conn.send(event)
        assert conn.data_to_send() == b""
        assert conn.state is state


def test_hello_and_welcome_only_once() -> None:
    client = Connection(CLIENT)
    client.send(Hello())
    with pytest.raises(LocalProtocolError, match="already"):
        client.send(Hello())
    server = for_sending(SERVER, "welcoming")
    server.send(Welcome())
    with pytest.raises(LocalProtocolError, match="welcome"):
        server.send(Welcome())


# --- hello / welcome: versions and limits ------------------------------------------------------


@pytest.mark.parametrize(("offered", "agreed"), [(1, 1), (2, 1), (2**32 - 1, 1), (0, None)])
def test_negotiate_version(offered: int, agreed: int | None) -> None:
    assert negotiate_version(offered) == agreed


def test_newer_client_gets_version_1(chunker: Callable[[bytes], Iterable[bytes]]) -> None:
    pair = Pair(chunker)
    assert pair.send(CLIENT, Hello(version=2)) == [Hello(version=2)]
    assert pair.server.version == 1
    at_client = pair.send(SERVER, Welcome(version=pair.server.version))
    assert at_client == [Welcome(version=1)]
    assert pair.client.version == 1


def test_unsupported_version_closes() -> None:
    server = Connection(SERVER)
    events = server.receive_data(encode_frame(Hello(version=0)))
    failed_with(server, events, ErrorCode.UNSUPPORTED_VERSION)


@pytest.mark.parametrize("version", [0, 2, 99])
def test_client_refuses_a_welcome_in_another_version(version: int) -> None:
    client = in_state(CLIENT, HANDSHAKE)
    events = client.receive_data(encode_frame(Welcome(version=version)))
    failed_with(client, events, ErrorCode.UNSUPPORTED_VERSION)


def test_client_refuses_a_frame_limit_below_64_kib() -> None:
    client = in_state(CLIENT, HANDSHAKE)
    events = client.receive_data(encode_frame(Welcome(max_frame=MAX_FRAME_BYTES_BEFORE_HELLO - 1)))
    failed_with(client, events, ErrorCode.PROTOCOL_ERROR)
    ok = in_state(CLIENT, HANDSHAKE)
    assert ok.receive_data(encode_frame(Welcome(max_frame=MAX_FRAME_BYTES_BEFORE_HELLO))) == [
        Welcome(max_frame=MAX_FRAME_BYTES_BEFORE_HELLO)
    ]


def padded_hello(size: int) -> bytes:
    """A hello frame whose body is exactly ``size`` bytes (an unknown key carries padding)."""
    base = len(body({"op": "hello", "version": 1, "pad": b""}))
    pad = size - base
    for _ in range(3):  # the bin header grows with the padding
        b = body({"op": "hello", "version": 1, "pad": b"p" * pad})
        pad -= len(b) - size
    b = body({"op": "hello", "version": 1, "pad": b"p" * pad})
    assert len(b) == size
    return frame(b)


def sized_publish(size: int, **kwargs: Any) -> Publish:
    """A publish whose body is exactly ``size`` bytes."""
    pad = size
    for _ in range(4):
        pub = Publish("t", b"x" * pad, **kwargs)
        pad -= len(encode_frame(pub)) - 4 - size
    pub = Publish("t", b"x" * pad, **kwargs)
    assert len(encode_frame(pub)) - 4 == size
    return pub


def test_frame_limit_before_hello() -> None:
    server = Connection(SERVER)
    assert server.receive_data(padded_hello(MAX_FRAME_BYTES_BEFORE_HELLO)) == [Hello()]
    stranger = Connection(SERVER)
    # Only the length prefix of an oversize frame: refused before any of its body arrives.
    events = stranger.receive_data((MAX_FRAME_BYTES_BEFORE_HELLO + 1).to_bytes(4, "big"))
    failed_with(stranger, events, ErrorCode.FRAME_TOO_LARGE)


def test_frame_limit_after_hello() -> None:
    server = open_server()
    big = sized_publish(MAX_FRAME_BYTES)
    assert server.receive_data(encode_frame(big)) == [big]
    events = server.receive_data((MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    failed_with(server, events, ErrorCode.FRAME_TOO_LARGE)


def test_configured_frame_limits() -> None:
    server = open_server(max_frame=100_000, max_frame_before_hello=2048)
    pub = sized_publish(100_000)
    assert server.receive_data(encode_frame(pub)) == [pub]
    failed_with(
        server, server.receive_data((100_001).to_bytes(4, "big")), ErrorCode.FRAME_TOO_LARGE
    )
    stranger = Connection(SERVER, max_frame_before_hello=2048)
    failed_with(stranger, stranger.receive_data(padded_hello(2049)), ErrorCode.FRAME_TOO_LARGE)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_frame_before_hello": 0},
        {"max_frame": 1000, "max_frame_before_hello": 1001},
        {"max_frame": MAX_FRAME_BYTES_CEILING + 1},
    ],
)
def test_bad_limits(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="max_frame"):
        Connection(SERVER, **kwargs)


def test_client_frame_limits() -> None:
    client = in_state(CLIENT, HANDSHAKE)
    events = client.receive_data((MAX_FRAME_BYTES_BEFORE_HELLO + 1).to_bytes(4, "big"))
    failed_with(client, events, ErrorCode.FRAME_TOO_LARGE)
    # After welcome the client accepts the larger of its own limit and the broker's.
    big = open_client(Welcome(max_frame=2 * MAX_FRAME_BYTES))
    msg = Message("t", b"x" * (2 * MAX_FRAME_BYTES - 100))
    assert big.receive_data(encode_frame(msg)) == [msg]
    small = open_client(Welcome(max_frame=MAX_FRAME_BYTES_BEFORE_HELLO))
    msg = Message("t", b"x" * (MAX_FRAME_BYTES - 100))
    assert small.receive_data(encode_frame(msg)) == [msg]


def test_client_refuses_a_publish_above_the_brokers_limit() -> None:
    client = open_client(Welcome(max_frame=100_000))
    assert client.peer_max_frame == 100_000
    fits = sized_publish(100_000, ack=1)
    client.send(fits)
    assert sent(client) == [fits]
    with pytest.raises(LocalProtocolError, match="100001 bytes exceeds"):
        client.send(sized_publish(100_001, ack=2))
    assert client.data_to_send() == b""
    assert client.state is OPEN
    client.send(Ping())  # still usable
    assert sent(client) == [Ping()]


def test_server_sends_deliveries_up_to_its_announced_limit() -> None:
    server = for_sending(SERVER, "welcoming")
    server.send(Welcome(max_frame=200_000))
    server.data_to_send()
    msg = Message("t", b"x" * 150_000)  # above the 64 KiB pre-hello limit
    server.send(msg)
    assert sent(server) == [msg]
    with pytest.raises(LocalProtocolError, match="client's limit"):
        server.send(Message("t", b"x" * 200_001))


@pytest.mark.parametrize("cut", [None, 0, 10, 5000])
def test_hello_pipelined_with_a_big_publish(cut: int | None) -> None:
    # Frames behind hello are decoded under the limit that hello unlocks, however they are cut.
    pub = encode_frame(sized_publish(200_000))
    hello = encode_frame(Hello())
    chunks = [hello + pub] if cut is None else [hello + pub[:cut], pub[cut:]]
    server = Connection(SERVER)
    events: list[Event] = []
    for chunk in chunks:
        events += server.receive_data(chunk)
    assert [type(e) for e in events] == [Hello, Publish]


# --- requests the broker answers without closing -----------------------------------------------


def test_unknown_operation_is_answered_and_the_connection_stays_open(
    chunker: Callable[[bytes], Iterable[bytes]],
) -> None:
    pair = Pair(chunker)
    pair.open()
    events: list[Event] = []
    for chunk in chunker(frame({"op": "subscribe", "sid": 1}) + encode_frame(Ping())):
        events += pair.server.receive_data(chunk)
    assert events == [
        Rejected(ErrorCode.UNKNOWN_OPERATION, "unknown operation 'subscribe'"),
        Ping(),
    ]
    assert sent(pair.server) == [
        Error(ErrorCode.UNKNOWN_OPERATION, "unknown operation 'subscribe'"),
        Pong(),
    ]
    assert pair.server.state is OPEN


def test_client_ignores_an_unknown_operation() -> None:
    # A client cannot send error frames: it reports the frame and carries on.
    client = open_client()
    events = client.receive_data(frame({"op": "gossip"}) + encode_frame(Ok(sid=1)))
    assert events == [
        Rejected(ErrorCode.UNKNOWN_OPERATION, "unknown operation 'gossip'"),
        Ok(sid=1),
    ]
    assert sent(client) == []
    assert client.state is OPEN


@pytest.mark.parametrize("role", [CLIENT, SERVER], ids=lambda r: r.value)
def test_unknown_operation_before_the_session_is_open_is_fatal(role: Role) -> None:
    conn = in_state(role, HANDSHAKE)
    failed_with(conn, conn.receive_data(frame({"op": "nope"})), ErrorCode.UNKNOWN_OPERATION)


@pytest.mark.parametrize("ack", [None, 0, 77])
def test_publish_to_an_invalid_topic_is_answered(ack: int | None) -> None:
    server = open_server()
    events = server.receive_data(
        encode_frame(Publish("a.*", b"p", ack=ack)) + encode_frame(Publish("a.b", b"p"))
    )
    assert len(events) == 2
    assert isinstance(events[0], Rejected)
    assert events[0].code is ErrorCode.INVALID_TOPIC
    assert events[0].ack == ack
    assert events[1] == Publish("a.b", b"p")
    [answer] = sent(server)
    assert answer == Error(ErrorCode.INVALID_TOPIC, events[0].message, ack=ack)
    assert answer.topic is None  # an invalid topic is not echoed back
    assert server.state is OPEN


@pytest.mark.parametrize("pattern", ["a..b", "a.>.b", "x*", "", "a b", "a." * 20 + "a"])
def test_subscribe_to_an_invalid_pattern_is_answered(pattern: str) -> None:
    server = open_server()
    events = server.receive_data(encode_frame(Subscribe(9, pattern)))
    assert len(events) == 1
    assert isinstance(events[0], Rejected)
    assert (events[0].code, events[0].sid) == (ErrorCode.INVALID_TOPIC, 9)
    assert sent(server) == [Error(ErrorCode.INVALID_TOPIC, events[0].message, sid=9)]
    assert server.state is OPEN


def test_configured_topic_limits_apply_to_requests() -> None:
    server = open_server(max_topic_bytes=8, max_topic_tokens=2)
    events = server.receive_data(
        encode_frame(Publish("a.b", b""))
        + encode_frame(Publish("a.b.c", b"", ack=1))
        + encode_frame(Subscribe(1, "123456789"))
    )
    assert events[0] == Publish("a.b", b"")
    assert [type(e) for e in events[1:]] == [Rejected, Rejected]
    assert [(e.code, e.ack, e.sid) for e in sent(server)] == [  # type: ignore[union-attr]
        (ErrorCode.INVALID_TOPIC, 1, None),
        (ErrorCode.INVALID_TOPIC, None, 1),
    ]


@pytest.mark.parametrize("role", [CLIENT, SERVER], ids=lambda r: r.value)
def test_ping_is_answered_automatically(role: Role) -> None:
    conn = in_state(role, OPEN)
    assert conn.receive_data(encode_frame(Ping()) + encode_frame(Ping())) == [Ping(), Ping()]
    assert sent(conn) == [Pong(), Pong()]
    assert conn.receive_data(encode_frame(Pong())) == [Pong()]
    assert sent(conn) == []


def test_requests_pipelined_behind_hello_are_answered_after_welcome() -> None:
    # A client must wait for welcome, but one that does not never makes the core raise; the
    # answers the core writes itself follow the driver's welcome.
    server = Connection(SERVER)
    events = server.receive_data(
        encode_frame(Hello())
        + encode_frame(Ping())
        + encode_frame(Subscribe(4, "a..b"))
        + frame({"op": "nope"})
        + encode_frame(Subscribe(5, "ok.>"))
    )
    assert [type(e) for e in events] == [Hello, Ping, Rejected, Rejected, Subscribe]
    assert server.data_to_send() == b""  # nothing may precede the welcome
    server.send(Welcome())
    out = sent(server)
    assert [type(e) for e in out] == [Welcome, Pong, Error, Error]
    assert (out[2].sid, out[3].code) == (4, ErrorCode.UNKNOWN_OPERATION)  # type: ignore[union-attr]
    server.send(Ok(sid=5))
    assert sent(server) == [Ok(sid=5)]


def test_pipelined_answers_are_dropped_if_the_server_closes_instead() -> None:
    server = Connection(SERVER)
    server.receive_data(encode_frame(Hello()) + encode_frame(Ping()))
    server.send(Close(ErrorCode.AUTHENTICATION_FAILED, ""))
    assert sent(server) == [Close(ErrorCode.AUTHENTICATION_FAILED, "")]


# --- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [CLIENT, SERVER], ids=lambda r: r.value)
@pytest.mark.parametrize("state", [HANDSHAKE, OPEN], ids=lambda s: s.value)
def test_malformed_frame_fails_the_connection(role: Role, state: State) -> None:
    conn = in_state(role, state)
    events = conn.receive_data(b"\x00\x00\x00\x01\xc1" + encode_frame(Ping()))
    failed_with(conn, events, ErrorCode.PROTOCOL_ERROR)
    assert events == [events[-1]]  # nothing after the failure is read
    assert conn.receive_data(encode_frame(Ping())) == []


def test_frames_before_a_failure_are_processed(chunker: Callable[[bytes], Iterable[bytes]]) -> None:
    server = open_server()
    data = encode_frame(Publish("a", b"1")) + (2**31).to_bytes(4, "big")
    events: list[Event] = []
    for chunk in chunker(data):
        events += server.receive_data(chunk)
    assert events[0] == Publish("a", b"1")
    failed_with(server, events, ErrorCode.FRAME_TOO_LARGE)


def test_garbage_while_closing_sends_no_second_close() -> None:
    conn = in_state(CLIENT, CLOSING)
    events = conn.receive_data(b"\x00\x00\x00\x01\xc1")
    assert [type(e) for e in events] == [ProtocolFailure]
    assert conn.state is CLOSED
    assert conn.data_to_send() == b""
    big = in_state(SERVER, CLOSING)
    assert [type(e) for e in big.receive_data(b"\xff\xff\xff\xff")] == [ProtocolFailure]
    assert big.data_to_send() == b""


def test_unknown_operation_while_closing_is_dropped() -> None:
    conn = in_state(SERVER, CLOSING)
    assert conn.receive_data(frame({"op": "nope"})) == []
    assert conn.data_to_send() == b""
    assert conn.state is CLOSING


# --- close and end of stream -------------------------------------------------------------------


@pytest.mark.parametrize("role", [CLIENT, SERVER], ids=lambda r: r.value)
def test_peer_close(role: Role) -> None:
    conn = in_state(role, OPEN)
    events = conn.receive_data(
        encode_frame(Close(ErrorCode.GOING_AWAY, "x")) + encode_frame(Ping())
    )
    assert events == [Close(ErrorCode.GOING_AWAY, "x")]  # nothing after close is read
    assert conn.state is CLOSED
    assert conn.closed
    assert sent(conn) == []  # no pong, no close in reply: the receiver closes the transport
    with pytest.raises(LocalProtocolError):
        conn.send(Close())
    assert conn.receive_data(b"") == [EndOfStream(clean=True)]


@pytest.mark.parametrize("role", [CLIENT, SERVER], ids=lambda r: r.value)
def test_our_close_then_eof_is_clean(role: Role) -> None:
    # The peer closes the transport on our close frame, without answering: that is clean.
    conn = in_state(role, OPEN)
    conn.send(Close())
    assert conn.state is CLOSING
    assert not conn.closed
    late = Message("a", b"") if role is CLIENT else Publish("a", b"")
    assert conn.receive_data(encode_frame(late)) == []
    assert conn.receive_data(b"") == [EndOfStream(clean=True)]
    assert conn.state is CLOSED


@pytest.mark.parametrize("role", [CLIENT, SERVER], ids=lambda r: r.value)
@pytest.mark.parametrize("state", [HANDSHAKE, OPEN], ids=lambda s: s.value)
def test_eof_without_close_is_not_clean(role: Role, state: State) -> None:
    conn = in_state(role, state)
    assert conn.receive_data(b"") == [EndOfStream(clean=False)]
    assert conn.state is CLOSED
    assert conn.receive_data(b"") == [EndOfStream(clean=False)]


def test_eof_after_a_failure_is_not_clean() -> None:
    conn = in_state(SERVER, OPEN)
    conn.receive_data(b"\x00\x00\x00\x01\xc1")
    assert conn.receive_data(b"") == [EndOfStream(clean=False)]


def test_eof_in_the_middle_of_a_frame() -> None:
    conn = in_state(SERVER, OPEN)
    assert conn.receive_data(encode_frame(Ping())[:5]) == []
    assert conn.receive_data(b"") == [EndOfStream(clean=False)]


# --- heartbeats --------------------------------------------------------------------------------


def test_heartbeat_client() -> None:
    client = open_client(Welcome(heartbeat_ms=10_000))
    assert client.heartbeat == 10.0
    client.mark_alive(100.0)
    client.handle_timer(109.9)
    assert sent(client) == []
    client.handle_timer(110.0)  # one interval of silence: ping
    assert sent(client) == [Ping()]
    client.handle_timer(115.0)  # one ping per silence
    assert sent(client) == []
    assert client.receive_data(encode_frame(Pong()), now=116.0) == [Pong()]
    client.handle_timer(125.9)
    assert sent(client) == []
    client.handle_timer(126.0)
    assert sent(client) == [Ping()]
    client.handle_timer(135.9)
    assert client.state is OPEN
    client.handle_timer(136.0)  # two intervals of silence: fail
    assert client.state is CLOSED
    assert client.failure is not None
    assert client.failure.code is ErrorCode.HEARTBEAT_TIMEOUT
    assert sent(client) == [Close(ErrorCode.HEARTBEAT_TIMEOUT, client.failure.message)]
    client.handle_timer(500.0)  # nothing more once closed
    assert client.data_to_send() == b""


def test_heartbeat_server() -> None:
    server = for_sending(SERVER, "welcoming")
    server.send(Welcome(heartbeat_ms=1_000))
    server.data_to_send()
    assert server.heartbeat == 1.0
    server.mark_alive(50.0)
    server.handle_timer(51.0)
    assert sent(server) == [Ping()]
    server.handle_timer(52.0)
    assert server.state is CLOSED
    assert sent(server)[-1].code == ErrorCode.HEARTBEAT_TIMEOUT  # type: ignore[union-attr]


def test_any_bytes_count_as_traffic() -> None:
    client = open_client(Welcome(heartbeat_ms=10_000))
    client.mark_alive(0.0)
    client.receive_data(encode_frame(Message("a", b""))[:3], now=19.0)  # part of a frame
    client.handle_timer(20.0)  # silent for one second, not for two intervals
    assert client.state is OPEN
    assert sent(client) == []
    client.handle_timer(29.0)
    assert sent(client) == [Ping()]


@pytest.mark.parametrize("role", [CLIENT, SERVER], ids=lambda r: r.value)
def test_no_heartbeat_before_the_session_opens_or_when_disabled(role: Role) -> None:
    conn = in_state(role, HANDSHAKE)
    assert conn.heartbeat is None
    conn.handle_timer(1e9)
    assert conn.data_to_send() == b""
    disabled = open_client(Welcome(heartbeat_ms=0))
    assert disabled.heartbeat is None
    disabled.handle_timer(1e9)
    assert disabled.state is OPEN
    assert disabled.data_to_send() == b""


def test_no_heartbeat_while_closing() -> None:
    client = open_client(Welcome(heartbeat_ms=1_000))
    client.mark_alive(0.0)
    client.send(Close())
    client.data_to_send()
    client.handle_timer(100.0)
    assert client.state is CLOSING
    assert client.data_to_send() == b""


# --- peer input never raises, and never depends on how it was cut into reads -------------------


_junk_frames = st.one_of(
    events_st.map(encode_frame),
    st.binary(max_size=40).map(frame),  # a prefix and a random body
    st.sampled_from([frame({"op": "nope"}), frame({"op": "pub"}), b"\xff\xff\xff\xff"]),
)


def feed(conn: Connection, chunks: Iterable[bytes]) -> tuple[list[Event], bytes]:
    events: list[Event] = []
    out = b""
    for chunk in chunks:
        if chunk:  # b"" would mean end of stream
            events += conn.receive_data(chunk)
            out += conn.data_to_send()
    return events, out


@given(
    role=st.sampled_from([CLIENT, SERVER]),
    state=st.sampled_from([HANDSHAKE, OPEN, CLOSING]),
    frames=st.lists(_junk_frames, max_size=8),
    cuts=st.lists(st.integers(0, 400), max_size=8),
)
@settings(deadline=None, max_examples=200)
def test_peer_input_never_raises_and_chunking_does_not_matter(
    role: Role, state: State, frames: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(frames)
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]

    whole_conn = in_state(role, state)
    whole_events, whole_out = feed(whole_conn, [data])
    cut_conn = in_state(role, state)
    cut_events, cut_out = feed(cut_conn, chunks)

    assert cut_events == whole_events
    assert cut_out == whole_out
    assert cut_conn.state is whole_conn.state
    out = decode_stream(whole_out)  # whatever the core wrote is a well-formed frame stream
    failures = [e for e in whole_events if isinstance(e, ProtocolFailure)]
    assert len(failures) <= 1
    if failures:
        assert whole_events[-1] is failures[0]
        assert whole_conn.state is CLOSED
        if state is not CLOSING:
            assert out[-1] == Close(failures[0].code, out[-1].reason)  # type: ignore[union-attr]
    if any(isinstance(e, Close) for e in out):
        assert isinstance(out[-1], Close)  # nothing after our close


@given(raw=st.binary(max_size=300), role=st.sampled_from([CLIENT, SERVER]))
@settings(deadline=None, max_examples=100)
def test_random_bytes_never_raise(raw: bytes, role: Role) -> None:
    for state in (HANDSHAKE, OPEN, CLOSING):
        conn = in_state(role, state)
        conn.receive_data(raw)
        decode_stream(conn.data_to_send())
        conn.receive_data(b"")
