"""One transport to the broker: socket -> security layer -> protocol core, and back.

A :class:`Link` lives from TCP connect to connection loss; the :class:`~client_sdk.Client`
survives it and opens a new link when it reconnects. The link is a thin ``asyncio.Protocol``
driver around the sans-I/O pieces: it never interprets requests, it hands every event to its
owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from tessera_mq.auth.errors import AuthError, HandshakeError
from tessera_mq.auth.layer import SecurityLayer
from tessera_mq.auth.pump import LayerPump
from tessera_mq.client.protocol import (
    Close,
    Connection,
    ErrorCode,
    Event,
    Hello,
    Publish,
    Reply,
    Request,
    Role,
    State,
    Subscribe,
    Unsubscribe,
)
from tessera_mq.client.protocol.errors import LocalProtocolError

__all__ = ["CLIENT_NAME", "Link", "LinkOwner"]

log = logging.getLogger("tessera.client")

CLIENT_NAME = "tessera-py/0.1.0"


class LinkOwner(Protocol):
    """What a link reports to (the client)."""

    def link_events(self, link: Link, events: list[Event]) -> None: ...

    def link_failed(self, link: Link, exc: BaseException) -> None:
        """The security layer failed (a handshake refusal, a broken record)."""

    def link_lost(self, link: Link, exc: Exception | None) -> None:
        """The transport is gone."""


class Link(asyncio.Protocol):
    """The client's side of one connection."""

    def __init__(
        self, owner: LinkOwner, layer: SecurityLayer, heartbeat_ms: int | None = None
    ) -> None:
        self.owner = owner
        #: The heartbeat interval asked for in hello (the broker decides; None: its default).
        self.heartbeat_ms = heartbeat_ms
        self.layer = layer
        self.conn = Connection(Role.CLIENT)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.writable: asyncio.Future[None] | None = None
        self._flush_scheduled = False
        self.pump = LayerPump(layer, self, self._offload, eof_fails=True)
        self._timer: asyncio.TimerHandle | None = None
        self._lost_deferred: tuple[Exception | None] | None = None

    # --- asyncio callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._on_wire(data)

    def eof_received(self) -> bool:
        self._on_wire(b"")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pump.stepping:
            # A handshake step is still running on bytes that arrived before the loss (the
            # broker's refusal, say): report the loss after it, so its verdict is known.
            self._lost_deferred = (exc,)
            return
        self._report_lost(exc)

    def _report_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter = self.writable
        self.writable = None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not self.lost.done():
            self.lost.set_result(None)
        self.owner.link_lost(self, exc)

    def pause_writing(self) -> None:
        self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        waiter = self.writable
        self.writable = None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- handshake ------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin the security handshake (off the loop when it may block on a KDC)."""
        try:
            if self.layer.blocking_handshake:
                await asyncio.to_thread(self.layer.start)
            else:
                self.layer.start()
        except HandshakeError:
            # Tell the broker why (the layer may have queued an ERROR record) before closing.
            with contextlib.suppress(Exception):
                self.write_wire()
            raise
        self.write_wire()

    # --- inbound: the shared layer pump and what comes out of it ---------------------------

    def _on_wire(self, data: bytes) -> None:
        self.pump.feed(data)

    def _offload(
        self,
        step: Callable[[bytes], None],
        data: bytes,
        done: Callable[[BaseException | None], None],
    ) -> None:
        fut = self.loop.run_in_executor(None, step, data)
        fut.add_done_callback(lambda f: done(f.exception()))

    def wire_out(self, data: bytes) -> None:
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def layer_established(self) -> bool:
        self.send(Hello(client=CLIENT_NAME, heartbeat_ms=self.heartbeat_ms))
        return True

    def plaintext(self, data: bytes) -> None:
        events = self.conn.receive_data(data, self.loop.time())
        if events:
            self.owner.link_events(self, events)
        if self.conn.has_data_to_send:
            self.flush()

    def layer_failed(self, exc: BaseException) -> None:
        if isinstance(exc, HandshakeError):
            self.pump.write_alert()  # the layer may have an alert or error record for the peer
        self.owner.link_failed(self, exc)
        self.abort()

    def alive(self) -> bool:
        return not self.lost.done()

    def pump_idle(self) -> None:
        deferred = self._lost_deferred
        if deferred is not None:
            self._lost_deferred = None
            self._report_lost(deferred[0])

    # --- outbound -------------------------------------------------------------------------

    def send(self, event: Publish | Subscribe | Unsubscribe | Request | Reply | Hello) -> None:
        """Queue a request; written at the end of this loop turn with everything else queued."""
        self.conn.send(event)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        data = self.conn.data_to_send()
        if data and self.layer.established:
            try:
                self.layer.send(data)
            except AuthError as exc:
                self.layer_failed(exc)
                return
        self.write_wire()

    def write_wire(self) -> None:
        out = self.layer.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    # --- heartbeats and closing ----------------------------------------------------------

    def start_heartbeat(self) -> None:
        hb = self.conn.heartbeat
        if hb is not None and self._timer is None and not self.lost.done():
            self._timer = self.loop.call_later(max(0.25, hb / 4), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.conn.state is not State.OPEN:
            return
        self.conn.handle_timer(self.loop.time())
        self.flush()
        if self.conn.closed:
            log.warning("broker stopped answering heartbeats; dropping the connection")
            self.owner.link_failed(
                self,
                ConnectionLostError(ErrorCode.HEARTBEAT_TIMEOUT, "broker stopped responding"),
            )
            self.abort()
            return
        self.start_heartbeat()

    def close(self) -> None:
        """Send a normal close frame and close the transport."""
        if self.conn.state in (State.OPEN, State.HANDSHAKE):
            with contextlib.suppress(LocalProtocolError):
                self.conn.send(Close(ErrorCode.NORMAL, ""))
            self.flush()
            with contextlib.suppress(AuthError):
                self.layer.close()
            self.write_wire()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class ConnectionLostError(Exception):
    """Internal: why a link went down when no frame said so."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
