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
from collections.abc import Callable
from typing import Any

from tessera_mq.auth.acl import Action, Decision, Grant, Policy
from tessera_mq.auth.identity import Identity
from tessera_mq.broker.audit import Audit
from tessera_mq.broker.backplane import Backplane, LocalBackplane, Publication
from tessera_mq.broker.config import LimitsConfig, MessagingConfig
from tessera_mq.broker.expiry import SessionWatch
from tessera_mq.broker.handler import Outcome, RequestHandler
from tessera_mq.broker.history import History
from tessera_mq.broker.messaging import Groups, Pending, PendingRequests
from tessera_mq.broker.router import Router
from tessera_mq.broker.store import NullStore, Store
from tessera_mq.broker.timers import DeadlineBuckets
from tessera_mq.client.protocol.codec import encode_frame
from tessera_mq.client.protocol.errors import ErrorCode
from tessera_mq.client.protocol.events import Error, Message, Ok, Reply, Request, Response
from tessera_mq.client.protocol.limits import DEFAULT_REQUEST_TIMEOUT_MS
from tessera_mq.client.protocol.topics import matches, split_pattern

__all__ = ["Hub"]

log = logging.getLogger("tessera.broker")


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timers: DeadlineBuckets | None = None
        #: Authenticated sessions: since when, credential expiry (issue #10, broker/expiry.py).
        self.watch = SessionWatch(
            lambda: self.loop, self.audit, max_age=lambda: self.limits.max_session_age
        )
        #: Queue groups, responders (``serve`` subscriptions) and requests in flight.
        self.groups: Groups[RequestHandler] = Groups()
        self.services: Groups[RequestHandler] = Groups()
        self.requests: PendingRequests[RequestHandler] = PendingRequests()
        self._sender_patterns = tuple(split_pattern(p) for p in self.messaging.sender)
        self._sender_cache: dict[str, bool] = {}
        self.history = History(self.messaging.history)
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
        await self.backplane.stop()
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
        if self.store.wants(pub):
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
        self._deliver_locally(pub)
        if not self.backplane.publish(pub):
            self.stats["backplane_refused"] += 1

    def _deliver_locally(self, pub: Publication) -> None:
        """Number it (history), encode once for the router, one frame per chosen group member."""
        sender = pub.sender if self._stamps(pub.topic) else None
        seq = epoch = None
        if self.history:
            stream = self.history.for_topic(pub.topic)
            if stream is not None:
                # Numbered in the step that routes it: sequence order is delivery order.
                seq, epoch = stream.append(pub, self.now()), stream.epoch
                pub.extra["seq"], pub.extra["epoch"] = seq, epoch
        self.deliveries_out += self.router.route(
            pub.topic, pub.payload, pub.headers, sender=sender, seq=seq, epoch=epoch
        )
        if self.groups:
            self._route_groups(pub, sender, seq, epoch)

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
        for handler, sid in self.groups.choose(pub.topic, _load):
            frame = encode_frame(
                Message(
                    pub.topic, pub.payload, headers, sid=sid, sender=sender, seq=seq, epoch=epoch
                )
            )
            handler.deliver(frame, 1)
            self.deliveries_out += 1

    async def _store_then_route(
        self, pub: Publication, done: Callable[[BaseException | None], None]
    ) -> None:
        try:
            await self.store.save((pub,))
        except Exception as exc:  # a refusal (StoreError) or a failing disk: the client is told
            self.stats["store_refused"] += 1
            log.warning("store refused a publish to %r: %s", pub.topic, exc)
            done(exc)
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

    def retained_for(self, handler: RequestHandler, pattern: str) -> list[Message]:
        """The retained snapshot of a new subscription: every retained topic matching
        ``pattern`` that ``handler``'s identity may subscribe to (sid filled in by the caller)."""
        out: list[Message] = []
        for pub in self.store.retained(pattern):
            if not handler.may_see(pub.topic):
                continue
            out.append(
                Message(
                    pub.topic,
                    pub.payload,
                    dict(pub.headers) if pub.headers is not None else None,
                    retained=True,
                    sender=pub.sender if self._stamps(pub.topic) else None,
                )
            )
        self.stats["retained_sent"] += len(out)
        return out

    def resume(
        self, handler: RequestHandler, pattern: str, since: int | None, epoch: str | None
    ) -> tuple[Ok, list[Message] | None]:
        """The ``ok`` for a new subscription (its history position) and, for a ``sub`` with
        ``since``, the messages it missed (``None``: no resumption was asked)."""
        stream = self.history.for_pattern(pattern) if self.history else None
        if stream is None:
            if since is None:
                return Ok(), None
            return Ok(recovered=False), []
        if since is None:
            return Ok(epoch=stream.epoch, seq=stream.seq), None
        gap = Ok(epoch=stream.epoch, seq=stream.seq, recovered=False)
        entries = None if epoch not in (None, stream.epoch) else stream.since(since, self.now())
        if entries is None:
            self.stats["recoveries_gap"] += 1
            return gap, []
        tokens = split_pattern(pattern)
        missed = [
            Message(
                pub.topic,
                pub.payload,
                dict(pub.headers) if pub.headers is not None else None,
                sender=pub.sender if self._stamps(pub.topic) else None,
                seq=seq,
                epoch=stream.epoch,
            )
            for seq, pub in entries
            if matches(tokens, split_pattern(pub.topic)) and handler.may_see(pub.topic)
        ]
        self.stats["recoveries"] += 1
        self.stats["recovered_messages"] += len(missed)
        return Ok(epoch=stream.epoch, seq=stream.seq, recovered=True), missed

    def join(
        self, handler: RequestHandler, sid: int, pattern: str, group: str | None, serve: bool
    ) -> None:
        (self.services if serve else self.groups).join(pattern, group, handler, sid)
        if not serve:  # a group member wants the pattern's publications from other nodes too
            self._interest_added(pattern)

    def leave(
        self, handler: RequestHandler, sid: int, pattern: str, group: str | None, serve: bool
    ) -> None:
        (self.services if serve else self.groups).leave(pattern, group, handler, sid)
        if not serve:
            self._interest_removed(pattern)

    def request(self, handler: RequestHandler, event: Request) -> ErrorCode | None:
        """Route a request to one responder per group; ``None`` when sent, else the error
        code to answer with at once (the ACL was checked by the caller)."""
        if self.requests.waiting(handler, event.rid):
            return ErrorCode.INVALID_SUBSCRIPTION
        if handler.pending_requests >= self.messaging.max_pending_requests:
            return ErrorCode.LIMIT_EXCEEDED
        chosen = list(self.services.choose(event.topic, _load))
        if not chosen:
            self.stats["requests_no_responders"] += 1
            return ErrorCode.NO_RESPONDERS
        responders: dict[RequestHandler, int] = {}
        for responder, sid in chosen:
            if responder in responders:
                continue  # one connection serving twice gets the request once
            token = self.requests.token_for(responder)
            responders[responder] = token
            responder.deliver(
                encode_frame(
                    Message(
                        event.topic,
                        event.payload,
                        event.headers,
                        sid=sid,
                        sender=handler.sender,
                        reply=token,
                    )
                ),
                1,
            )
        timeout_ms = min(
            event.timeout_ms or DEFAULT_REQUEST_TIMEOUT_MS,
            int(self.messaging.request_timeout_max * 1000),
        )
        pending = Pending(handler, event.rid, responders)
        pending.timer = self.loop.call_later(
            timeout_ms / 1000, self._request_expired, handler, event.rid
        )
        self.requests.add(pending)
        handler.pending_requests += 1
        self.stats["requests"] += 1
        return None

    def _request_expired(self, handler: RequestHandler, rid: int) -> None:
        pending = self.requests.expire(handler, rid)
        if pending is None:
            return
        handler.pending_requests -= 1
        self.stats["requests_timed_out"] += 1
        handler.answer(Error(ErrorCode.REQUEST_TIMEOUT, "no reply within the timeout", rid=rid))

    def reply(self, responder: RequestHandler, event: Reply) -> bool:
        """The first reply to a pending request goes to its requester only; ``False`` if the
        token names no request pending for this responder."""
        pending = self.requests.answer(responder, event.token)
        if pending is None:
            self.stats["replies_unknown"] += 1
            return False
        _cancel(pending)
        requester = pending.requester
        requester.pending_requests -= 1
        requester.answer(Response(pending.rid, event.payload, event.headers, responder.sender))
        return True

    def forget_requests(self, handler: RequestHandler) -> None:
        """``handler``'s connection is gone: its requests are dropped; requests only it could
        answer fail at once with NO_RESPONDERS."""
        for pending in self.requests.forget(handler):
            _cancel(pending)
            pending.requester.pending_requests -= 1
            pending.requester.answer(
                Error(ErrorCode.NO_RESPONDERS, "the responder went away", rid=pending.rid)
            )

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
        interest[pattern] += 1

    def _interest_removed(self, pattern: str) -> None:
        interest = self._interest
        interest[pattern] -= 1
        if interest[pattern] <= 0:
            del interest[pattern]
            self.backplane.interest(pattern, False)

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
            "requests_pending": len(self.requests),
            "groups": len(self.groups),
            "services": len(self.services),
            **self.stats,
        }


def _load(handler: RequestHandler) -> float:
    """How full a member's outbox is: 0 (idle) to 1 (at its limit)."""
    return handler.load


def _cancel(pending: Pending[RequestHandler]) -> None:
    timer = pending.timer
    if isinstance(timer, asyncio.TimerHandle):
        timer.cancel()
