"""Drive a security layer from a byte stream: the code the broker's sessions and the SDK's links
share (bytes in, handshake steps off the event loop when they may block, plaintext out).

It is sans-I/O like the layers themselves: no asyncio, no socket. The driver passes an
``offload`` function that runs a blocking handshake step in a worker thread and reports back on
its own thread (the broker gives it its bounded handshake pool, the SDK the loop's default
executor), and an owner that receives what comes out. Bytes that arrive while a step runs wait
behind it, in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from tessera_mq.auth.errors import AuthError, HandshakeError, HandshakeReason
from tessera_mq.auth.layer import SecurityLayer

__all__ = ["MAX_PENDING_BYTES", "LayerPump", "Offload", "PumpOwner", "StepSkipped"]

#: Bytes a peer may send while one of its handshake steps runs (drivers also stop reading
#: meanwhile); past it the handshake fails. A first flight is one token (64 KiB by default,
#: ``max_handshake_token_bytes``) plus what a client may pipeline behind it (a hello frame).
MAX_PENDING_BYTES = 256 * 1024

#: ``offload(step, data, done)``: run ``step(data)`` off the loop, then call ``done(exc)`` (the
#: exception it raised, or ``None``) on the loop's thread.
Offload = Callable[[Callable[[bytes], None], bytes, Callable[[BaseException | None], None]], None]


class StepSkipped(Exception):
    """What ``offload`` reports when it never ran the step (the connection went, or its
    deadline passed while the step was queued): nothing failed, nothing is to be reported."""


class PumpOwner(Protocol):
    """What a :class:`LayerPump` reports to (a broker session, an SDK link)."""

    def wire_out(self, data: bytes) -> None:
        """Write ``data`` (non-empty) to the socket."""

    def layer_established(self) -> bool:
        """The handshake has just completed; return False to stop (the owner is closing)."""

    def plaintext(self, data: bytes) -> None:
        """Application plaintext from the peer; ``b""`` is EOF after the handshake."""

    def layer_failed(self, exc: BaseException) -> None:
        """The layer failed: a :class:`HandshakeError` (then :meth:`LayerPump.write_alert` sends
        the peer its alert), another :class:`AuthError` (a broken record), or anything a
        handshake step raised."""

    def alive(self) -> bool:
        """False once the connection is gone or closing: results of a step are then dropped."""

    def pump_idle(self) -> None:
        """A blocking step and the bytes queued behind it are done (nothing is in flight)."""


class LayerPump:
    """Feeds socket bytes through one security layer on behalf of its owner."""

    __slots__ = (
        "_eof_fails",
        "_offload",
        "_owner",
        "_pending",
        "_pending_bytes",
        "_stepping",
        "_was_established",
        "layer",
    )

    def __init__(
        self, layer: SecurityLayer, owner: PumpOwner, offload: Offload, *, eof_fails: bool = False
    ) -> None:
        self.layer = layer
        self._owner = owner
        self._offload = offload
        self._stepping = False
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._was_established = False
        #: Also report EOF before the handshake completed as a failure (a client wants to know
        #: that the broker hung up; a broker just lets the transport close).
        self._eof_fails = eof_fails

    @property
    def stepping(self) -> bool:
        """True while a blocking handshake step runs in a worker thread."""
        return self._stepping

    def feed(self, data: bytes) -> None:
        """Bytes read from the socket (``b""``: EOF)."""
        if self._stepping:
            self._pending_bytes += len(data)
            if self._pending_bytes > MAX_PENDING_BYTES:
                self._pending.clear()
                self._failed(
                    HandshakeError(HandshakeReason.MALFORMED, "too much data during the handshake")
                )
                return
            self._pending.append(data)
            return
        layer = self.layer
        if layer.blocking_handshake and not layer.established:
            self._stepping = True
            self._offload(layer.receive_data, data, lambda exc: self._step_done(exc, data))
            return
        try:
            layer.receive_data(data)
        except AuthError as exc:
            self._failed(exc)
            return
        self._after(data)

    def _step_done(self, exc: BaseException | None, data: bytes) -> None:
        self._stepping = False
        self._pending_bytes = 0
        owner = self._owner
        if isinstance(exc, StepSkipped):
            self._pending.clear()
        elif exc is not None:
            self._pending.clear()
            self._failed(exc)
        elif not owner.alive():
            self._pending.clear()
        else:
            self._after(data)
            pending, self._pending = self._pending, []
            for chunk in pending:
                if not owner.alive():
                    break
                self.feed(chunk)  # queues behind a new step again if one starts
        if not self._stepping:
            owner.pump_idle()

    def _failed(self, exc: BaseException) -> None:
        self._owner.layer_failed(exc)

    def write_alert(self) -> None:
        """After a :class:`HandshakeError`: write the alert or ERROR record the layer queued for
        the peer (the owner calls it once it has recorded the failure, before closing)."""
        if not self._owner.alive():
            return
        try:
            out = self.layer.data_to_send()
        except Exception:  # best effort: the layer has already failed
            out = b""
        if out:
            self._owner.wire_out(out)

    def _after(self, data: bytes) -> None:
        layer = self.layer
        owner = self._owner
        out = layer.data_to_send()
        if out:
            owner.wire_out(out)
        if not layer.established:
            if not data and self._eof_fails:
                self._failed(HandshakeError(HandshakeReason.CLOSED, "peer closed during handshake"))
            return
        if not self._was_established:
            self._was_established = True
            if not owner.layer_established():
                return
        plain = layer.read()
        if plain or not data:
            owner.plaintext(plain if data else b"")
