"""The seam to storage: the :class:`Store` protocol (retained values, history).

The hub asks the store, synchronously and cheaply, whether a publication must be stored
(``wants``). If not (the common case: plain pub/sub) it is routed at once. If so, the hub awaits
``save`` (durable when it returns) before routing it and before the publisher's ``ok``; the
publishing connection's later requests wait behind it, so per-publisher order is kept. The store
may fill ``Publication.extra`` (history sequence, epoch) during ``save``; those fields then go out
with the delivery.

The default, :class:`NullStore`, stores nothing. The embedded engine (SQLite in the data
directory) and the clustered one (Redis) implement the same protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from broker.backplane import Publication

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
        """Store ``pubs`` durably, in order; raise :class:`StoreError` to refuse them."""


class StoreError(Exception):
    """The store refused a publication (over a limit, disk full); the message says why."""


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
