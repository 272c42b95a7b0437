"""Topic routing: a token trie with ``*`` and ``>`` nodes, and the fan-out path.

Lookup walks only the branches a topic can reach (its literal tokens, ``*`` and ``>``), so its cost
does not grow with the number of unrelated subscriptions; results are cached per topic until the
subscription set changes. Fan-out is synchronous and never awaits (STYLE §4): a publish is encoded
once. With a ``schedule`` callback (the hub's mode) consecutive publishes that reach the same
subscriber set are joined into one block at the end of the event-loop turn and that block is
handed to each subscriber once: the Python work per delivery becomes work per subscriber per turn,
and publish order is kept (a new block starts whenever the subscriber set changes). Without one,
each frame is handed over at once. Crossing to other processes or nodes is the hub's business
(:mod:`broker.backplane`), not the router's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from tessera_mq.client.protocol.codec import encode_message_frame
from tessera_mq.client.protocol.topics import MULTI_WILDCARD, SINGLE_WILDCARD

__all__ = ["Router", "Subscriber", "SubscriptionFilter"]

#: Topics whose subscriber lists are cached; the cache is cleared when full or on any change.
_MATCH_CACHE_ENTRIES = 8192


class Subscriber(Protocol):
    """What the router delivers to (a broker session)."""

    def deliver(self, data: bytes, count: int) -> None:
        """Queue ``count`` encoded delivery frames, concatenated in ``data``; never blocks,
        never awaits. The same ``data`` object is handed to every subscriber of the block."""


class SubscriptionFilter(Protocol):
    """What an ACL grant tells the router about one subscription (:class:`auth.acl.Grant`)."""

    @property
    def unrestricted(self) -> bool:
        """Every topic the pattern matches may be delivered: no per-topic check."""

    def allows(self, topic: Sequence[str]) -> bool:
        """The subscription may deliver this concrete topic (its tokens)."""


class _Node:
    __slots__ = ("children", "rest", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        #: subscribers of ``<prefix>.>`` (refcounted per subscriber)
        self.rest: dict[Subscriber, int] = {}
        #: subscribers of exactly ``<prefix>`` (refcounted per subscriber)
        self.subs: dict[Subscriber, int] = {}

    def empty(self) -> bool:
        return not (self.children or self.rest or self.subs)


class _Block:
    """Consecutive deliveries of one turn to one subscriber set."""

    __slots__ = ("chunks", "count", "subscribers")

    def __init__(self, subscribers: tuple[Subscriber, ...], chunk: bytes, count: int) -> None:
        self.subscribers = subscribers
        self.chunks = [chunk]  #: encoded frames, joined at the flush
        self.count = count  #: frames in ``chunks``


_FilterKey = tuple[Subscriber, SubscriptionFilter]


class _FilteredNode:
    """A node of the filtered trie: like :class:`_Node`, keyed by (subscriber, filter)."""

    __slots__ = ("children", "rest", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _FilteredNode] = {}
        self.rest: dict[_FilterKey, int] = {}
        self.subs: dict[_FilterKey, int] = {}

    def empty(self) -> bool:
        return not (self.children or self.rest or self.subs)


class Router:
    """Subscriptions and fan-out for one broker process."""

    def __init__(self, schedule: Callable[[], None] | None = None) -> None:
        self._root = _Node()
        #: Called once when the first block of a loop turn is started; the caller then runs
        #: :meth:`flush_pending` later in the same turn.
        self._schedule = schedule
        #: This turn's blocks, in publish order.
        self._pending: list[_Block] = []
        self._cache: dict[str, tuple[Subscriber, ...]] = {}
        self._count = 0
        #: ACL-filtered subscriptions (issue #10), in a trie of their own whose tables are keyed
        #: by (subscriber, filter): a topic's match walks it only when it is not empty, and asks
        #: each filter once per (subscription, topic), kept with the topic's cached match.
        self._filtered = _FilteredNode()
        self._filtered_count = 0

    @property
    def subscription_count(self) -> int:
        return self._count

    def subscribe(
        self, subscriber: Subscriber, pattern: str, grant: SubscriptionFilter | None = None
    ) -> None:
        """Add one subscription (``pattern`` already validated). A subscriber may hold the same
        pattern several times (different subscription ids); it still gets one copy. With a
        ``grant`` that is not unrestricted, only the topics it allows are delivered."""
        if grant is not None and not grant.unrestricted:
            self._add_filtered(subscriber, pattern, grant)
            return
        tokens = pattern.split(".")
        node = self._root
        for token in tokens[:-1]:
            node = node.children.setdefault(token, _Node())
        last = tokens[-1]
        if last == MULTI_WILDCARD:
            table = node.rest
        else:
            node = node.children.setdefault(last, _Node())
            table = node.subs
        table[subscriber] = table.get(subscriber, 0) + 1
        self._count += 1
        self._cache.clear()

    def unsubscribe(
        self, subscriber: Subscriber, pattern: str, grant: SubscriptionFilter | None = None
    ) -> None:
        """Remove one subscription added with :meth:`subscribe` (with the same ``grant``);
        prune empty nodes."""
        if grant is not None and not grant.unrestricted:
            self._remove_filtered(subscriber, pattern, grant)
            return
        tokens = pattern.split(".")
        path: list[tuple[_Node, str]] = []
        node = self._root
        for token in tokens[:-1]:
            child = node.children.get(token)
            if child is None:
                return
            path.append((node, token))
            node = child
        last = tokens[-1]
        if last == MULTI_WILDCARD:
            table = node.rest
        else:
            child = node.children.get(last)
            if child is None:
                return
            path.append((node, last))
            node = child
            table = node.subs
        n = table.get(subscriber, 0)
        if n == 0:
            return
        if n == 1:
            del table[subscriber]
        else:
            table[subscriber] = n - 1
        self._count -= 1
        self._cache.clear()
        for parent, token in reversed(path):
            if not parent.children[token].empty():
                break
            del parent.children[token]

    def match(self, topic: str) -> tuple[Subscriber, ...]:
        """Every subscriber with at least one subscription matching ``topic``, each once."""
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        found: dict[Subscriber, None] = {}
        tokens = topic.split(".")
        last = len(tokens) - 1
        level = [self._root]
        for i, token in enumerate(tokens):
            nxt: list[_Node] = []
            for node in level:
                if node.rest:
                    found.update(dict.fromkeys(node.rest))
                children = node.children
                if not children:
                    continue
                child = children.get(token)
                if child is not None:
                    nxt.append(child)
                star = children.get(SINGLE_WILDCARD)
                if star is not None:
                    nxt.append(star)
            if not nxt:
                break
            level = nxt
            if i == last:
                for node in level:
                    if node.subs:
                        found.update(dict.fromkeys(node.subs))
        if self._filtered_count:
            self._match_filtered(tokens, found)
        result = tuple(found)
        if len(self._cache) >= _MATCH_CACHE_ENTRIES:
            self._cache.clear()
        self._cache[topic] = result
        return result

    # --- ACL-filtered subscriptions (issue #10) -----------------------------------------------

    def _filtered_table(
        self, pattern: str, *, create: bool
    ) -> tuple[dict[_FilterKey, int] | None, list[tuple[_FilteredNode, str]]]:
        tokens = pattern.split(".")
        path: list[tuple[_FilteredNode, str]] = []
        node = self._filtered
        for token in tokens[:-1]:
            child = node.children.get(token)
            if child is None:
                if not create:
                    return None, path
                child = node.children[token] = _FilteredNode()
            path.append((node, token))
            node = child
        last = tokens[-1]
        if last == MULTI_WILDCARD:
            return node.rest, path
        child = node.children.get(last)
        if child is None:
            if not create:
                return None, path
            child = node.children[last] = _FilteredNode()
        path.append((node, last))
        return child.subs, path

    def _add_filtered(
        self, subscriber: Subscriber, pattern: str, grant: SubscriptionFilter
    ) -> None:
        table, _ = self._filtered_table(pattern, create=True)
        assert table is not None
        key = (subscriber, grant)
        table[key] = table.get(key, 0) + 1
        self._count += 1
        self._filtered_count += 1
        self._cache.clear()

    def _remove_filtered(
        self, subscriber: Subscriber, pattern: str, grant: SubscriptionFilter
    ) -> None:
        table, path = self._filtered_table(pattern, create=False)
        key = (subscriber, grant)
        if table is None or key not in table:
            return
        if table[key] == 1:
            del table[key]
        else:
            table[key] -= 1
        self._count -= 1
        self._filtered_count -= 1
        self._cache.clear()
        for parent, token in reversed(path):
            if not parent.children[token].empty():
                break
            del parent.children[token]

    def _match_filtered(self, tokens: list[str], found: dict[Subscriber, None]) -> None:
        """Add the subscribers whose filtered subscriptions deliver ``tokens``."""
        reached: list[dict[_FilterKey, int]] = []
        last = len(tokens) - 1
        level = [self._filtered]
        for i, token in enumerate(tokens):
            nxt: list[_FilteredNode] = []
            for node in level:
                if node.rest:
                    reached.append(node.rest)
                for key in (token, SINGLE_WILDCARD):
                    child = node.children.get(key)
                    if child is not None:
                        nxt.append(child)
            if not nxt:
                break
            level = nxt
            if i == last:
                reached.extend(node.subs for node in level if node.subs)
        for table in reached:
            for subscriber, grant in table:
                if subscriber not in found and grant.allows(tokens):
                    found[subscriber] = None

    def route(
        self,
        topic: str,
        payload: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        sender: str | None = None,
        seq: int | None = None,
        epoch: str | None = None,
    ) -> int:
        """Encode once, hand the same bytes to every local subscriber; returns how many.
        ``sender`` (the publisher's verified identity) and the history position (``seq``,
        ``epoch``) go into the one encoded frame."""
        subscribers = self._cache.get(topic)  # match's own cache: filtered ones included
        if subscribers is None:
            subscribers = self.match(topic)
        if not subscribers:
            return 0
        frame = encode_message_frame(topic, payload, headers, sender=sender, seq=seq, epoch=epoch)
        return self._queue(subscribers, frame)

    def route_frame(self, topic: str, payload: bytes, frame: bytes | None) -> int:
        """:meth:`route` without headers, with the delivery ``frame`` already built (``None``:
        encode it here, only if someone subscribes)."""
        subscribers = self._cache.get(topic)  # match's own cache: filtered ones included
        if subscribers is None:
            subscribers = self.match(topic)
        if not subscribers:
            return 0
        if frame is None:
            frame = encode_message_frame(topic, payload)
        # _queue, inlined: this is the one-subscriber hot path
        if self._schedule is None:
            for subscriber in subscribers:
                subscriber.deliver(frame, 1)
            return len(subscribers)
        pending = self._pending
        if pending and pending[-1].subscribers is subscribers:
            block = pending[-1]
            block.chunks.append(frame)
            block.count += 1
        else:
            if not pending:
                self._schedule()
            pending.append(_Block(subscribers, frame, 1))
        return len(subscribers)

    def route_block(self, topic: str, frames: bytes, count: int) -> int:
        """Queue ``count`` delivery frames to ``topic``, already encoded back to back in
        ``frames``; returns how many deliveries (``count`` per subscriber)."""
        subscribers = self._cache.get(topic)  # match's own cache: filtered ones included
        if subscribers is None:
            subscribers = self.match(topic)
        if not subscribers:
            return 0
        return self._queue(subscribers, frames, count) * count

    def _queue(self, subscribers: tuple[Subscriber, ...], frame: bytes, count: int = 1) -> int:
        if self._schedule is None:
            for subscriber in subscribers:
                subscriber.deliver(frame, count)
            return len(subscribers)
        pending = self._pending
        if pending and pending[-1].subscribers is subscribers:
            block = pending[-1]
            block.chunks.append(frame)
            block.count += count
        else:
            if not pending:
                self._schedule()
            pending.append(_Block(subscribers, frame, count))
        return len(subscribers)

    def flush_pending(self) -> None:
        """Hand every block started this turn to its subscribers (in publish order)."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        for block in pending:
            chunks = block.chunks
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            count = block.count
            for subscriber in block.subscribers:
                subscriber.deliver(data, count)
