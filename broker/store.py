"""The seam to storage: the :class:`Store` protocol (retained values, history).

The hub asks the store, synchronously and cheaply, whether a publication must be stored
(``wants``). If not (the common case: plain pub/sub) it is routed at once. If so, the hub awaits
``save`` (durable when it returns) before routing it and before the publisher's ``ok``; the
publishing connection's later requests wait behind it, so per-publisher order is kept. The store
may fill ``Publication.extra`` (history sequence, epoch) during ``save``; those fields then go out
with the delivery.

What a new subscription is sent first (its retained snapshot) comes from ``retained_cursor``
(``retained`` is the same as a list), a synchronous read of the store's **visible** view: the cursor
copies references to the candidate values when it is made (a list of references, not messages or
frames) and matches them against the pattern one by one as it is pulled, so a large snapshot costs
the event loop a little per pull, never all at once. A saved publication becomes visible only when
the hub calls ``apply`` for it, and the hub does so in the same synchronous step in which it routes
it. So a subscription that starts before that step receives the old value in its snapshot and the
new one live; one that starts after receives the new value in its snapshot and not live: no gap, no
duplicate (docs/messaging.md, "Retained values").

Several concurrent ``save`` calls (from different publishers) are what a store batches into one
durable write; the hub calls ``save`` once per stored publish and never waits for one publisher's
save before starting another's.

The default, :class:`NullStore`, stores nothing. The embedded engine
(:class:`broker.store_sqlite.SQLiteStore`, SQLite in the data directory) and a clustered one
(Redis) implement the same protocol.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

from tessera_mq.broker.backplane import Publication
from tessera_mq.client.protocol.errors import ErrorCode
from tessera_mq.client.protocol.topics import (
    MULTI_WILDCARD,
    SINGLE_WILDCARD,
    matches,
    split_pattern,
)

__all__ = ["NullStore", "RetainedCursor", "Store", "StoreError", "retained_cursor"]

#: What :meth:`Store.retained_cursor` yields: a matching visible value, or ``None`` for a
#: candidate it looked at that does not match (a step that produced nothing; the caller counts
#: it against its per-turn budget, so a scan that skips most values is paced too).
RetainedCursor = Iterator[Publication | None]


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

    def retained_cursor(self, pattern: str) -> RetainedCursor:
        """:meth:`retained` as a lazy cursor: the visible values that may match are fixed when
        it is made (later ``apply`` calls change nothing it yields: a value replaced or cleared
        meanwhile is yielded as it was), and matching is done per item as it is pulled.
        Making it is cheap (a copy of references); pulling never blocks."""


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

    def retained_cursor(self, pattern: str) -> RetainedCursor:
        return iter(())


def retained_cursor(
    buckets: Mapping[str, Mapping[str, Publication]], pattern: str
) -> RetainedCursor:
    """The cursor of an in-memory view indexed by first topic token (first token -> topic ->
    value), for :meth:`Store.retained_cursor`. The candidates (the bucket of the pattern's first
    token, every bucket for a wildcard) are copied as references now; each pull matches one.
    Consumed references are released as it goes, so a replaced value is not kept alive longer
    than the cursor needs it."""
    tokens = split_pattern(pattern)
    first = tokens[0]
    if first in (SINGLE_WILDCARD, MULTI_WILDCARD):
        chosen: list[Mapping[str, Publication]] = list(buckets.values())
    else:
        bucket = buckets.get(first)
        if bucket is None:
            return iter(())
        if len(tokens) == 1:
            pub = bucket.get(first)
            return iter(() if pub is None else (pub,))
        chosen = [bucket]
    candidates = list(itertools.chain.from_iterable(b.values() for b in chosen))
    candidates.reverse()  # popped from the end: O(1), and each reference is dropped once used
    return _matching(candidates, None if tokens == (MULTI_WILDCARD,) else tokens)


def _matching(candidates: list[Publication], tokens: tuple[str, ...] | None) -> RetainedCursor:
    pop = candidates.pop
    while candidates:
        pub = pop()
        if tokens is None or matches(tokens, split_pattern(pub.topic)):
            yield pub
        else:
            yield None
