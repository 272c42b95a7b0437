"""Two security layers stacked: wire <-> outer <-> inner <-> application.

Used for ``tls+negotiate``: TLS outside protects the channel, SPNEGO inside authenticates the
peer and is bound to that TLS channel (``tls-server-end-point``). The inner layer's handshake
and records travel as the outer layer's plaintext.

The inner layer may be given as a factory called with the *established* outer layer, because
its channel bindings depend on the outer handshake: a client only learns the server certificate
once TLS completes::

    def inner(tls: SecurityLayer) -> SecurityLayer:
        cert = tls.peer_certificate()          # TLSLayer: the server's certificate (DER)
        return NegotiateClientLayer(host, credential=cred, protect_frames=False,
                                    channel_bindings=tls_channel_bindings(cert))

    layer = StackedLayer(TLSLayer(ctx, server_side=False, server_hostname=host), inner)
"""

from __future__ import annotations

from collections.abc import Callable

from tessera_mq.auth.errors import HandshakeError, HandshakeReason
from tessera_mq.auth.identity import Identity
from tessera_mq.auth.layer import SecurityLayer

__all__ = ["InnerFactory", "StackedLayer"]

InnerFactory = Callable[[SecurityLayer], SecurityLayer]
"""Builds the inner layer from the established outer layer (e.g. to read its certificate)."""


class StackedLayer:
    """A :class:`~auth.layer.SecurityLayer` made of ``outer`` (next to the wire) and ``inner``
    (next to the application). Established when both are; ``peer_identity`` is the inner
    layer's; the handshake may block if either layer's may."""

    def __init__(self, outer: SecurityLayer, inner: SecurityLayer | InnerFactory) -> None:
        self._outer = outer
        self._inner: SecurityLayer | None = None
        self._factory: InnerFactory | None = None
        if isinstance(inner, SecurityLayer):
            self._inner = inner
        else:
            self._factory = inner
        self._inner_started = False
        self._closed = False

    @property
    def outer(self) -> SecurityLayer:
        return self._outer

    @property
    def inner(self) -> SecurityLayer | None:
        """The inner layer (``None`` until the outer handshake completes, with a factory)."""
        return self._inner

    @property
    def established(self) -> bool:
        return self._outer.established and self._inner is not None and self._inner.established

    @property
    def peer_identity(self) -> Identity | None:
        return self._inner.peer_identity if self.established and self._inner else None

    @property
    def credential_expires_at(self) -> float | None:
        """The inner layer's ``credential_expires_at`` (UNIX time the authenticated credential,
        e.g. a Kerberos ticket, ends), once established; ``None`` if it has none."""
        if not self.established:
            return None
        value = getattr(self._inner, "credential_expires_at", None)
        return float(value) if isinstance(value, int | float) else None

    @property
    def blocking_handshake(self) -> bool:
        # With a factory the inner layer is unknown until the outer handshake: assume it blocks
        # (the negotiate layers do), so drivers run the whole handshake off the loop.
        inner_blocks = self._inner.blocking_handshake if self._inner is not None else True
        return self._outer.blocking_handshake or inner_blocks

    def start(self) -> None:
        self._outer.start()
        self._advance()

    def receive_data(self, data: bytes) -> None:
        self._outer.receive_data(data)
        self._advance()
        if not data and self._inner is not None and self._inner_started:
            self._inner.receive_data(b"")  # EOF reaches the inner layer after the last bytes

    def read(self) -> bytes:
        return self._inner.read() if self._inner is not None else b""

    def send(self, data: bytes) -> None:
        if not self.established:
            raise HandshakeError(HandshakeReason.INTERNAL, "send before the handshake completed")
        assert self._inner is not None
        self._inner.send(data)
        self._flush_inner()

    def data_to_send(self) -> bytes:
        # Anything the inner layer queued (records, an ERROR record after a failed handshake)
        # goes through the outer layer first.
        self._flush_inner()
        return self._outer.data_to_send()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._inner is not None and self._inner_started:
            self._inner.close()
            self._flush_inner()
        self._outer.close()

    # -- internals -----------------------------------------------------------------------------

    def _advance(self) -> None:
        """Start the inner layer once the outer is up, then move bytes until nothing moves."""
        if not self._outer.established:
            return
        if not self._inner_started:
            if self._inner is None:
                assert self._factory is not None
                self._inner = self._factory(self._outer)
            self._inner_started = True
            self._inner.start()
        inner = self._inner
        assert inner is not None
        while True:
            plaintext = self._outer.read()
            if plaintext:
                inner.receive_data(plaintext)
            moved = self._flush_inner()
            if not plaintext and not moved:
                return

    def _flush_inner(self) -> bool:
        if self._inner is None or not self._inner_started or not self._outer.established:
            return False
        out = self._inner.data_to_send()
        if out:
            self._outer.send(out)
        return bool(out)
