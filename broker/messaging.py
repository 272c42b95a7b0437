"""Queue groups, responders and pending requests: the parts of the pipeline that deliver to one
chosen subscription instead of every matching connection (docs/messaging.md).

Sans-I/O like the handler: members are opaque objects with an outbox load, choices are
deterministic (round robin, skipping backed-up members), timers are the caller's. The hub owns
one :class:`Groups` for queue groups, one for responders (``serve`` subscriptions), and one
:class:`PendingRequests` table.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from tessera_mq.client.protocol.topics import matches, split_pattern

__all__ = ["Group", "Groups", "Pending", "PendingRequests"]

M = TypeVar("M", bound=Hashable)

#: Topics whose matching groups are cached (cleared on any membership change).
_CACHE_ENTRIES = 4096


@dataclass(slots=True)
class Group(Generic[M]):
    """Subscriptions sharing the messages of one pattern: each message to one member."""

    pattern: str
    name: str | None
    tokens: tuple[str, ...]
    members: list[tuple[M, int]] = field(default_factory=list)  #: (member, sid)
    next: int = 0  #: round-robin position

    def pick(self, load: Callable[[M], float]) -> tuple[M, int] | None:
        """The next member whose ``load`` (0: idle, 1: full) is below one half, round robin;
        if every member is backed up, the least loaded one (a slow member never stalls the
        group while another can take the message)."""
        members = self.members
        n = len(members)
        if not n:
            return None
        start = self.next % n
        best: tuple[M, int] | None = None
        best_load = 2.0
        for i in range(n):
            cand = members[(start + i) % n]
            level = load(cand[0])
            if level < 0.5:
                self.next = start + i + 1
                return cand
            if level < best_load:
                best, best_load = cand, level
        self.next = start + 1
        return best


class Groups(Generic[M]):
    """Every group of one kind (queue groups, or responders) in a broker process."""

    def __init__(self) -> None:
        self._groups: dict[tuple[str, str | None, object], Group[M]] = {}
        self._cache: dict[str, tuple[Group[M], ...]] = {}

    def __bool__(self) -> bool:
        return bool(self._groups)

    def __len__(self) -> int:
        return len(self._groups)

    def _key(
        self, pattern: str, name: str | None, member: M, sid: int
    ) -> tuple[str, str | None, object]:
        # A subscription without a group name is a group of its own.
        return (pattern, name, None if name is not None else (member, sid))

    def join(self, pattern: str, name: str | None, member: M, sid: int) -> None:
        key = self._key(pattern, name, member, sid)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = Group(pattern, name, split_pattern(pattern))
        group.members.append((member, sid))
        self._cache.clear()

    def leave(self, pattern: str, name: str | None, member: M, sid: int) -> None:
        key = self._key(pattern, name, member, sid)
        group = self._groups.get(key)
        if group is None:
            return
        try:
            group.members.remove((member, sid))
        except ValueError:
            return
        if not group.members:
            del self._groups[key]
        self._cache.clear()

    def matching(self, topic: str) -> tuple[Group[M], ...]:
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        tokens = split_pattern(topic)
        found = tuple(g for g in self._groups.values() if matches(g.tokens, tokens))
        if len(self._cache) >= _CACHE_ENTRIES:
            self._cache.clear()
        self._cache[topic] = found
        return found

    def choose(self, topic: str, load: Callable[[M], float]) -> Iterator[tuple[M, int]]:
        """One member of every group matching ``topic``."""
        for group in self.matching(topic):
            chosen = group.pick(load)
            if chosen is not None:
                yield chosen


@dataclass(slots=True)
class Pending(Generic[M]):
    """A request on its way: who asked (``requester``, ``rid``), who may answer."""

    requester: M
    rid: int
    responders: dict[M, int]  #: responder -> the token it was given
    timer: object = None  #: the caller's timer handle (cancelled when done)


class PendingRequests(Generic[M]):
    """Requests waiting for their first reply, by (responder, token) and by (requester, rid)."""

    def __init__(self) -> None:
        self._by_token: dict[tuple[M, int], Pending[M]] = {}
        self._by_rid: dict[tuple[M, int], Pending[M]] = {}
        self._tokens: dict[M, int] = {}

    def __len__(self) -> int:
        return len(self._by_rid)

    def count_for(self, requester: M) -> int:
        return sum(1 for (r, _rid) in self._by_rid if r == requester)

    def waiting(self, requester: M, rid: int) -> bool:
        return (requester, rid) in self._by_rid

    def token_for(self, responder: M) -> int:
        """A fresh reply token for ``responder`` (unique among its pending requests)."""
        token = (self._tokens.get(responder, 0) + 1) & 0xFFFFFFFF
        while (responder, token) in self._by_token:
            token = (token + 1) & 0xFFFFFFFF
        self._tokens[responder] = token
        return token

    def add(self, pending: Pending[M]) -> None:
        self._by_rid[pending.requester, pending.rid] = pending
        for responder, token in pending.responders.items():
            self._by_token[responder, token] = pending

    def answer(self, responder: M, token: int) -> Pending[M] | None:
        """The request ``responder`` answers with ``token``, removed; ``None`` if it is gone
        (answered, expired, or never delivered to this responder)."""
        pending = self._by_token.get((responder, token))
        if pending is None:
            return None
        self.remove(pending)
        return pending

    def remove(self, pending: Pending[M]) -> None:
        self._by_rid.pop((pending.requester, pending.rid), None)
        for responder, token in pending.responders.items():
            self._by_token.pop((responder, token), None)

    def expire(self, requester: M, rid: int) -> Pending[M] | None:
        pending = self._by_rid.get((requester, rid))
        if pending is not None:
            self.remove(pending)
        return pending

    def forget(self, member: M) -> list[Pending[M]]:
        """``member`` is gone: drop the requests it asked; remove it as a responder. Returns
        the requests left with no responder (their requesters get NO_RESPONDERS)."""
        self._tokens.pop(member, None)
        orphaned: list[Pending[M]] = []
        for pending in list(self._by_rid.values()):
            if pending.requester == member:
                self.remove(pending)
                continue
            token = pending.responders.pop(member, None)
            if token is None:
                continue
            self._by_token.pop((member, token), None)
            if not pending.responders:
                self._by_rid.pop((pending.requester, pending.rid), None)
                orphaned.append(pending)
        return orphaned
