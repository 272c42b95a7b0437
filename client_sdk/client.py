"""The asyncio client: ``async with connect(url, ...) as client``.

A thin driver around the sans-I/O core: an ``asyncio.Protocol`` feeds socket bytes to the security
layer and the :class:`~client_sdk.protocol.Connection`; requests that expect an answer wait on
futures keyed by subscription id or acknowledgement id; deliveries are dispatched to every local
subscription whose pattern matches the topic (one delivery frame serves them all).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from auth.credentials import NTLM, Kerberos
from auth.errors import AuthError, HandshakeError, HandshakeReason
from auth.layer import SecurityLayer
from auth.tls import TLSLayer, client_context
from client_sdk.protocol import (
    Close,
    Connection,
    EndOfStream,
    Error,
    ErrorCode,
    Hello,
    Message,
    Ok,
    ProtocolFailure,
    Publish,
    Rejected,
    Role,
    State,
    Subscribe,
    Unsubscribe,
    Welcome,
)
from client_sdk.protocol.errors import (
    AuthenticationError,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    LocalProtocolError,
    TesseraError,
    error_from_code,
)
from client_sdk.protocol.topics import matches, split_pattern, validate_pattern, validate_topic

__all__ = ["DEFAULT_PORT", "Client", "Delivery", "Subscription", "connect"]

log = logging.getLogger("tessera.client")

DEFAULT_PORT = 7443
CLIENT_NAME = "tessera-py/0.1.0"

#: Messages a subscription buffers for a slow application before it drops new ones.
DEFAULT_MAX_PENDING_MESSAGES = 10_000

_SCHEMES = ("tls", "negotiate", "tls+negotiate")


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message received on a subscription."""

    topic: str
    payload: bytes
    headers: Mapping[str, str] | None = None


class Subscription:
    """A live subscription: iterate it with ``async for``; end it with :meth:`unsubscribe`.

    Messages wait in a bounded local queue (``max_pending``); when the application falls behind
    further, new messages are dropped and counted in :attr:`dropped`.
    """

    def __init__(self, client: Client, sid: int, pattern: str, max_pending: int) -> None:
        self._client = client
        self.sid = sid
        self.pattern = pattern
        self._tokens = split_pattern(pattern)
        self.max_pending = max_pending
        self.dropped = 0
        self._queue: collections.deque[Delivery] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended: BaseException | None = None
        self.active = True

    def _put(self, msg: Delivery) -> None:
        if len(self._queue) >= self.max_pending:
            self.dropped += 1
            return
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

    def __aiter__(self) -> AsyncIterator[Delivery]:
        return self

    async def __anext__(self) -> Delivery:
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

    async def get(self, timeout: float | None = None) -> Delivery:
        """The next message (raises ``TimeoutError`` after ``timeout`` seconds)."""
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    async def unsubscribe(self) -> None:
        """End the subscription on the broker; messages already queued can still be read."""
        if self.active:
            await self._client._unsubscribe(self)


class _ClientProtocol(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.client._transport = transport

    def data_received(self, data: bytes) -> None:
        self.client._on_wire(data)

    def eof_received(self) -> bool:
        self.client._on_wire(b"")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._on_lost(exc)

    def pause_writing(self) -> None:
        self.client._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        fut = self.client._writable
        self.client._writable = None
        if fut is not None and not fut.done():
            fut.set_result(None)


class Client:
    """A connection to a Tessera broker. Create it with :func:`connect`."""

    def __init__(
        self,
        layer: SecurityLayer,
        *,
        on_error: Callable[[TesseraError], None] | None = None,
    ) -> None:
        self._layer = layer
        self._conn = Connection(Role.CLIENT)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._welcome: asyncio.Future[Welcome] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._close_exc: ConnectionClosed | None = None
        self._subs: dict[int, Subscription] = {}
        self._pending_subs: dict[int, asyncio.Future[None]] = {}
        self._pending_acks: dict[int, asyncio.Future[None]] = {}
        self._dispatch_cache: dict[str, tuple[Subscription, ...]] = {}
        self._ids = itertools.count(1)
        self._flush_scheduled = False
        self._writable: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._on_error = on_error
        self.welcome: Welcome | None = None
        self._stepping = False
        self._pending_in: list[bytes] = []

    # --- public API -----------------------------------------------------------------------

    @property
    def identity(self) -> str:
        """How the broker authenticated us, e.g. ``x509:alice``."""
        w = self.welcome
        return f"{w.mechanism}:{w.identity}" if w else ""

    @property
    def max_payload(self) -> int:
        """The broker's frame limit (a payload must fit in it with its topic and headers)."""
        return self._conn.peer_max_frame

    @property
    def is_open(self) -> bool:
        return self._conn.state is State.OPEN and self._close_exc is None

    async def publish(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview | str,
        *,
        headers: Mapping[str, str] | None = None,
        ack: bool = True,
    ) -> None:
        """Publish ``payload`` on ``topic``.

        With ``ack=True`` (the default) this returns once the broker has accepted the message
        and raises :class:`PermissionDenied` if the ACL refuses it. With ``ack=False`` it returns
        as soon as the frame is queued (faster; a refusal is reported to ``on_error``).
        """
        validate_topic(topic)
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        hdrs = dict(headers) if headers else None
        if not ack:
            self._send(Publish(topic, data, hdrs))
            if self._writable is not None:
                await self._writable
            return
        ack_id = next(self._ids) & 0xFFFFFFFF
        fut = self._loop.create_future()
        self._pending_acks[ack_id] = fut
        try:
            self._send(Publish(topic, data, hdrs, ack=ack_id))
            await fut
        finally:
            self._pending_acks.pop(ack_id, None)

    async def subscribe(
        self, pattern: str, *, max_pending: int = DEFAULT_MAX_PENDING_MESSAGES
    ) -> Subscription:
        """Subscribe to ``pattern`` (``*`` = one token, ``>`` = the rest); returns once the
        broker has accepted it, or raises :class:`PermissionDenied` / :class:`InvalidTopic`."""
        validate_pattern(pattern)
        sid = next(self._ids) & 0xFFFFFFFF
        sub = Subscription(self, sid, pattern, max_pending)
        fut = self._loop.create_future()
        self._pending_subs[sid] = fut
        self._subs[sid] = sub
        self._dispatch_cache.clear()
        try:
            self._send(Subscribe(sid, pattern))
            await fut
        except BaseException:
            self._subs.pop(sid, None)
            self._dispatch_cache.clear()
            sub._end(None)
            raise
        finally:
            self._pending_subs.pop(sid, None)
        return sub

    async def close(self) -> None:
        """Close the connection cleanly (idempotent)."""
        if self._transport is None:
            return
        if self._conn.state in (State.OPEN, State.HANDSHAKE):
            with contextlib.suppress(LocalProtocolError):
                self._conn.send(Close(ErrorCode.NORMAL, ""))
            self._flush()
            self._layer.close()
            self._write_wire()
        if not self._transport.is_closing():
            self._transport.close()
        try:
            async with asyncio.timeout(5):
                await asyncio.shield(self._closed)
        except TimeoutError:
            self._transport.abort()
        self._fail_all(ConnectionClosedOK(ErrorCode.NORMAL, "closed by the client"))

    async def wait_closed(self) -> None:
        """Wait until the connection is closed (by either side)."""
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

    # --- internals ------------------------------------------------------------------------

    async def _unsubscribe(self, sub: Subscription) -> None:
        fut = self._loop.create_future()
        self._pending_subs[sub.sid] = fut
        try:
            self._send(Unsubscribe(sub.sid))
            await fut
        finally:
            self._pending_subs.pop(sub.sid, None)
            self._subs.pop(sub.sid, None)
            self._dispatch_cache.clear()
            sub._end(None)

    def _check_open(self) -> None:
        if self._close_exc is not None:
            raise self._close_exc
        if self._conn.state is not State.OPEN:
            raise ConnectionClosedError(ErrorCode.NORMAL, "connection is closing")

    def _send(self, event: Publish | Subscribe | Unsubscribe | Hello) -> None:
        if not isinstance(event, Hello):
            self._check_open()
        self._conn.send(event)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._conn.data_to_send()
        if data and self._layer.established:
            try:
                self._layer.send(data)
            except AuthError as exc:
                self._abort_with(ConnectionClosedError(ErrorCode.INTERNAL_ERROR, str(exc)))
                return
        self._write_wire()

    def _write_wire(self) -> None:
        out = self._layer.data_to_send()
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(out)

    def _on_wire(self, data: bytes) -> None:
        if self._stepping:
            self._pending_in.append(data)
            return
        layer = self._layer
        was_established = layer.established
        if layer.blocking_handshake and not was_established:
            # A handshake step may block (a Kerberos initiator asking the KDC for a ticket):
            # run it off the loop and keep later bytes in order behind it.
            self._stepping = True
            fut = self._loop.run_in_executor(None, layer.receive_data, data)
            fut.add_done_callback(lambda f: self._step_done(f, data))
            return
        try:
            layer.receive_data(data)
        except AuthError as exc:
            self._layer_error(exc)
            return
        self._after_layer(data, was_established)

    def _layer_error(self, exc: BaseException) -> None:
        if isinstance(exc, HandshakeError):
            self._write_wire()
            self._abort_with(authentication_error(exc))
        else:
            self._abort_with(ConnectionClosedError(ErrorCode.PROTOCOL_ERROR, str(exc)))

    def _step_done(self, fut: asyncio.Future[None], data: bytes) -> None:
        self._stepping = False
        exc = fut.exception()
        if exc is not None:
            self._pending_in.clear()
            self._layer_error(exc)
            return
        self._after_layer(data, False)
        pending, self._pending_in = self._pending_in, []
        for chunk in pending:
            if self._close_exc is not None:
                break
            self._on_wire(chunk)

    def _after_layer(self, data: bytes, was_established: bool) -> None:
        layer = self._layer
        self._write_wire()
        if not layer.established:
            if not data:
                self._abort_with(AuthenticationError("broker closed during the handshake"))
            return
        if not was_established:
            self._send(Hello(client=CLIENT_NAME))
        plain = layer.read()
        if plain or not data:
            events = self._conn.receive_data(plain if data else b"", self._loop.time())
            self._handle(events)
        if self._conn.has_data_to_send:
            self._flush()

    def _handle(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, Message):
                self._dispatch(event)
            elif isinstance(event, Ok):
                self._resolve(event.sid, event.ack, None)
            elif isinstance(event, Error):
                err = error_from_code(event.code, event.message)
                if event.sid is None and event.ack is None:
                    if self._welcome.done():
                        self._report(err)
                    else:
                        self._abort_with(err)
                else:
                    self._resolve(event.sid, event.ack, err)
            elif isinstance(event, Welcome):
                self.welcome = event
                self._conn.mark_alive(self._loop.time())
                if not self._welcome.done():
                    self._welcome.set_result(event)
                self._schedule_timer()
            elif isinstance(event, Close):
                code = _code(event.code)
                exc: ConnectionClosed
                if code is ErrorCode.NORMAL:
                    exc = ConnectionClosedOK(code, event.reason)
                elif code is ErrorCode.AUTHENTICATION_FAILED:
                    exc = ConnectionClosedError(code, event.reason)
                else:
                    exc = ConnectionClosedError(code, event.reason)
                log.info("broker closed the connection: %s %s", code.name, event.reason)
                self._abort_with(exc, graceful=True)
            elif isinstance(event, ProtocolFailure):
                log.warning("protocol error from broker: %s %s", event.code.name, event.message)
                self._flush()
                self._abort_with(ConnectionClosedError(event.code, event.message))
            elif isinstance(event, Rejected):
                log.warning("ignored a frame from the broker: %s", event.message)
            elif isinstance(event, EndOfStream):
                self._abort_with(
                    ConnectionClosedError(ErrorCode.NORMAL, "broker closed the connection")
                )

    def _report(self, err: TesseraError) -> None:
        if self._on_error is not None:
            self._on_error(err)
        else:
            log.warning("broker reported an error: %s", err)

    def _resolve(self, sid: int | None, ack: int | None, err: TesseraError | None) -> None:
        fut = None
        if sid is not None:
            fut = self._pending_subs.get(sid)
        elif ack is not None:
            fut = self._pending_acks.get(ack)
        if fut is None or fut.done():
            if err is not None:
                self._report(err)
            return
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)

    def _dispatch(self, msg: Message) -> None:
        subs = self._dispatch_cache.get(msg.topic)
        if subs is None:
            tokens = split_pattern(msg.topic)
            subs = tuple(s for s in self._subs.values() if matches(s._tokens, tokens))
            if len(self._dispatch_cache) > 4096:
                self._dispatch_cache.clear()
            self._dispatch_cache[msg.topic] = subs
        if not subs:
            return
        delivery = Delivery(msg.topic, msg.payload, msg.headers)
        for sub in subs:
            sub._put(delivery)

    def _schedule_timer(self) -> None:
        hb = self._conn.heartbeat
        if hb is None:
            return
        self._timer = self._loop.call_later(max(0.25, hb / 4), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._conn.state is not State.OPEN:
            return
        self._conn.handle_timer(self._loop.time())
        if self._conn.closed:
            self._flush()
            self._abort_with(
                ConnectionClosedError(ErrorCode.HEARTBEAT_TIMEOUT, "broker stopped responding")
            )
            return
        self._flush()
        self._schedule_timer()

    def _abort_with(self, exc: TesseraError, graceful: bool = False) -> None:
        if self._close_exc is None:
            self._close_exc = (
                exc
                if isinstance(exc, ConnectionClosed)
                else ConnectionClosedError(exc.code, str(exc))
            )
        if not self._welcome.done():
            self._welcome.set_exception(exc)
            self._welcome.exception()  # mark retrieved; connect() re-raises it
        self._fail_all(self._close_exc)
        if self._transport is not None and not self._transport.is_closing():
            if graceful:
                self._transport.close()
            else:
                self._transport.abort()

    def _fail_all(self, exc: ConnectionClosed) -> None:
        for fut in (*self._pending_subs.values(), *self._pending_acks.values()):
            if not fut.done():
                fut.set_exception(exc)
        self._pending_subs.clear()
        self._pending_acks.clear()
        for sub in self._subs.values():
            sub._end(exc)
        self._subs.clear()
        self._dispatch_cache.clear()

    def _on_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._close_exc is None:
            reason = f"connection lost: {exc}" if exc else "connection lost"
            self._abort_with(ConnectionClosedError(ErrorCode.NORMAL, reason))
        if not self._closed.done():
            self._closed.set_result(None)


def _code(value: int) -> ErrorCode:
    try:
        return ErrorCode(value)
    except ValueError:
        return ErrorCode.INTERNAL_ERROR


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
        on_error: Callable[[TesseraError], None] | None = None,
    ) -> None:
        self._url = url
        self._scheme, self._host, self._port = _parse_url(url)
        if self._scheme == "negotiate":
            if ca is not None or cert is not None or ssl_context is not None:
                raise ValueError("negotiate:// uses no TLS: use tls+negotiate:// with ca=")
            self._ctx = None
        else:
            if self._scheme == "tls+negotiate" and cert is not None:
                raise ValueError("tls+negotiate:// authenticates with auth=, not a certificate")
            self._ctx = ssl_context if ssl_context is not None else client_context(ca, cert, key)
        if self._scheme == "tls" and auth is not None:
            raise ValueError("auth= is for negotiate:// and tls+negotiate:// URLs")
        self._auth = auth
        self._service = service
        self._server_hostname = server_hostname or self._host
        self._timeout = timeout
        self._on_error = on_error
        self._client: Client | None = None

    def _make_layer(self) -> SecurityLayer:
        if self._scheme == "tls":
            assert self._ctx is not None
            return TLSLayer(self._ctx, server_side=False, server_hostname=self._server_hostname)
        try:
            from auth.negotiate import NegotiateClientLayer, tls_channel_bindings  # noqa: PLC0415
            from auth.stack import StackedLayer  # noqa: PLC0415
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ImportError(
                f"{self._scheme}:// needs Kerberos support: pip install 'tessera[negotiate]' "
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
        loop = asyncio.get_running_loop()
        layer = self._make_layer()
        client = Client(layer, on_error=self._on_error)
        async with asyncio.timeout(self._timeout):
            try:
                await loop.create_connection(
                    lambda: _ClientProtocol(client), self._host, self._port
                )
                try:
                    if layer.blocking_handshake:
                        await asyncio.to_thread(layer.start)
                    else:
                        layer.start()
                except HandshakeError as exc:
                    raise authentication_error(exc) from None
                client._write_wire()
                await asyncio.shield(client._welcome)
            except BaseException:
                if client._transport is not None:
                    client._transport.abort()
                raise
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
