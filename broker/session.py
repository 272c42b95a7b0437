"""One client connection: the thin asyncio drivers. Socket bytes -> security layer ->
plaintext -> :class:`~broker.handler.RequestHandler`; and back: the handler's outbox -> security
layer -> socket. Both drivers hold no broker logic (no ACL, no subscriptions, no outbox policy),
run on callbacks (no task per connection), and are the handler's one
:class:`~broker.handler.ConnectionIO`:

* :class:`Session` (every listener kind): an asyncio ``BufferedProtocol`` whose transport
  carries the ciphertext, with one receive buffer shared by every connection; the sans-I/O
  security layer (TLS over memory BIOs, SPNEGO, or both stacked) is driven by the shared
  :class:`~auth.pump.LayerPump`.
* :class:`SocketSession` (listeners whose layer stack is TLS alone): an ``ssl.SSLSocket`` on
  the connection's own non-blocking socket (:class:`~auth.tls.ServerTLSSocket`), watched
  through the broker's one :class:`Readiness` set (an epoll set the loop watches as one
  reader); no asyncio transport, no memory BIOs, no loop handle per socket. An idle connection
  costs 3.7 KB (TLS) to 5.6 KB (mutual TLS) less this way (docs/performance.md, "Memory on
  public APIs").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import select
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from tessera_mq.auth.errors import AuthError, HandshakeError
from tessera_mq.auth.layer import SecurityLayer
from tessera_mq.auth.pump import LayerPump, StepSkipped
from tessera_mq.auth.tls import ServerTLSSocket
from tessera_mq.broker.handler import RequestHandler

if TYPE_CHECKING:
    from tessera_mq.broker.handshake_pool import FailureGate, HandshakePool
    from tessera_mq.broker.hub import Hub

__all__ = ["Readiness", "Session", "SocketSession", "attempted_mechanism"]

log = logging.getLogger("tessera.broker")


def attempted_mechanism(layer: SecurityLayer) -> str | None:
    """The SPNEGO mechanism a connection uses or is trying (``kerberos``, ``ntlm``), for the log
    and audit lines of a failed handshake; ``None`` for TLS or before the first token."""
    inner = getattr(layer, "inner", None)  # StackedLayer (tls+negotiate): the SPNEGO layer
    mechanism = getattr(inner if inner is not None else layer, "mechanism", None)
    return mechanism if isinstance(mechanism, str) else None


class Session(asyncio.BufferedProtocol):
    """The broker's side of one connection, as seen by asyncio."""

    __slots__ = (
        "_close_timer",
        "_gate",
        "_gate_timer",
        "_label",
        "_pool",
        "_recv",
        "_step",
        "handler",
        "hub",
        "layer",
        "pump",
        "transport",
    )

    def __init__(
        self,
        hub: Hub,
        layer: SecurityLayer,
        conn_id: int,
        *,
        label: str,
        pool: HandshakePool,
        gate: FailureGate,
        recv_buffer: memoryview,
    ) -> None:
        self.hub = hub
        self.layer = layer
        self.pump = LayerPump(layer, self, self._offload)
        self.transport: asyncio.Transport | None = None
        self._label = label
        self._pool = pool
        self._gate = gate
        #: Held, unread, until this address may start another blocking handshake.
        self._gate_timer: asyncio.TimerHandle | None = None
        self._step: concurrent.futures.Future[None] | None = None
        self._recv = recv_buffer
        self._close_timer: asyncio.TimerHandle | None = None
        self.handler = RequestHandler(hub, self, conn_id, peer="?", listener=label)
        self.handler.describe_mechanism = self._mechanism  # a bound method: no closure

    def _mechanism(self) -> str | None:
        return attempted_mechanism(self.layer)

    # --- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not an asyncio.Transport subclass, only alike)
        self.transport = cast(asyncio.Transport, transport)
        handler = self.handler
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            handler.peer = f"{peer[0]}:{peer[1]}"
        if not self.hub.admit(handler):
            log.warning("%s refused: max_connections reached", handler.who())
            self.transport.abort()
            return
        handler.start(self.hub.now())
        if log.isEnabledFor(logging.DEBUG):  # who() formats eagerly
            log.debug("%s accepted on %s", handler.who(), self._label)
        if self.layer.blocking_handshake:  # pace addresses whose handshakes keep failing
            self._gate_retry()
        self.layer.start()
        self.wire_out(self.layer.data_to_send())

    def _source(self) -> str:
        return self.handler.peer.rpartition(":")[0]

    def _gate_retry(self) -> None:
        """Read this connection only once its address may start a blocking handshake
        (broker/handshake_pool.py ``FailureGate``); until then it is held, unread, and the
        handshake deadline still applies."""
        held = self._gate_timer is not None
        self._gate_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            if held:
                self._gate.release(self._source())
            return
        wait = self._gate.admit(self._source(), held=held)
        if wait == math.inf:  # too many connections of this address held already
            self.handler.close_code = "handshake_busy"
            self.abort()
        elif wait > 0:
            transport.pause_reading()
            self._gate_timer = self.hub.loop.call_later(wait, self._gate_retry)
        elif held:
            transport.resume_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._recv

    def buffer_updated(self, nbytes: int) -> None:
        self.hub.bytes_in += nbytes
        self.pump.feed(bytes(self._recv[:nbytes]))

    def eof_received(self) -> bool:
        self.pump.feed(b"")
        # A half-closed peer whose handshake step is queued still gets (and is audited with)
        # its verdict: the transport stays open until the step is done or the deadline passes.
        return self.pump.stepping

    def connection_lost(self, exc: Exception | None) -> None:
        if self._step is not None:  # a queued handshake step of ours need not run any more
            self._step.cancel()
        if self._gate_timer is not None:  # a held connection is gone
            self._gate_timer.cancel()
            self._gate_timer = None
            self._gate.release(self._source())
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        handler = self.handler
        self.hub.watch.lost(handler)
        if handler in self.hub.handlers:
            handler.lost()
        if log.isEnabledFor(logging.DEBUG):  # who() formats eagerly
            log.debug("%s connection lost%s", handler.who(), f": {exc}" if exc else "")

    def pause_writing(self) -> None:
        self.handler.outbox_paused(True)

    def resume_writing(self) -> None:
        self.handler.outbox_paused(False)

    # --- blocking handshake steps: the per-source handshake pool ------------------------------

    def _offload(
        self,
        step: Callable[[bytes], None],
        data: bytes,
        done: Callable[[BaseException | None], None],
    ) -> None:
        """Run a blocking handshake step on the broker's pool, fairly per peer address; a step
        still queued at the handshake deadline, or when the connection went, never runs."""
        handler = self.handler
        fut = self._pool.submit(self._source(), step, data, deadline=handler.deadline)
        if fut is None:  # this address has too many handshakes in progress: refuse early
            handler.close_code = "handshake_busy"
            self.hub.count("handshakes_refused_busy")
            done(StepSkipped())
            self.abort()
            return
        self._step = fut
        self.pause_reading()  # what the peer sends meanwhile waits in the kernel, not here
        asyncio.wrap_future(fut, loop=self.hub.loop).add_done_callback(
            lambda f: self._step_finished(f, done)
        )

    def _step_finished(
        self, fut: asyncio.Future[None], done: Callable[[BaseException | None], None]
    ) -> None:
        self._step = None
        if fut.cancelled():  # skipped: the connection went, or its deadline passed in the queue
            done(StepSkipped())
            self.abort()
            return
        done(fut.exception())

    # --- PumpOwner: what comes out of the security layer -------------------------------------

    def wire_out(self, data: bytes) -> None:
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            self.hub.bytes_out += len(data)
            transport.write(data)

    def layer_established(self) -> bool:
        if self.layer.blocking_handshake:  # a good handshake costs its address no budget
            self._gate.succeeded(self._source())
        admitted = self.handler.authenticated(self.layer.peer_identity, self.hub.now())
        if admitted:
            self.hub.watch.authenticated(self)  # since, credential expiry (broker/expiry.py)
        return admitted

    def plaintext(self, data: bytes) -> None:
        self.handler.receive(data, self.hub.now())

    def layer_failed(self, exc: BaseException) -> None:
        handler = self.handler
        if isinstance(exc, HandshakeError):
            handler.close_code = "auth_failure"
            handler.hub.audit("auth_failure", handler, logging.WARNING, reason=exc.reason.value)
            mechanism = attempted_mechanism(self.layer)
            log.info(
                "%s handshake failed: %s%s",
                handler.who(),
                exc,
                f" (mechanism: {mechanism})" if mechanism else "",
            )
            self.pump.write_alert()
            self.close(graceful=False)
            return
        if not isinstance(exc, AuthError):
            log.error("%s handshake step crashed: %r", handler.who(), exc)
        handler.hub.audit("layer_failure", handler, logging.WARNING, reason=type(exc).__name__)
        self.abort()

    def alive(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def pump_idle(self) -> None:
        if self._gate_timer is None:  # (a connection held by the failure gate stays held)
            self.resume_reading()

    # --- ConnectionIO: what the handler asks for ---------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.alive():
            return
        try:
            self.layer.send(data)
        except AuthError:
            self.abort()
            return
        self.wire_out(self.layer.data_to_send())

    def close(self, *, graceful: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if graceful and self.layer.established:
            try:
                self.layer.close()
                self.wire_out(self.layer.data_to_send())
            except AuthError:
                pass
        transport.close()
        if self._close_timer is None:
            self._close_timer = self.hub.loop.call_later(self.hub.limits.close_timeout, self.abort)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.alive():
            assert self.transport is not None
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.alive():
            assert self.transport is not None
            self.transport.resume_reading()


def session_factory(
    hub: Hub,
    make_layer: Callable[[], SecurityLayer],
    next_id: Callable[[], int],
    *,
    label: Callable[[], str],
    pool: HandshakePool,
    gate: FailureGate,
    recv_buffer: memoryview,
) -> Callable[[], Session]:
    """The ``protocol_factory`` of one listener."""

    def factory() -> Session:
        return Session(
            hub,
            make_layer(),
            next_id(),
            label=label(),
            pool=pool,
            gate=gate,
            recv_buffer=recv_buffer,
        )

    return factory


#: Readiness events one poll of the :class:`Readiness` set takes (the rest, level-triggered,
#: come with the next loop turn; asyncio's selector takes what epoll returns, up to the fd count).
_EVENTS_PER_POLL = 1024

_READ_EVENTS = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP


class Readiness:
    """The sockets of every :class:`SocketSession` of a loop in one epoll set, which the loop
    watches as a single reader: per connection a dict entry here instead of a loop ``Handle``,
    a selector key and a bound method (about 320 bytes per idle connection). Level-triggered,
    as asyncio's selector: what a callback leaves unread is reported again."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._sessions: dict[int, SocketSession] = {}
        loop.add_reader(self._epoll.fileno(), self._poll)

    def watch(self, fd: int, session: SocketSession, mask: int) -> None:
        """Report ``mask`` events of ``fd`` to ``session`` from now on (0: none, forget it;
        call it before the socket is closed)."""
        sessions = self._sessions
        if self._epoll.closed:  # the broker has stopped: nothing is watched any more
            return
        if not mask:
            if sessions.pop(fd, None) is not None:
                self._epoll.unregister(fd)
        elif fd in sessions:
            self._epoll.modify(fd, mask)
        else:
            self._epoll.register(fd, mask)
            sessions[fd] = session

    def _poll(self) -> None:
        try:
            events = self._epoll.poll(0, _EVENTS_PER_POLL)
        except InterruptedError:
            return
        sessions = self._sessions
        for fd, mask in events:
            session = sessions.get(fd)
            if session is not None:  # (a callback earlier in this batch may have closed it)
                session.ready(mask)

    def close(self) -> None:
        if not self._epoll.closed:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._sessions.clear()


#: Room left in the shared receive buffer below which a read turn stops: one TLS record's
#: plaintext (16 KiB), so OpenSSL never holds decrypted bytes the socket's readiness would not
#: announce again.
_RECORD_BYTES = 16 * 1024


class SocketSession:
    """The broker's side of one connection on a TLS-only listener: ``ssl.SSLSocket`` on the
    connection's own socket, driven by the loop's readiness callbacks.

    The same duties as :class:`Session` towards the handler and the hub: admission, the
    handshake deadline (the handler's timer), audit of a failed handshake, the
    identity, reading paused and resumed on the handler's request, the handler's output written
    in one ``SSL_write`` per flush, ``close(graceful)`` after what is queued with close_notify,
    ``abort``. Output the socket does not take at once stays here (the bytes OpenSSL asked to
    be offered again) and the handler's outbox is paused until it has gone: what a slow peer
    makes the broker hold is bounded by the outbox, as with a transport's write buffer.
    """

    __slots__ = (
        "_close_timer",
        "_closing",
        "_fd",
        "_out",
        "_paused",
        "_readiness",
        "_reading",
        "_recv",
        "_writing",
        "handler",
        "hub",
        "layer",
    )

    def __init__(
        self,
        hub: Hub,
        layer: ServerTLSSocket,
        conn_id: int,
        *,
        label: str,
        recv_buffer: memoryview,
        readiness: Readiness,
    ) -> None:
        self.hub = hub
        self.layer = layer
        self._readiness = readiness
        self._fd = layer.sock.fileno()
        self._recv = recv_buffer
        #: Unsent output; the first item is what OpenSSL must be offered again as it is.
        self._out: list[bytes] | None = None
        self._reading = False  #: the reader callback is registered
        self._writing = False  #: the writer callback is registered
        self._paused = False  #: the handler asked not to read
        #: None: open; False/True: closing (after the unsent output), gracefully or not;
        #: the socket is closed once ``_fd`` is -1.
        self._closing: bool | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self.handler = RequestHandler(hub, self, conn_id, peer="?", listener=label)

    def start(self, peer: object) -> None:
        """The listener accepted the connection from ``peer`` (its address)."""
        handler = self.handler
        if isinstance(peer, tuple) and len(peer) >= 2:
            handler.peer = f"{peer[0]}:{peer[1]}"
        if not self.hub.admit(handler):
            log.warning("%s refused: max_connections reached", handler.who())
            self.abort()
            return
        handler.start(self.hub.now())
        if log.isEnabledFor(logging.DEBUG):  # who() formats eagerly
            log.debug("%s accepted on %s", handler.who(), handler.listener)
        self._set_reading(True)  # the client speaks first

    # --- readiness ----------------------------------------------------------------------------

    def _set_reading(self, on: bool) -> None:
        if on != self._reading:
            self._reading = on
            self._watch()

    def _set_writing(self, on: bool) -> None:
        if on != self._writing:
            self._writing = on
            self._watch()

    def _watch(self) -> None:
        mask = (_READ_EVENTS if self._reading else 0) | (select.EPOLLOUT if self._writing else 0)
        self._readiness.watch(self._fd, self, mask)

    def ready(self, mask: int) -> None:
        """The socket is readable and/or writable (:class:`Readiness`)."""
        if mask & _READ_EVENTS and self._reading:
            self._readable()
        if mask & _WRITE_EVENTS and self._writing:
            self._writable()

    def _readable(self) -> None:
        if self._closing is not None:
            return
        if not self.layer.established and not self._handshake():
            return
        layer = self.layer
        buf = self._recv
        room = len(buf)
        n = 0
        eof = False
        failure: BaseException | None = None
        while room - n >= _RECORD_BYTES:
            try:
                got = layer.recv_into(buf[n:])
            except (AuthError, OSError) as exc:
                failure = exc
                break
            if got < 0:
                break
            if got == 0:
                eof = True
                break
            n += got
        handler = self.handler
        if n:
            self.hub.bytes_in += n
            handler.receive(bytes(buf[:n]), self.hub.now())
        if failure is not None:
            if isinstance(failure, HandshakeError):  # a broken record: as Session reports it
                self._failed(failure)
            else:  # the connection broke (reset)
                self.abort()
        elif eof:
            handler.receive(b"", self.hub.now())
            self.close(graceful=False)  # (a no-op if the handler closed already)
        elif self._reading and not self._paused and layer.pending():
            self.hub.loop.call_soon(self._readable)

    def _writable(self) -> None:
        if self._fd < 0:
            return
        if not self.layer.established:
            self._set_writing(False)
            self._readable()
            return
        out = self._out
        layer = self.layer
        while out:
            first = out[0]
            try:
                n = layer.send(first)
            except (AuthError, OSError):
                self.abort()
                return
            if n < 0:
                return
            if n < len(first):  # (partial writes: only if CPython ever enables them)
                out[0] = first[n:]
                continue
            del out[0]
            if len(out) > 1:
                out[:] = [b"".join(out)]
        self._out = None
        self._set_writing(False)
        if self._closing is not None:
            self._finish_close()
        else:
            self.handler.outbox_paused(False)

    def _handshake(self) -> bool:
        """Advance the handshake; True once established and admitted."""
        layer = self.layer
        try:
            wait = layer.handshake()
        except HandshakeError as exc:
            self._failed(exc)
            return False
        except OSError:
            self.abort()
            return False
        if wait is not None:
            if wait == "write":
                self._set_writing(True)
            return False
        handler = self.handler
        admitted = handler.authenticated(layer.peer_identity, self.hub.now())
        if admitted:
            self.hub.watch.authenticated(self)  # since, credential expiry (broker/expiry.py)
        return admitted and self._closing is None

    def _failed(self, exc: HandshakeError) -> None:
        handler = self.handler
        handler.close_code = "auth_failure"
        handler.hub.audit("auth_failure", handler, logging.WARNING, reason=exc.reason.value)
        log.info("%s handshake failed: %s", handler.who(), exc)
        self.abort()  # OpenSSL has written its alert to the socket already

    # --- ConnectionIO: what the handler asks for ---------------------------------------------

    def write(self, data: bytes) -> None:
        if self._closing is not None or self._fd < 0 or not data:
            return
        if not self.layer.established:
            self.abort()
            return
        self.hub.bytes_out += len(data)
        out = self._out
        if out is not None:
            out.append(data)
            return
        sock = self.layer.sock
        # Several records: corked, they leave as one segment train, as one write of a memory
        # BIO's contents would (SSL_write sends each record on its own: a peer would wake up
        # for every 16 KiB).
        cork = len(data) > _RECORD_BYTES
        try:
            if cork:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            try:
                n = self.layer.send(data)
            finally:
                if cork:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        except (AuthError, OSError):
            self.abort()
            return
        if n == len(data):
            return
        self._out = [data if n < 0 else data[n:]]
        self._set_writing(True)
        self.handler.outbox_paused(True)

    def close(self, *, graceful: bool) -> None:
        if self._closing is not None or self._fd < 0:
            return
        self._closing = graceful
        self._set_reading(False)
        if self._close_timer is None:
            self._close_timer = self.hub.loop.call_later(self.hub.limits.close_timeout, self.abort)
        if self._out is None:
            self._finish_close()

    def _finish_close(self) -> None:
        if self._closing and self.layer.established:
            self.layer.shutdown()  # close_notify, best effort (the peer's is not awaited)
        self.abort()

    def abort(self) -> None:
        fd = self._fd
        if fd < 0:
            return
        if self._reading or self._writing:
            self._reading = self._writing = False
            self._readiness.watch(fd, self, 0)
        self._fd = -1
        self._out = None
        self.layer.close()
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self.hub.loop.call_soon(self._lost)  # as a transport reports connection_lost

    def _lost(self) -> None:
        handler = self.handler
        self.hub.watch.lost(handler)
        if handler in self.hub.handlers:
            handler.lost()
        if log.isEnabledFor(logging.DEBUG):  # who() formats eagerly
            log.debug("%s connection lost", handler.who())

    def pause_reading(self) -> None:
        self._paused = True
        self._set_reading(False)

    def resume_reading(self) -> None:
        self._paused = False
        if self._closing is None and self._fd >= 0:
            self._set_reading(True)
            if self.layer.established and self.layer.pending():
                self.hub.loop.call_soon(self._readable)
