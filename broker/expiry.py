"""Authenticated sessions over time: when each began, when its credential ends, and the close
at that moment (issue #10).

A connection lives for days or weeks; the credential it authenticated with does not. When a
session's security layer is established, :meth:`SessionWatch.authenticated` reads the layer's
``credential_expires_at`` (the client certificate's notAfter on TLS, the Kerberos ticket's end
time on the negotiate layer; epoch seconds) and files one loop timer for that moment, or for
``[limits] max_session_age`` after authentication if that comes first. At it the session is
closed with ``CREDENTIAL_EXPIRED`` (23), which the SDK reads as "re-authenticate and
reconnect". A session whose credential has no end (and no maximum age) gets no timer. The
watch also answers "who is connected" for ``tessera-broker connections``.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from tessera_mq.broker.handler import RequestHandler
from tessera_mq.client.protocol import ErrorCode

__all__ = ["SessionRecord", "SessionWatch", "WatchedSession", "credential_expires_at", "tls_layer"]

log = logging.getLogger("tessera.broker")


class WatchedSession(Protocol):
    """What the watch needs of a broker session (:class:`broker.session.Session` or
    ``SocketSession``): its layer is read with ``getattr`` only."""

    @property
    def handler(self) -> RequestHandler: ...

    @property
    def layer(self) -> object: ...


def tls_layer(layer: object) -> object | None:
    """The TLS layer of a session: the layer itself, or the outer one of ``tls+negotiate``."""
    outer = getattr(layer, "outer", None)
    candidate = outer if outer is not None else layer
    return candidate if hasattr(candidate, "peer_certificate") else None


def credential_expires_at(layer: object) -> float | None:
    """When the credential a layer authenticated ends (epoch seconds), ``None`` if never.

    A ``tls+negotiate`` session authenticates with its inner (SPNEGO) layer; the outer TLS
    layer has no client certificate there, so the inner layer's end is the one that counts.
    """
    inner = getattr(layer, "inner", None)
    source = inner if inner is not None else layer
    value = getattr(source, "credential_expires_at", None)
    return float(value) if isinstance(value, int | float) else None


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return _dt.datetime.fromtimestamp(stamp, _dt.UTC).isoformat(timespec="seconds")


@dataclass(slots=True)
class SessionRecord:
    """One authenticated session, as ``tessera-broker connections`` shows it."""

    session: WatchedSession
    since: float  #: epoch seconds the security layer was established
    expires_at: float | None  #: epoch seconds the credential ends (``None``: never)
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    def describe(self) -> dict[str, object]:
        handler = self.session.handler
        identity = handler.identity
        return {
            "conn": handler.conn_id,
            "identity": str(identity) if identity is not None else None,
            "mechanism": identity.mechanism if identity is not None else None,
            "peer": handler.peer,
            "listener": handler.listener,
            "since": _iso(self.since),
            "credential_expires_at": _iso(self.expires_at),
            "subscriptions": {str(sid): pattern for sid, pattern in sorted(handler.subs.items())},
        }


class SessionWatch:
    """Every authenticated session of a broker, and its credential-expiry timer."""

    def __init__(
        self,
        loop: Callable[[], asyncio.AbstractEventLoop],
        audit: Callable[[str, RequestHandler, int], None],
        *,
        max_age: Callable[[], float | None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._loop = loop
        self._audit = audit
        self._max_age = max_age
        self._clock = clock
        self.records: dict[RequestHandler, SessionRecord] = {}

    def authenticated(self, session: WatchedSession) -> None:
        """The session's layer is established (and the handler admitted it)."""
        now = self._clock()
        expires = credential_expires_at(session.layer)
        age = self._max_age()
        record = SessionRecord(session, now, expires)
        if age is not None and (expires is None or now + age < expires):
            expires = now + age  # [limits] max_session_age: re-authenticate by then
        self.records[session.handler] = record
        if expires is not None:
            # call_later takes a delay: the loop clock is monotonic, the credential's end is not.
            delay = max(0.0, expires - now)
            record.timer = self._loop().call_later(delay, self._expired, session.handler)

    def lost(self, handler: RequestHandler) -> None:
        record = self.records.pop(handler, None)
        if record is not None and record.timer is not None:
            record.timer.cancel()

    def _expired(self, handler: RequestHandler) -> None:
        record = self.records.get(handler)
        if record is None or handler.closing:
            return
        record.timer = None
        log.info("%s credential expired, closing", handler.who())
        self._audit("credential_expired", handler, logging.WARNING)
        handler.close(ErrorCode.CREDENTIAL_EXPIRED, "credential expired: re-authenticate")

    def describe(self) -> list[dict[str, object]]:
        """``tessera-broker connections``: one entry per authenticated session, by id."""
        return [r.describe() for r in sorted(self.records.values(), key=lambda r: r.since)]
