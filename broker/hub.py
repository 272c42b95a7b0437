"""The hub: the one publish pipeline of a broker process, and everything sessions share.

A publish takes one path, top to bottom in :meth:`Hub.publish` (nats-server's
``processInboundClientMsg`` is the shape): decide (the ACL, through the publishing connection's
decision cache) -> store (retained values and history, :class:`~broker.store.Store`) -> route
locally (encode once, joined into per-turn blocks by the :class:`~broker.router.Router`) -> hand
to other nodes (:class:`~broker.backplane.Backplane`). The hub alone owns the per-turn flush: at
the end of each event-loop turn it hands the turn's blocks to their subscribers' outboxes, then
writes every connection with something queued, once. An ``ok`` therefore never leaves before the
publish it acknowledges is queued for every matching subscriber, and :meth:`drain` empties the
pipeline before shutdown closes a single connection.

Request handlers see the hub through :class:`~broker.handler.HubPort` only; the hub never sees
a socket.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from tessera_mq.auth.acl import Action, Decision, Grant, Policy
from tessera_mq.auth.identity import Identity
from tessera_mq.broker.audit import Audit
from tessera_mq.broker.backplane import Backplane, LocalBackplane, Publication
from tessera_mq.broker.config import LimitsConfig, MessagingConfig
from tessera_mq.broker.expiry import SessionWatch
from tessera_mq.broker.handler import Outcome, RequestHandler, SnapshotCursor
from tessera_mq.broker.history import Entries, History, HistoryEngine, Resumption
from tessera_mq.broker.messaging import (
    GROUP,
    SERVICE,
    ClusterMessaging,
    Groups,
    Key,
    Peer,
    Pending,
    PendingRequests,
    RemoteRequest,
)
from tessera_mq.broker.router import Router
from tessera_mq.broker.store import NullStore, RetainedCursor, Store
from tessera_mq.broker.timers import DeadlineBuckets
from tessera_mq.client.protocol.codec import encode_frame
from tessera_mq.client.protocol.errors import ErrorCode
from tessera_mq.client.protocol.events import Error, Message, Ok, Reply, Request, Response
from tessera_mq.client.protocol.limits import DEFAULT_REQUEST_TIMEOUT_MS
from tessera_mq.client.protocol.topics import matches, split_pattern

__all__ = ["Hub"]

log = logging.getLogger("tessera.broker")

#: Seconds a history replay waits for its connection's outbox to drain below half its bound
#: before it reads the next page (the writer empties it; a slow reader is cut off by the
#: outbox's own slow-consumer policy).
_REPLAY_WAIT_SECONDS = 0.01


class Hub:
    """Publish pipeline, subscriptions, connection registry, timers and the per-turn flush."""

    def __init__(
        self,
        *,
        limits: LimitsConfig,
        policy: Policy,
        audit: Audit,
        server_name: str,
        store: Store | None = None,
        backplane: Backplane | None = None,
        messaging: MessagingConfig | None = None,
        history: HistoryEngine | None = None,
    ) -> None:
        self.limits = limits
        self.messaging = messaging or MessagingConfig()
        self.policy = policy
        self.server_name = server_name
        self.audit_trail = audit
        self.store: Store = store or NullStore()
        self.backplane: Backplane = backplane or LocalBackplane()
        self.router = Router(schedule=self._schedule_flush)
        self.handlers: set[RequestHandler] = set()
        self.stats: collections.Counter[str] = collections.Counter()
        #: Hot-path counters, plain attributes (read by :meth:`info`).
        self.publishes_in = 0
        self.deliveries_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._per_identity: collections.Counter[str] = collections.Counter()
        self._interest: collections.Counter[str] = collections.Counter()
        self._dirty: list[RequestHandler] = []
        self._flush_scheduled = False
        self._saving: set[asyncio.Task[None]] = set()
        #: History replays reading from the engine (``[cluster]``: Redis), by their task.
        self._replays: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timers: DeadlineBuckets | None = None
        #: Authenticated sessions: since when, credential expiry (issue #10, broker/expiry.py).
        self.watch = SessionWatch(
            lambda: self.loop, self.audit, max_age=lambda: self.limits.max_session_age
        )
        #: Queue groups, responders (``serve`` subscriptions) and requests in flight.
        self.groups: Groups[RequestHandler] = Groups()
        self.services: Groups[RequestHandler] = Groups()
        #: A requester or responder: a local connection, or another node (:class:`Peer`).
        self.requests: PendingRequests[RequestHandler | Peer] = PendingRequests()
        #: Groups and requests across nodes, when the backplane carries them (broker/cluster.py).
        self._cluster: ClusterMessaging | None = None
        self._node = b""
        self._xid = 0  #: the last id of a request forwarded to another node
        if isinstance(self.backplane, ClusterMessaging):
            self._cluster = self.backplane
            self._node = self.backplane.node
            self.backplane.attach(self)
        self._sender_patterns = tuple(split_pattern(p) for p in self.messaging.sender)
        self._sender_cache: dict[str, bool] = {}
        #: In memory (the embedded default) or, with ``[cluster]``, Redis streams.
        self.history: HistoryEngine = history or History(self.messaging.history)
        #: Announced in welcome (docs/protocol.md section 16.1).
        features = ["request", "group", "sender"]
        if not isinstance(self.store, NullStore):
            features.insert(0, "retain")
        if self.history:
            features.append("history")
        self.features: tuple[str, ...] = tuple(features)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind to the running loop; open the store and the backplane."""
        self._loop = asyncio.get_running_loop()
        self._timers = DeadlineBuckets(self._loop)
        await self.store.open()
        await self.history.start(self._deliver_numbered)
        await self.backplane.start(self._inject)

    async def drain(self) -> None:
        """Empty the pipeline: finish pending store writes, hand every block to its
        subscribers and write every outbox (shutdown calls it before closing connections)."""
        while self._saving:
            await asyncio.gather(*self._saving, return_exceptions=True)
        self._flush_turn()

    async def stop(self) -> None:
        """After :meth:`drain` and the connections' close: release the engines."""
        if self._timers is not None:
            self._timers.close()
        for task in self._replays:
            task.cancel()
        await self.backplane.stop()
        await self.history.stop()
        await self.store.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "Hub.start() has not run"
        return self._loop

    # --- the publish pipeline ----------------------------------------------------------------

    def publish(
        self,
        handler: RequestHandler,
        pub: Publication,
        done: Callable[[BaseException | None], None],
    ) -> Outcome:
        """Decide, store, route, hand over. ``DONE``: queued for every local subscriber (this
        turn's flush writes it); ``PENDING``: the store has it, ``done`` reports the outcome."""
        self.publishes_in += 1
        if not handler.allowed(Action.PUBLISH, pub.topic):
            return Outcome.DENIED
        if self.store.wants(pub) or (self.history and self.history.appends(pub.topic)):
            task = self.loop.create_task(self._store_then_route(pub, done))
            self._saving.add(task)
            task.add_done_callback(self._saving.discard)
            return Outcome.PENDING
        self._route(pub)
        return Outcome.DONE

    def route_plain(self, topic: str, payload: bytes, frame: bytes | None) -> bool:
        """The same pipeline for a plain publish the handler has already allowed, without a
        :class:`Publication`: when the pipeline would add nothing (:meth:`_plain_routable`),
        deciding is all there is before routing. ``frame`` is the delivery frame if the
        connection built it. False: not that case, the handler runs :meth:`publish` instead."""
        if not self._plain_routable(topic):
            return False
        self.publishes_in += 1
        self.deliveries_out += self.router.route_frame(topic, payload, frame)
        return True

    def route_block(self, topic: str, frames: bytes, count: int) -> bool:
        """:meth:`route_plain` for ``count`` plain publishes to one topic at once, their
        delivery frames already encoded back to back in ``frames``."""
        if not self._plain_routable(topic):
            return False
        self.publishes_in += count
        self.deliveries_out += self.router.route_block(topic, frames, count)
        return True

    def _plain_routable(self, topic: str) -> bool:
        """May a plain publish to ``topic`` skip the :class:`Publication` and go out as the
        connection encoded it? Only when the full pipeline (:meth:`publish`) would do nothing
        more than route that same frame to :meth:`Router.match`'s subscribers: nothing stored
        (:class:`NullStore`), no other node (:class:`LocalBackplane`), no ``sender`` stamp, no
        history numbering, no queue group or responder on the topic. The handler has already
        asked the ACL (its cache is cleared by :meth:`set_policy`); the router's match includes
        ACL-filtered subscriptions. Anything that adds per-publish fields to deliveries, or
        chooses subscribers by more than the topic, must say no here."""
        if type(self.store) is not NullStore or type(self.backplane) is not LocalBackplane:
            return False
        if self._sender_patterns and self._stamps(topic):
            return False
        if self.history and self.history.for_topic(topic) is not None:
            return False
        if self.groups and self.groups.matching(topic):
            return False
        return not (self.services and self.services.matching(topic))

    def _route(self, pub: Publication) -> None:
        if self._cluster is not None:
            self._choose_nodes(pub, self._cluster)
        self._deliver_locally(pub)
        if not self.backplane.publish(pub):
            self.stats["backplane_refused"] += 1

    def _deliver_locally(self, pub: Publication) -> None:
        """Number it (history), encode once for the router, one frame per chosen group member."""
        seq = epoch = None
        if self.history:
            # Numbered in the step that routes it: sequence order is delivery order.
            numbered = self.history.number(pub, self.now())
            if numbered is not None:
                seq, epoch = numbered
                pub.extra["seq"], pub.extra["epoch"] = seq, epoch
        self._deliver(pub, seq, epoch)

    def _deliver_numbered(self, pub: Publication, seq: int, epoch: str) -> None:
        """A publication the history engine numbered (``[cluster]``: from Redis' feed, in
        sequence order, on every node, the publishing one included): local subscribers only."""
        pub.extra["seq"], pub.extra["epoch"] = seq, epoch
        self._deliver(pub, seq, epoch)

    def _deliver(self, pub: Publication, seq: int | None, epoch: str | None) -> None:
        sender = pub.sender if self._stamps(pub.topic) else None
        self.deliveries_out += self.router.route(
            pub.topic, pub.payload, pub.headers, sender=sender, seq=seq, epoch=epoch
        )
        if self.groups:
            self._route_groups(pub, sender, seq, epoch)
        elif self._cluster is not None and "q" in pub.extra:
            # Named for groups here whose last members left since the choice: lost for them.
            chosen = _chosen_nodes(pub.extra["q"]) or {}
            lost = sum(1 for node in chosen.values() if node == self._node)
            if lost:
                self.stats["group_copies_lost"] += lost

    def _stamps(self, topic: str) -> bool:
        """Do plain deliveries on ``topic`` carry the publisher's identity (``[messaging]
        sender``)?"""
        if not self._sender_patterns:
            return False
        cached = self._sender_cache.get(topic)
        if cached is None:
            tokens = split_pattern(topic)
            cached = any(matches(p, tokens) for p in self._sender_patterns)
            if len(self._sender_cache) >= 4096:
                self._sender_cache.clear()
            self._sender_cache[topic] = cached
        return cached

    def _route_groups(
        self, pub: Publication, sender: str | None, seq: int | None, epoch: str | None
    ) -> None:
        """One member of every queue group matching the topic gets its own frame (naming its
        subscription); a backed-up member is passed over while another can take it."""
        headers = dict(pub.headers) if pub.headers is not None else None
        chosen = None if self._cluster is None else _chosen_nodes(pub.extra.get("q"))
        if chosen:
            self._route_groups_chosen(
                pub, chosen, headers=headers, sender=sender, seq=seq, epoch=epoch
            )
            return
        for handler, sid in self.groups.choose(pub.topic, _load):
            frame = encode_frame(
                Message(
                    pub.topic, pub.payload, headers, sid=sid, sender=sender, seq=seq, epoch=epoch
                )
            )
            handler.deliver(frame, 1)
            self.deliveries_out += 1

    def _choose_nodes(self, pub: Publication, cluster: ClusterMessaging) -> None:
        """Across nodes: one node per queue group matching the topic, named in the publication
        (``extra["q"]``): this one while a local member is below half its outbox, else one of
        the other nodes that advertised members, round robin (docs/messaging.md)."""
        directory = cluster.directory
        remote = directory.matching(GROUP, pub.topic) if directory.has(GROUP) else ()
        local = self.groups.matching(pub.topic) if self.groups else ()
        if not remote and not local:
            return
        me = self._node
        chosen: dict[Key, bytes] = {}
        for group in local:
            idle = any(_load(member) < 0.5 for member, _sid in group.members)
            chosen[group.pattern, group.name] = me if idle else b""
        for key, nodes in remote:
            if chosen.get(key) != me:
                chosen[key] = directory.pick(GROUP, key, nodes)
        pub.extra["q"] = [[k[0], k[1], node or me] for k, node in chosen.items()]

    def _route_groups_chosen(
        self,
        pub: Publication,
        chosen: dict[Key, bytes],
        *,
        headers: dict[str, str] | None,
        sender: str | None,
        seq: int | None,
        epoch: str | None,
    ) -> None:
        """:meth:`_route_groups` for a publication that names a node per group: a group
        named for another node is left to it; one named for this node gets one member here;
        one not named (the publisher did not know of it yet) gets one here too."""
        me = self._node
        served = 0
        for group in self.groups.matching(pub.topic):
            node = chosen.get((group.pattern, group.name))
            if node is not None and node != me:
                continue
            if node is not None:
                served += 1
            member = group.pick(_load)
            if member is None:
                continue
            handler, sid = member
            frame = encode_frame(
                Message(
                    pub.topic, pub.payload, headers, sid=sid, sender=sender, seq=seq, epoch=epoch
                )
            )
            handler.deliver(frame, 1)
            self.deliveries_out += 1
        # Named for this node, but its members here left between the choice and the arrival.
        lost = sum(1 for node in chosen.values() if node == me) - served
        if lost > 0:
            self.stats["group_copies_lost"] += lost

    async def _store_then_route(
        self, pub: Publication, done: Callable[[BaseException | None], None]
    ) -> None:
        appends = bool(self.history) and self.history.appends(pub.topic)
        if self.store.wants(pub):
            try:
                await self.store.save((pub,))
            except Exception as exc:  # a refusal (StoreError) or a failing disk: the client is told
                self.stats["store_refused"] += 1
                log.warning("store refused a publish to %r: %s", pub.topic, exc)
                done(exc)
                return
        if appends:
            # ``[cluster]`` history: Redis numbers it and its feed delivers it on every node,
            # this one included, in sequence order (broker/history_redis.py); so it is neither
            # routed here nor handed to the backplane. A retained value becomes visible to
            # snapshots as the feed routes it (the engine's ``on_retained``). Queue groups:
            # the node per group is chosen here and travels with it through the feed.
            if self._cluster is not None:
                self._choose_nodes(pub, self._cluster)
            try:
                await self.history.append(pub)
            except Exception as exc:  # StoreError: Redis unreachable (STORE_FAILED)
                self.stats["history_refused"] += 1
                done(exc)
                return
            finally:
                if self.store.wants(pub):
                    # Already visible if the feed routed it here; else (no local subscriber,
                    # or not kept) visible from now on, as it is retained all the same.
                    self.store.apply((pub,))
            done(None)
            return
        # Visible to new subscriptions' snapshots in the same step as it is routed: a
        # subscription sees it either in its snapshot or live, never both, never neither.
        self.store.apply((pub,))
        self._route(pub)
        done(None)

    def _inject(self, pub: Publication) -> None:
        """A publication from another node: local subscribers only (plain ones, and one member
        of each local queue group; numbered in this node's history), never back out."""
        self._deliver_locally(pub)

    # --- retained snapshots, queue groups, requests ---------------------------------------------

    def barrier(self) -> None:
        """Hand this turn's delivery blocks to their subscribers now: what was routed before a
        new subscription reaches its connection before the subscription's ``ok``."""
        self.router.flush_pending()

    def retained_for(self, handler: RequestHandler, pattern: str) -> SnapshotCursor:
        """The retained snapshot of a new subscription, as a lazy cursor: the store fixes the
        values it covers now (:meth:`~broker.store.Store.retained_cursor`: a copy of references,
        in the same step as the subscription starts, so each value is in the snapshot or live,
        never both, never neither); matching, the ACL filter (``handler``'s identity may
        subscribe to the topic, asked as each item is pulled: a policy changed meanwhile
        applies) and the :class:`Message` (sid filled in by the caller) are done per pull.
        ``None`` items are candidates passed over (they count against the caller's budget)."""
        return self._retained_messages(handler, self.store.retained_cursor(pattern))

    def _retained_messages(self, handler: RequestHandler, cursor: RetainedCursor) -> SnapshotCursor:
        stats = self.stats
        for pub in cursor:
            if pub is None or not handler.may_see(pub.topic):
                yield None
                continue
            stats["retained_sent"] += 1
            yield Message(
                pub.topic,
                pub.payload,
                dict(pub.headers) if pub.headers is not None else None,
                retained=True,
                sender=pub.sender if self._stamps(pub.topic) else None,
            )

    def resume(
        self,
        handler: RequestHandler,
        sid: int,
        pattern: str,
        since: int | None,
        epoch: str | None,
    ) -> tuple[Ok | None, list[Message] | None]:
        """The ``ok`` for a new subscription (its history position) and, for a ``sub`` with
        ``since``, the messages it missed (``None``: no resumption was asked). ``(None, None)``:
        the engine reads first (``[cluster]``); the answer follows as ``handler.replayed``."""
        found = self.history.resume(pattern, since, epoch, self.now()) if self.history else None
        if found is None:
            if since is None:
                return Ok(), None
            return Ok(recovered=False), []
        if isinstance(found, Resumption):
            return self._resumed(handler, pattern, found)
        task = self.loop.create_task(self._replay(handler, sid, pattern, since, found))
        self._replays.add(task)
        task.add_done_callback(self._replays.discard)
        return None, None

    def _resumed(
        self, handler: RequestHandler, pattern: str, found: Resumption
    ) -> tuple[Ok, list[Message] | None]:
        ok = Ok(epoch=found.epoch, seq=found.seq, recovered=found.recovered)
        if found.recovered is None:
            return ok, None
        if not found.recovered:
            self.stats["recoveries_gap"] += 1
            return ok, []
        self.stats["recoveries"] += 1
        return ok, self._missed(handler, pattern, found.epoch, found.entries)

    def _missed(
        self, handler: RequestHandler, pattern: str, epoch: str | None, entries: Entries
    ) -> list[Message]:
        """Recovered messages the subscription matches and its identity may see."""
        tokens = split_pattern(pattern)
        missed = [
            Message(
                pub.topic,
                pub.payload,
                dict(pub.headers) if pub.headers is not None else None,
                sender=pub.sender if self._stamps(pub.topic) else None,
                seq=seq,
                epoch=epoch,
            )
            for seq, pub in entries
            if matches(tokens, split_pattern(pub.topic)) and handler.may_see(pub.topic)
        ]
        self.stats["recovered_messages"] += len(missed)
        return missed

    async def _replay(
        self,
        handler: RequestHandler,
        sid: int,
        pattern: str,
        since: int | None,
        pending: Awaitable[Resumption],
    ) -> None:
        """Answer a subscription whose position the engine reads from Redis: the ``ok``, then
        the missed messages a page at a time, each page read once the connection's outbox is
        below half its bound (what is routed meanwhile waits behind it in the handler)."""
        try:
            found = await pending
        except Exception as exc:  # Redis unreachable or too slow: a gap, never a hang
            self.stats["recoveries_failed"] += 1
            log.warning("history position for %r unavailable: %s", pattern, exc)
            if since is not None:
                handler.replayed(sid, Ok(recovered=False), [], True)
            else:  # a fresh subscription without a history position: its retained snapshot
                handler.replayed(sid, Ok(), self.retained_for(handler, pattern), True)
            return
        ok, missed = self._resumed(handler, pattern, found)
        # a fresh subscription: its retained snapshot, as on the sync path
        first = missed if missed is not None else self.retained_for(handler, pattern)
        more = found.more if found.recovered else None
        if not handler.replayed(sid, ok, first, more is None):
            return
        outbox = handler.outbox
        while more is not None:
            half = outbox.max_bytes // 2
            while outbox.bytes >= half and not handler.closing:  # noqa: ASYNC110 - no such event
                await asyncio.sleep(_REPLAY_WAIT_SECONDS)  # the writer drains it meanwhile
            try:
                entries, more = await more()
            except Exception as exc:  # Redis went away, or trimmed what was still to send
                self.stats["recoveries_failed"] += 1
                log.warning("history replay of %r interrupted: %s", pattern, exc)
                handler.replay_failed(sid)
                return
            msgs = self._missed(handler, pattern, found.epoch, entries)
            if not handler.replayed(sid, None, msgs, more is None):
                return

    def join(
        self, handler: RequestHandler, sid: int, pattern: str, group: str | None, serve: bool
    ) -> None:
        (self.services if serve else self.groups).join(pattern, group, handler, sid)
        if self._cluster is not None:
            self._cluster.advertise(SERVICE if serve else GROUP, (pattern, group), True)
        if not serve:  # a group member wants the pattern's publications from other nodes too
            self._interest_added(pattern)

    def leave(
        self, handler: RequestHandler, sid: int, pattern: str, group: str | None, serve: bool
    ) -> None:
        (self.services if serve else self.groups).leave(pattern, group, handler, sid)
        if self._cluster is not None:
            self._cluster.advertise(SERVICE if serve else GROUP, (pattern, group), False)
        if not serve:
            self._interest_removed(pattern)

    def request(self, handler: RequestHandler, event: Request) -> ErrorCode | None:
        """Route a request to one responder per group, here or (for a group with no member
        here) on another node; ``None`` when sent, else the error code to answer with at
        once (the ACL was checked by the caller)."""
        if self.requests.waiting(handler, event.rid):
            return ErrorCode.INVALID_SUBSCRIPTION
        if handler.pending_requests >= self.messaging.max_pending_requests:
            return ErrorCode.LIMIT_EXCEEDED
        timeout_ms = min(
            event.timeout_ms or DEFAULT_REQUEST_TIMEOUT_MS,
            int(self.messaging.request_timeout_max * 1000),
        )
        responders: dict[RequestHandler | Peer, int] = {}
        served = self._offer(
            event.topic, event.payload, event.headers, sender=handler.sender, responders=responders
        )
        if self._cluster is not None:
            self._offer_remote(event, handler.sender, timeout_ms, served, responders)
        if not responders:
            self.stats["requests_no_responders"] += 1
            return ErrorCode.NO_RESPONDERS
        pending: Pending[RequestHandler | Peer] = Pending(handler, event.rid, responders)
        pending.timer = self.loop.call_later(
            timeout_ms / 1000, self._request_expired, handler, event.rid
        )
        self.requests.add(pending)
        handler.pending_requests += 1
        self.stats["requests"] += 1
        return None

    def _offer(
        self,
        topic: str,
        payload: bytes,
        headers: Mapping[str, str] | None,
        *,
        sender: str | None,
        responders: dict[RequestHandler | Peer, int],
        keys: frozenset[Key] | None = None,
    ) -> set[Key]:
        """Deliver a request to one local member of each serving group matching ``topic``
        (only the groups in ``keys`` if given), filling ``responders``; returns the groups
        served here."""
        served: set[Key] = set()
        for group in self.services.matching(topic):
            key = (group.pattern, group.name)
            if keys is not None and key not in keys:
                continue
            member = group.pick(_load)
            if member is None:
                continue
            served.add(key)
            responder, sid = member
            if responder in responders:
                continue  # one connection serving twice gets the request once
            token = self.requests.token_for(responder)
            responders[responder] = token
            responder.deliver(
                encode_frame(
                    Message(
                        topic,
                        payload,
                        dict(headers) if headers is not None else None,
                        sid=sid,
                        sender=sender,
                        reply=token,
                    )
                ),
                1,
            )
        return served

    def _offer_remote(
        self,
        event: Request,
        sender: str | None,
        timeout_ms: int,
        served: set[Key],
        responders: dict[RequestHandler | Peer, int],
    ) -> None:
        """The groups no local member serves go to one node each that advertised members
        (round robin); serving subscriptions without a group, on every node that has some."""
        cluster = self._cluster
        assert cluster is not None
        directory = cluster.directory
        if not directory.has(SERVICE):
            return
        targets: dict[bytes, list[Key]] = {}
        for key, nodes in directory.matching(SERVICE, event.topic):
            if key[1] is None:
                for node in nodes:
                    targets.setdefault(node, []).append(key)
            elif key not in served:
                targets.setdefault(directory.pick(SERVICE, key, nodes), []).append(key)
        for node, keys in targets.items():
            peer = Peer(node)
            # Never reused by this process (a node forgotten and heard again, or a late reply,
            # can never be taken for another request); a restarted process has a new node id.
            self._xid += 1
            xid = self._xid
            forwarded = RemoteRequest(
                event.topic, event.payload, event.headers, sender, timeout_ms, tuple(keys)
            )
            if cluster.send_request(node, xid, forwarded):
                responders[peer] = xid
                self.stats["requests_forwarded"] += 1

    def remote_request(self, origin: bytes, xid: int, request: RemoteRequest) -> None:
        """Another node forwarded a request for local members of ``request.keys``; the reply
        goes back to it (:meth:`reply`), or a withdrawal if none is left."""
        cluster = self._cluster
        assert cluster is not None
        peer = Peer(origin)
        if self.requests.waiting(peer, xid):
            return  # already here (cannot happen with one origin numbering its requests)
        responders: dict[RequestHandler | Peer, int] = {}
        self._offer(
            request.topic,
            request.payload,
            request.headers,
            sender=request.sender,
            responders=responders,
            keys=frozenset(request.keys),
        )
        if not responders:  # its members here left since it chose this node
            self.stats["remote_requests_unserved"] += 1
            cluster.send_withdraw(origin, xid)
            return
        timeout_ms = min(request.timeout_ms, int(self.messaging.request_timeout_max * 1000))
        pending: Pending[RequestHandler | Peer] = Pending(peer, xid, responders)
        pending.timer = self.loop.call_later(timeout_ms / 1000, self._request_expired, peer, xid)
        self.requests.add(pending)
        self.stats["remote_requests"] += 1

    def _request_expired(self, requester: RequestHandler | Peer, rid: int) -> None:
        pending = self.requests.expire(requester, rid)
        if pending is None:
            return
        if isinstance(requester, Peer):
            return  # the requester's node times it out itself
        requester.pending_requests -= 1
        self.stats["requests_timed_out"] += 1
        requester.answer(Error(ErrorCode.REQUEST_TIMEOUT, "no reply within the timeout", rid=rid))

    def reply(self, responder: RequestHandler, event: Reply) -> bool:
        """The first reply to a pending request goes to its requester only (through its node
        if it asked on another); ``False`` if the token names no request pending for this
        responder."""
        pending = self.requests.answer(responder, event.token)
        if pending is None:
            self.stats["replies_unknown"] += 1
            return False
        _cancel(pending)
        requester = pending.requester
        if isinstance(requester, Peer):
            assert self._cluster is not None
            if not self._cluster.send_reply(
                requester.node, pending.rid, event.payload, event.headers, responder.sender
            ):
                self.stats["replies_refused"] += 1
            return True
        requester.pending_requests -= 1
        requester.answer(Response(pending.rid, event.payload, event.headers, responder.sender))
        return True

    def remote_reply(
        self,
        origin: bytes,
        xid: int,
        payload: bytes,
        headers: Mapping[str, str] | None,
        sender: str | None,
    ) -> None:
        """A reply from another node to a request sent there: the first one wins; one for a
        request answered, expired or never sent there is dropped."""
        pending = self.requests.answer(Peer(origin), xid)
        if pending is None:
            self.stats["replies_unknown"] += 1
            return
        _cancel(pending)
        requester = pending.requester
        if isinstance(requester, Peer):  # not ours to answer (cannot happen: xids are ours)
            return
        requester.pending_requests -= 1
        requester.answer(
            Response(pending.rid, payload, dict(headers) if headers is not None else None, sender)
        )

    def remote_withdraw(self, origin: bytes, xid: int) -> None:
        """Another node has no responder left for request ``xid``."""
        pending = self.requests.withdraw(Peer(origin), xid)
        if pending is not None:
            self._no_responders(pending, "no responder on the node it was sent to")

    def peer_gone(self, node: bytes) -> None:
        """Another node left, expired or cannot be reached: the requests only it could
        answer fail with NO_RESPONDERS; those it forwarded here are dropped."""
        peer = Peer(node)
        for pending in self.requests.asked(peer):
            _cancel(pending)  # forwarded from there: its reply could not go back
        for pending in self.requests.forget(peer):
            self._no_responders(pending, "the responder's node went away")

    def forget_requests(self, handler: RequestHandler) -> None:
        """``handler``'s connection is gone: its requests are dropped; requests only it could
        answer fail at once with NO_RESPONDERS."""
        for pending in self.requests.asked(handler):
            _cancel(pending)
        for pending in self.requests.forget(handler):
            self._no_responders(pending, "the responder went away")

    def _no_responders(self, pending: Pending[RequestHandler | Peer], why: str) -> None:
        _cancel(pending)
        requester = pending.requester
        if isinstance(requester, Peer):
            if self._cluster is not None:
                self._cluster.send_withdraw(requester.node, pending.rid)
            return
        requester.pending_requests -= 1
        requester.answer(Error(ErrorCode.NO_RESPONDERS, why, rid=pending.rid))

    # --- the per-turn flush ------------------------------------------------------------------

    def wake(self, handler: RequestHandler) -> None:
        self._dirty.append(handler)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_turn)

    def _flush_turn(self) -> None:
        """Once per loop turn: this turn's delivery blocks into their subscribers' outboxes,
        then one write per connection with something queued."""
        self._flush_scheduled = False
        self.router.flush_pending()
        dirty, self._dirty = self._dirty, []
        for handler in dirty:
            handler.flush()

    def later(self, callback: Callable[[], None]) -> None:
        self.loop.call_soon(callback)

    def now(self) -> float:
        return self.loop.time()

    def set_timer(self, handler: RequestHandler, when: float | None) -> None:
        timers = self._timers
        if timers is not None:
            timers.schedule(handler, when)

    # --- subscriptions -----------------------------------------------------------------------

    def subscribe(self, handler: RequestHandler, pattern: str, grant: Grant | None = None) -> None:
        self.router.subscribe(handler, pattern, grant)
        self._interest_added(pattern)

    def unsubscribe(
        self, handler: RequestHandler, pattern: str, grant: Grant | None = None
    ) -> None:
        self.router.unsubscribe(handler, pattern, grant)
        self._interest_removed(pattern)

    def _interest_added(self, pattern: str) -> None:
        """Count a local subscription (plain or queue group); the first one of a pattern tells
        the backplane, so other nodes send what someone here wants."""
        interest = self._interest
        if not interest[pattern]:
            self.backplane.interest(pattern, True)
            self.history.interest(pattern, True)
        interest[pattern] += 1

    def _interest_removed(self, pattern: str) -> None:
        interest = self._interest
        interest[pattern] -= 1
        if interest[pattern] <= 0:
            del interest[pattern]
            self.backplane.interest(pattern, False)
            self.history.interest(pattern, False)

    # --- policy ------------------------------------------------------------------------------

    def check(self, identity: Identity, action: Action, subject: str) -> Decision:
        return self.policy.check(identity, action, subject)

    def subscription(self, identity: Identity, pattern: str) -> Grant:
        """What a subscription may receive: refused, unrestricted or ACL-filtered (issue #10)."""
        return self.policy.subscription(identity, pattern)

    def permits_anything(self, identity: Identity) -> bool:
        """Whether the policy allows this identity anything at all (issue #10 re-check)."""
        return self.policy.permits_anything(identity)

    def set_policy(self, policy: Policy) -> int:
        """Swap the ACL and re-check every live connection against it; returns how many
        subscriptions it removed (each owner is told with an ``error`` naming it)."""
        self.policy = policy
        removed = 0
        for handler in list(self.handlers):
            removed += handler.recheck()
        return removed

    # --- connections -------------------------------------------------------------------------

    def admit(self, handler: RequestHandler) -> bool:
        if len(self.handlers) >= self.limits.max_connections:
            self.stats["connections_refused"] += 1
            return False
        self.handlers.add(handler)
        self.stats["connections_accepted"] += 1
        return True

    def admit_identity(self, handler: RequestHandler) -> bool:
        """Count an authenticated connection against its identity's limit."""
        key = str(handler.identity)
        if self._per_identity[key] >= self.limits.max_connections_per_identity:
            self.stats["connections_refused_identity"] += 1
            return False
        self._per_identity[key] += 1
        handler.counted = True
        return True

    def forget(self, handler: RequestHandler) -> None:
        if handler in self.handlers:
            self.handlers.discard(handler)
            if handler.counted:
                key = str(handler.identity)
                self._per_identity[key] -= 1
                if self._per_identity[key] <= 0:
                    del self._per_identity[key]

    def audit(self, event: str, handler: RequestHandler, level: int, **fields: object) -> None:
        self.audit_trail.record(event, handler, level=level, **fields)

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] += n

    # --- stats -------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Counters and gauges for operators, tests and the metrics endpoint."""
        outbox_bytes = 0
        for handler in self.handlers:
            outbox_bytes += handler.outbox.bytes
        return {
            "connections": len(self.handlers),
            "subscriptions": self.router.subscription_count,
            "publishes_in": self.publishes_in,
            "deliveries_out": self.deliveries_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "outbox_bytes": outbox_bytes,
            "timers": len(self._timers) if self._timers is not None else 0,
            "backplane": dict(self.backplane.health()),
            **({"history": dict(h)} if (h := self.history.health()) else {}),
            "requests_pending": len(self.requests),
            "groups": len(self.groups),
            "services": len(self.services),
            **self.stats,
        }


def _load(handler: RequestHandler) -> float:
    """How full a member's outbox is: 0 (idle) to 1 (at its limit)."""
    return handler.load


def _chosen_nodes(raw: object) -> dict[Key, bytes] | None:
    """``extra["q"]`` of a publication: (pattern, group) -> the node chosen for it."""
    if not raw or not isinstance(raw, list | tuple):
        return None
    out: dict[Key, bytes] = {}
    for item in raw:
        if isinstance(item, list | tuple) and len(item) == 3:
            pattern, name, node = item
            if isinstance(pattern, str) and isinstance(name, str) and isinstance(node, bytes):
                out[pattern, name] = node
    return out


def _cancel(pending: Pending[Any]) -> None:
    timer = pending.timer
    if isinstance(timer, asyncio.TimerHandle):
        timer.cancel()
