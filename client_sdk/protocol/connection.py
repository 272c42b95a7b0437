"""The connection state machine: bytes in, events out; events in, bytes out. No I/O, no clock.

Both ends use it: the broker as ``Role.SERVER``, the SDK as ``Role.CLIENT``. What may be sent
and received in each state is data (the two tables below, as h11's ``_state.py`` keeps them).
Peer input never raises: a bad request is answered with an ``error`` frame (:class:`Rejected`),
a broken stream is failed with a ``close`` frame (:class:`ProtocolFailure`), and the cause is kept
in :attr:`Connection.failure`.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from typing import Protocol

import msgpack

from tessera_mq.client.protocol import codec
from tessera_mq.client.protocol.errors import (
    ErrorCode,
    InvalidTopic,
    LocalProtocolError,
    RemoteProtocolError,
)
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
    Reply,
    Request,
    Response,
    Subscribe,
    Unsubscribe,
    Welcome,
)
from tessera_mq.client.protocol.framing import FrameDecoder, FrameTooLarge
from tessera_mq.client.protocol.limits import (
    DELIVERY_OVERHEAD_BYTES,
    FRAME_HEADER_BYTES,
    MAX_FRAME_BYTES,
    MAX_FRAME_BYTES_BEFORE_HELLO,
    MAX_FRAME_BYTES_CEILING,
    MAX_GROUP_BYTES,
    MAX_ID,
    MAX_REASON_BYTES,
    MAX_TOPIC_BYTES,
    MAX_TOPIC_TOKENS,
    MIN_HEARTBEAT_MS,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
)
from tessera_mq.client.protocol.topics import validate_pattern, validate_topic

__all__ = ["Connection", "PublishSink", "Role", "State", "negotiate_version"]


class PublishSink(Protocol):
    """A server's fast path for plain publishes (see :attr:`Connection.publish_sink`)."""

    def publish_plain(
        self, topic: str, payload: bytes, ack: int | None, frame: bytes | None
    ) -> bool:
        """One plain publish, its topic already validated; ``frame`` is its ``msg`` frame when
        it could be built from the ``pub`` frame's own bytes, else ``None``. True if taken;
        False to have it delivered as a :class:`Publish` event instead."""

    def publish_run(self, topic: str, frames: bytes, count: int) -> bool:
        """``count`` plain publishes to ``topic`` without ``ack``, as ``count`` ``msg`` frames
        back to back in ``frames``. True if all were taken; False to have them handed over one
        by one instead."""


#: A run of publishes is taken from a read in one piece, at a fraction of the Python work per
#: frame of an event; for the per-turn budget (``max_events``) this many run frames count as one.
RUN_FRAMES_PER_EVENT = 8

#: A plain publish body starts with a map header, then ``"op": "pub"`` (every encoder that puts
#: ``op`` first, as the SDK does). Bodies that do not take the general path.
_PUB_OP = b"\xa2op\xa3pub"
#: With exactly three entries (op, topic, payload) the delivery body is the publish body with
#: ``pub`` renamed ``msg`` (same length): the topic and payload bytes are reused as they came.
_PUB_MAP3 = 0x83
_MSG_HEAD = b"\x83\xa2op\xa3msg"
_PUB_HEAD_BYTES = len(_MSG_HEAD)
_unpackb = msgpack.unpackb
_unpack_u16 = struct.Struct(">H").unpack_from
_unpack_u32 = struct.Struct(">I").unpack_from
#: The canonical body (the SDK's and msgpack's own order): op, topic, payload.
_TOPIC_KEY = b"\xa5topic"
_PAYLOAD_KEY = b"\xa7payload"
#: msgpack ``bin`` markers
_BIN8, _BIN16, _BIN32 = 0xC4, 0xC5, 0xC6


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    HANDSHAKE = "handshake"  #: server: awaiting hello; client: awaiting welcome
    OPEN = "open"
    CLOSING = "closing"  #: we sent close; we drop what arrives until the peer's close or EOF
    CLOSED = "closed"  #: nothing more is read or sent


_R = Role
_S = State

#: What each side may RECEIVE in each state. Anything else fails the connection.
RECEIVABLE: dict[tuple[Role, State], frozenset[type[Event]]] = {
    (_R.SERVER, _S.HANDSHAKE): frozenset({Hello, Close}),
    (_R.SERVER, _S.OPEN): frozenset(
        {Subscribe, Unsubscribe, Publish, Request, Reply, Ping, Pong, Close}
    ),
    (_R.CLIENT, _S.HANDSHAKE): frozenset({Welcome, Error, Close}),
    (_R.CLIENT, _S.OPEN): frozenset({Message, Response, Ok, Error, Ping, Pong, Close}),
}

#: What each side may SEND in each state. Anything else raises LocalProtocolError.
SENDABLE: dict[tuple[Role, State], frozenset[type[Event]]] = {
    (_R.SERVER, _S.HANDSHAKE): frozenset({Error, Close}),
    (_R.SERVER, _S.OPEN): frozenset({Welcome, Message, Response, Ok, Error, Ping, Pong, Close}),
    (_R.CLIENT, _S.HANDSHAKE): frozenset({Hello, Close}),
    (_R.CLIENT, _S.OPEN): frozenset(
        {Subscribe, Unsubscribe, Publish, Request, Reply, Ping, Pong, Close}
    ),
}


_BEFORE_WELCOME = frozenset({Welcome, Error, Close})

#: Answers to requests (the only frames sent after we failed the stream, before our close).
_ANSWERS = frozenset({Ok, Error})


def negotiate_version(client_version: int) -> int | None:
    """The version a broker answers a ``hello`` with: the highest version both speak."""
    common = [v for v in SUPPORTED_VERSIONS if v <= client_version]
    return max(common) if common else None


def _subscription_problem(sub: Subscribe) -> str | None:
    """Why the optional fields of ``sub`` cannot go together, or ``None`` (section 16.3)."""
    if sub.group is not None:
        group = sub.group
        if (
            not group
            or len(group.encode("utf-8", "surrogatepass")) > MAX_GROUP_BYTES
            or "." in group
            or group in ("*", ">")
        ):
            return f"a group name is one topic token of at most {MAX_GROUP_BYTES} bytes"
        try:
            validate_topic(group)
        except InvalidTopic:
            return f"a group name is one topic token of at most {MAX_GROUP_BYTES} bytes"
    if sub.serve and sub.since is not None:
        return "a serving subscription has no history to resume"
    return None


def _clip(text: str, limit: int = MAX_REASON_BYTES) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Connection:
    """One end of a Tessera session over an already secured byte stream."""

    __slots__ = (
        "_bodies",
        "_close_seen",
        "_decoder",
        "_deferred",
        "_delivery_overhead",
        "_final",
        "_heartbeat",
        "_hello_sent",
        "_last_rx",
        "_out",
        "_ping_outstanding",
        "_run_head",
        "_run_topic",
        "_too_large",
        "_valid_topic",
        "_welcome_sent",
        "failure",
        "max_frame",
        "max_topic_bytes",
        "max_topic_tokens",
        "peer_max_frame",
        "publish_sink",
        "role",
        "state",
        "version",
    )

    def __init__(
        self,
        role: Role,
        *,
        max_frame: int = MAX_FRAME_BYTES,
        max_frame_before_hello: int = MAX_FRAME_BYTES_BEFORE_HELLO,
        max_topic_bytes: int = MAX_TOPIC_BYTES,
        max_topic_tokens: int = MAX_TOPIC_TOKENS,
    ) -> None:
        if not 0 < max_frame_before_hello <= max_frame <= MAX_FRAME_BYTES_CEILING:
            raise ValueError("need 0 < max_frame_before_hello <= max_frame <= 64 MiB")
        self.role = role
        self.state = State.HANDSHAKE
        #: Largest frame body we accept once the session is open.
        self.max_frame = max_frame
        #: Largest frame body the peer accepts (a client learns it from ``welcome``).
        self.peer_max_frame = max_frame_before_hello
        self.max_topic_bytes = max_topic_bytes
        self.max_topic_tokens = max_topic_tokens
        self.version = PROTOCOL_VERSION
        #: Why the connection failed, if it did (code and message); ``None`` otherwise.
        self.failure: RemoteProtocolError | None = None
        self._decoder = FrameDecoder(max_frame_before_hello)
        self._out: list[bytes] = []
        #: The close frame of a failure we detected; it goes out after the answers to the
        #: requests that were complete before the fatal frame (docs/protocol.md 3).
        self._final: bytes | None = None
        #: Frame bodies decoded but not yet turned into events (see ``max_events``).
        #: (Created when needed: an idle connection holds no deque.)
        self._bodies: deque[bytes] | None = None
        #: An oversize prefix seen after the bodies in ``_bodies``; judged once they are.
        self._too_large: FrameTooLarge | None = None
        #: Frames the core answered with (pong, error) while a server had not yet sent its
        #: welcome (a client pipelined behind hello); they follow the welcome.
        self._deferred: list[bytes] = []
        #: What a server's deliveries may add beyond the announced limit (section 16.1): only
        #: once its welcome announced features, so a peer that knows of them.
        self._delivery_overhead = 0
        #: A close frame was sent or received: EOF after it is the expected end.
        self._close_seen = False
        self._hello_sent = False
        self._welcome_sent = False
        self._heartbeat: float | None = None
        self._last_rx = 0.0
        self._ping_outstanding = False
        #: The last topic a plain publish named that passed :func:`validate_topic`.
        self._valid_topic: str | None = None
        #: A server's fast path for plain publishes (:class:`PublishSink`): while the session
        #: is open, a ``pub`` frame with no headers is handed to it without building an event,
        #: as long as no other event precedes it in the same batch (so order is kept), and a
        #: run of them to one topic goes in one piece, straight from the read.
        self.publish_sink: PublishSink | None = None
        #: The body of the last canonical plain publish up to its payload (map, op, topic,
        #: ``payload`` key): a frame whose body starts with it and ends in a ``bin`` that fills
        #: it is a valid publish to :attr:`_run_topic` (validated when it was learned).
        self._run_head: bytes | None = None
        self._run_topic: str | None = None

    # --- receiving ----------------------------------------------------------------------

    def receive_data(
        self, data: bytes, now: float = 0.0, max_events: int | None = None
    ) -> list[Event]:
        """Feed plaintext from the security layer; ``b""`` is EOF. Returns the events, in order.

        ``now`` is the driver's monotonic clock, used only for heartbeats. With ``max_events``
        at most that many frames are turned into events; the rest stay decoded-but-pending
        (:attr:`has_backlog`) until :meth:`receive_backlog`, so that a driver can bound the work
        it takes from one connection per event-loop turn. The outcome never depends on where
        the stream was cut or on the budget.
        """
        if not data:
            events = self.receive_backlog(now) if self._bodies or self._too_large else []
            if self.state is State.CLOSED and events:
                return events
            clean = self._close_seen and self.failure is None
            self.state = State.CLOSED
            events.append(EndOfStream(clean=clean))
            return events
        if self.state is State.CLOSED:
            return []
        self._last_rx = now
        self._ping_outstanding = False
        if (
            self._run_head is not None
            and self.publish_sink is not None
            and self.state is State.OPEN
            and not self._bodies
            and self._too_large is None
        ):
            return self._receive_run(data, now, max_events)
        self._feed(data)
        return self.receive_backlog(now, max_events)

    def _receive_run(self, data: bytes, now: float, max_events: int | None) -> list[Event]:
        """:meth:`receive_data` for a connection that has been publishing to one topic: a run
        of publishes that repeat the last one's head is handed on as one block, the rest of the
        read takes the general path, in stream order."""
        pos = 0
        end = len(data)
        decoder = self._decoder
        need = decoder.needed()
        while need and pos < end:  # first the frame the previous read cut in two
            self._feed(data[pos : pos + need])
            pos += need
            if self._too_large is not None:
                break
            need = decoder.needed()
        bodies = self._bodies
        if bodies:
            # That frame first: on with the run only if it was a plain publish the sink took.
            sink = self.publish_sink
            if (
                self._too_large is not None
                or sink is None
                or len(bodies) != 1
                or not self._plain_publishes(bodies, 1, sink)
            ):
                self._feed(data[pos:])
                return self.receive_backlog(now, max_events)
            if max_events is not None:
                max_events = max(1, max_events - 1)
        if (
            pos >= end
            or self._too_large is not None
            or self.state is not State.OPEN
            or self._run_head is None
        ):
            self._feed(data[pos:])
            return self.receive_backlog(now, max_events)
        limit = end if max_events is None else max_events * RUN_FRAMES_PER_EVENT
        count, stop = self._take_run(data, pos, limit)
        if count:
            pos = stop
            if max_events is not None:
                max_events = max(1, max_events + (-count // RUN_FRAMES_PER_EVENT))
        self._feed(data[pos:] if pos else data)
        return self.receive_backlog(now, max_events)

    @staticmethod
    def _equal_run(
        data: bytes, pos: int, limit: int, head: bytes, max_frame: int
    ) -> tuple[int, int]:
        """(k, size) if the ``k`` >= 2 frames from ``pos`` on (at most ``limit``) all have the
        size and every byte up to the payload of the first, which is ``head`` and a ``bin``
        filling the frame: then all are valid, and checking it takes one strided slice per
        header byte (C speed) instead of a Python iteration per frame. (0, 0) otherwise."""
        end = len(data)
        if end - pos < FRAME_HEADER_BYTES:
            return 0, 0
        (n,) = _unpack_u32(data, pos)
        size = FRAME_HEADER_BYTES + n
        k = min((end - pos) // size, limit)
        body = pos + FRAME_HEADER_BYTES
        hl = len(head)
        if k < 2 or n > max_frame or n < hl + 2 or not data.startswith(head, body):
            return 0, 0
        mark = body + hl
        rest = n - hl
        marker = data[mark]
        if marker == _BIN8 and data[mark + 1] == rest - 2:
            fixed = 2
        elif marker == _BIN16 and rest >= 3 and _unpack_u16(data, mark + 1)[0] == rest - 3:
            fixed = 3
        elif marker == _BIN32 and rest >= 5 and _unpack_u32(data, mark + 1)[0] == rest - 5:
            fixed = 5
        else:
            return 0, 0
        stop = pos + k * size
        for i in range(pos, mark + fixed):  # length prefix, head, bin marker and length
            if data[i:stop:size].count(data[i]) != k:
                return 0, 0
        return k, size

    def _take_run(self, data: bytes, pos: int, limit: int) -> tuple[int, int]:
        """Find up to ``limit`` frames from ``pos`` on whose bodies are :attr:`_run_head` and a
        ``bin`` filling the rest, relabel them ``msg`` and hand them to :attr:`publish_sink`.
        Returns (frames taken, position after them); (0, pos) if none or the sink refused."""
        head = self._run_head
        sink = self.publish_sink
        topic = self._run_topic
        assert head is not None and sink is not None and topic is not None
        hl = len(head)
        end = len(data)
        max_frame = self._decoder.max_frame
        start = pos
        equal, size = self._equal_run(data, pos, limit, head, max_frame)
        if equal:
            # Every frame alike but for its payload bytes: relabel with strided assignments.
            pos = start + equal * size
            block = bytearray(data[start:pos])
            at = FRAME_HEADER_BYTES + _PUB_HEAD_BYTES - 3
            block[at::size] = b"m" * equal
            block[at + 1 :: size] = b"s" * equal
            block[at + 2 :: size] = b"g" * equal
            if not sink.publish_run(topic, bytes(block), equal):
                return 0, start
            return equal, pos
        starts: list[int] = []
        while len(starts) < limit and end - pos >= FRAME_HEADER_BYTES:
            (n,) = _unpack_u32(data, pos)
            body = pos + FRAME_HEADER_BYTES
            stop = body + n
            if n > max_frame or stop > end or not data.startswith(head, body):
                break
            mark = body + hl
            rest = stop - mark  # the payload's bin: marker, length, bytes
            if rest < 2:
                break
            marker = data[mark]
            if marker == _BIN8:
                ok = data[mark + 1] == rest - 2
            elif marker == _BIN16:
                ok = rest >= 3 and _unpack_u16(data, mark + 1)[0] == rest - 3
            elif marker == _BIN32:
                ok = rest >= 5 and _unpack_u32(data, mark + 1)[0] == rest - 5
            else:
                ok = False
            if not ok:
                break
            starts.append(pos)
            pos = stop
        if not starts:
            return 0, start
        block = bytearray(data[start:pos])
        shift = FRAME_HEADER_BYTES + _PUB_HEAD_BYTES - 3 - start
        for at in starts:  # "pub" -> "msg", at the same place in every frame of the run
            block[at + shift : at + shift + 3] = b"msg"
        if not sink.publish_run(topic, bytes(block), len(starts)):
            return 0, start
        return len(starts), pos

    @property
    def has_backlog(self) -> bool:
        """True while frames already received wait to be turned into events."""
        return bool(self._bodies) or self._too_large is not None

    def receive_backlog(self, now: float = 0.0, max_events: int | None = None) -> list[Event]:
        """Continue :meth:`receive_data` with frames it left pending (at most ``max_events``)."""
        events: list[Event] = []
        taken = 0
        sink = self.publish_sink
        while True:
            bodies = self._bodies  # (re-read: the limit change below may refill it)
            while bodies:
                if max_events is not None and taken >= max_events:
                    return events
                taken += 1
                if sink is not None and not events and self.state is State.OPEN:
                    # Plain publishes first, in a tight loop, until anything else comes.
                    limit = len(bodies) if max_events is None else max_events - taken + 1
                    done = self._plain_publishes(bodies, limit, sink)
                    if done:
                        taken += done - 1
                        if self.closed:
                            self._bodies = None
                            self._too_large = None
                            return events
                        continue
                event = self._receive_frame(bodies.popleft())
                if event is not None:
                    events.append(event)
                if self.closed:
                    self._bodies = None
                    self._too_large = None
                    return events
            self._bodies = None  # drained: an idle connection keeps no deque
            too_large = self._too_large
            if too_large is None:
                return events
            self._too_large = None
            if too_large.length > self._decoder.max_frame:
                events.append(self._fail(too_large))
                return events
            # hello/welcome in this batch raised the limit: decode the rest under the new one.
            self._feed(b"")

    def _feed(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except FrameTooLarge as exc:
            frames = exc.frames
            self._too_large = exc
        if frames:
            if self._bodies is None:
                self._bodies = deque(frames)
            else:
                self._bodies.extend(frames)

    def _plain_publishes(self, bodies: deque[bytes], limit: int, sink: PublishSink) -> int:
        """Hand up to ``limit`` leading plain publishes of ``bodies`` to ``sink``; how many."""
        done = 0
        plain = self._plain_publish
        popleft = bodies.popleft
        while done < limit and bodies:
            body = bodies[0]
            if not body.startswith(_PUB_OP, 1) or not plain(body, sink):
                break
            popleft()
            done += 1
            if self.state is not State.OPEN:
                break
        return done

    def _plain_publish(self, body: bytes, sink: PublishSink) -> bool:
        """Hand a plain, valid ``pub`` to ``sink`` without building an event. False (nothing
        done) for anything else (headers, unknown fields, bad values, a topic that fails
        validation): the general path then decodes it and answers as it always does."""
        try:
            d = _unpackb(body, raw=False, use_list=True, strict_map_key=True)
        except (ValueError, TypeError, msgpack.UnpackException):
            return False
        if type(d) is not dict or d.get("op") != "pub":
            return False
        topic = d.get("topic")
        payload = d.get("payload")
        if type(topic) is not str or type(payload) is not bytes:
            return False
        entries = len(d)
        ack = None
        if entries == 4:
            ack = d.get("ack")
            if type(ack) is not int or not 0 <= ack <= MAX_ID:
                return False
        elif entries != 3:
            return False
        if topic != self._valid_topic:
            try:
                validate_topic(
                    topic, max_bytes=self.max_topic_bytes, max_tokens=self.max_topic_tokens
                )
            except InvalidTopic:
                return False
            self._valid_topic = topic
        frame = None
        if entries == 3 and body[0] == _PUB_MAP3:
            frame = b"".join((len(body).to_bytes(4, "big"), _MSG_HEAD, body[_PUB_HEAD_BYTES:]))
            if topic != self._run_topic or not body.startswith(self._run_head or b"\0"):
                self._learn_run(body, topic)
        return sink.publish_plain(topic, payload, ack, frame)

    def _learn_run(self, body: bytes, topic: str) -> None:
        """Remember the head of ``body`` (a valid canonical plain publish to the validated
        ``topic``: map of 3, op, topic, then the payload last) for :meth:`_take_run`."""
        self._run_head = self._run_topic = None
        if not body.startswith(_TOPIC_KEY, _PUB_HEAD_BYTES):
            return
        at = _PUB_HEAD_BYTES + len(_TOPIC_KEY)
        marker = body[at]
        if 0xA0 <= marker <= 0xBF:  # fixstr
            size, at = marker & 0x1F, at + 1
        elif marker == 0xD9:  # str8
            size, at = body[at + 1], at + 2
        else:
            return
        if body[at : at + size] != topic.encode() or not body.startswith(_PAYLOAD_KEY, at + size):
            return
        self._run_head = body[: at + size + len(_PAYLOAD_KEY)]
        self._run_topic = topic

    def _receive_frame(self, body: bytes) -> Event | None:
        if self.state is State.CLOSED:
            return None  # nothing is read after the end (a driver's late continuation)
        try:
            event = codec.decode(body)
        except codec.UnknownOperation as exc:
            if self.state is State.OPEN:
                return self._reject(ErrorCode.UNKNOWN_OPERATION, exc.message)
            if self.state is State.CLOSING:
                return None
            return self._fail(exc)
        except RemoteProtocolError as exc:
            return self._fail(exc)
        kind = type(event)
        if self.state is State.CLOSING:
            if kind is Close:
                self.state = State.CLOSED
                self._close_seen = True
                return event
            return None
        if kind not in RECEIVABLE[self.role, self.state]:
            if self.state is State.HANDSHAKE:
                return self._fail(
                    RemoteProtocolError(
                        f"'{codec.op_of(event)}' before the session is open", ErrorCode.NOT_READY
                    )
                )
            return self._fail(
                RemoteProtocolError(f"unexpected '{codec.op_of(event)}' from the {self._peer}")
            )
        return self._accept(event)

    @property
    def _peer(self) -> str:
        return "broker" if self.role is Role.CLIENT else "client"

    def _accept(self, event: Event) -> Event | None:
        if isinstance(event, Publish):
            try:
                validate_topic(
                    event.topic, max_bytes=self.max_topic_bytes, max_tokens=self.max_topic_tokens
                )
            except InvalidTopic as exc:
                self._reply(Error(ErrorCode.INVALID_TOPIC, exc.message, ack=event.ack, topic=None))
                return Rejected(ErrorCode.INVALID_TOPIC, exc.message, ack=event.ack)
            return event
        if isinstance(event, Subscribe):
            try:
                validate_pattern(
                    event.pattern,
                    max_bytes=self.max_topic_bytes,
                    max_tokens=self.max_topic_tokens,
                )
            except InvalidTopic as exc:
                self._reply(Error(ErrorCode.INVALID_TOPIC, exc.message, sid=event.sid))
                return Rejected(ErrorCode.INVALID_TOPIC, exc.message, sid=event.sid)
            problem = _subscription_problem(event)
            if problem is not None:
                self._reply(Error(ErrorCode.INVALID_SUBSCRIPTION, problem, sid=event.sid))
                return Rejected(ErrorCode.INVALID_SUBSCRIPTION, problem, sid=event.sid)
            return event
        if isinstance(event, Request):
            try:
                validate_topic(
                    event.topic, max_bytes=self.max_topic_bytes, max_tokens=self.max_topic_tokens
                )
            except InvalidTopic as exc:
                self._reply(Error(ErrorCode.INVALID_TOPIC, exc.message, rid=event.rid))
                return Rejected(ErrorCode.INVALID_TOPIC, exc.message, rid=event.rid)
            return event
        if isinstance(event, Ping):
            self._reply(Pong())
            return event
        if isinstance(event, Close):
            self.state = State.CLOSED
            self._close_seen = True
            return event
        if isinstance(event, Hello):
            version = negotiate_version(event.version)
            if version is None:
                return self._fail(
                    RemoteProtocolError(
                        f"protocol version {event.version} is not supported "
                        f"(broker speaks {sorted(SUPPORTED_VERSIONS)})",
                        ErrorCode.UNSUPPORTED_VERSION,
                    )
                )
            self.version = version
            self.state = State.OPEN
            self._decoder.max_frame = self.max_frame
            return event
        if isinstance(event, Welcome):
            if event.version not in SUPPORTED_VERSIONS:
                return self._fail(
                    RemoteProtocolError(
                        f"broker answered with protocol version {event.version}",
                        ErrorCode.UNSUPPORTED_VERSION,
                    )
                )
            if event.max_frame < MAX_FRAME_BYTES_BEFORE_HELLO:
                return self._fail(
                    RemoteProtocolError("broker announced a frame limit below 64 KiB")
                )
            self.version = event.version
            self.state = State.OPEN
            self.peer_max_frame = event.max_frame
            self._decoder.max_frame = max(self.max_frame, event.max_frame)
            if event.features is not None:
                # Deliveries may carry broker-added fields beyond the publish (section 16.1).
                self._decoder.max_frame = min(
                    self._decoder.max_frame + DELIVERY_OVERHEAD_BYTES, MAX_FRAME_BYTES_CEILING
                )
            # A broker cannot make us ping more often than the protocol minimum.
            self._heartbeat = (
                max(event.heartbeat_ms, MIN_HEARTBEAT_MS) / 1000 if event.heartbeat_ms else None
            )
            return event
        return event

    def _reject(self, code: ErrorCode, message: str) -> Rejected:
        # A broker answers with an error frame; a client cannot send one and ignores the frame.
        if self.role is Role.SERVER:
            self._reply(Error(code, _clip(message)))
        return Rejected(code, message)

    def _reply(self, event: Event) -> None:
        """Queue a frame the core sends on its own (pong, error answer)."""
        if self.role is Role.SERVER and not self._welcome_sent:
            # The driver has not answered hello yet: nothing may precede the welcome.
            self._deferred.append(codec.encode_frame(event))
        else:
            self.send(event)

    def _fail(self, exc: RemoteProtocolError) -> ProtocolFailure:
        """Fail the connection because of the peer: queue a close frame, stop reading."""
        self.failure = exc
        if self.state is State.HANDSHAKE or self.state is State.OPEN:  # CLOSING: already sent
            self._final = codec.encode_frame(Close(exc.code, _clip(exc.message)))
        self.state = State.CLOSED
        return ProtocolFailure(exc.code, exc.message)

    # --- sending ------------------------------------------------------------------------

    def send(self, event: Event) -> None:
        """Queue ``event`` for sending (see :meth:`data_to_send`).

        Raises :class:`LocalProtocolError` if the protocol does not allow it now, or if a
        client's publish would exceed the broker's frame limit.
        """
        kind = type(event)
        if self._final is not None and kind in _ANSWERS:
            # We failed the stream; requests complete before the fatal frame still get their
            # answers, ahead of our close (docs/protocol.md 3).
            self._out.append(codec.encode_frame(event))
            return
        if self.state is State.CLOSED or self.state is State.CLOSING:
            raise LocalProtocolError(f"cannot send '{codec.op_of(event)}': connection closing")
        if kind not in SENDABLE[self.role, self.state]:
            raise LocalProtocolError(
                f"cannot send '{codec.op_of(event)}' in state {self.state.value}"
            )
        if self.role is Role.SERVER and not self._welcome_sent and kind not in _BEFORE_WELCOME:
            raise LocalProtocolError(f"cannot send '{codec.op_of(event)}' before welcome")
        if kind is Hello:
            if self._hello_sent:
                raise LocalProtocolError("hello was already sent")
            self._hello_sent = True
        elif kind is Welcome:
            if self._welcome_sent:
                raise LocalProtocolError("welcome was already sent")
            self._welcome_sent = True
            assert isinstance(event, Welcome)
            self._heartbeat = event.heartbeat_ms / 1000 if event.heartbeat_ms else None
            # The client accepts at least what the broker announces (it announces no limit).
            self.peer_max_frame = event.max_frame
            if event.features is not None:
                self._delivery_overhead = DELIVERY_OVERHEAD_BYTES
        frame = codec.encode_frame(event)
        limit = self.peer_max_frame
        if kind is Response or kind is Message:
            limit += self._delivery_overhead  # broker-added fields (section 16.1)
        if len(frame) - 4 > limit and self.state is State.OPEN:
            raise LocalProtocolError(
                f"frame of {len(frame) - 4} bytes exceeds the {self._peer}'s limit of "
                f"{self.peer_max_frame} bytes"
            )
        self._out.append(frame)
        if kind is Welcome:
            self._out.extend(self._deferred)
            self._deferred.clear()
        elif kind is Close:
            self.state = State.CLOSING
            self._close_seen = True
            self._deferred.clear()

    @property
    def closed(self) -> bool:
        """True once nothing more will be read or sent."""
        return self.state is State.CLOSED

    @property
    def can_answer(self) -> bool:
        """True while a request just received may still be answered: the session is open, or
        we failed it and our close has not been handed out yet. False after the peer's close."""
        return self.state is State.OPEN or self._final is not None

    @property
    def has_data_to_send(self) -> bool:
        """True if frames are queued (see :meth:`data_to_send`)."""
        return bool(self._out) or self._final is not None

    def data_to_send(self) -> bytes:
        """Return and forget the bytes queued for the peer (``b""`` if none)."""
        final, self._final = self._final, None
        if final is not None:
            self._out.append(final)
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    # --- time -----------------------------------------------------------------------------

    @property
    def heartbeat(self) -> float | None:
        """The heartbeat interval in seconds, once the session is open."""
        return self._heartbeat

    def handle_timer(self, now: float) -> None:
        """Drive heartbeats: after one interval of silence queue a ``ping``; after two, fail
        the connection with ``HEARTBEAT_TIMEOUT``. Call it at least once per interval."""
        hb = self._heartbeat
        if hb is None or self.state is not State.OPEN:
            return
        idle = now - self._last_rx
        if idle >= 2 * hb:
            self._fail(
                RemoteProtocolError(
                    f"no traffic for {idle:.0f} s (heartbeat {hb:g} s)",
                    ErrorCode.HEARTBEAT_TIMEOUT,
                )
            )
        elif idle >= hb and not self._ping_outstanding:
            self._ping_outstanding = True
            self._out.append(codec.encode_frame(Ping()))

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called (driver's clock), or ``None``."""
        hb = self._heartbeat
        if hb is None or self.state is not State.OPEN:
            return None
        return self._last_rx + (2 * hb if self._ping_outstanding else hb)

    def mark_alive(self, now: float) -> None:
        """Start the heartbeat clock (call when the session opens)."""
        self._last_rx = now
