"""Queue groups, responders and pending requests: the parts of the pipeline that deliver to one
chosen subscription instead of every matching connection (docs/messaging.md).

Sans-I/O like the handler: members are opaque objects with an outbox load, choices are
deterministic (round robin, skipping backed-up members), timers are the caller's. The hub owns
one :class:`Groups` for queue groups, one for responders (``serve`` subscriptions), and one
:class:`PendingRequests` table.

Across broker processes (``--workers``, ``[cluster]``; docs/messaging.md "Several broker
processes") a backplane that implements :class:`ClusterMessaging` keeps a :class:`Directory` of
which other nodes have queue-group members and responders, by (pattern, group): the publishing
node names one node per matching group in the publication, and a request whose service has no
local responder goes to one node that has one (a :class:`Peer` then stands in the pending table
for the other node, as requester or as responder).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar, runtime_checkable

from tessera_mq.client.protocol.topics import matches, split_pattern

__all__ = [
    "GROUP",
    "SERVICE",
    "ClusterEvents",
    "ClusterMessaging",
    "Directory",
    "Group",
    "Groups",
    "Key",
    "Peer",
    "Pending",
    "PendingRequests",
    "RemoteRequest",
]

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
    """Requests waiting for their first reply, indexed by requester (``rid``) and by responder
    (token): every operation costs what the member named has pending, never the whole table
    (a disconnect used to scan every pending request)."""

    def __init__(self) -> None:
        #: requester -> rid -> request
        self._asked: dict[M, dict[int, Pending[M]]] = {}
        #: responder -> token -> request
        self._serving: dict[M, dict[int, Pending[M]]] = {}
        self._tokens: dict[M, int] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def count_for(self, requester: M) -> int:
        asked = self._asked.get(requester)
        return len(asked) if asked is not None else 0

    def asked(self, requester: M) -> list[Pending[M]]:
        """The requests ``requester`` is waiting for (O(its own))."""
        return list(self._asked.get(requester, {}).values())

    def waiting(self, requester: M, rid: int) -> bool:
        asked = self._asked.get(requester)
        return asked is not None and rid in asked

    def token_for(self, responder: M) -> int:
        """A fresh reply token for ``responder`` (unique among its pending requests)."""
        serving = self._serving.get(responder, {})
        token = (self._tokens.get(responder, 0) + 1) & 0xFFFFFFFF
        while token in serving:
            token = (token + 1) & 0xFFFFFFFF
        self._tokens[responder] = token
        return token

    def add(self, pending: Pending[M]) -> None:
        asked = self._asked.setdefault(pending.requester, {})
        if pending.rid not in asked:
            self._count += 1
        asked[pending.rid] = pending
        for responder, token in pending.responders.items():
            self._serving.setdefault(responder, {})[token] = pending

    def answer(self, responder: M, token: int) -> Pending[M] | None:
        """The request ``responder`` answers with ``token``, removed; ``None`` if it is gone
        (answered, expired, or never delivered to this responder)."""
        serving = self._serving.get(responder)
        pending = serving.get(token) if serving is not None else None
        if pending is None:
            return None
        self.remove(pending)
        return pending

    def remove(self, pending: Pending[M]) -> None:
        asked = self._asked.get(pending.requester)
        if asked is not None and asked.get(pending.rid) is pending:
            del asked[pending.rid]
            self._count -= 1
            if not asked:
                del self._asked[pending.requester]
        for responder, token in pending.responders.items():
            self._unserve(responder, token, pending)

    def _unserve(self, responder: M, token: int, pending: Pending[M]) -> None:
        serving = self._serving.get(responder)
        if serving is not None and serving.get(token) is pending:
            del serving[token]
            if not serving:
                del self._serving[responder]

    def expire(self, requester: M, rid: int) -> Pending[M] | None:
        asked = self._asked.get(requester)
        pending = asked.get(rid) if asked is not None else None
        if pending is not None:
            self.remove(pending)
        return pending

    def withdraw(self, responder: M, token: int) -> Pending[M] | None:
        """``responder`` will not answer the request it holds as ``token`` (a node that found
        no responder of its own left): the request if that left it with no responder at all
        (removed; its requester gets NO_RESPONDERS), else ``None``."""
        serving = self._serving.get(responder)
        pending = serving.get(token) if serving is not None else None
        if pending is None:
            return None
        self._unserve(responder, token, pending)
        pending.responders.pop(responder, None)
        if pending.responders:
            return None
        self.remove(pending)
        return pending

    def forget(self, member: M) -> list[Pending[M]]:
        """``member`` is gone: drop the requests it asked; remove it as a responder. Returns
        the requests left with no responder (their requesters get NO_RESPONDERS)."""
        self._tokens.pop(member, None)
        for pending in list(self._asked.get(member, {}).values()):
            self.remove(pending)
        orphaned: list[Pending[M]] = []
        for token, pending in list(self._serving.pop(member, {}).items()):
            if pending.responders.get(member) != token:
                continue
            del pending.responders[member]
            if not pending.responders:
                self.remove(pending)
                orphaned.append(pending)
        return orphaned


# --- across nodes ------------------------------------------------------------------------------

#: What a node advertises: (pattern, group name); the name is ``None`` for serving
#: subscriptions without a group (each of them gets every request, as locally).
Key = tuple[str, str | None]
#: The two kinds of entries in a :class:`Directory`.
GROUP = "g"  #: queue-group members (``sub`` with ``group``)
SERVICE = "s"  #: responders (``sub`` with ``serve``)

#: Topics whose matching remote entries are cached per kind (cleared on any change).
_DIRECTORY_CACHE_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class Peer:
    """Another broker process (its backplane node id) in the pending-request table: the
    requester of a request it forwarded here, or the responder of one sent there."""

    node: bytes


@dataclass(frozen=True, slots=True)
class RemoteRequest:
    """A request forwarded to another node: the groups (``keys``) it must give it to."""

    topic: str
    payload: bytes
    headers: Mapping[str, str] | None
    sender: str | None
    timeout_ms: int
    keys: tuple[Key, ...]


@dataclass(slots=True)
class _Advert:
    entries: dict[str, frozenset[Key]]
    expires: float


class Directory:
    """Which nodes have queue-group members and responders, by kind and (pattern, group).

    The local side counts this process's own members per key (what it advertises); the remote
    side holds each other node's last advertisement until ``ttl`` seconds after it was heard
    (a node that stops advertising, killed or cut off, is forgotten). Sans-I/O: the caller
    passes the time and does the advertising (broker/cluster.py)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._local: dict[str, collections.Counter[Key]] = {
            GROUP: collections.Counter(),
            SERVICE: collections.Counter(),
        }
        self._peers: dict[bytes, _Advert] = {}
        #: kind -> key -> (pattern tokens, nodes), rebuilt when a peer's entries change.
        self._index: dict[str, dict[Key, tuple[tuple[str, ...], tuple[bytes, ...]]]] = {
            GROUP: {},
            SERVICE: {},
        }
        self._cache: dict[tuple[str, str], tuple[tuple[Key, tuple[bytes, ...]], ...]] = {}
        self._next: dict[tuple[str, Key], int] = {}

    def __len__(self) -> int:
        """Other nodes known."""
        return len(self._peers)

    def has(self, kind: str) -> bool:
        """Does any other node advertise an entry of ``kind``?"""
        return bool(self._index[kind])

    def entries(self, kind: str) -> int:
        """Distinct remote keys of ``kind``."""
        return len(self._index[kind])

    # --- the local side ------------------------------------------------------------------

    def add_local(self, kind: str, key: Key) -> bool:
        """A local member joined; True if ``key`` is new here (the advertisement changed)."""
        counts = self._local[kind]
        counts[key] += 1
        return counts[key] == 1

    def remove_local(self, kind: str, key: Key) -> bool:
        """A local member left; True if it was the last one of ``key``."""
        counts = self._local[kind]
        if counts[key] <= 0:
            return False
        counts[key] -= 1
        if counts[key]:
            return False
        del counts[key]
        return True

    def local(self, kind: str) -> list[Key]:
        return sorted(self._local[kind], key=lambda k: (k[0], k[1] or ""))

    # --- the remote side -----------------------------------------------------------------

    def update(
        self, node: bytes, groups: Iterable[Key], services: Iterable[Key], now: float
    ) -> bool:
        """``node`` advertised these entries (its whole set); True if the node is new."""
        entries = {GROUP: frozenset(groups), SERVICE: frozenset(services)}
        advert = self._peers.get(node)
        if advert is None:
            self._peers[node] = _Advert(entries, now + self.ttl)
            self._reindex()
            return True
        advert.expires = now + self.ttl
        if advert.entries != entries:
            advert.entries = entries
            self._reindex()
        return False

    def drop(self, node: bytes) -> bool:
        """``node`` said goodbye (or is unreachable); True if it was known."""
        if self._peers.pop(node, None) is None:
            return False
        self._reindex()
        return True

    def expire(self, now: float) -> list[bytes]:
        """Forget the nodes not heard from for ``ttl`` seconds; returns them."""
        gone = [node for node, advert in self._peers.items() if advert.expires <= now]
        for node in gone:
            del self._peers[node]
        if gone:
            self._reindex()
        return gone

    def clear(self) -> list[bytes]:
        """Forget every other node (the backplane lost the engine); returns them."""
        gone = list(self._peers)
        self._peers.clear()
        self._reindex()
        return gone

    def _reindex(self) -> None:
        for kind, index in self._index.items():
            nodes: dict[Key, list[bytes]] = {}
            for node, advert in self._peers.items():
                for key in advert.entries[kind]:
                    nodes.setdefault(key, []).append(node)
            index.clear()
            for key, found in nodes.items():
                index[key] = (split_pattern(key[0]), tuple(sorted(found)))
        self._cache.clear()

    def matching(self, kind: str, topic: str) -> tuple[tuple[Key, tuple[bytes, ...]], ...]:
        """Every remote key of ``kind`` whose pattern matches ``topic``, with its nodes."""
        index = self._index[kind]
        if not index:
            return ()
        cached = self._cache.get((kind, topic))
        if cached is not None:
            return cached
        tokens = split_pattern(topic)
        found = tuple(
            (key, nodes) for key, (pattern, nodes) in index.items() if matches(pattern, tokens)
        )
        if len(self._cache) >= _DIRECTORY_CACHE_ENTRIES:
            self._cache.clear()
        self._cache[kind, topic] = found
        return found

    def pick(self, kind: str, key: Key, nodes: tuple[bytes, ...]) -> bytes:
        """One of ``nodes`` for ``key``, round robin (spreads a group's messages over them)."""
        i = self._next.get((kind, key), 0)
        if len(self._next) >= _DIRECTORY_CACHE_ENTRIES and (kind, key) not in self._next:
            self._next.clear()
        self._next[kind, key] = i + 1
        return nodes[i % len(nodes)]


class ClusterEvents(Protocol):
    """What a :class:`ClusterMessaging` backplane calls on the hub, on the loop's thread."""

    def remote_request(self, origin: bytes, xid: int, request: RemoteRequest) -> None:
        """Node ``origin`` forwarded a request for local responders of ``request.keys``."""

    def remote_reply(
        self,
        origin: bytes,
        xid: int,
        payload: bytes,
        headers: Mapping[str, str] | None,
        sender: str | None,
    ) -> None:
        """Node ``origin`` answers request ``xid`` this node sent it."""

    def remote_withdraw(self, origin: bytes, xid: int) -> None:
        """Node ``origin`` has no responder (left) for request ``xid``."""

    def peer_gone(self, node: bytes) -> None:
        """``node`` said goodbye, expired, or cannot be reached (an outage)."""


@runtime_checkable
class ClusterMessaging(Protocol):
    """A backplane that carries queue-group choices and requests between nodes (the Redis
    backplane, broker/cluster.py). Sends never block: they queue, ``False`` if refused."""

    node: bytes
    directory: Directory

    def attach(self, events: ClusterEvents) -> None:
        """Where incoming requests, replies and departures go (the hub)."""

    def advertise(self, kind: str, key: Key, added: bool) -> None:
        """A local member of ``key`` joined or left (advertised once per key)."""

    def send_request(self, node: bytes, xid: int, request: RemoteRequest) -> bool: ...

    def send_reply(
        self,
        node: bytes,
        xid: int,
        payload: bytes,
        headers: Mapping[str, str] | None,
        sender: str | None,
    ) -> bool: ...

    def send_withdraw(self, node: bytes, xid: int) -> bool: ...
