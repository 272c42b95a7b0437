"""The sans-I/O interface every security layer (TLS, SPNEGO) implements.

A security layer sits between the socket and the Tessera framing::

    socket bytes --receive_data()--> [layer] --read()--> plaintext for the frame decoder
    socket bytes <--data_to_send()-- [layer] <--send()-- plaintext frames to protect

It never touches a socket, a clock or an event loop; the driver (broker session, SDK client)
moves bytes and enforces deadlines. Steps that may block (a Kerberos initiator talking to a
KDC) are exposed so the driver can run them off the loop.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from tessera_mq.auth.identity import Identity

__all__ = ["SecurityLayer"]


@runtime_checkable
class SecurityLayer(Protocol):
    """A secured byte stream, driven by bytes in and bytes out."""

    @property
    def established(self) -> bool:
        """True once the handshake has completed and the peer is authenticated."""

    @property
    def peer_identity(self) -> Identity | None:
        """The authenticated peer (on a server: the client). ``None`` before ``established``."""

    def start(self) -> None:
        """Begin the handshake: a client queues its first flight (see ``data_to_send``); a server
        does nothing. May block (a Kerberos initiator asks the KDC for a ticket) when
        ``blocking_handshake`` is true: drivers then call it off the event loop."""

    @property
    def blocking_handshake(self) -> bool:
        """True when ``start``/``receive_data`` may block before ``established`` (GSS steps):
        the driver runs them in a worker thread until the handshake completes."""

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the socket; ``b""`` means the peer closed (EOF).

        Advances the handshake as far as the bytes allow. Raises
        :class:`auth.errors.HandshakeError` when the handshake fails and
        :class:`auth.errors.IntegrityError` when a protected record fails its check.
        """

    def read(self) -> bytes:
        """Return the application plaintext decoded so far (``b""`` if none)."""

    def send(self, data: bytes) -> None:
        """Protect application plaintext for sending. Only valid once ``established``."""

    def data_to_send(self) -> bytes:
        """Return (and forget) the wire bytes to write to the socket, ``b""`` if none."""

    def close(self) -> None:
        """Queue the layer's own closing record (e.g. TLS close_notify), if it has one."""
