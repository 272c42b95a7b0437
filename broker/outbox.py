"""What the broker has queued for one connection: one bounded outbox for every byte.

Replies (welcome, ok, error, pong, ping), deliveries and the close frame all go through the same
:class:`Outbox`, so one bound covers everything a peer can make the broker hold (STYLE §2: every
subscriber has a bounded outbox and an explicit slow-consumer policy, as nats-server's
``max_pending`` and centrifuge's ``DisconnectSlow``).

Past the bound:

* deliveries follow the configured slow-consumer policy: ``disconnect`` (NATS) closes the
  connection with SLOW_CONSUMER; ``drop`` (Mosquitto) discards them, counts them, and the client
  is told how many in an ``error`` frame once its backlog has gone out;
* replies always disconnect: an answer cannot be dropped without leaving the client waiting
  forever for the request it correlates with, and a client that keeps asking without reading is
  the one that made the broker hold them.

The outbox knows nothing of sockets: the session takes its bytes (:meth:`take`) once per loop turn
and writes them in one TLS record batch.
"""

from __future__ import annotations

import enum

__all__ = ["Outbox", "Verdict"]


class Verdict(enum.Enum):
    """What :meth:`Outbox.push` decided."""

    QUEUED = "queued"
    DROPPED = "dropped"  #: over the bound, policy ``drop``: discarded and counted
    OVERFLOW = "overflow"  #: over the bound, policy ``disconnect`` (or a reply): close the peer


class Outbox:
    """Bounded queue of encoded frames for one connection."""

    __slots__ = ("_chunks", "bytes", "drop", "dropped", "max_bytes", "max_messages", "messages")

    def __init__(self, max_bytes: int, max_messages: int, *, drop: bool = False) -> None:
        self._chunks: list[bytes] = []
        #: Bytes queued now (every frame counts).
        self.bytes = 0
        #: Deliveries queued now (replies count in ``bytes`` only).
        self.messages = 0
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        #: Slow-consumer policy ``drop`` (else ``disconnect``).
        self.drop = drop
        #: Deliveries discarded since the client was last told (policy ``drop``).
        self.dropped = 0

    def __bool__(self) -> bool:
        return bool(self._chunks)

    def push(self, data: bytes, deliveries: int = 0) -> Verdict:
        """Queue ``data``: ``deliveries`` message frames (0 for replies). Hot path: keep lean."""
        size = self.bytes + len(data)
        if size > self.max_bytes or self.messages + deliveries > self.max_messages:
            if deliveries and self.drop:
                self.dropped += deliveries
                return Verdict.DROPPED
            return Verdict.OVERFLOW
        self._chunks.append(data)
        self.bytes = size
        self.messages += deliveries
        return Verdict.QUEUED

    def push_final(self, data: bytes) -> None:
        """Queue the closing frames regardless of the bound (they end the connection)."""
        if data:
            self._chunks.append(data)
            self.bytes += len(data)

    def take(self) -> bytes:
        """Return (and forget) everything queued, as one buffer."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.bytes = 0
        self.messages = 0
        return data

    def clear(self) -> None:
        self._chunks.clear()
        self.bytes = 0
        self.messages = 0
