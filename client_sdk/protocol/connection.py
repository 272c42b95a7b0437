"""The connection state machine: bytes in, events out; events in, bytes out. No I/O, no clock.

Both ends use it: the broker as ``Role.SERVER``, the SDK as ``Role.CLIENT``. What may be sent
and received in each state is data (the two tables below, as h11's ``_state.py`` keeps them).
Peer input never raises: a bad request is answered with an ``error`` frame (:class:`Rejected`),
a broken stream is failed with a ``close`` frame (:class:`ProtocolFailure`), and the cause is kept
in :attr:`Connection.failure`.
"""

from __future__ import annotations

import enum
from collections import deque

from client_sdk.protocol import codec
from client_sdk.protocol.errors import (
    ErrorCode,
    InvalidTopic,
    LocalProtocolError,
    RemoteProtocolError,
)
from client_sdk.protocol.events import (
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
from client_sdk.protocol.framing import FrameDecoder, FrameTooLarge
from client_sdk.protocol.limits import (
    DELIVERY_OVERHEAD_BYTES,
    MAX_FRAME_BYTES,
    MAX_FRAME_BYTES_BEFORE_HELLO,
    MAX_FRAME_BYTES_CEILING,
    MAX_GROUP_BYTES,
    MAX_REASON_BYTES,
    MAX_TOPIC_BYTES,
    MAX_TOPIC_TOKENS,
    MIN_HEARTBEAT_MS,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
)
from client_sdk.protocol.topics import validate_pattern, validate_topic

__all__ = ["Connection", "Role", "State", "negotiate_version"]


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
        "_too_large",
        "_welcome_sent",
        "failure",
        "max_frame",
        "max_topic_bytes",
        "max_topic_tokens",
        "peer_max_frame",
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
        self._feed(data)
        return self.receive_backlog(now, max_events)

    @property
    def has_backlog(self) -> bool:
        """True while frames already received wait to be turned into events."""
        return bool(self._bodies) or self._too_large is not None

    def receive_backlog(self, now: float = 0.0, max_events: int | None = None) -> list[Event]:
        """Continue :meth:`receive_data` with frames it left pending (at most ``max_events``)."""
        events: list[Event] = []
        taken = 0
        while True:
            bodies = self._bodies  # (re-read: the limit change below may refill it)
            while bodies:
                if max_events is not None and taken >= max_events:
                    return events
                taken += 1
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
