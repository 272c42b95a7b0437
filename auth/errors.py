"""Errors raised by security layers.

A failed handshake carries a :class:`HandshakeReason` code: that code (never a token, a key or
the peer's credential) is what goes into logs and, where safe, to the peer.
"""

from __future__ import annotations

import enum

__all__ = ["AuthError", "HandshakeError", "HandshakeReason", "IntegrityError"]


class HandshakeReason(enum.Enum):
    """Why a security handshake failed; stable names, used in logs and the audit trail."""

    TLS_PROTOCOL = "tls_protocol"  # version/cipher/ALPN mismatch, not TLS at all
    TLS_NO_CLIENT_CERT = "tls_no_client_cert"
    TLS_BAD_CERT = "tls_bad_cert"  # unknown CA, expired, not yet valid, wrong usage
    TLS_BAD_SERVER_CERT = "tls_bad_server_cert"  # client side: server not trusted / name mismatch
    TLS_PEER_REJECTED = "tls_peer_rejected"  # the peer sent an alert (e.g. refused our cert)
    TIMEOUT = "timeout"
    TOKEN_TOO_LARGE = "token_too_large"
    TOO_MANY_LEGS = "too_many_legs"
    NO_CREDENTIALS = "no_credentials"
    KDC_UNREACHABLE = "kdc_unreachable"
    WRONG_SERVICE = "wrong_service"
    MECHANISM_REFUSED = "mechanism_refused"
    BAD_CREDENTIALS = "bad_credentials"
    CHANNEL_BINDING = "channel_binding"
    MALFORMED = "malformed"
    CLOSED = "closed"  # the peer closed the connection during the handshake
    INTERNAL = "internal"


class AuthError(Exception):
    """Root of the errors raised by :mod:`auth`."""


class HandshakeError(AuthError):
    """The security handshake failed. ``reason`` is safe to log; ``detail`` is for the local user
    (it may name a file or a certificate subject, never a secret)."""

    def __init__(self, reason: HandshakeReason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)


class IntegrityError(AuthError):
    """A protected record failed its check: tampered, replayed, reordered, or not sealed."""
