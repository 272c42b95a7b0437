"""The error hierarchy and the error-code enum shared by exceptions and the wire's error frames.

Modelled on h2's ``ErrorCodes`` plus h11/websockets' exception split: a :class:`LocalProtocolError`
is raised when *we* try something the protocol forbids, a :class:`RemoteProtocolError` describes
what the *peer* did wrong. Every exception that mirrors a wire error carries its :class:`ErrorCode`.
"""

from __future__ import annotations

import enum

__all__ = [
    "AuthenticationError",
    "BrokerError",
    "ConnectionClosed",
    "ConnectionClosedError",
    "ConnectionClosedOK",
    "ErrorCode",
    "InvalidTopic",
    "LocalProtocolError",
    "NoResponders",
    "PermissionDenied",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestTimeout",
    "TesseraError",
    "error_from_code",
]


class ErrorCode(enum.IntEnum):
    """Codes carried by ``error`` and ``close`` frames (see docs/protocol.md, "Error codes")."""

    NORMAL = 0  #: close only: the sender is done
    PROTOCOL_ERROR = 1  #: malformed frame, bad msgpack, wrong field types
    FRAME_TOO_LARGE = 2  #: length prefix above the announced limit
    UNSUPPORTED_VERSION = 3  #: no common protocol version
    UNKNOWN_OPERATION = 4  #: an ``op`` this peer does not implement (connection stays open)
    INVALID_TOPIC = 5  #: topic or pattern breaks the topic rules
    PERMISSION_DENIED = 6  #: the ACL does not allow this identity to do this
    AUTHENTICATION_FAILED = 7  #: the security handshake failed
    NOT_READY = 8  #: an operation before ``hello``/``welcome``
    INVALID_SUBSCRIPTION = 9  #: duplicate or unknown subscription id
    TOO_MANY_SUBSCRIPTIONS = 10  #: per-connection subscription limit reached
    SLOW_CONSUMER = 11  #: the connection fell too far behind its deliveries
    HEARTBEAT_TIMEOUT = 12  #: the peer stopped answering pings
    GOING_AWAY = 13  #: the broker is shutting down or restarting
    HANDSHAKE_TIMEOUT = 14  #: security handshake or hello did not complete in time
    INTERNAL_ERROR = 15  #: a bug on the sender's side; the connection is closed
    LIMIT_EXCEEDED = 16  #: a connection or rate limit refused the operation
    NO_RESPONDERS = 17  #: a request found no responder subscription for its topic
    REQUEST_TIMEOUT = 18  #: no responder answered a request within its ``timeout_ms``
    RETAINED_TOO_LARGE = 19  #: a retained value is over the broker's per-value size limit
    RETAINED_LIMIT = 20  #: the broker holds as many retained topics (or bytes) as it may
    STORE_FAILED = 21  #: the broker could not store the message durably (disk, database)
    UNKNOWN_REQUEST = 22  #: a reply names a request that is answered, expired or not ours
    CREDENTIAL_EXPIRED = 23  #: close only: the credential ended; re-authenticate and reconnect
    CREDENTIAL_REVOKED = 24  #: close only: the credential was revoked; do not retry with it


class TesseraError(Exception):
    """Root of every error raised by the Tessera protocol core and SDK."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str = "", code: ErrorCode | None = None) -> None:
        if code is not None:
            self.code = code
        self.message = message
        super().__init__(message or self.code.name.lower())


class ProtocolError(TesseraError):
    """A violation of the wire protocol."""

    code = ErrorCode.PROTOCOL_ERROR


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug in the caller, or a bad argument)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class InvalidTopic(TesseraError, ValueError):
    """A topic or subscription pattern breaks the topic rules."""

    code = ErrorCode.INVALID_TOPIC


class AuthenticationError(TesseraError):
    """The security handshake failed: the broker or the client could not prove who it is.

    ``reason`` is a stable code when known (``no_credentials``, ``kdc_unreachable``,
    ``wrong_service``, ``mechanism_refused``, ``bad_credentials``, ``tls_bad_server_cert``,
    ``tls_peer_rejected``, ...), see docs/sdk.md."""

    code = ErrorCode.AUTHENTICATION_FAILED
    reason: str | None = None


class PermissionDenied(TesseraError):
    """The broker's ACL does not allow this identity to publish or subscribe here."""

    code = ErrorCode.PERMISSION_DENIED


class BrokerError(TesseraError):
    """The broker answered a request with an error frame (see ``code``)."""


class NoResponders(BrokerError):
    """A request found no responder: nobody serves its topic (raised at once, not on timeout)."""

    code = ErrorCode.NO_RESPONDERS


class RequestTimeout(BrokerError, TimeoutError):
    """No responder answered a request in time; a late answer is discarded, never delivered."""

    code = ErrorCode.REQUEST_TIMEOUT


class ConnectionClosed(TesseraError):
    """The connection is closed; ``code`` and ``reason`` say why (from the close frame if any)."""

    def __init__(self, code: ErrorCode = ErrorCode.NORMAL, reason: str = "") -> None:
        self.reason = reason
        super().__init__(
            f"connection closed: {code.name.lower()}" + (f" ({reason})" if reason else ""), code
        )


class ConnectionClosedOK(ConnectionClosed):
    """The connection was closed normally (by either side, with code ``NORMAL``)."""


class ConnectionClosedError(ConnectionClosed):
    """The connection was closed because of an error, a timeout, or a lost transport."""


def error_from_code(code: int, message: str) -> TesseraError:
    """The exception matching an ``error`` frame received from the peer."""
    try:
        known = ErrorCode(code)
    except ValueError:
        return BrokerError(message, ErrorCode.INTERNAL_ERROR)
    if known is ErrorCode.PERMISSION_DENIED:
        return PermissionDenied(message)
    if known is ErrorCode.INVALID_TOPIC:
        return InvalidTopic(message)
    if known is ErrorCode.AUTHENTICATION_FAILED:
        return AuthenticationError(message)
    if known is ErrorCode.NO_RESPONDERS:
        return NoResponders(message)
    if known is ErrorCode.REQUEST_TIMEOUT:
        return RequestTimeout(message)
    return BrokerError(message, known)
