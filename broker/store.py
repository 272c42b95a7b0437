"""The seam to storage: the :class:`Store` protocol (retained values, history).

The hub asks the store, synchronously and cheaply, whether a publication must be stored
(``wants``). If not (the common case: plain pub/sub) it is routed at once. If so, the hub awaits
``save`` (durable when it returns) before routing it and before the publisher's ``ok``; the
publishing connection's later requests wait behind it, so per-publisher order is kept. The store
may fill ``Publication.extra`` (history sequence, epoch) during ``save``; those fields then go out
with the delivery.

What a new subscription is sent first (its retained snapshot) comes from ``retained``, a
synchronous read of the store's **visible** view. A saved publication becomes visible only when
the hub calls ``apply`` for it, and the hub does so in the same synchronous step in which it
routes it. So a subscription that starts before that step receives the old value in its snapshot
and the new one live; one that starts after receives the new value in its snapshot and not live:
no gap, no duplicate (docs/messaging.md, "Retained values").

Several concurrent ``save`` calls (from different publishers) are what a store batches into one
durable write; the hub calls ``save`` once per stored publish and never waits for one publisher's
save before starting another's.

The default, :class:`NullStore`, stores nothing. The embedded engine
(:class:`broker.store_sqlite.SQLiteStore`, SQLite in the data directory) and a clustered one
(Redis) implement the same protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tessera_mq.broker.backplane import Publication
from tessera_mq.client.protocol.errors import ErrorCode

__all__ = ["NullStore", "Store", "StoreError"]


class Store(Protocol):
    """Retained values and history."""

    async def open(self) -> None:
        """Open files or connections; awaited once before the first listener accepts."""

    async def close(self) -> None:
        """Flush and close; awaited once at shutdown after the hub has drained."""

    def wants(self, pub: Publication) -> bool:
        """Must ``pub`` be stored before it is routed? Called for every publish: keep it cheap."""

    async def save(self, pubs: Sequence[Publication]) -> None:
        """Store ``pubs`` durably, in order; raise :class:`StoreError` to refuse them (then
        none of them is stored). Does not change what ``retained`` returns: see ``apply``."""

    def apply(self, pubs: Sequence[Publication]) -> None:
        """Make saved ``pubs`` visible to ``retained``; the hub calls it in the step that routes
        them. Synchronous, never blocks."""

    def retained(self, pattern: str) -> Sequence[Publication]:
        """The visible retained value of every topic matching ``pattern``, as a snapshot taken
        now (later ``apply`` calls do not change the returned sequence). Synchronous."""


class StoreError(Exception):
    """The store refused a publication; ``code`` is the wire error code for the publisher
    (``RETAINED_TOO_LARGE``, ``RETAINED_LIMIT``, ``STORE_FAILED``) and the message says why
    (it names no payload)."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.STORE_FAILED) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NullStore:
    """Stores nothing: every publication is routed at once."""

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def wants(self, pub: Publication) -> bool:
        return False

    async def save(self, pubs: Sequence[Publication]) -> None:
        pass

    def apply(self, pubs: Sequence[Publication]) -> None:
        pass

    def retained(self, pattern: str) -> Sequence[Publication]:
        return ()
