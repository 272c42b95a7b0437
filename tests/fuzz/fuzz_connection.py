"""Fuzz the connection state machine, both roles, with arbitrary peer bytes.

    python tests/fuzz/fuzz_connection.py [libFuzzer flags] [CORPUS_DIR ...]

Input layout: byte 0 = role (bit 0: server/client) and starting state (bits 1-2: handshake,
open, closing); byte 1 = how the rest is cut into reads (:func:`fuzzlib.chunks`); byte 2 = the
clock step between reads, in seconds (0: no timer calls); bytes 3.. = what the peer sends.

The harness is a minimal driver, as the broker session and the SDK client are: a server answers
``hello`` with ``welcome``, ``sub``/``unsub`` and acknowledged ``pub`` with ``ok``, and echoes a
publish back as a delivery (which must fit the frame limit it announced); both call
``handle_timer``. Checked on every read:

* ``receive_data`` never raises, whatever the bytes;
* states move only along the tables in client_sdk/protocol/connection.py, every returned wire
  event was receivable (``RECEIVABLE``) in the state it arrived in, and ``ProtocolFailure`` is the
  last event of its read;
* the output is a well-formed frame stream that decodes, with at most one frame per event (plus
  the driver's welcome), each core frame under 2 KiB, nothing after a ``close``;
* the receive buffer never holds more than one incomplete frame;
* once closed (by a failure, a close or a heartbeat timeout) the connection stays closed and
  silent; EOF then gives ``EndOfStream`` (clean only after a close and no failure).
"""

from __future__ import annotations

import sys

import fuzzlib
import msgpack

with fuzzlib.instrumented("client_sdk"):
    from tessera_mq.client.protocol import codec
    from tessera_mq.client.protocol.connection import RECEIVABLE, Connection, Role, State
    from tessera_mq.client.protocol.errors import LocalProtocolError
    from tessera_mq.client.protocol.events import (
        Close,
        EndOfStream,
        Error,
        Event,
        Hello,
        Message,
        Ok,
        Ping,
        Pong,
        ProtocolFailure,
        Publish,
        Rejected,
        Subscribe,
        Unsubscribe,
        Welcome,
    )
    from tessera_mq.client.protocol.framing import FrameDecoder
    from tessera_mq.client.protocol.limits import FRAME_HEADER_BYTES, MAX_FRAME_BYTES_CEILING

#: A frame the core writes by itself (pong, error answer, close) is small: reasons are clipped.
MAX_CORE_FRAME_BYTES = 2048
#: The heartbeat the fuzzing server announces (and the client is told): 5 s, so that clock steps
#: of a few seconds reach both the ping and the timeout.
HEARTBEAT_MS = 5000

_S, _C = Role.SERVER, Role.CLIENT
HANDSHAKE, OPEN, CLOSING, CLOSED = State.HANDSHAKE, State.OPEN, State.CLOSING, State.CLOSED

#: The moves receive_data and handle_timer may make (CLOSING is entered only by our own close).
ALLOWED = {
    HANDSHAKE: {HANDSHAKE, OPEN, CLOSED},
    OPEN: {OPEN, CLOSED},
    CLOSING: {CLOSING, CLOSED},
    CLOSED: {CLOSED},
}

WIRE = (Hello, Welcome, Subscribe, Unsubscribe, Publish, Message, Ok, Error, Ping, Pong, Close)


def make(role: Role, start: int) -> Connection:
    """A connection in the starting state (0 handshake, 1 open, 2 closing) with output drained."""
    conn = Connection(role)
    if role is _C:
        conn.send(Hello(client="fuzz/1"))
        if start >= 1:
            conn.receive_data(codec.encode_frame(Welcome(heartbeat_ms=HEARTBEAT_MS)))
    elif start >= 1:
        conn.receive_data(codec.encode_frame(Hello(client="fuzz/1")))
        conn.send(Welcome(heartbeat_ms=HEARTBEAT_MS))
    if start >= 2:
        conn.send(Close(0, "fuzz"))
    conn.mark_alive(0.0)
    conn.data_to_send()
    return conn


def drive(conn: Connection, events: list[Event]) -> int:
    """Answer ``events`` as a broker session would; return how many frames the driver sent."""
    sent = 0
    if conn.role is _C:
        return 0
    for event in events:
        if conn.state is not OPEN:
            break
        if isinstance(event, Hello):
            conn.send(Welcome(version=conn.version, heartbeat_ms=HEARTBEAT_MS))
        elif isinstance(event, Subscribe | Unsubscribe):
            conn.send(Ok(sid=event.sid))
        elif isinstance(event, Publish):
            # The delivery of a publish always fits the limit the broker announced.
            conn.send(Message(event.topic, event.payload, event.headers))
            sent += 1
            if event.ack is None:
                continue
            conn.send(Ok(ack=event.ack))
        else:
            continue
        sent += 1
    return sent


def check_output(out: bytes, allowed_frames: int) -> None:
    decoder = FrameDecoder(MAX_FRAME_BYTES_CEILING)
    bodies = decoder.feed(out)
    assert decoder.buffered == 0, "the core wrote a partial frame"
    assert len(bodies) <= allowed_frames, (len(bodies), allowed_frames)
    closed = False
    for body in bodies:
        event = codec.decode(body)  # the core never writes what its peer could not decode
        assert not closed, f"{event!r} after our close"
        closed = isinstance(event, Close)
        if not isinstance(event, Message):
            assert len(body) <= MAX_CORE_FRAME_BYTES, (len(body), event)


def check_events(role: Role, before: State, after: State, events: list[Event]) -> None:
    assert after in ALLOWED[before], (before, after)
    receivable = set(RECEIVABLE.get((role, before), ()))
    if before is HANDSHAKE:
        receivable |= RECEIVABLE[role, OPEN]  # the read may open the session first
    for i, event in enumerate(events):
        if isinstance(event, ProtocolFailure):
            assert i == len(events) - 1, "events after a ProtocolFailure"
            assert after is CLOSED
        elif isinstance(event, Close):
            assert i == len(events) - 1, "events after a close"
            assert after is CLOSED
        elif isinstance(event, WIRE):
            assert before is not CLOSING, f"{event!r} delivered while closing"
            assert type(event) in receivable, (role, before, event)
        else:
            assert isinstance(event, Rejected), event


def test_one_input(data: bytes) -> None:
    if len(data) < 3:
        return
    role = _C if data[0] & 1 else _S
    start = (data[0] >> 1) & 3
    if start == 3:
        start = 0
    conn = make(role, start)
    step = float(data[2] & 0x0F)
    now = 0.0
    failed = False
    for piece in fuzzlib.chunks(data[3:], data[1]):
        before = conn.state
        events = conn.receive_data(piece, now)
        if failed or before is CLOSED:
            assert events == [], events
        check_events(role, before, conn.state, events)
        driven = drive(conn, events)
        if step:  # a timer call may add a ping or a heartbeat-timeout close
            now += step
            conn.handle_timer(now)
            driven += 1
        # + 1: a close frame when this read failed or ended the session
        check_output(conn.data_to_send(), len(events) + driven + 1)
        if any(isinstance(e, ProtocolFailure) for e in events):
            assert conn.failure is not None
            failed = True
        if conn.state is CLOSED:
            assert not conn.has_data_to_send
            try:
                conn.send(Ping())
            except LocalProtocolError:
                pass
            else:
                raise AssertionError("a closed connection accepted a frame to send")
        else:
            assert conn._decoder.buffered < FRAME_HEADER_BYTES + conn._decoder.max_frame
    end = conn.receive_data(b"", now)
    assert len(end) == 1 and isinstance(end[0], EndOfStream), end
    assert conn.state is CLOSED
    if failed:
        assert not end[0].clean


def _frame(obj: object) -> bytes:
    body: bytes = msgpack.packb(obj)
    return len(body).to_bytes(4, "big") + body


def seeds() -> list[bytes]:
    f = codec.encode_frame
    to_server = b"".join(
        [
            f(Hello(client="fuzz/1", heartbeat_ms=1000)),
            f(Subscribe(1, "a.>")),
            f(Subscribe(2, "a.*.c")),
            f(Publish("a.b", b"x" * 20, headers={"k": "v"}, ack=9)),
            f(Publish("a.b.c", b"")),
            f(Ping()),
            f(Pong()),
            f(Unsubscribe(1)),
            _frame({"op": "later", "x": 1}),  # an unknown operation
            f(Publish("bad topic", b"", ack=1)),
            f(Subscribe(3, "a.>.b")),
            f(Close(0, "bye")),
        ]
    )
    to_client = b"".join(
        [
            f(Welcome(heartbeat_ms=HEARTBEAT_MS, max_frame=128 * 1024)),
            f(Ok(sid=1)),
            f(Message("a.b", b"x", headers={"k": "v"})),
            f(Error(9, "no", ack=3)),
            f(Ping()),
            f(Pong()),
            _frame({"op": "later"}),
            f(Close(13, "going away")),
        ]
    )
    out = []
    for start in (0, 1, 2):
        for selector, step in ((0, 0), (1, 0), (0x27, 3), (0x84, 0)):
            header = bytes([start << 1, selector, step])
            out.append(header + to_server)
            out.append(bytes([header[0] | 1]) + header[1:] + to_client)
    out.append(b"\x00\x00\x00" + f(Ping()) + f(Hello()))  # ping before hello: fatal
    out.append(b"\x00\x00\x00" + f(Hello()) + b"\x00\x10\x00\x01")  # too large after hello
    return out


if __name__ == "__main__":
    fuzzlib.main(
        "connection",
        test_one_input,
        seeds,
        default_args=["-max_len=16384", "-timeout=10"],
        argv=sys.argv,
    )
