"""The broker's log set-up: ``[log] format = "text"`` (one human line per record) or ``"json"``
(one JSON object per line, for log shippers).

In JSON, the connection label that starts every line about a connection,
``[c12 127.0.0.1:5555 x509:alice]``, becomes the fields ``conn``, ``peer`` and ``identity``;
records of the ``tessera.audit`` logger carry the audit event as the object ``audit``. The
audit trail's own file (``[audit] file``) is written by broker/audit.py and is not affected.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import sys
from typing import TextIO

from tessera_mq.broker.audit import AUDIT_LOGGER

__all__ = ["JsonFormatter", "TEXT_FORMAT", "setup_logging"]

_HANDLER_NAME = "tessera-broker"

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

#: ``[c<id> <peer> <identity>] rest`` (broker/session.py ``_who``); identity ``-`` = not yet known.
_LABEL_RE = re.compile(
    r"^\[c(?P<conn>\d+) (?P<peer>\S+) (?P<identity>[^\]]*)\] ?(?P<rest>.*)$", re.S
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``message`` and, for lines
    about a connection, ``conn``, ``peer``, ``identity``."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, object] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if record.name == AUDIT_LOGGER and message.startswith("{"):
            try:
                out["audit"] = json.loads(message)
            except ValueError:
                out["message"] = message
        else:
            m = _LABEL_RE.match(message)
            if m:
                out["conn"] = int(m["conn"])
                out["peer"] = m["peer"]
                if m["identity"] != "-":
                    out["identity"] = m["identity"]
                message = m["rest"]
            out["message"] = message
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(
    level: str, fmt: str = "text", stream: TextIO | None = None, *, worker: int | None = None
) -> None:
    """Send the broker's logs to ``stream`` (standard error) at ``level`` in format ``fmt``;
    a ``--workers`` worker tags its text lines ``[worker N]``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    text = TEXT_FORMAT
    if worker is not None:
        text = text.replace("%(name)s", f"[worker {worker}] %(name)s")
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(text))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:  # ours from an earlier call; leave others' alone
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
