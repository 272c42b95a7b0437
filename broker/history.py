"""Message history per configured pattern (a *stream*), for gapless recovery after a reconnect.

Each ``[[messaging.history]]`` entry is one stream: every publish on a topic its pattern matches
gets the stream's next sequence number (1, 2, ...) and is kept while it is among the last
``max_messages`` and younger than ``max_age`` seconds. The stream's epoch is a random string
chosen when the broker starts: history lives in memory, so after a restart the sequence starts
again under a new epoch and a client resuming with the old epoch is told it has a gap
(Centrifugo's memory engine works the same way).

Sans-I/O: the clock is passed in. The hub numbers a publication in the same synchronous step in
which it routes it, so sequence order is delivery order.

:class:`HistoryEngine` is what the hub asks of history, for both engines: this in-memory
:class:`History` (the embedded default) and, with ``[cluster]``, the Redis streams of
broker/history_redis.py, where Redis numbers each publication and a feed delivers it on every
node in sequence order (docs/scaling.md, "State in Redis: history").
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from tessera_mq.broker.backplane import Publication
from tessera_mq.broker.config import HistoryConfig
from tessera_mq.client.protocol.topics import (
    MULTI_WILDCARD,
    SINGLE_WILDCARD,
    matches,
    split_pattern,
)

__all__ = [
    "Deliver",
    "History",
    "HistoryConfig",
    "HistoryEngine",
    "Page",
    "Resumption",
    "Stream",
    "covers",
    "overlaps",
]

#: Kept messages of a stream, oldest first: ``(seq, publication)``.
Entries = list[tuple[int, Publication]]
#: The next page of a replay and what reads the one after it (``None``: that was the last).
Page = tuple[Entries, "Callable[[], Awaitable[Page]] | None"]
#: How an engine that numbers publications itself hands them to the hub for local delivery.
Deliver = Callable[[Publication, int, str], None]


@dataclass(slots=True)
class Resumption:
    """A new subscription's history position (the ``ok``'s ``epoch``/``seq``/``recovered``)
    and, for a ``sub`` with ``since``, what it missed: ``entries`` now and, if the engine reads
    them in pages, ``more`` for the rest."""

    epoch: str | None
    seq: int | None
    #: ``None``: no resumption was asked; ``False``: a gap (nothing is sent from history).
    recovered: bool | None
    entries: Entries = field(default_factory=list)
    more: Callable[[], Awaitable[Page]] | None = None


class HistoryEngine(Protocol):
    """What the hub asks of history (both engines; docs/architecture.md, the pipeline)."""

    def __bool__(self) -> bool:
        """Is any stream configured?"""

    def for_topic(self, topic: str) -> object | None:
        """The stream ``topic`` belongs to, if any."""

    def number(self, pub: Publication, now: float) -> tuple[int, str] | None:
        """Number ``pub`` in the step that routes it: ``(seq, epoch)``; ``None`` if it has no
        stream or the engine numbers elsewhere (:meth:`appends`)."""

    def appends(self, topic: str) -> bool:
        """Does a publish on ``topic`` go through :meth:`append` (numbered by the engine, then
        delivered on every node by it) instead of being routed by the hub?"""

    async def append(self, pub: Publication) -> None:
        """Number and keep ``pub``; returns once this node has delivered it (raises
        :class:`~broker.store.StoreError` when it cannot be kept)."""

    def interest(self, pattern: str, added: bool) -> None:
        """A local pattern appeared or went (the hub reports first and last)."""

    def resume(
        self, pattern: str, since: int | None, epoch: str | None, now: float
    ) -> Resumption | Awaitable[Resumption] | None:
        """The position for a new subscription to ``pattern`` (``None``: not within a stream),
        at once or, when the engine must read first, as an awaitable."""

    async def start(self, deliver: Deliver) -> None: ...

    async def stop(self) -> None: ...

    def health(self) -> Mapping[str, object]: ...


def covers(outer: Sequence[str], inner: Sequence[str]) -> bool:
    """Does every topic that pattern ``inner`` matches also match pattern ``outer``?"""
    for i, tok in enumerate(outer):
        if tok == MULTI_WILDCARD:
            return len(inner) > i  # at least one token left (a final ">" is one or more)
        if i >= len(inner):
            return False
        sub = inner[i]
        if sub == MULTI_WILDCARD:
            return False
        if tok == SINGLE_WILDCARD:
            continue
        if sub != tok:
            return False
    return len(inner) == len(outer)


def overlaps(a: Sequence[str], b: Sequence[str]) -> bool:
    """Is there a topic that both patterns match?"""
    for x, y in zip(a, b, strict=False):
        if MULTI_WILDCARD in (x, y):
            return True
        if x != y and SINGLE_WILDCARD not in (x, y):
            return False
    return len(a) == len(b)


class Stream:
    """The kept messages of one configured pattern."""

    __slots__ = ("_entries", "config", "epoch", "seq", "tokens")

    def __init__(self, config: HistoryConfig) -> None:
        self.config = config
        self.tokens = split_pattern(config.pattern)
        self.epoch = secrets.token_hex(4)
        #: The last sequence number given (0: none yet).
        self.seq = 0
        self._entries: deque[tuple[int, float, Publication]] = deque()

    def append(self, pub: Publication, now: float) -> int:
        self.seq += 1
        self._entries.append((self.seq, now, pub))
        if len(self._entries) > self.config.max_messages:
            self._entries.popleft()
        self._trim(now)
        return self.seq

    def _trim(self, now: float) -> None:
        age = self.config.max_age
        if age is None:
            return
        entries = self._entries
        while entries and now - entries[0][1] > age:
            entries.popleft()

    def __len__(self) -> int:
        return len(self._entries)

    def since(self, seq: int, now: float) -> list[tuple[int, Publication]] | None:
        """Every kept message after ``seq``, oldest first; ``None`` if some of them are no
        longer kept (or ``seq`` is ahead of the stream: it belongs to another epoch)."""
        self._trim(now)
        if seq > self.seq:
            return None
        first = self._entries[0][0] if self._entries else self.seq + 1
        if seq + 1 < first:
            return None
        return [(s, p) for s, _t, p in self._entries if s > seq]


class _Tokened(Protocol):
    @property
    def tokens(self) -> tuple[str, ...]: ...


S = TypeVar("S", bound=_Tokened)


class StreamIndex(Generic[S]):
    """Which configured stream a topic or a subscription pattern belongs to: the lookup both
    engines share (the streams' patterns never overlap)."""

    def __init__(self, streams: Sequence[S]) -> None:
        self.streams = list(streams)
        self._by_topic: dict[str, S | None] = {}

    def __bool__(self) -> bool:
        return bool(self.streams)

    def for_topic(self, topic: str) -> S | None:
        """The stream a topic belongs to (the first configured pattern that matches it)."""
        try:
            return self._by_topic[topic]
        except KeyError:
            pass
        tokens = split_pattern(topic)
        found = next((s for s in self.streams if matches(s.tokens, tokens)), None)
        if len(self._by_topic) >= 8192:
            self._by_topic.clear()
        self._by_topic[topic] = found
        return found

    def for_pattern(self, pattern: str) -> S | None:
        """The stream a subscription pattern lies within (at most one)."""
        tokens = split_pattern(pattern)
        return next((s for s in self.streams if covers(s.tokens, tokens)), None)


class History(StreamIndex[Stream]):
    """Every stream of a broker process, in memory (the embedded engine)."""

    def __init__(self, configs: Sequence[HistoryConfig]) -> None:
        super().__init__([Stream(c) for c in configs])

    # --- the HistoryEngine protocol (in memory: numbered by the hub, read at once) ----------

    def number(self, pub: Publication, now: float) -> tuple[int, str] | None:
        stream = self.for_topic(pub.topic)
        if stream is None:
            return None
        return stream.append(pub, now), stream.epoch

    def appends(self, topic: str) -> bool:
        return False

    async def append(self, pub: Publication) -> None:
        raise NotImplementedError("the in-memory history is numbered by number()")

    def interest(self, pattern: str, added: bool) -> None:
        pass

    def resume(
        self, pattern: str, since: int | None, epoch: str | None, now: float
    ) -> Resumption | None:
        stream = self.for_pattern(pattern)
        if stream is None:
            return None
        if since is None:
            return Resumption(stream.epoch, stream.seq, None)
        entries = None if epoch not in (None, stream.epoch) else stream.since(since, now)
        if entries is None:
            return Resumption(stream.epoch, stream.seq, False)
        return Resumption(stream.epoch, stream.seq, True, entries)

    async def start(self, deliver: Deliver) -> None:
        pass

    async def stop(self) -> None:
        pass

    def health(self) -> Mapping[str, object]:
        return {}
