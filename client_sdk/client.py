"""The asyncio client: ``async with connect(url, ...) as client``.

A :class:`Client` outlives its connections. Each connection is a :class:`~client_sdk.link.Link`
(socket, security layer, protocol core); when one is lost the client reconnects with exponential
backoff and full jitter, re-authenticates, re-subscribes every live subscription exactly once,
and resends what it owes (acknowledged publishes not yet confirmed, publishes buffered while
disconnected). Deliveries are dispatched to every local subscription whose pattern matches the
topic (one delivery frame from the broker serves them all).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import itertools
import logging
import os
import random
import ssl
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import urlsplit

from tessera_mq.auth.credentials import NTLM, Kerberos
from tessera_mq.auth.errors import HandshakeError, HandshakeReason
from tessera_mq.auth.layer import SecurityLayer
from tessera_mq.auth.tls import TLSLayer, client_context
from tessera_mq.client.link import ConnectionLostError, Link
from tessera_mq.client.protocol import (
    Close,
    EndOfStream,
    Error,
    ErrorCode,
    Event,
    Message,
    Ok,
    ProtocolFailure,
    Publish,
    Rejected,
    Request,
    Response,
    Subscribe,
    Unsubscribe,
    Welcome,
)
from tessera_mq.client.protocol import Reply as ReplyFrame
from tessera_mq.client.protocol.errors import (
    AuthenticationError,
    BrokerError,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    LocalProtocolError,
    RequestTimeout,
    TesseraError,
    error_from_code,
)
from tessera_mq.client.protocol.grammar import header_problem
from tessera_mq.client.protocol.limits import MAX_REQUEST_TIMEOUT_MS
from tessera_mq.client.protocol.topics import (
    matches,
    split_pattern,
    validate_pattern,
    validate_topic,
)

__all__ = [
    "DEFAULT_PORT",
    "Client",
    "ConnectionState",
    "Delivery",
    "HistoryGap",
    "IncomingRequest",
    "PublishBufferFull",
    "Reconnect",
    "Reply",
    "Service",
    "Subscription",
    "connect",
]

log = logging.getLogger("tessera.client")

DEFAULT_PORT = 7443

#: Messages a subscription buffers for a slow application (see ``overflow``).
DEFAULT_MAX_PENDING_MESSAGES = 10_000

#: ``request`` waits this much longer than its timeout for the broker's REQUEST_TIMEOUT answer
#: before giving up on its own (the broker's clock and ours run independently).
REQUEST_TIMEOUT_GRACE = 1.0

_T = TypeVar("_T")

_SCHEMES = ("tls", "negotiate", "tls+negotiate")

#: Close codes after which reconnecting can help (the broker restarted, the network failed,
#: we fell behind); anything else (a protocol violation, a refused identity) is final.
_RETRYABLE_CODES = frozenset(
    {
        ErrorCode.NORMAL,
        ErrorCode.GOING_AWAY,
        ErrorCode.HEARTBEAT_TIMEOUT,
        ErrorCode.SLOW_CONSUMER,
        ErrorCode.INTERNAL_ERROR,
        ErrorCode.LIMIT_EXCEEDED,
        ErrorCode.HANDSHAKE_TIMEOUT,
        # The credential ended: reconnecting re-reads the certificate files (or the ccache), so
        # a renewed credential is picked up; if there is none the handshake fails and says why.
        ErrorCode.CREDENTIAL_EXPIRED,
    }
)

#: Authentication failures that may pass by themselves (a KDC or broker that is restarting).
_TRANSIENT_AUTH = frozenset(
    {
        HandshakeReason.KDC_UNREACHABLE.value,
        HandshakeReason.TIMEOUT.value,
        HandshakeReason.CLOSED.value,
    }
)


class ConnectionState(enum.Enum):
    """Where a client is; see ``on_state_change`` and :attr:`Client.state`."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Automatic reconnection. ``connect(..., reconnect=False)`` turns it off.

    Delays follow exponential backoff with full jitter: before attempt *n* (from 0) the client
    waits a random time between 0 and ``min(max_delay, initial_delay * 2**n)``, so a broker
    restart does not meet all its clients at once.
    """

    initial_delay: float = 0.1
    """Upper bound of the first delay, in seconds."""
    max_delay: float = 30.0
    """Cap of the delay bound, in seconds."""
    max_attempts: int | None = None
    """Attempts before giving up (``None``: keep trying)."""
    buffer_messages: int = 1_000
    """Publishes held while disconnected; one more raises :class:`PublishBufferFull`."""
    buffer_bytes: int = 8 * 1024 * 1024
    """Payload bytes held while disconnected."""

    def __post_init__(self) -> None:
        if self.initial_delay <= 0 or self.max_delay < self.initial_delay:
            raise ValueError("need 0 < initial_delay <= max_delay")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1 (or None)")
        if self.buffer_messages < 0 or self.buffer_bytes < 0:
            raise ValueError("buffer limits must not be negative")

    def delay(self, attempt: int) -> float:
        """The delay before reconnection attempt ``attempt`` (0-based)."""
        bound = min(self.max_delay, self.initial_delay * (2 ** min(attempt, 32)))
        return random.uniform(0, bound)  # noqa: S311 - jitter, not cryptography


class PublishBufferFull(TesseraError):
    """The client is disconnected and its publish buffer is full: this message was not taken."""

    code = ErrorCode.LIMIT_EXCEEDED


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message received on a subscription."""

    topic: str
    payload: bytes
    headers: Mapping[str, str] | None = None
    #: A stored last value sent because the subscription is new (not a live publish).
    retained: bool = False
    #: The publisher's identity (``mechanism:name``) as the broker authenticated it, when the
    #: broker stamps it (docs/messaging.md, "Verified sender"); never set by a client.
    sender: str | None = None
    #: History sequence number and stream epoch, for topics the broker keeps history for.
    seq: int | None = None
    epoch: str | None = None


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to :meth:`Client.request`."""

    payload: bytes
    headers: Mapping[str, str] | None = None
    #: The responder's identity as the broker authenticated it.
    sender: str | None = None


class HistoryGap(TesseraError):
    """A subscription resumed after a reconnect could not be given everything it missed
    (history too short, or the broker restarted without persisted history: a new epoch)."""

    def __init__(self, pattern: str, epoch: str | None, seq: int | None) -> None:
        super().__init__(f"messages on {pattern!r} were lost while disconnected")
        self.pattern = pattern
        self.epoch = epoch
        self.seq = seq


class _Inbox(Generic[_T]):
    """A bounded local queue behind ``async for`` (shared by subscriptions and services)."""

    def __init__(
        self,
        client: Client,
        sid: int,
        pattern: str,
        max_pending: int,
        overflow: Literal["drop_new", "drop_old"],
        *,
        group: str | None,
        serve: bool,
    ) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        if overflow not in ("drop_new", "drop_old"):
            raise ValueError("overflow must be 'drop_new' or 'drop_old'")
        self._client = client
        self.sid = sid
        self.pattern = pattern
        self._tokens = split_pattern(pattern)
        self.max_pending = max_pending
        self.overflow = overflow
        #: The queue group this subscription is a member of, if any.
        self.group = group
        self.serve = serve
        self.dropped = 0
        self._queue: collections.deque[_T] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended: BaseException | None = None
        self.active = True
        #: The broker's ``ok`` for this subscription arrived on the current connection.
        self.ready = False

    @property
    def plain(self) -> bool:
        """Receives topic-dispatched deliveries (no group, not serving)."""
        return self.group is None and not self.serve

    def _put(self, msg: _T) -> None:
        if len(self._queue) >= self.max_pending:
            self.dropped += 1
            if self.overflow == "drop_new":
                return
            self._queue.popleft()
        self._queue.append(msg)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _end(self, exc: BaseException | None) -> None:
        self.active = False
        self._ended = exc
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _next(self) -> _T:
        while not self._queue:
            if not self.active:
                if self._ended is not None and not isinstance(self._ended, ConnectionClosedOK):
                    raise self._ended
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()

    async def unsubscribe(self) -> None:
        """End the subscription on the broker; messages already queued can still be read."""
        if self.active:
            await self._client._unsubscribe(self)


class Subscription(_Inbox[Delivery]):
    """A live subscription: iterate it with ``async for``; end it with :meth:`unsubscribe`.

    Messages wait in a bounded local queue (``max_pending``). When the application falls
    further behind, ``overflow`` decides: ``"drop_new"`` (default) discards arriving messages,
    ``"drop_old"`` discards the oldest queued one; either way :attr:`dropped` counts them.
    A subscription survives reconnects: the client subscribes again for it, resuming from the
    last history sequence number it saw when the broker keeps history for its topics; a gap
    that cannot be filled is counted in :attr:`gaps`, passed to ``on_gap`` and reported to the
    client's ``on_error`` as a :class:`HistoryGap`.
    """

    def __init__(
        self,
        client: Client,
        sid: int,
        pattern: str,
        max_pending: int,
        overflow: Literal["drop_new", "drop_old"],
        *,
        group: str | None = None,
        on_gap: Callable[[HistoryGap], None] | None = None,
    ) -> None:
        super().__init__(client, sid, pattern, max_pending, overflow, group=group, serve=False)
        self.on_gap = on_gap
        #: History position: the stream epoch and the last sequence number received.
        self.epoch: str | None = None
        self.last_seq = 0
        #: Gaps the broker reported on resumption (messages lost while disconnected).
        self.gaps = 0
        #: Subscribe with ``since`` (the topics have history, or the application asked for it).
        self._resume = False

    def _deliver(self, msg: Message) -> None:
        if msg.seq is not None:
            if msg.epoch == self.epoch and msg.seq <= self.last_seq:
                return  # already seen (a resumption overlapping live delivery)
            self.epoch, self.last_seq = msg.epoch, msg.seq
        self._put(
            Delivery(
                msg.topic, msg.payload, msg.headers, msg.retained, msg.sender, msg.seq, msg.epoch
            )
        )

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self

    async def __anext__(self) -> Delivery:
        return await self._next()

    async def get(self, timeout: float | None = None) -> Delivery:
        """The next message (raises ``TimeoutError`` after ``timeout`` seconds)."""
        async with asyncio.timeout(timeout):
            return await self._next()


class IncomingRequest:
    """A request delivered to a :class:`Service`: answer it once with :meth:`respond`."""

    __slots__ = (
        "_client",
        "_link",
        "_responded",
        "_token",
        "headers",
        "payload",
        "sender",
        "topic",
    )

    def __init__(self, client: Client, link: Link | None, msg: Message) -> None:
        self._client = client
        self._link = link
        assert msg.reply is not None
        self._token = msg.reply
        self._responded = False
        self.topic = msg.topic
        self.payload = msg.payload
        self.headers = msg.headers
        #: The requester's identity as the broker authenticated it (``mechanism:name``).
        self.sender = msg.sender

    async def respond(
        self,
        payload: bytes | bytearray | memoryview | str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Send the answer; returns once the broker has routed it to the requester. Raises
        :class:`BrokerError` (``UNKNOWN_REQUEST``) when the request is gone: answered by another
        responder, timed out, or its connection was lost."""
        if self._responded:
            raise LocalProtocolError("this request was already answered")
        self._responded = True
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        hdrs = _checked_headers(headers) if headers else None
        await self._client._respond(self._link, self._token, data, hdrs)


class Service(_Inbox[IncomingRequest]):
    """Requests to a pattern: ``async for req in client.serve("cmd.>"): await req.respond(...)``.

    The broker subscribes it on first iteration (or ``await service.start()``). With a
    ``group``, each request goes to one member of the group. A service survives reconnects;
    requests received on a lost connection can no longer be answered.
    """

    def __init__(
        self,
        client: Client,
        sid: int,
        pattern: str,
        max_pending: int,
        group: str | None,
    ) -> None:
        super().__init__(client, sid, pattern, max_pending, "drop_new", group=group, serve=True)
        self._started: asyncio.Task[None] | None = None

    async def start(self) -> Service:
        """Subscribe on the broker (raises :class:`PermissionDenied` if the ACL refuses)."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._client._subscribe(self))
        await asyncio.shield(self._started)
        return self

    def __aiter__(self) -> AsyncIterator[IncomingRequest]:
        return self

    async def __anext__(self) -> IncomingRequest:
        await self.start()  # at once when started; raises if the subscription was refused
        return await self._next()

    async def __aenter__(self) -> Service:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.unsubscribe()


@dataclass(slots=True)
class _Ack:
    """A publish that asked for an acknowledgement and has not had it."""

    event: Publish
    future: asyncio.Future[None]
    sent: bool = False  #: handed to a link (resent after a reconnect)


Dialer = Callable[[], SecurityLayer]


class Client:
    """A connection to a Tessera broker that survives reconnects. Create it with :func:`connect`."""

    def __init__(
        self,
        make_layer: Dialer,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        heartbeat: float | None = None,
        reconnect: Reconnect | None = Reconnect(),
        on_error: Callable[[TesseraError], None] | None = None,
        on_state_change: Callable[[ConnectionState, TesseraError | None], None] | None = None,
    ) -> None:
        self._make_layer = make_layer
        self._host = host
        self._port = port
        self._timeout = timeout
        self._heartbeat_ms = None if heartbeat is None else int(heartbeat * 1000)
        self._reconnect = reconnect
        self._on_error = on_error
        self._on_state_change = on_state_change
        self._loop = asyncio.get_running_loop()
        self._link: Link | None = None
        self._dialing: Link | None = None
        self._welcome_waiter: asyncio.Future[Welcome] | None = None
        self._link_error: TesseraError | None = None
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._final: ConnectionClosed | None = None
        self._closing = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self._subs: dict[int, _Inbox[Any]] = {}
        self._sub_waiters: dict[int, asyncio.Future[None]] = {}
        self._unsub_waiters: dict[int, asyncio.Future[None]] = {}
        self._acks: dict[int, _Ack] = {}
        self._outq: collections.deque[Publish] = collections.deque()
        self._outq_bytes = 0
        self._dispatch_cache: dict[str, tuple[Subscription, ...]] = {}
        #: Pending requests: rid -> (the link it went out on, the caller's future).
        self._requests: dict[int, tuple[Link, asyncio.Future[Reply]]] = {}
        self._reply_acks: dict[int, asyncio.Future[None]] = {}
        #: The broker orders ``ok {sid}`` with deliveries (feature ``retain``, section 16.3).
        self._ordered_ok = False
        self._ids = itertools.count(1)
        self.state = ConnectionState.CONNECTING
        #: The broker's welcome on the current (or last) connection.
        self.welcome: Welcome | None = None
        #: Successful reconnections so far.
        self.reconnects = 0
        #: Deliveries the broker discarded because this connection fell behind (its
        #: ``slow_consumer = "drop"`` policy); each such report also goes to ``on_error``.
        self.broker_dropped = 0

    # --- public API -----------------------------------------------------------------------

    @property
    def identity(self) -> str:
        """How the broker authenticated us, e.g. ``x509:alice``."""
        w = self.welcome
        return f"{w.mechanism}:{w.identity}" if w else ""

    @property
    def max_payload(self) -> int:
        """The broker's frame limit (a payload must fit in it with its topic and headers)."""
        return self.welcome.max_frame if self.welcome else 0

    @property
    def is_open(self) -> bool:
        return self.state is ConnectionState.CONNECTED

    async def publish(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview | str,
        *,
        headers: Mapping[str, str] | None = None,
        ack: bool = True,
        retain: bool = False,
    ) -> None:
        """Publish ``payload`` on ``topic``.

        With ``retain=True`` the broker also keeps the message as the topic's last value for
        subscribers that come later (an empty payload clears it); with ``ack`` the call returns
        once the value is durable.

        With ``ack=True`` (the default) this returns once the broker has accepted the message
        and raises :class:`PermissionDenied` if the ACL refuses it; across a reconnect the
        message is sent again until acknowledged (at least once). With ``ack=False`` it returns
        as soon as the frame is queued (a refusal is reported to ``on_error``). While the client
        is reconnecting, publishes wait in a bounded buffer; when it is full
        :class:`PublishBufferFull` is raised and the message is not taken.
        """
        validate_topic(topic)
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        hdrs = _checked_headers(headers) if headers else None
        self._check_usable()
        if retain:
            self._require("retain")
        link = self._link if self.state is ConnectionState.CONNECTED else None
        if not ack:
            event = Publish(topic, data, hdrs, retain=retain)
            if link is not None:
                link.send(event)
                if link.writable is not None:
                    await link.writable
            else:
                self._enqueue(event)
            return
        ack_id = next(self._ids) & 0xFFFFFFFF
        event = Publish(topic, data, hdrs, ack=ack_id, retain=retain)
        entry = _Ack(event, self._loop.create_future())
        if link is not None:
            link.send(event)
            entry.sent = True
        else:
            self._enqueue(event)
        self._acks[ack_id] = entry
        try:
            await entry.future
        finally:
            self._acks.pop(ack_id, None)

    async def subscribe(
        self,
        pattern: str,
        *,
        max_pending: int = DEFAULT_MAX_PENDING_MESSAGES,
        overflow: Literal["drop_new", "drop_old"] = "drop_new",
        group: str | None = None,
        since: int | None = None,
        epoch: str | None = None,
        on_gap: Callable[[HistoryGap], None] | None = None,
    ) -> Subscription:
        """Subscribe to ``pattern`` (``*`` = one token, ``>`` = the rest); returns once the
        broker has accepted it, or raises :class:`PermissionDenied` / :class:`InvalidTopic`.

        The first messages are the retained values of matching topics (``msg.retained``),
        when the broker keeps any. With ``group``, subscriptions of the same group on the same
        pattern share its messages: each goes to one member. ``since`` (and ``epoch``) start
        from the history after that sequence number, where the broker keeps history; after a
        reconnect the client does this by itself."""
        validate_pattern(pattern)
        self._check_usable()
        if group is not None:
            self._require("group")
        if since is not None:
            self._require("history")
        sid = next(self._ids) & 0xFFFFFFFF
        sub = Subscription(self, sid, pattern, max_pending, overflow, group=group, on_gap=on_gap)
        if since is not None:
            sub.epoch, sub.last_seq, sub._resume = epoch, since, True
        await self._subscribe(sub)
        return sub

    def serve(
        self,
        pattern: str,
        *,
        group: str | None = None,
        max_pending: int = DEFAULT_MAX_PENDING_MESSAGES,
    ) -> Service:
        """Serve requests on ``pattern``: ``async for req in client.serve("cmd.>"): ...``.

        Needs subscribe rights on ``pattern``. With ``group``, members share the requests."""
        validate_pattern(pattern)
        self._check_usable()
        self._require("request")
        if group is not None:
            self._require("group")
        sid = next(self._ids) & 0xFFFFFFFF
        return Service(self, sid, pattern, max_pending, group)

    async def request(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview | str = b"",
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> Reply:
        """Send a request to whoever serves ``topic`` and return the first :class:`Reply`.

        Raises :class:`NoResponders` at once when nobody serves the topic,
        :class:`RequestTimeout` (a ``TimeoutError``) after ``timeout`` seconds (a reply that
        comes later is discarded), :class:`PermissionDenied` without publish rights, and
        :class:`ConnectionClosedError` if the connection is lost first (the request may or
        may not have been carried out; it is not resent)."""
        validate_topic(topic)
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        hdrs = _checked_headers(headers) if headers else None
        if not 0 < timeout <= MAX_REQUEST_TIMEOUT_MS / 1000:
            raise ValueError("timeout must be above 0 and at most one hour")
        self._check_usable()
        self._require("request")
        link = self._link if self.state is ConnectionState.CONNECTED else None
        if link is None:
            raise ConnectionClosedError(ErrorCode.NORMAL, "not connected: request not sent")
        rid = next(self._ids) & 0xFFFFFFFF
        fut: asyncio.Future[Reply] = self._loop.create_future()
        self._requests[rid] = (link, fut)
        try:
            link.send(Request(rid, topic, data, hdrs, max(1, int(timeout * 1000))))
            async with asyncio.timeout(timeout + REQUEST_TIMEOUT_GRACE):
                return await fut
        except TimeoutError as exc:
            if isinstance(exc, RequestTimeout):
                raise
            raise RequestTimeout(f"no reply within {timeout:g} s") from None
        finally:
            # The rid is never reused on this client: a late answer finds nothing and is dropped.
            self._requests.pop(rid, None)

    async def _subscribe(self, sub: _Inbox[Any]) -> None:
        sid = sub.sid
        fut: asyncio.Future[None] = self._loop.create_future()
        self._sub_waiters[sid] = fut
        self._subs[sid] = sub
        self._dispatch_cache.clear()
        try:
            if self.state is ConnectionState.CONNECTED and self._link is not None:
                sub.ready = False
                self._link.send(self._subscribe_frame(sub))
            # else: sent by _resume() when the client is connected again
            await fut
        except BaseException:
            self._subs.pop(sid, None)
            self._dispatch_cache.clear()
            sub._end(None)
            raise
        finally:
            self._sub_waiters.pop(sid, None)

    def _subscribe_frame(self, sub: _Inbox[Any]) -> Subscribe:
        since = epoch = None
        if isinstance(sub, Subscription) and sub._resume:
            since, epoch = sub.last_seq, sub.epoch
        return Subscribe(sub.sid, sub.pattern, sub.group, sub.serve, since, epoch)

    async def _respond(
        self, link: Link | None, token: int, payload: bytes, headers: dict[str, str] | None
    ) -> None:
        if link is None or link is not self._link or self.state is not ConnectionState.CONNECTED:
            raise BrokerError(
                "the connection this request came on is gone", ErrorCode.UNKNOWN_REQUEST
            )
        ack_id = next(self._ids) & 0xFFFFFFFF
        fut: asyncio.Future[None] = self._loop.create_future()
        self._reply_acks[ack_id] = fut
        try:
            link.send(ReplyFrame(token, payload, headers, ack=ack_id))
            await fut
        finally:
            self._reply_acks.pop(ack_id, None)

    def _require(self, feature: str) -> None:
        w = self.welcome
        if w is None or w.features is None or feature not in w.features:
            raise LocalProtocolError(
                f"this broker does not offer {feature!r} (docs/protocol.md section 16.1)"
            )

    async def close(self) -> None:
        """Close the connection cleanly and stop reconnecting (idempotent)."""
        if self._closing:
            await asyncio.shield(self._closed)
            return
        self._closing = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect_task
        link = self._link
        if link is not None:
            link.close()
            try:
                async with asyncio.timeout(5):
                    await asyncio.shield(link.lost)
            except TimeoutError:
                link.abort()
        self._finish(ConnectionClosedOK(ErrorCode.NORMAL, "closed by the client"))

    async def wait_closed(self) -> None:
        """Wait until the client is closed for good (by :meth:`close` or a final failure)."""
        await asyncio.shield(self._closed)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- connecting -----------------------------------------------------------------------

    async def _open(self) -> None:
        """The first connection: failures are raised to the caller, not retried."""
        try:
            self._link = await self._dial()
        except BaseException as exc:
            self._closing = True
            final = exc if isinstance(exc, ConnectionClosed) else None
            self._finish(final or ConnectionClosedError(ErrorCode.NORMAL, "connect failed"))
            raise
        self._set_state(ConnectionState.CONNECTED)

    async def _dial(self) -> Link:
        link = Link(self, self._make_layer(), self._heartbeat_ms)
        self._dialing = link
        self._link_error = None
        waiter: asyncio.Future[Welcome] = self._loop.create_future()
        self._welcome_waiter = waiter
        try:
            async with asyncio.timeout(self._timeout):
                await self._loop.create_connection(lambda: link, self._host, self._port)
                try:
                    await link.start()
                except HandshakeError as exc:
                    raise authentication_error(exc) from None
                await asyncio.shield(waiter)
        except BaseException:
            link.abort()
            if not waiter.done():
                waiter.cancel()
            raise
        finally:
            self._dialing = None
            self._welcome_waiter = None
        link.start_heartbeat()
        return link

    async def _reconnect_loop(self, cause: TesseraError) -> None:
        policy = self._reconnect
        assert policy is not None
        attempt = 0
        last: BaseException = cause
        while not self._closing:
            if policy.max_attempts is not None and attempt >= policy.max_attempts:
                break
            await asyncio.sleep(policy.delay(attempt))
            attempt += 1
            try:
                link = await self._dial()
            except (OSError, TimeoutError, ConnectionClosed) as exc:
                last = exc
                log.info("reconnect attempt %d failed: %s", attempt, exc)
                continue
            except AuthenticationError as exc:
                last = exc
                if exc.reason in _TRANSIENT_AUTH:
                    log.info("reconnect attempt %d failed: %s", attempt, exc)
                    continue
                log.warning("reconnect refused, giving up: %s", exc)
                break
            self._link = link
            self.reconnects += 1
            self._resume(link)
            self._set_state(ConnectionState.CONNECTED)
            log.info("reconnected after %d attempt(s)", attempt)
            return
        if not self._closing:
            err = (
                last
                if isinstance(last, ConnectionClosed)
                else ConnectionClosedError(_code_of(last), f"gave up reconnecting: {last}")
            )
            self._finish(err)

    def _resume(self, link: Link) -> None:
        """After a reconnect: subscribe again, resend unacknowledged and buffered publishes."""
        for sub in self._subs.values():
            sub.ready = False
            link.send(self._subscribe_frame(sub))
        for ack_id in sorted(self._acks):
            entry = self._acks[ack_id]
            if entry.sent:
                link.send(entry.event)
        while self._outq:
            event = self._outq.popleft()
            link.send(event)
            if event.ack is not None and event.ack in self._acks:
                self._acks[event.ack].sent = True
        self._outq_bytes = 0

    def _enqueue(self, event: Publish) -> None:
        policy = self._reconnect
        if policy is None:
            raise self._final or ConnectionClosedError(ErrorCode.NORMAL, "not connected")
        size = len(event.payload)
        if (
            len(self._outq) >= policy.buffer_messages
            or self._outq_bytes + size > policy.buffer_bytes
        ):
            raise PublishBufferFull(
                f"disconnected and {len(self._outq)} publishes "
                f"({self._outq_bytes} bytes) are already buffered"
            )
        self._outq.append(event)
        self._outq_bytes += size

    def _check_usable(self) -> None:
        if self._final is not None:
            raise self._final
        if self._closing:
            raise ConnectionClosedOK(ErrorCode.NORMAL, "client is closing")

    def _set_state(self, state: ConnectionState, exc: TesseraError | None = None) -> None:
        if self.state is state:
            return
        self.state = state
        if self._on_state_change is not None:
            try:
                self._on_state_change(state, exc)
            except Exception:
                log.exception("on_state_change callback failed")

    # --- link callbacks -------------------------------------------------------------------

    def link_events(self, link: Link, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Message):
                self._dispatch(link, event)
            elif isinstance(event, Ok):
                self._on_ok(event)
            elif isinstance(event, Response):
                pending = self._requests.pop(event.rid, None)
                if pending is not None and not pending[1].done():
                    pending[1].set_result(Reply(event.payload, event.headers, event.sender))
            elif isinstance(event, Error):
                self._on_error_frame(link, event)
            elif isinstance(event, Welcome):
                self.welcome = event
                feats = event.features or ()
                self._ordered_ok = "retain" in feats or "history" in feats
                waiter = self._welcome_waiter
                if link is self._dialing and waiter is not None and not waiter.done():
                    waiter.set_result(event)
            elif isinstance(event, Close):
                code = _code(event.code)
                log.info("broker closed the connection: %s %s", code.name, event.reason)
                exc: ConnectionClosed = (
                    ConnectionClosedOK(code, event.reason)
                    if code is ErrorCode.NORMAL
                    else ConnectionClosedError(code, event.reason)
                )
                self._link_error = self._link_error or exc
                link.close()
            elif isinstance(event, ProtocolFailure):
                log.warning("protocol error from broker: %s %s", event.code.name, event.message)
                self._link_error = ConnectionClosedError(event.code, event.message)
                link.flush()
                link.abort()
            elif isinstance(event, Rejected):
                log.warning("ignored a frame from the broker: %s", event.message)
            elif isinstance(event, EndOfStream):
                link.close()

    def _on_error_frame(self, link: Link, event: Error) -> None:
        err = error_from_code(event.code, event.message)
        if event.code == ErrorCode.SLOW_CONSUMER and event.dropped:
            # The broker's slow-consumer policy is "drop": it discarded deliveries for us.
            self.broker_dropped += event.dropped
        if event.rid is not None:
            pending = self._requests.pop(event.rid, None)
            if pending is not None and not pending[1].done():
                pending[1].set_exception(err)
        elif event.sid is not None or event.ack is not None:
            self._resolve(event.sid, event.ack, err)
        elif link is self._dialing:
            # An error before welcome (e.g. unsupported version): the broker closes next.
            self._link_error = err
        else:
            self._report(err)

    def link_failed(self, link: Link, exc: BaseException) -> None:
        if isinstance(exc, HandshakeError):
            err: TesseraError = authentication_error(exc)
        elif isinstance(exc, ConnectionLostError):
            err = ConnectionClosedError(exc.code, exc.reason)
        else:
            err = ConnectionClosedError(ErrorCode.PROTOCOL_ERROR, str(exc))
        self._link_error = self._link_error or err

    def link_lost(self, link: Link, exc: Exception | None) -> None:
        cause = self._link_error or ConnectionClosedError(
            ErrorCode.NORMAL, f"connection lost: {exc}" if exc else "connection lost"
        )
        if link is self._dialing:
            waiter = self._welcome_waiter
            if waiter is not None and not waiter.done():
                waiter.set_exception(cause)
            return
        if link is not self._link:
            return
        self._link = None
        if self._closing:
            return
        for sid, fut in list(self._unsub_waiters.items()):
            # The broker forgets a lost connection's subscriptions: the unsubscribe is done.
            if not fut.done():
                fut.set_result(None)
            del self._unsub_waiters[sid]
        self._fail_requests(
            ConnectionClosedError(
                cause.code, "connection lost: the request may or may not have been carried out"
            )
        )
        if self._reconnect is not None and _retryable(cause):
            log.warning("connection lost (%s); reconnecting", cause)
            self._set_state(ConnectionState.RECONNECTING, cause)
            self._reconnect_task = self._loop.create_task(self._reconnect_loop(cause))
        else:
            self._finish(
                cause
                if isinstance(cause, ConnectionClosed)
                else ConnectionClosedError(cause.code, str(cause))
            )

    # --- replies and deliveries -----------------------------------------------------------

    def _report(self, err: TesseraError) -> None:
        if self._on_error is not None:
            try:
                self._on_error(err)
            except Exception:
                log.exception("on_error callback failed")
        else:
            log.warning("broker reported an error: %s", err)

    def _resolve(self, sid: int | None, ack: int | None, err: TesseraError | None) -> None:
        fut: asyncio.Future[None] | None = None
        if sid is not None:
            fut = self._sub_waiters.get(sid) or self._unsub_waiters.pop(sid, None)
            if fut is None and err is not None and sid in self._subs:
                # A re-subscription after a reconnect was refused (the ACL changed).
                sub = self._subs.pop(sid)
                self._dispatch_cache.clear()
                sub._end(err)
                self._report(err)
                return
        elif ack is not None:
            entry = self._acks.get(ack)
            fut = entry.future if entry is not None else self._reply_acks.get(ack)
        if fut is None or fut.done():
            if err is not None:
                self._report(err)
            return
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)

    def _on_ok(self, event: Ok) -> None:
        sid = event.sid
        sub = self._subs.get(sid) if sid is not None else None
        if sub is not None:
            sub.ready = True
            if isinstance(sub, Subscription):
                if event.recovered is False:
                    gap = HistoryGap(sub.pattern, event.epoch, event.seq)
                    sub.gaps += 1
                    if sub.on_gap is not None:
                        try:
                            sub.on_gap(gap)
                        except Exception:
                            log.exception("on_gap callback failed")
                    self._report(gap)
                if event.epoch is not None and event.recovered is not True:
                    # A fresh start (or after a gap): count from the stream's position now.
                    sub.epoch, sub.last_seq = event.epoch, event.seq or 0
                sub._resume = event.epoch is not None
        self._resolve(sid, event.ack, None)

    def _dispatch(self, link: Link, msg: Message) -> None:
        if msg.sid is not None:
            # For one subscription only: a retained snapshot, a recovered message, a
            # queue-group delivery, or a request to a service.
            target = self._subs.get(msg.sid)
            if target is None or not matches(target._tokens, split_pattern(msg.topic)):
                return
            if msg.reply is not None:
                if isinstance(target, Service):
                    target._put(IncomingRequest(self, link, msg))
            elif isinstance(target, Subscription):
                target._deliver(msg)
            return
        subs = self._dispatch_cache.get(msg.topic)
        if subs is None:
            tokens = split_pattern(msg.topic)
            subs = tuple(
                s
                for s in self._subs.values()
                if isinstance(s, Subscription) and s.plain and matches(s._tokens, tokens)
            )
            if len(self._dispatch_cache) > 4096:
                self._dispatch_cache.clear()
            self._dispatch_cache[msg.topic] = subs
        ordered = self._ordered_ok
        for sub in subs:
            # A delivery before the sub's ok was routed before the subscription existed: its
            # effect is in the retained snapshot that follows the ok (section 16.3).
            if sub.ready or not ordered:
                sub._deliver(msg)

    def _fail_requests(self, exc: TesseraError) -> None:
        for _link, fut in self._requests.values():
            if not fut.done():
                fut.set_exception(exc)
        self._requests.clear()
        for ack_fut in self._reply_acks.values():
            if not ack_fut.done():
                ack_fut.set_exception(exc)
        self._reply_acks.clear()

    async def _unsubscribe(self, sub: _Inbox[Any]) -> None:
        self._subs.pop(sub.sid, None)
        self._dispatch_cache.clear()
        sub._end(None)
        link = self._link
        if self.state is not ConnectionState.CONNECTED or link is None:
            return  # not subscribed on any broker connection now; _resume will not renew it
        fut: asyncio.Future[None] = self._loop.create_future()
        self._unsub_waiters[sub.sid] = fut
        try:
            link.send(Unsubscribe(sub.sid))
            await fut
        finally:
            self._unsub_waiters.pop(sub.sid, None)

    def _finish(self, exc: ConnectionClosed) -> None:
        """Closed for good: fail what waits, end every subscription, drop buffers."""
        if self._final is None:
            self._final = exc
        self._set_state(
            ConnectionState.CLOSED, None if isinstance(exc, ConnectionClosedOK) else exc
        )
        for fut in (
            *self._sub_waiters.values(),
            *self._unsub_waiters.values(),
            *(a.future for a in self._acks.values()),
        ):
            if not fut.done():
                fut.set_exception(exc)
        self._sub_waiters.clear()
        self._unsub_waiters.clear()
        self._acks.clear()
        self._fail_requests(exc)
        self._outq.clear()
        self._outq_bytes = 0
        for sub in self._subs.values():
            sub._end(exc)
        self._subs.clear()
        self._dispatch_cache.clear()
        if not self._closed.done():
            self._closed.set_result(None)


def _checked_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Headers as the protocol allows them (checked here: the broker would close the whole
    connection with PROTOCOL_ERROR instead of refusing one publish)."""
    problem = header_problem(headers)
    if problem is not None:
        raise LocalProtocolError(f"headers {problem}")
    return dict(headers)


def _code(value: int) -> ErrorCode:
    try:
        return ErrorCode(value)
    except ValueError:
        return ErrorCode.INTERNAL_ERROR


def _code_of(exc: BaseException) -> ErrorCode:
    return exc.code if isinstance(exc, TesseraError) else ErrorCode.NORMAL


def _retryable(exc: TesseraError) -> bool:
    if isinstance(exc, AuthenticationError):
        return exc.reason in _TRANSIENT_AUTH
    return isinstance(exc, ConnectionClosed) and exc.code in _RETRYABLE_CODES


def authentication_error(exc: HandshakeError) -> AuthenticationError:
    """The SDK error for a failed security handshake, with the reason code a user can act on."""
    err = AuthenticationError(
        f"{exc.reason.value}: {exc.detail}" if exc.detail else exc.reason.value
    )
    err.reason = exc.reason.value
    return err


def _parse_url(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(
            f"unsupported URL scheme {scheme!r} (use tls://, negotiate:// or tls+negotiate://)"
        )
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    return scheme, parts.hostname, parts.port or DEFAULT_PORT


def _files_stamp(
    files: tuple[str | Path | None, str | Path | None, str | Path | None] | None,
) -> tuple[tuple[int, int, int] | None, ...]:
    """What identifies the contents of credential files cheaply: (inode, size, mtime) each."""
    if files is None:
        return ()
    stamps: list[tuple[int, int, int] | None] = []
    for path in files:
        try:
            st = os.stat(path) if path is not None else None
        except OSError:
            st = None
        stamps.append((st.st_ino, st.st_size, st.st_mtime_ns) if st is not None else None)
    return tuple(stamps)


class connect:  # used as a function: ``async with connect(...)`` / ``await connect(...)``
    """Open a connection: ``async with connect("tls://host:7443", ca=..., cert=..., key=...)``.

    URL schemes: ``tls://`` (mutual TLS: ``ca`` verifies the broker, the system store if omitted;
    ``cert``/``key`` are the client certificate, or pass a ready ``ssl_context``);
    ``negotiate://`` (Kerberos or NTLM through SPNEGO, every frame sealed with GSS: pass
    ``auth=Kerberos(...)`` or ``auth=NTLM(user, password)``; with no ``auth`` the default
    Kerberos credential cache is used); ``tls+negotiate://`` (TLS for the channel, SPNEGO bound
    to it for the identity; ``ca`` and ``auth`` as above). ``server_hostname`` overrides the name
    checked against the broker certificate and used for the Kerberos service principal
    ``<service>/<host>`` (default: the URL's host). Raises :class:`AuthenticationError` (with a
    ``reason`` code) when either side rejects the other, ``OSError`` when the broker cannot be
    reached, ``TimeoutError`` after ``timeout`` seconds.

    Once connected, a lost connection is re-established automatically (``reconnect``: a
    :class:`Reconnect` policy, ``True`` for the default one, ``False`` for none);
    ``on_state_change(state, error)`` is told about every :class:`ConnectionState` change.
    ``heartbeat`` asks the broker for a shorter heartbeat interval in seconds (it grants at
    least 1 s and at most its own configured interval).
    """

    def __init__(
        self,
        url: str,
        *,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
        auth: Kerberos | NTLM | None = None,
        service: str = "tessera",
        server_hostname: str | None = None,
        timeout: float = 10.0,
        heartbeat: float | None = None,
        reconnect: bool | Reconnect = True,
        on_error: Callable[[TesseraError], None] | None = None,
        on_state_change: Callable[[ConnectionState, TesseraError | None], None] | None = None,
    ) -> None:
        self._scheme, self._host, self._port = _parse_url(url)
        if self._scheme == "negotiate":
            if ca is not None or cert is not None or ssl_context is not None:
                raise ValueError("negotiate:// uses no TLS: use tls+negotiate:// with ca=")
            self._ctx = None
        else:
            if self._scheme == "tls+negotiate" and cert is not None:
                raise ValueError("tls+negotiate:// authenticates with auth=, not a certificate")
            self._ctx = ssl_context if ssl_context is not None else client_context(ca, cert, key)
        # Certificate files are read again on reconnect when they changed (a renewed client
        # certificate after CREDENTIAL_EXPIRED); a ready ssl_context is the caller's to renew.
        self._ctx_files = (ca, cert, key) if self._ctx is not None and ssl_context is None else None
        self._ctx_stamp = _files_stamp(self._ctx_files)
        if self._scheme == "tls" and auth is not None:
            raise ValueError("auth= is for negotiate:// and tls+negotiate:// URLs")
        self._auth = auth
        self._service = service
        self._server_hostname = server_hostname or self._host
        self._timeout = timeout
        self._heartbeat = heartbeat
        if reconnect is True:
            reconnect = Reconnect()
        self._reconnect: Reconnect | None = reconnect or None
        self._on_error = on_error
        self._on_state_change = on_state_change
        self._client: Client | None = None

    def _context(self) -> ssl.SSLContext | None:
        """The TLS client context, rebuilt first if its certificate files changed on disk."""
        files = self._ctx_files
        if files is not None:
            stamp = _files_stamp(files)
            if stamp != self._ctx_stamp:
                try:
                    self._ctx = client_context(*files)
                except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                    log.warning(
                        "cannot load the renewed certificate files, keeping the old: %s", exc
                    )
                else:
                    log.info("certificate files changed: using the renewed credentials")
                self._ctx_stamp = stamp
        return self._ctx

    def _make_layer(self) -> SecurityLayer:
        self._context()
        if self._scheme == "tls":
            assert self._ctx is not None
            return TLSLayer(self._ctx, server_side=False, server_hostname=self._server_hostname)
        try:
            from tessera_mq.auth.negotiate import NegotiateClientLayer, tls_channel_bindings  # noqa: PLC0415
            from tessera_mq.auth.stack import StackedLayer  # noqa: PLC0415
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ImportError(
                f"{self._scheme}:// needs Kerberos support: pip install 'tessera-mq[negotiate]' "
                f"({exc})"
            ) from exc
        host, service, auth = self._server_hostname, self._service, self._auth
        if self._scheme == "negotiate":
            return NegotiateClientLayer(host, service, credential=auth)
        assert self._ctx is not None

        def inner(outer: SecurityLayer) -> SecurityLayer:
            assert isinstance(outer, TLSLayer)
            der = outer.peer_certificate()
            if der is None:
                raise HandshakeError(HandshakeReason.TLS_BAD_SERVER_CERT, "no broker certificate")
            return NegotiateClientLayer(
                host,
                service,
                credential=auth,
                channel_bindings=tls_channel_bindings(der),
                protect_frames=False,
            )

        return StackedLayer(TLSLayer(self._ctx, server_side=False, server_hostname=host), inner)

    async def _connect(self) -> Client:
        client = Client(
            self._make_layer,
            self._host,
            self._port,
            timeout=self._timeout,
            heartbeat=self._heartbeat,
            reconnect=self._reconnect,
            on_error=self._on_error,
            on_state_change=self._on_state_change,
        )
        await client._open()
        self._client = client
        return client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._connect().__await__()

    async def __aenter__(self) -> Client:
        return await self._connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.close()
