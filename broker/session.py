"""One client connection: an asyncio ``BufferedProtocol`` that drives a security layer and the
sans-I/O :class:`~client_sdk.protocol.Connection`. No task per connection: it runs on callbacks.

Inbound: socket bytes -> security layer -> plaintext -> Connection -> events -> handled here.
Outbound: frames go into a bounded outbox; the broker flushes every dirty session once per
event-loop turn, so a burst of deliveries becomes one TLS write and one syscall.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
from typing import TYPE_CHECKING

from auth.acl import Action
from auth.errors import AuthError, HandshakeError
from auth.identity import Identity
from auth.layer import SecurityLayer
from client_sdk.protocol import (
    Close,
    Connection,
    EndOfStream,
    Error,
    ErrorCode,
    Event,
    Hello,
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
from client_sdk.protocol.codec import encode_frame
from client_sdk.protocol.errors import LocalProtocolError
from client_sdk.protocol.limits import MAX_ID, MIN_HEARTBEAT_MS

if TYPE_CHECKING:
    from broker.server import Broker, Listener

__all__ = ["Session"]

log = logging.getLogger("tessera.broker")


def _attempted_mechanism(layer: SecurityLayer) -> str | None:
    """The SPNEGO mechanism a connection uses or is trying (``kerberos``, ``ntlm``), for the log
    and audit lines of a failed handshake; ``None`` for TLS or before the first token."""
    inner = getattr(layer, "inner", None)  # StackedLayer (tls+negotiate): the SPNEGO layer
    mechanism = getattr(inner if inner is not None else layer, "mechanism", None)
    return mechanism if isinstance(mechanism, str) else None


#: Decisions cached per connection ((action, subject) -> allowed); cleared when full.
_ACL_CACHE_ENTRIES = 256


def _heartbeat_ms(requested: int | None, configured_s: float) -> int:
    """The interval announced in welcome: the client may ask for a shorter one (to notice a dead
    broker sooner), never below the protocol minimum nor above the broker's own."""
    configured = int(configured_s * 1000)
    if requested is None:
        return configured
    return max(MIN_HEARTBEAT_MS, min(requested, configured))


class Session(asyncio.BufferedProtocol):
    """The broker's side of one connection."""

    __slots__ = (
        "_acl_cache",
        "_close_code",
        "_close_timer",
        "_deadline",
        "_dirty",
        "_dropped",
        "_gate_timer",
        "_open",
        "_outbox",
        "_outbox_bytes",
        "_outbox_msgs",
        "_paused",
        "_pending_in",
        "_recv_buf",
        "_step_future",
        "_stepping",
        "broker",
        "conn",
        "counted",
        "id",
        "identity",
        "layer",
        "listener",
        "peer",
        "subs",
        "transport",
    )

    def __init__(self, broker: Broker, listener: Listener, conn_id: int) -> None:
        self.broker = broker
        self.listener = listener
        self.id = conn_id
        self.transport: asyncio.Transport | None = None
        self.layer: SecurityLayer = listener.make_layer()
        limits = broker.config.limits
        self.conn = Connection(
            Role.SERVER,
            max_frame=limits.max_frame_bytes,
            max_frame_before_hello=limits.max_frame_bytes_before_hello,
            max_topic_bytes=limits.max_topic_bytes,
            max_topic_tokens=limits.max_topic_tokens,
        )
        self.identity: Identity | None = None
        self.counted = False
        self.peer = "?"
        self.subs: dict[int, str] = {}
        self._outbox: list[bytes] = []
        self._outbox_bytes = 0
        self._outbox_msgs = 0
        self._open = False  #: session open for deliveries (welcome sent, not closing)
        self._dirty = False
        self._paused = False
        self._deadline: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._acl_cache: dict[tuple[Action, str], bool] = {}
        self._recv_buf = broker.recv_buffer
        self._stepping = False
        self._step_future: concurrent.futures.Future[None] | None = None  # handshake-pool
        self._gate_timer: asyncio.TimerHandle | None = None  # handshake-pool: held, not read
        self._close_code: str | None = None
        self._dropped = 0
        self._pending_in: list[bytes] = []

    # --- logging ------------------------------------------------------------------------

    def _who(self) -> str:
        ident = str(self.identity) if self.identity is not None else "-"
        return f"[c{self.id} {self.peer} {ident}]"

    @property
    def audit_fields(self) -> dict[str, object]:
        ident = self.identity
        fields: dict[str, object] = {
            "conn": self.id,
            "peer": self.peer,
            "listener": self.listener.label or self.listener.config.bind,
        }
        if ident is not None:
            fields["identity"] = str(ident)
            fields["mechanism"] = ident.mechanism
        else:
            mechanism = _attempted_mechanism(self.layer)
            if mechanism is not None:
                fields["mechanism"] = mechanism
        return fields

    # --- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
        if not self.broker.admit(self):
            log.warning("%s refused: max_connections reached", self._who())
            transport.abort()
            return
        loop = self.broker.loop
        self._deadline = loop.call_later(
            self.broker.config.limits.handshake_timeout, self._handshake_timeout
        )
        if log.isEnabledFor(logging.DEBUG):  # _who() formats eagerly
            log.debug("%s accepted on %s", self._who(), self.listener.label)
        if self.layer.blocking_handshake:  # handshake-pool (issue 13): pace failing sources
            self._gate_retry()
        self.layer.start()
        self._write_wire(self.layer.data_to_send())

    def _gate_retry(self) -> None:
        """handshake-pool (issue 13): read this connection only once its source may start a
        handshake (broker/handshake_pool.py FailureGate); until then it is held, unread, and
        the handshake deadline still applies."""
        held = self._gate_timer is not None
        self._gate_timer = None
        gate, source = self.broker.handshake_gate, self.peer.rpartition(":")[0]
        transport = self.transport
        if transport is None or transport.is_closing():
            if held:
                gate.release(source)
            return
        wait = gate.admit(source, held=held)
        if wait == math.inf:  # too many connections of this address held already
            self._close_code = "handshake_busy"
            self._abort()
        elif wait > 0:
            transport.pause_reading()
            self._gate_timer = self.broker.loop.call_later(wait, self._gate_retry)
        elif held:
            transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._recv_buf

    def buffer_updated(self, nbytes: int) -> None:
        self._on_wire(bytes(self._recv_buf[:nbytes]))

    def eof_received(self) -> bool:
        self._on_wire(b"")
        # handshake-pool: a half-closed peer still gets (and is audited with) its verdict; the
        # transport is closed once the queued step is done, or at the handshake deadline.
        return self._stepping

    def connection_lost(self, exc: Exception | None) -> None:
        if self._step_future is not None:  # handshake-pool: a queued step of ours never runs
            self._step_future.cancel()
        if self._gate_timer is not None:  # handshake-pool: a held connection is gone
            self._gate_timer.cancel()
            self._gate_timer = None
            self.broker.handshake_gate.release(self.peer.rpartition(":")[0])
        for timer in (self._deadline, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._deadline = self._close_timer = None
        router = self.broker.router
        for pattern in self.subs.values():
            router.unsubscribe(self, pattern)
        self.subs.clear()
        self._open = False
        self._outbox.clear()
        self._outbox_bytes = 0
        self._outbox_msgs = 0
        if self.conn.state is not State.CLOSED:
            self.conn.state = State.CLOSED
        self.broker.forget(self)
        self.broker.audit.record("close", self, code=self._close_code)
        if log.isEnabledFor(logging.DEBUG):  # _who() formats eagerly
            log.debug("%s connection lost%s", self._who(), f": {exc}" if exc else "")

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._outbox:
            self._mark_dirty()

    # --- inbound --------------------------------------------------------------------------

    def _on_wire(self, data: bytes) -> None:
        if self._stepping:
            # A blocking handshake step is running in a worker thread: keep the bytes in order.
            self._pending_in.append(data)
            return
        layer = self.layer
        was_established = layer.established
        if layer.blocking_handshake and not was_established:
            # handshake-pool (issue 13): fair per peer address, skipped once we are gone/late.
            deadline = self._deadline.when() if self._deadline is not None else None
            step = self.broker.handshake_pool.submit(
                self.peer.rpartition(":")[0], layer.receive_data, data, deadline=deadline
            )
            if step is None:  # this address has too many handshakes in progress: refuse early
                self._close_code = "handshake_busy"
                self.broker.stats["handshakes_refused_busy"] += 1
                self._abort()
                return
            self._stepping = True
            self._step_future = step
            fut = asyncio.wrap_future(step, loop=self.broker.loop)
            fut.add_done_callback(lambda f: self._step_done(f, data))
            return
        try:
            layer.receive_data(data)
        except HandshakeError as exc:
            self._auth_failed(exc)
            return
        except AuthError as exc:
            self._layer_failed(exc)
            return
        self._after_layer(data, was_established)

    def _step_done(self, fut: asyncio.Future[None], data: bytes) -> None:
        self._stepping = False
        self._step_future = None
        if fut.cancelled():  # handshake-pool: skipped (connection gone or past its deadline)
            self._pending_in.clear()
            self._abort()
            return
        exc = fut.exception()  # always retrieve it, even when the connection is gone
        if self.transport is None or self.transport.is_closing():
            self._pending_in.clear()
            if isinstance(exc, HandshakeError):
                # The client closed right after its token (a scanner does): audit it anyway.
                self._audit_auth_failure(exc)
            return
        if isinstance(exc, HandshakeError):
            self._pending_in.clear()
            self._auth_failed(exc)
            return
        if exc is not None:
            self._pending_in.clear()
            if not isinstance(exc, AuthError):
                log.error("%s handshake step crashed: %r", self._who(), exc)
            self._layer_failed(exc)
            return
        self._after_layer(data, False)
        pending, self._pending_in = self._pending_in, []
        for chunk in pending:
            if self.transport is None or self.transport.is_closing():
                break
            self._on_wire(chunk)

    def _layer_failed(self, exc: BaseException) -> None:
        self.broker.audit.record(
            "layer_failure", self, level=logging.WARNING, reason=type(exc).__name__
        )
        self._abort()

    def _after_layer(self, data: bytes, was_established: bool) -> None:
        layer = self.layer
        out = layer.data_to_send()
        if out:
            self._write_wire(out)
        if not layer.established:
            return
        if not was_established:
            self.identity = layer.peer_identity
            self.broker.audit.record("auth_success", self)
            if layer.blocking_handshake:  # handshake-pool: a good handshake costs no budget
                self.broker.handshake_gate.succeeded(self.peer.rpartition(":")[0])
            if not self.broker.admit_identity(self):
                self.broker.audit.record(
                    "limit_exceeded", self, level=logging.WARNING, reason="connections_per_identity"
                )
                self.close(ErrorCode.LIMIT_EXCEEDED, "too many connections for this identity")
                return
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.broker.loop.call_later(
                self.broker.config.limits.hello_timeout, self._handshake_timeout
            )
        plain = layer.read()
        if plain or not data:
            self._handle(self.conn.receive_data(plain if data else b"", self.broker.loop.time()))

    def _audit_auth_failure(self, exc: HandshakeError) -> None:
        self._close_code = "auth_failure"
        self.broker.audit.record(
            "auth_failure", self, level=logging.WARNING, reason=exc.reason.value
        )
        mechanism = _attempted_mechanism(self.layer)
        log.info(
            "%s handshake failed: %s%s",
            self._who(),
            exc,
            f" (mechanism: {mechanism})" if mechanism else "",
        )

    def _auth_failed(self, exc: HandshakeError) -> None:
        self._audit_auth_failure(exc)
        # Flush any alert the layer produced, then drop the connection.
        try:
            out = self.layer.data_to_send()
        except Exception:  # best effort: the layer has already failed
            out = b""
        if out:
            self._write_wire(out)
        self._close_transport()

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Publish):
                self._on_publish(event)
            elif isinstance(event, Subscribe):
                self._on_subscribe(event)
            elif isinstance(event, Unsubscribe):
                self._on_unsubscribe(event)
            elif isinstance(event, Hello):
                self._on_hello(event)
            elif isinstance(event, Rejected):
                log.info(
                    "%s rejected request: %s (%s)", self._who(), event.code.name, event.message
                )
            elif isinstance(event, ProtocolFailure):
                self._close_code = event.code.name.lower()
                log.warning(
                    "%s protocol error, closing: %s (%s)",
                    self._who(),
                    event.code.name,
                    event.message,
                )
                self._flush_conn()
                self._begin_close()
                return
            elif isinstance(event, Close):
                self._close_code = self._close_code or "client_close"
                if log.isEnabledFor(logging.DEBUG):  # _who() formats eagerly
                    log.debug("%s client closed: code=%s", self._who(), event.code)
                self._begin_close()
                return
            elif isinstance(event, EndOfStream):
                self._close_code = self._close_code or "eof"
                self._close_transport()
                return
        self._flush_conn()

    def _on_hello(self, event: Hello) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self.conn.state is not State.OPEN:
            return  # hello and close in one read: nothing to welcome
        limits = self.broker.config.limits
        ident = self.identity
        self.conn.send(
            Welcome(
                version=self.conn.version,
                server=self.broker.server_name,
                mechanism=ident.mechanism if ident else "anonymous",
                identity=ident.name if ident else "",
                max_frame=limits.max_frame_bytes,
                heartbeat_ms=_heartbeat_ms(event.heartbeat_ms, limits.heartbeat_interval),
            )
        )
        self.conn.mark_alive(self.broker.loop.time())
        self._open = True
        log.info("%s session open (client %r)", self._who(), event.client[:64])

    def _reply(self, event: Ok | Error) -> None:
        """Answer a request, unless the client closed in the same read (its close frame came
        after the request): the request is still carried out, there is just no one to tell."""
        if self.conn.state is State.OPEN:
            self.conn.send(event)

    def _allowed(self, action: Action, subject: str) -> bool:
        key = (action, subject)
        cached = self._acl_cache.get(key)
        if cached is not None:
            return cached
        ident = self.identity
        if ident is None:
            return False
        decision = self.broker.policy.check(ident, action, subject)
        if len(self._acl_cache) >= _ACL_CACHE_ENTRIES:
            self._acl_cache.clear()
        self._acl_cache[key] = decision.allowed
        if not decision.allowed:
            self.broker.audit.record(
                "denied",
                self,
                level=logging.WARNING,
                action=action.value,
                subject=subject,
                reason=decision.reason,
            )
        return decision.allowed

    def _on_publish(self, event: Publish) -> None:
        if not self._allowed(Action.PUBLISH, event.topic):
            log.info("%s publish to %r denied", self._who(), event.topic)
            self._reply(
                Error(
                    ErrorCode.PERMISSION_DENIED,
                    f"not allowed to publish to {event.topic!r}",
                    ack=event.ack,
                    topic=event.topic if event.ack is None else None,
                )
            )
            return
        self.broker.router.publish(event.topic, event.payload, event.headers)
        if event.ack is not None:
            self._reply(Ok(ack=event.ack))

    def _on_subscribe(self, event: Subscribe) -> None:
        sid = event.sid
        if sid in self.subs:
            self._reply(
                Error(ErrorCode.INVALID_SUBSCRIPTION, f"subscription id {sid} is in use", sid=sid)
            )
            return
        if len(self.subs) >= self.broker.config.limits.max_subscriptions:
            self._reply(
                Error(
                    ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                    f"at most {self.broker.config.limits.max_subscriptions} subscriptions",
                    sid=sid,
                )
            )
            return
        if not self._allowed(Action.SUBSCRIBE, event.pattern):
            log.info("%s subscribe to %r denied", self._who(), event.pattern)
            self._reply(
                Error(
                    ErrorCode.PERMISSION_DENIED,
                    f"not allowed to subscribe to {event.pattern!r}",
                    sid=sid,
                )
            )
            return
        self.subs[sid] = event.pattern
        self.broker.router.subscribe(self, event.pattern)
        self._reply(Ok(sid=sid))
        if log.isEnabledFor(logging.DEBUG):  # _who() formats eagerly
            log.debug("%s subscribed sid=%d %r", self._who(), sid, event.pattern)

    def _on_unsubscribe(self, event: Unsubscribe) -> None:
        pattern = self.subs.pop(event.sid, None)
        if pattern is None:
            self._reply(
                Error(
                    ErrorCode.INVALID_SUBSCRIPTION,
                    f"no subscription with id {event.sid}",
                    sid=event.sid,
                )
            )
            return
        self.broker.router.unsubscribe(self, pattern)
        self._reply(Ok(sid=event.sid))

    # --- outbound -------------------------------------------------------------------------

    def deliver(self, data: bytes, count: int) -> None:
        """Router callback at the end of a loop turn: queue a block of ``count`` delivery
        frames (the same bytes object for every subscriber of the block). Hot path: keep lean.

        Replies of this session's own (welcome, ok) were moved to the outbox when its requests
        were handled, earlier in the turn, so they precede these deliveries.
        """
        if not self._open:
            return
        broker = self.broker
        size = self._outbox_bytes + len(data)
        if size > broker.max_pending_bytes or self._outbox_msgs + count > broker.max_pending_msgs:
            if broker.drop_slow_consumers:
                self._drop(count)
            else:
                self._slow_consumer(size, self._outbox_msgs + count)
            return
        self._outbox.append(data)
        self._outbox_bytes = size
        self._outbox_msgs += count
        if not self._dirty:
            self._dirty = True
            broker.dirty.append(self)

    def _drop(self, count: int) -> None:
        """Slow-consumer policy ``drop``: discard deliveries, count them, tell the client later."""
        if self._dropped == 0:
            self.broker.audit.record(
                "slow_consumer",
                self,
                level=logging.WARNING,
                policy="drop",
                pending_bytes=self._outbox_bytes,
                pending_messages=self._outbox_msgs,
            )
        self._dropped += count
        self.broker.stats["slow_consumer_drops"] += count

    def _slow_consumer(self, pending: int, count: int) -> None:
        self._outbox.clear()
        self._outbox_bytes = 0
        self._outbox_msgs = 0
        self.broker.stats["slow_consumer_disconnects"] += 1
        self.broker.audit.record(
            "slow_consumer",
            self,
            level=logging.WARNING,
            policy="disconnect",
            pending_bytes=pending,
            pending_messages=count,
        )
        self.close(ErrorCode.SLOW_CONSUMER, "slow consumer: too many undelivered messages")

    def _flush_conn(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self._outbox.append(data)
            self._outbox_bytes += len(data)
            if not self._dirty:
                self._mark_dirty()

    def _mark_dirty(self) -> None:
        self._dirty = True
        self.broker.mark_dirty(self)

    def flush(self) -> None:
        """Called by the broker once per loop turn for dirty sessions: one write for all."""
        self._dirty = False
        if self._paused or not self._outbox or self.transport is None:
            return
        outbox = self._outbox
        if self._dropped:
            # The backlog is going out: tell the client how many deliveries it missed.
            dropped, self._dropped = self._dropped, 0
            outbox.append(
                encode_frame(
                    Error(
                        ErrorCode.SLOW_CONSUMER,
                        f"{dropped} deliveries dropped: this connection fell behind",
                        dropped=min(dropped, MAX_ID),
                    )
                )
            )
        data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
        outbox.clear()
        self._outbox_bytes = 0
        self._outbox_msgs = 0
        try:
            self.layer.send(data)
        except AuthError:
            self._abort()
            return
        self._write_wire(self.layer.data_to_send())

    def _write_wire(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # --- closing --------------------------------------------------------------------------

    def close(self, code: ErrorCode, reason: str) -> None:
        """Send a close frame, flush, and close the transport (aborted after close_timeout)."""
        self._open = False
        self._close_code = self._close_code or code.name.lower()
        if self.conn.state in (State.OPEN, State.HANDSHAKE):
            with contextlib.suppress(LocalProtocolError):
                self.conn.send(Close(code, reason))
        self._flush_conn()
        self._begin_close()

    def _begin_close(self) -> None:
        """Flush what is queued, send the layer's close record, close the transport."""
        self._open = False
        self._paused = False
        self.flush()
        if self.layer.established:
            try:
                self.layer.close()
                self._write_wire(self.layer.data_to_send())
            except AuthError:
                pass
        self._close_transport()

    def _close_transport(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        if self._close_timer is None:
            self._close_timer = self.broker.loop.call_later(
                self.broker.config.limits.close_timeout, self._abort
            )

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _handshake_timeout(self) -> None:
        self._deadline = None
        stage = "hello" if self.layer.established else "security handshake"
        self.broker.audit.record(
            "handshake_timeout", self, level=logging.WARNING, stage=stage.replace(" ", "_")
        )
        if self.layer.established:
            self.close(ErrorCode.HANDSHAKE_TIMEOUT, f"no {stage} within the deadline")
        else:
            self._abort()

    def on_timer(self, now: float) -> None:
        """Heartbeat tick from the broker's sweep."""
        conn = self.conn
        if conn.state is not State.OPEN:
            return
        conn.handle_timer(now)
        if conn.closed:
            log.info("%s heartbeat timeout, closing", self._who())
            self.broker.audit.record("heartbeat_timeout", self, level=logging.WARNING)
            self._flush_conn()
            self._begin_close()
        else:
            self._flush_conn()
