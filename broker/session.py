"""One client connection: the thin asyncio driver. Socket bytes -> security layer (through the
shared :class:`~auth.pump.LayerPump`) -> plaintext -> :class:`~broker.handler.RequestHandler`;
and back: the handler's outbox -> security layer -> socket.

It holds no broker logic: no ACL, no subscriptions, no outbox policy. It runs on callbacks
(``BufferedProtocol`` with one receive buffer shared by every connection), no task per
connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from tessera_mq.auth.errors import AuthError, HandshakeError
from tessera_mq.auth.layer import SecurityLayer
from tessera_mq.auth.pump import LayerPump, StepSkipped
from tessera_mq.broker.handler import RequestHandler

if TYPE_CHECKING:
    from tessera_mq.broker.handshake_pool import FailureGate, HandshakePool
    from tessera_mq.broker.hub import Hub

__all__ = ["Session", "attempted_mechanism"]

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
