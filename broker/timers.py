"""Deadline buckets: one event-loop timer per slot of time, not one per connection.

Every open session has a next deadline (its next heartbeat ping or timeout, from the sans-I/O
core's ``get_timer()``). At 100k connections a sweep over all of them every fraction of an
interval costs CPU at rest and cannot honour per-session intervals; one ``call_at`` per session
re-armed on every frame costs heap operations on the hot path. Instead deadlines are rounded up
to a slot of :data:`SLOT_SECONDS`, each slot holds the sessions due in it, and only the earliest
slot has a loop timer. A session that was active since it was filed is simply re-filed when its
slot fires (the core's ``get_timer()`` says when), so activity costs nothing here.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable
from typing import Protocol

__all__ = ["SLOT_SECONDS", "DeadlineBuckets", "Timed"]

#: Resolution of deadlines. Heartbeats are at least 1 s (MIN_HEARTBEAT_MS), so a ping goes out
#: at most 10% of the smallest interval late (Netty's HashedWheelTimer ticks at 100 ms).
SLOT_SECONDS = 0.1

#: Sessions handled per slot before the loop is given a turn (100k connections due in one slot
#: must not stall the loop at once).
_SLICE = 1000


class Timed(Protocol):
    def on_timer(self, now: float) -> None:
        """The deadline filed with :meth:`DeadlineBuckets.schedule` has come."""


class DeadlineBuckets:
    """Deadlines of many objects, each fired once, at most :data:`SLOT_SECONDS` late."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, *, clock: Callable[[], float] | None = None
    ):
        self._loop = loop
        self._clock = clock or loop.time
        self._slots: dict[int, dict[Timed, None]] = {}
        self._where: dict[Timed, int] = {}
        self._heap: list[int] = []
        self._armed: int | None = None
        self._handle: asyncio.Handle | None = None

    def __len__(self) -> int:
        return len(self._where)

    def schedule(self, obj: Timed, when: float | None) -> None:
        """File ``obj`` to be called at ``when`` (``None``: no deadline, forget it)."""
        old = self._where.pop(obj, None)
        if old is not None:
            slot = self._slots.get(old)
            if slot is not None:
                slot.pop(obj, None)
        if when is None:
            return
        key = math.ceil(when / SLOT_SECONDS)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = {}
            heapq.heappush(self._heap, key)
        slot[obj] = None
        self._where[obj] = key
        if self._armed is None or key < self._armed:
            self._arm(key)

    def cancel(self, obj: Timed) -> None:
        self.schedule(obj, None)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self._armed = None
        self._slots.clear()
        self._where.clear()
        self._heap.clear()

    def _arm(self, key: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed = key
        self._handle = self._loop.call_at(key * SLOT_SECONDS, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed = None
        now = self._clock()
        due = math.floor(now / SLOT_SECONDS + 1e-9)
        heap = self._heap
        handled = 0
        while heap and heap[0] <= due:
            key = heapq.heappop(heap)
            slot = self._slots.pop(key, None)
            if not slot:
                continue
            for obj in slot:
                del self._where[obj]
            for obj in slot:
                obj.on_timer(now)  # may re-file itself
            handled += len(slot)
            if handled >= _SLICE:
                break  # the rest on the next turn
        while heap and heap[0] not in self._slots:
            heapq.heappop(heap)
        if heap:
            nxt = heap[0]
            if handled >= _SLICE and nxt <= due:
                self._armed = nxt
                self._handle = self._loop.call_soon(self._fire)
            elif self._armed is None or nxt < self._armed:
                self._arm(nxt)
