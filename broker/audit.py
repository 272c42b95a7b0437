"""The audit trail: one JSON object per line for every security-relevant event.

Events: ``auth_success``, ``auth_failure``, ``denied``, ``slow_consumer``, ``handshake_timeout``,
``heartbeat_timeout``, ``limit_exceeded``, ``layer_failure``, ``close``; and (issue #10)
``reload``, ``revoked``, ``credential_expired``, ``policy_closed``, ``crl_expired``,
``admin_denied``. Each line carries the time
(UTC, ISO 8601), the event, the connection id, the peer address, the listener, the identity when
known, and a reason code. Never a credential, a token, or a payload.

It is written through the ``tessera.audit`` logger (so it also shows in the main log) and, when
``[audit] file`` is configured, to its own file as pure JSON lines.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import logging.handlers
from pathlib import Path
from typing import Protocol

__all__ = ["AUDIT_LOGGER", "Audit", "AuditSubject"]

AUDIT_LOGGER = "tessera.audit"


class AuditSubject(Protocol):
    """What the audit trail needs to know about a connection (a broker session)."""

    @property
    def audit_fields(self) -> dict[str, object]: ...


class Audit:
    """Writes audit events; one per broker."""

    def __init__(self, path: Path | None = None) -> None:
        self.logger = logging.getLogger(AUDIT_LOGGER)
        self._handler: logging.Handler | None = None
        if path is not None:
            handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(message)s"))
            handler.setLevel(logging.INFO)
            self.logger.addHandler(handler)
            if self.logger.level == logging.NOTSET or self.logger.level > logging.INFO:
                self.logger.setLevel(logging.INFO)
            self._handler = handler

    def record(
        self,
        event: str,
        who: AuditSubject | None = None,
        *,
        level: int = logging.INFO,
        **fields: object,
    ) -> None:
        if not self.logger.isEnabledFor(level):
            return  # nothing is built for a disabled trail (it runs for every connection)
        entry: dict[str, object] = {
            "ts": _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds"),
            "event": event,
        }
        if who is not None:
            entry.update(who.audit_fields)
        entry.update(fields)
        self.logger.log(level, "%s", json.dumps(entry, ensure_ascii=False, default=str))

    def close(self) -> None:
        if self._handler is not None:
            self.logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
