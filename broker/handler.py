"""The broker's side of one session, sans-I/O: protocol events in, decisions out.

A :class:`RequestHandler` owns what the broker knows of one connection once bytes are plaintext:
the :class:`~client_sdk.protocol.Connection` state machine, the authenticated identity, its
subscriptions, its ACL cache, its :class:`~broker.outbox.Outbox` and its deadlines. It asks the
hub (a narrow :class:`HubPort`, never the whole broker) for decisions and routing, and talks to
its driver (a :class:`ConnectionIO`: the asyncio session in production, a recorder in tests)
only to write bytes, close, and pause or resume reading. It never reads a clock: ``now`` is
passed in (aioquic's ``handle_timer(now)``), so tests run in-process with a fake clock.

Work taken from one connection is bounded per event-loop turn (:data:`EVENTS_PER_TURN`): the
rest of a large read waits, decoded but not handled, while other connections are served.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import replace
from itertools import chain
from typing import Protocol

from tessera_mq.auth.acl import Action, Decision, Grant
from tessera_mq.auth.identity import Identity
from tessera_mq.broker.backplane import Publication
from tessera_mq.broker.config import LimitsConfig
from tessera_mq.broker.outbox import Outbox, Verdict
from tessera_mq.broker.store import StoreError
from tessera_mq.client.protocol import (
    Close,
    Connection,
    EndOfStream,
    Error,
    ErrorCode,
    Event,
    Hello,
    Ok,
    ProtocolFailure,
    Publish,
    Rejected,
    Role,
    State,
    Subscribe,
    Unsubscribe,
    Welcome,
)
from tessera_mq.client.protocol.codec import encode_frame
from tessera_mq.client.protocol.errors import LocalProtocolError
from tessera_mq.client.protocol.events import Message, Reply, Request, Response
from tessera_mq.client.protocol.limits import MAX_ID, MIN_HEARTBEAT_MS

__all__ = [
    "EVENTS_PER_TURN",
    "ConnectionIO",
    "HubPort",
    "Outcome",
    "RequestHandler",
    "SnapshotCursor",
]

log = logging.getLogger("tessera.broker")

#: Requests handled from one connection per event-loop turn. A 64 KiB read can hold ~2,000
#: tiny publishes (~5 ms of work); 128 keep one turn of one connection well under a millisecond
#: so that a flooding client cannot raise everyone else's latency (issue #8, measured in bench/).
EVENTS_PER_TURN = 128

#: Decisions cached per connection ((action, subject) -> allowed); cleared when full.
_ACL_CACHE_ENTRIES = 256

#: Retained-snapshot (or replay) frames joined into one outbox block (one write covers many
#: topics); also the most a connection's snapshots build per event-loop turn, so that a
#: subscription to 20,000 retained topics is spread over ~80 turns with everyone else served in
#: between (the same fairness as :data:`EVENTS_PER_TURN`).
SNAPSHOT_BLOCK_FRAMES = 256

#: Snapshot bytes encoded per connection per loop turn at most (large values: fewer frames per
#: turn). 256 KiB is ~1 ms of encoding and of a socket write on the CI machine.
SNAPSHOT_BYTES_PER_TURN = 256 * 1024

#: Snapshot candidates looked at per connection per loop turn at most, sent or passed over (not
#: matching the pattern, not allowed by the ACL): a scan that skips most values is paced too.
SNAPSHOT_STEPS_PER_TURN = 1024

#: What a new subscription's snapshot is pulled from, lazily (:meth:`HubPort.retained_for`, or a
#: history replay as ``iter(messages)``): a message to send (the caller sets its sid), or
#: ``None`` for a step that produced nothing (a candidate passed over; counted as a step).
SnapshotCursor = Iterator[Message | None]


class Outcome(enum.Enum):
    """What the hub did with a publish."""

    DONE = "done"  #: queued for every matching local subscriber (and handed to other nodes)
    PENDING = "pending"  #: the store has it; the hub reports the outcome later
    DENIED = "denied"  #: the ACL does not allow it


class ConnectionIO(Protocol):
    """What a handler needs from its driver (the asyncio session)."""

    def write(self, data: bytes) -> None:
        """Protect ``data`` with the security layer and write it to the socket."""

    def close(self, *, graceful: bool) -> None:
        """Close the transport after what was written (``graceful``: the security layer's own
        closing record first); aborted if it does not finish within ``close_timeout``."""

    def abort(self) -> None:
        """Drop the connection now."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class HubPort(Protocol):
    """What a handler may ask of the hub (see :class:`broker.hub.Hub`)."""

    limits: LimitsConfig
    server_name: str

    def check(self, identity: Identity, action: Action, subject: str) -> Decision: ...

    def subscription(self, identity: Identity, pattern: str) -> Grant: ...

    def permits_anything(self, identity: Identity) -> bool: ...

    def admit_identity(self, handler: RequestHandler) -> bool: ...

    features: tuple[str, ...]

    def publish(
        self,
        handler: RequestHandler,
        pub: Publication,
        done: Callable[[BaseException | None], None],
    ) -> Outcome:
        """Run ``pub`` through the pipeline (decide, store, route, other nodes)."""

    def route_plain(self, topic: str, payload: bytes, frame: bytes | None) -> bool:
        """Route an already allowed plain publish at once if the full pipeline would add nothing
        (see ``Hub._plain_routable``); False: the caller runs :meth:`publish` instead."""

    def route_block(self, topic: str, frames: bytes, count: int) -> bool:
        """:meth:`route_plain` for ``count`` publishes at once (delivery frames encoded)."""

    def barrier(self) -> None:
        """Hand this turn's delivery blocks to their subscribers now."""

    def retained_for(self, handler: RequestHandler, pattern: str) -> SnapshotCursor:
        """The retained snapshot for a new subscription, fixed now, pulled lazily (ACL-filtered
        per item as it is pulled)."""

    def resume(
        self,
        handler: RequestHandler,
        sid: int,
        pattern: str,
        since: int | None,
        epoch: str | None,
    ) -> tuple[Ok | None, list[Message] | None]:
        """The new subscription's ``ok`` and, with ``since``, what it missed; ``(None, None)``:
        read from the engine first, answered later through :meth:`RequestHandler.replayed`."""

    def join(
        self, handler: RequestHandler, sid: int, pattern: str, group: str | None, serve: bool
    ) -> None: ...

    def leave(
        self, handler: RequestHandler, sid: int, pattern: str, group: str | None, serve: bool
    ) -> None: ...

    def request(self, handler: RequestHandler, event: Request) -> ErrorCode | None: ...

    def reply(self, responder: RequestHandler, event: Reply) -> bool: ...

    def forget_requests(self, handler: RequestHandler) -> None: ...

    def subscribe(
        self, handler: RequestHandler, pattern: str, grant: Grant | None = None
    ) -> None: ...

    def unsubscribe(
        self, handler: RequestHandler, pattern: str, grant: Grant | None = None
    ) -> None: ...

    def wake(self, handler: RequestHandler) -> None:
        """``handler`` has queued output: call its :meth:`~RequestHandler.flush` this turn."""

    def later(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on a later event-loop turn."""

    def now(self) -> float:
        """The event loop's clock."""

    def set_timer(self, handler: RequestHandler, when: float | None) -> None: ...

    def audit(self, event: str, handler: RequestHandler, level: int, **fields: object) -> None: ...

    def count(self, key: str, n: int = 1) -> None: ...

    def forget(self, handler: RequestHandler) -> None: ...


def _no_mechanism() -> str | None:
    """``describe_mechanism`` of a driver that has no mechanism to name (TLS)."""
    return None


def heartbeat_ms(requested: int | None, configured_s: float) -> int:
    """The interval announced in welcome: the client may ask for a shorter one (to notice a dead
    broker sooner), never below the protocol minimum nor above the broker's own."""
    configured = int(configured_s * 1000)
    if requested is None:
        return configured
    return max(MIN_HEARTBEAT_MS, min(requested, configured))


def _whole_pattern_required(grant: Grant) -> Grant:
    """Queue-group and responder subscriptions are routed by the hub's groups, which do not
    filter per topic: an ACL-filtered grant for one is refused (docs/acl.md)."""
    reason = "a queue group or responder subscription must be allowed its whole pattern"
    refused = Decision(allowed=False, rule=None, reason=reason)
    return Grant(grant.pattern, (), refused, possible=False, unrestricted=False)


class RequestHandler:
    """Decisions for one connection. Also the router's subscriber (:meth:`deliver`)."""

    __slots__ = (
        "_acl_cache",
        "_backlog",
        "_busy",
        "_deadline",
        "_dirty",
        "_grants",
        "_ordered",
        "_ordered_bytes",
        "_pub_allowed",
        "_pump_scheduled",
        "_suspended",
        "_write_paused",
        "authed",
        "close_code",
        "closing",
        "conn",
        "conn_id",
        "counted",
        "describe_mechanism",
        "hub",
        "identity",
        "io",
        "listener",
        "opened",
        "outbox",
        "peer",
        "pending_requests",
        "sender",
        "sub_kinds",
        "subs",
    )

    def __init__(
        self, hub: HubPort, io: ConnectionIO, conn_id: int, *, peer: str, listener: str
    ) -> None:
        self.hub = hub
        self.io = io
        self.conn_id = conn_id
        self.peer = peer
        self.listener = listener
        limits = hub.limits
        self.conn = Connection(
            Role.SERVER,
            max_frame=limits.max_frame_bytes,
            max_frame_before_hello=limits.max_frame_bytes_before_hello,
            max_topic_bytes=limits.max_topic_bytes,
            max_topic_tokens=limits.max_topic_tokens,
        )
        self.outbox = Outbox(
            limits.max_pending_bytes,
            limits.max_pending_messages,
            drop=limits.slow_consumer == "drop",
        )
        self.identity: Identity | None = None
        #: ``mechanism:name`` of the identity, stamped on what this connection publishes.
        self.sender: str | None = None
        #: Counted against its identity's connection limit (undone by the hub on forget).
        self.counted = False
        #: The session is open for deliveries (welcome sent, not closing).
        self.opened = False
        self.subs: dict[int, str] = {}
        #: What each subscription may receive (issue #10: filtered wildcards), by sid.
        self._grants: dict[int, Grant] = {}
        #: Subscriptions that are not plain: sid -> (group, serve). Plain ones are routed by
        #: the router; these by the hub's queue groups and responders.
        #: (Created when first needed, as the ACL cache below: an empty dict is 64 bytes.)
        self.sub_kinds: dict[int, tuple[str | None, bool]] | None = None
        #: Requests this connection sent that wait for an answer.
        self.pending_requests = 0
        #: While a retained snapshot is going out: what must follow it, in order (snapshot
        #: cursors and deliveries routed meanwhile), and the bytes held there.
        #: (Created when first needed: an idle connection holds no deque, ~760 bytes each.)
        self._ordered: deque[_Snapshot | tuple[bytes, int]] | None = None
        self._ordered_bytes = 0
        self._pump_scheduled = False
        self.close_code: str | None = None
        #: The security layer finished (``authenticated`` was called).
        self.authed = False
        #: The handler closed the connection (or the peer did): nothing more is handled.
        self.closing = False
        #: The driver's way to name the mechanism a failed handshake tried (for the audit).
        self.describe_mechanism: Callable[[], str | None] = _no_mechanism  # (not a closure)
        self._acl_cache: dict[tuple[Action, str], bool] | None = None
        #: Events decoded but not yet handled (the turn's budget ran out, or the store is busy).
        self._backlog: deque[Event] | None = None
        self._busy = False  #: a continuation is scheduled
        self._suspended = False  #: waiting for the store to finish a publish
        self._dirty = False
        self._write_paused = False
        self._deadline: float | None = None
        #: The last topic this connection was allowed to publish to (fast path; see recheck).
        self._pub_allowed: str | None = None
        self.conn.publish_sink = self  # publish_plain / publish_run

    # --- identity and logging ---------------------------------------------------------------

    def who(self) -> str:
        ident = str(self.identity) if self.identity is not None else "-"
        return f"[c{self.conn_id} {self.peer} {ident}]"

    @property
    def audit_fields(self) -> dict[str, object]:
        ident = self.identity
        fields: dict[str, object] = {
            "conn": self.conn_id,
            "peer": self.peer,
            "listener": self.listener,
        }
        if ident is not None:
            fields["identity"] = str(ident)
            fields["mechanism"] = ident.mechanism
        else:
            mechanism = self.describe_mechanism()
            if mechanism is not None:
                fields["mechanism"] = mechanism
        return fields

    def _audit(self, event: str, level: int = logging.WARNING, **fields: object) -> None:
        self.hub.audit(event, self, level, **fields)

    # --- lifecycle driven by the session ---------------------------------------------------

    def start(self, now: float) -> None:
        """The connection was accepted: the security handshake must finish in time."""
        self._set_deadline(now + self.hub.limits.handshake_timeout)

    def authenticated(self, identity: Identity | None, now: float) -> bool:
        """The security layer authenticated the peer. False: refused (the handler closes)."""
        self.identity = identity
        self.authed = True
        if identity is not None:
            self.sender = f"{identity.mechanism}:{identity.name}"
        self._audit("auth_success", logging.INFO)
        if not self.hub.admit_identity(self):
            self._audit("limit_exceeded", reason="connections_per_identity")
            self.close(ErrorCode.LIMIT_EXCEEDED, "too many connections for this identity")
            return False
        self._set_deadline(now + self.hub.limits.hello_timeout)
        return True

    def receive(self, data: bytes, now: float) -> None:
        """Plaintext from the security layer (``b""``: EOF)."""
        if self.closing:
            return
        if self._backlog or self._suspended:
            # Reading is paused while a backlog exists; bytes still in flight queue behind it.
            self.io.pause_reading()
            self._hold(self.conn.receive_data(data, now))
            return
        self._handle(self.conn.receive_data(data, now, EVENTS_PER_TURN), now)
        self._after_turn(now)

    def _hold(self, events: list[Event]) -> None:
        """Keep ``events`` for a later turn, after those already held."""
        if not events:
            return
        if self._backlog is None:
            self._backlog = deque(events)
        else:
            self._backlog.extend(events)

    def _after_turn(self, now: float) -> None:
        if self._suspended or self.conn.closed:
            return
        if self._backlog or self.conn.has_backlog:
            if not self._busy:
                self._busy = True
                self.io.pause_reading()
                self.hub.later(self._continue)
        elif self._busy:
            self._busy = False
            self.io.resume_reading()

    def _continue(self) -> None:
        self._busy = False
        if self._suspended or self.closing:
            return
        now = self.hub.now()
        backlog = self._backlog
        if backlog:
            take = [backlog.popleft() for _ in range(min(len(backlog), EVENTS_PER_TURN))]
            if not backlog:
                self._backlog = None
        else:
            take = self.conn.receive_backlog(now, EVENTS_PER_TURN)
        self._handle(take, now)
        if self._suspended or self.closing:
            return  # reading stays paused: the store's answer (or nothing) goes on from here
        if self._backlog or self.conn.has_backlog:
            self._busy = True
            self.hub.later(self._continue)
        else:
            self.io.resume_reading()

    def lost(self) -> None:
        """The transport is gone: release everything held for this connection."""
        self.closing = True  # a continuation already scheduled finds nothing to do
        self.hub.set_timer(self, None)
        for sid, pattern in list(self.subs.items()):
            self._drop_sub(sid, pattern)
        self.subs.clear()
        self._grants.clear()
        self.hub.forget_requests(self)
        self._ordered = None
        self._ordered_bytes = 0
        self.opened = False
        self.outbox.clear()
        self._backlog = None
        if self.conn.state is not State.CLOSED:
            self.conn.state = State.CLOSED
        self.hub.forget(self)
        self._audit("close", logging.INFO, code=self.close_code)

    # --- events ---------------------------------------------------------------------------

    def _handle(self, events: list[Event], now: float) -> None:
        for i, event in enumerate(events):
            if self._suspended:
                self._hold(events[i:])
                break
            match event:
                case Publish():
                    self._on_publish(event)
                case Subscribe():
                    self._on_subscribe(event)
                case Request():
                    self._on_request(event)
                case Reply():
                    self._on_reply(event)
                case Unsubscribe():
                    self._on_unsubscribe(event)
                case Hello():
                    self._on_hello(event, now)
                case Rejected():
                    log.info(
                        "%s rejected request: %s (%s)", self.who(), event.code.name, event.message
                    )
                case ProtocolFailure():
                    self.close_code = event.code.name.lower()
                    log.warning(
                        "%s protocol error, closing: %s (%s)",
                        self.who(),
                        event.code.name,
                        event.message,
                    )
                    self._finish(graceful=True)
                    return
                case Close():
                    self.close_code = self.close_code or "client_close"
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("%s client closed: code=%s", self.who(), event.code)
                    self._finish(graceful=True)
                    return
                case EndOfStream():
                    self.close_code = self.close_code or "eof"
                    self._finish(graceful=False)
                    return
        self._take_replies()

    def _on_hello(self, event: Hello, now: float) -> None:
        if self.conn.state is not State.OPEN:
            return  # hello and close in one read: nothing to welcome
        limits = self.hub.limits
        ident = self.identity
        self.conn.send(
            Welcome(
                version=self.conn.version,
                server=self.hub.server_name,
                mechanism=ident.mechanism if ident else "anonymous",
                identity=ident.name if ident else "",
                max_frame=limits.max_frame_bytes,
                heartbeat_ms=heartbeat_ms(event.heartbeat_ms, limits.heartbeat_interval),
                features=self.hub.features,
            )
        )
        self.conn.mark_alive(now)
        self.opened = True
        self._deadline = None
        self.hub.set_timer(self, self.conn.get_timer())
        log.info("%s session open (client %r)", self.who(), event.client[:64])

    def _reply(self, event: Ok | Error) -> None:
        """Answer a request, unless the client closed in the same read (its close frame came
        after the request): the request is still carried out, there is just no one to tell."""
        if self.conn.can_answer:
            self.conn.send(event)

    def allowed(self, action: Action, subject: str) -> bool:
        key = (action, subject)
        cache = self._acl_cache
        if cache is None:
            cache = self._acl_cache = {}
        cached = cache.get(key)
        if cached is not None:
            return cached
        ident = self.identity
        if ident is None:
            return False
        decision = self.hub.check(ident, action, subject)
        if len(cache) >= _ACL_CACHE_ENTRIES:
            cache.clear()
        cache[key] = decision.allowed
        if not decision.allowed:
            self._audit("denied", action=action.value, subject=subject, reason=decision.reason)
        return decision.allowed

    def _grant(self, pattern: str) -> Grant:
        """The ACL's answer for a subscription (issue #10): refused, unrestricted or filtered
        (the router then delivers only the topics the identity may read)."""
        ident = self.identity
        if ident is None:
            refused = Decision(allowed=False, rule=None, reason="not authenticated")
            return Grant(pattern, (), refused, possible=False, unrestricted=False)
        grant = self.hub.subscription(ident, pattern)
        if not grant.possible:
            self._audit("denied", action="subscribe", subject=pattern, reason=grant.decision.reason)
        return grant

    def may_see(self, topic: str) -> bool:
        """May this identity receive a stored message on ``topic`` (a retained value, a history
        entry)? A filter, not a request: no cache churn, no audit record per topic."""
        ident = self.identity
        return ident is not None and self.hub.check(ident, Action.SUBSCRIBE, topic).allowed

    def _on_publish(self, event: Publish) -> None:
        ack = event.ack
        pub = Publication(event.topic, event.payload, event.headers, self.sender, event.retain)
        outcome = self.hub.publish(self, pub, lambda exc: self._stored(ack, exc))
        if outcome is Outcome.DONE:
            if ack is not None:
                self._reply(Ok(ack=ack))
        elif outcome is Outcome.PENDING:
            self._suspended = True  # this connection's later requests wait behind the store
            self.io.pause_reading()
        else:
            topic = event.topic
            log.info("%s publish to %r denied", self.who(), topic)
            self._reply(
                Error(
                    ErrorCode.PERMISSION_DENIED,
                    f"not allowed to publish to {topic!r}",
                    ack=ack,
                    topic=topic if ack is None else None,
                )
            )

    def publish_plain(
        self, topic: str, payload: bytes, ack: int | None, frame: bytes | None
    ) -> bool:
        """The connection's fast path for a plain publish (no headers; see
        :data:`~client_sdk.protocol.connection.PublishSink`): no event, no Publication when the
        hub can route it at once; anything else goes through :meth:`_on_publish`."""
        if self._suspended or self._backlog or self.closing:
            return False  # it must queue behind what waits: the caller makes an event of it
        if topic is not self._pub_allowed and topic != self._pub_allowed:
            if not self.allowed(Action.PUBLISH, topic):
                self._on_publish(Publish(topic, payload, None, ack))  # denied: the full answer
                return True
            self._pub_allowed = topic
        if not self.hub.route_plain(topic, payload, frame):
            self._on_publish(Publish(topic, payload, None, ack))
        elif ack is not None:
            self._reply(Ok(ack=ack))
        return True

    def publish_run(self, topic: str, frames: bytes, count: int) -> bool:
        """The connection's fast path for a run of plain publishes to one topic (no acks):
        taken only when this connection was already allowed that topic and the hub can route
        at once; False: the connection hands them over one by one instead."""
        if self._suspended or self._backlog or self.closing or topic != self._pub_allowed:
            return False
        return self.hub.route_block(topic, frames, count)

    def _stored(self, ack: int | None, exc: BaseException | None) -> None:
        """The store finished the publish this connection waits for: answer, then go on."""
        self._suspended = False
        if self.conn.closed and not self.conn.can_answer:
            return
        if exc is None:
            if ack is not None:
                self._reply(Ok(ack=ack))
        else:
            code = exc.code if isinstance(exc, StoreError) else ErrorCode.STORE_FAILED
            self._reply(Error(code, str(exc)[:200], ack=ack))
        self._take_replies()
        if self._backlog or self.conn.has_backlog:
            if not self._busy:
                self._busy = True
                self.hub.later(self._continue)
        else:
            self.io.resume_reading()

    def _on_subscribe(self, event: Subscribe) -> None:
        sid = event.sid
        if sid in self.subs:
            self._reply(
                Error(ErrorCode.INVALID_SUBSCRIPTION, f"subscription id {sid} is in use", sid=sid)
            )
            return
        limit = self.hub.limits.max_subscriptions
        if len(self.subs) >= limit:
            self._reply(
                Error(ErrorCode.TOO_MANY_SUBSCRIPTIONS, f"at most {limit} subscriptions", sid=sid)
            )
            return
        grant = self._grant(event.pattern)
        if grant.possible and not grant.unrestricted and (event.group is not None or event.serve):
            # Queue groups and responders are routed by the hub, not the filtering router: they
            # must be allowed the whole pattern (docs/acl.md, "Filtered wildcards").
            grant = _whole_pattern_required(grant)
        if not grant.possible:
            log.info("%s subscribe to %r denied", self.who(), event.pattern)
            self._reply(
                Error(
                    ErrorCode.PERMISSION_DENIED,
                    f"not allowed to subscribe to {event.pattern!r}",
                    sid=sid,
                )
            )
            return
        pattern = event.pattern
        if not self.conn.can_answer:
            return
        # What was routed before this subscription existed goes out before its ok; the ok
        # marks the switch (docs/protocol.md section 16.3).
        self._take_replies()
        self.hub.barrier()
        self.subs[sid] = pattern
        self._grants[sid] = grant
        if event.group is not None or event.serve:
            if self.sub_kinds is None:
                self.sub_kinds = {}
            self.sub_kinds[sid] = (event.group, event.serve)
            self.hub.join(self, sid, pattern, event.group, event.serve)
        else:
            self.hub.subscribe(self, pattern, grant)
        snapshot: SnapshotCursor | None = None
        answer = Ok()
        if not event.serve:
            resumed, missed = self.hub.resume(self, sid, pattern, event.since, event.epoch)
            if resumed is None:
                # ``[cluster]`` history: the position (and what was missed) is read from Redis;
                # what is routed meanwhile waits behind it (``replayed``), bounded as below.
                if self._ordered is None:
                    self._ordered = deque()
                self._ordered.append(_Snapshot(sid, None, None, waiting=True))
                return
            answer = resumed
            # A resumption gets what it missed; a fresh subscription the retained values (a
            # cursor fixed in this step, pulled a block per turn by _pump).
            if missed is not None:
                snapshot = iter(missed) if missed else None
            else:
                snapshot = self.hub.retained_for(self, pattern)
        ok = encode_frame(replace(answer, sid=sid))
        if snapshot is not None or self._ordered:
            ordered = self._ordered
            if ordered is None:
                ordered = self._ordered = deque()
            ordered.append(_Snapshot(sid, ok, snapshot))
            if len(ordered) == 1:
                self._pump()  # else one is going out already: this one's turn comes after it
        else:
            self._push_ordered(ok, 0)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s subscribed sid=%d %r", self.who(), sid, pattern)

    def _drop_sub(self, sid: int, pattern: str) -> None:
        kind = self.sub_kinds.pop(sid, None) if self.sub_kinds else None
        grant = self._grants.pop(sid, None)
        if kind is None:
            self.hub.unsubscribe(self, pattern, grant)
        else:
            self.hub.leave(self, sid, pattern, kind[0], kind[1])
        for item in self._ordered or ():
            if isinstance(item, _Snapshot) and item.sid == sid:
                item.cancel()  # its ok still goes out, in order; the rest is moot
                if item.waiting:
                    item.waiting = False  # the replay still reading finds it gone
                    if not item.answered:
                        item.ok = encode_frame(Ok(sid=sid))
                        item.answered = True

    def _on_request(self, event: Request) -> None:
        rid = event.rid
        if not self.allowed(Action.PUBLISH, event.topic):
            log.info("%s request to %r denied", self.who(), event.topic)
            self._reply(
                Error(
                    ErrorCode.PERMISSION_DENIED,
                    f"not allowed to publish to {event.topic!r}",
                    rid=rid,
                )
            )
            return
        code = self.hub.request(self, event)
        if code is ErrorCode.NO_RESPONDERS:
            self._reply(Error(code, f"no responders for {event.topic!r}", rid=rid))
        elif code is ErrorCode.LIMIT_EXCEEDED:
            self._reply(Error(code, "too many requests waiting for an answer", rid=rid))
        elif code is not None:
            self._reply(Error(code, f"request id {rid} is in use", rid=rid))

    def _on_reply(self, event: Reply) -> None:
        if self.hub.reply(self, event):
            if event.ack is not None:
                self._reply(Ok(ack=event.ack))
        elif event.ack is not None:
            self._reply(
                Error(
                    ErrorCode.UNKNOWN_REQUEST,
                    "no such request: answered, expired or not delivered here",
                    ack=event.ack,
                )
            )

    def answer(self, event: Response | Error) -> None:
        """An answer the hub produced for this connection (a request's reply or failure)."""
        if not self.opened or not self.conn.can_answer:
            return
        try:
            self.conn.send(event)
        except LocalProtocolError:  # a reply too large for this client
            self.conn.send(Error(ErrorCode.LIMIT_EXCEEDED, "the reply is too large", rid=event.rid))
        self._take_replies()

    # --- retained snapshots and history replays, in order -------------------------------------

    def _waiting(self, sid: int) -> _Snapshot | None:
        for item in self._ordered or ():
            if isinstance(item, _Snapshot) and item.sid == sid and item.waiting:
                return item
        return None

    def replayed(
        self, sid: int, answer: Ok | None, messages: SnapshotCursor | list[Message], last: bool
    ) -> bool:
        """The hub read (part of) a replay from the engine: the subscription's ``ok`` (first
        page only) and missed messages, in order before what was routed meanwhile. False: the
        subscription or the connection is gone, read no more."""
        item = self._waiting(sid)
        if item is None or self.closing:
            return False
        if answer is not None:
            item.ok = encode_frame(replace(answer, sid=sid))
            item.answered = True
        grant = self._grants.get(sid)
        if grant is not None and not grant.unrestricted:
            allows = grant.allows
            messages = (m for m in messages if m is None or allows(m.topic))
        item.extend(messages)
        if last:
            item.waiting = False
        self._pump()
        return not last

    def replay_failed(self, sid: int) -> None:
        """A replay could not be read to its end (Redis went away, or trimmed what was still
        to be sent after the ``ok`` said ``recovered``): the subscription ends with an error
        naming it, after what was sent so far, so the client knows it has a gap."""
        item = self._waiting(sid)
        pattern = self.subs.pop(sid, None)
        if item is None or pattern is None or self.closing:
            return
        self._drop_sub(sid, pattern)
        error = Error(
            ErrorCode.STORE_FAILED,
            "history replay interrupted: subscribe again",
            sid=sid,
        )
        ordered = self._ordered
        assert ordered is not None  # ``item`` is in it
        data = encode_frame(error)
        # right after what was sent of the replay: live deliveries held behind it come after
        # the subscription ended (a client drops them)
        ordered.insert(ordered.index(item) + 1, (data, 0))
        self._ordered_bytes += len(data)
        self._pump()

    @property
    def load(self) -> float:
        """How full this connection's outbox is, 0 to 1 (queue groups skip busy members)."""
        outbox = self.outbox
        return (outbox.bytes + self._ordered_bytes) / outbox.max_bytes

    def _push_ordered(self, data: bytes, count: int) -> None:
        if self.outbox.push(data, count) is Verdict.OVERFLOW:
            self._overflow(len(data), count)
            return
        if not self._dirty:
            self._dirty = True
            self.hub.wake(self)

    def _pump_turn(self) -> None:
        """The scheduled pump of a later loop turn (one at a time: ``_pump_scheduled``)."""
        self._pump_scheduled = False
        self._pump()

    def _pump(self) -> None:
        """Move snapshot frames (then what was held behind them) into the outbox while it is
        below half its bound, at most one turn's budget of snapshot work
        (:data:`SNAPSHOT_BLOCK_FRAMES`, :data:`SNAPSHOT_BYTES_PER_TURN`,
        :data:`SNAPSHOT_STEPS_PER_TURN`); the rest follows on later turns, once the outbox has
        been written."""
        ordered = self._ordered
        if ordered is None:
            return
        outbox = self.outbox
        half = outbox.max_bytes // 2
        half_messages = outbox.max_messages // 2
        frames_left = max(1, min(SNAPSHOT_BLOCK_FRAMES, half_messages))
        bytes_left = SNAPSHOT_BYTES_PER_TURN
        steps_left = SNAPSHOT_STEPS_PER_TURN
        waiting = False  # stopped at a replay still reading: ``replayed`` pumps again
        while (
            ordered and outbox.bytes < half and outbox.messages < half_messages and not self.closing
        ):
            item = ordered[0]
            if isinstance(item, tuple):
                ordered.popleft()
                self._ordered_bytes -= len(item[0])
                self._push_ordered(item[0], item[1])
                continue
            if item.ok is not None:
                self._push_ordered(item.ok, 0)
                item.ok = None
            elif not item.answered:
                waiting = True
                break  # its ok comes from a replay still reading (``replayed``)
            if frames_left <= 0 or bytes_left <= 0 or steps_left <= 0:
                break  # this turn's share is used: the rest on a later turn
            block, size, steps = item.take(frames_left, bytes_left, steps_left)
            frames_left -= len(block)
            bytes_left -= size
            steps_left -= steps
            if block:
                self._push_ordered(b"".join(block), len(block))
            if item.source is None:
                if item.waiting:
                    waiting = True
                    break  # the next page is being read: ``replayed`` pumps again
                ordered.popleft()
        if not ordered:
            if self._ordered is ordered:
                self._ordered = None
                self._ordered_bytes = 0
        elif (
            not waiting
            and not self._dirty
            and not self._pump_scheduled
            and not self.closing
            and outbox.bytes < half
            and outbox.messages < half_messages
        ):
            # Stopped by the budget with nothing queued to write (every candidate of the turn
            # was passed over): no flush will schedule the next pump, so schedule it here.
            self._pump_scheduled = True
            self.hub.later(self._pump_turn)

    def _on_unsubscribe(self, event: Unsubscribe) -> None:
        pattern = self.subs.pop(event.sid, None)
        if pattern is None:
            self._reply(
                Error(
                    ErrorCode.INVALID_SUBSCRIPTION,
                    f"no subscription with id {event.sid}",
                    sid=event.sid,
                )
            )
            return
        self._drop_sub(event.sid, pattern)
        self._reply(Ok(sid=event.sid))

    def recheck(self) -> int:
        """The policy changed: forget cached decisions and remove every subscription it no
        longer allows, telling the client (an ``error`` naming the subscription). Returns how
        many were removed."""
        self._acl_cache = None
        self._pub_allowed = None
        removed = 0
        for sid, pattern in list(self.subs.items()):
            old = self._grants.get(sid)
            grant = self._grant(pattern)
            special = self.sub_kinds is not None and sid in self.sub_kinds
            if special and not grant.unrestricted:
                grant = _whole_pattern_required(grant)  # groups and responders: whole pattern
            if grant.possible and special:
                self._grants[sid] = grant
                continue
            if grant.possible:
                self._grants[sid] = grant
                if not grant.unrestricted:
                    # a snapshot or replay still going out obeys the new policy too
                    for item in self._ordered or ():
                        if isinstance(item, _Snapshot) and item.sid == sid:
                            item.allow = grant.allows
                if old is None or not (old.unrestricted and grant.unrestricted):
                    # what it may receive changed (or may have): file it with the new filter
                    self.hub.unsubscribe(self, pattern, old)
                    self.hub.subscribe(self, pattern, grant)
                continue
            del self.subs[sid]
            self._grants[sid] = old if old is not None else grant
            self._drop_sub(sid, pattern)
            removed += 1
            if self.conn.state is State.OPEN:
                self.conn.send(
                    Error(
                        ErrorCode.PERMISSION_DENIED,
                        f"subscription {sid} to {pattern!r} is no longer allowed",
                        sid=sid,
                    )
                )
        if removed:
            self._take_replies()
        ident = self.identity
        if ident is not None and self.opened and not self.hub.permits_anything(ident):
            # issue #10: an identity the new policy allows nothing has no business staying
            log.info("%s no longer allowed anything, closing", self.who())
            self._audit("policy_closed")
            self.close(ErrorCode.PERMISSION_DENIED, "this identity is no longer allowed anything")
        return removed

    # --- outbound ---------------------------------------------------------------------------

    def deliver(self, data: bytes, count: int) -> None:
        """Router callback: queue a block of ``count`` delivery frames (the same bytes object
        for every subscriber of the block). Hot path: keep lean."""
        if not self.opened:
            return
        if self._ordered:
            # A snapshot is going out: live deliveries wait behind it (bounded like the outbox).
            outbox = self.outbox
            if outbox.bytes + self._ordered_bytes + len(data) > outbox.max_bytes:
                self._overflow(len(data), count)
                return
            self._ordered.append((data, count))  # not None: tested just above
            self._ordered_bytes += len(data)
            return
        verdict = self.outbox.push(data, count)
        if verdict is Verdict.QUEUED:
            if not self._dirty:
                self._dirty = True
                self.hub.wake(self)
        elif verdict is Verdict.DROPPED:
            self._dropped(count)
        else:
            self._overflow(len(data), count)

    def _take_replies(self) -> None:
        """Move what the protocol core queued (answers, pings) into the bounded outbox."""
        data = self.conn.data_to_send()
        if not data:
            return
        if self.outbox.push(data) is Verdict.OVERFLOW:
            self._overflow(len(data), 0)
            return
        if not self._dirty:
            self._dirty = True
            self.hub.wake(self)

    def _dropped(self, count: int) -> None:
        outbox = self.outbox
        if outbox.dropped == count:  # the first drop since the client was last told
            self._audit(
                "slow_consumer",
                policy="drop",
                pending_bytes=outbox.bytes,
                pending_messages=outbox.messages,
            )
        self.hub.count("slow_consumer_drops", count)

    def _overflow(self, size: int, count: int) -> None:
        """``size`` bytes (``count`` deliveries) did not fit: the peer is not reading."""
        outbox = self.outbox
        self.hub.count("slow_consumer_disconnects")
        self._audit(
            "slow_consumer",
            policy="disconnect",
            pending_bytes=outbox.bytes + size,
            pending_messages=outbox.messages + count,
        )
        outbox.clear()
        self._ordered = None  # what was held behind a snapshot goes with the connection
        self._ordered_bytes = 0
        self.close(ErrorCode.SLOW_CONSUMER, "slow consumer: too many undelivered bytes")

    def outbox_paused(self, paused: bool) -> None:
        """The transport's buffer is above (True) or back below (False) its high-water mark:
        while paused, output stays in the bounded outbox instead of the transport's buffer."""
        self._write_paused = paused
        if not paused and self.outbox and not self._dirty:
            self._dirty = True
            self.hub.wake(self)

    def flush(self) -> None:
        """Called by the hub once per loop turn when woken: one write for everything queued."""
        self._dirty = False
        if self._write_paused and not self.closing:
            return
        outbox = self.outbox
        if outbox.dropped and self.opened:
            # The backlog is going out: tell the client how many deliveries it missed.
            dropped, outbox.dropped = outbox.dropped, 0
            outbox.push_final(
                encode_frame(
                    Error(
                        ErrorCode.SLOW_CONSUMER,
                        f"{dropped} deliveries dropped: this connection fell behind",
                        dropped=min(dropped, MAX_ID),
                    )
                )
            )
        data = outbox.take()
        if data:
            self.io.write(data)
        if self._ordered and not self._pump_scheduled:
            self._pump_scheduled = True
            self.hub.later(self._pump_turn)

    # --- timers and closing -------------------------------------------------------------------

    @property
    def deadline(self) -> float | None:
        """The handshake or hello deadline still ahead (loop clock), if any."""
        return self._deadline

    def _set_deadline(self, when: float) -> None:
        self._deadline = when
        self.hub.set_timer(self, when)

    def on_timer(self, now: float) -> None:
        """A deadline filed with the hub's timer came: handshake/hello deadline or heartbeat."""
        deadline = self._deadline
        if deadline is not None:
            if now < deadline:
                self.hub.set_timer(self, deadline)
                return
            self._deadline = None
            self._timed_out("hello" if self.authed else None)
            return
        conn = self.conn
        if conn.state is not State.OPEN:
            return
        conn.handle_timer(now)
        if conn.closed:
            log.info("%s heartbeat timeout, closing", self.who())
            self._audit("heartbeat_timeout")
            self.close_code = self.close_code or "heartbeat_timeout"
            self._finish(graceful=True)
            return
        self._take_replies()
        self.hub.set_timer(self, conn.get_timer())

    def _timed_out(self, stage: str | None) -> None:
        name = stage or "security_handshake"
        self._audit("handshake_timeout", stage=name)
        if stage is None:
            self.io.abort()
        else:
            self.close(ErrorCode.HANDSHAKE_TIMEOUT, f"no {stage} within the deadline")

    def close(self, code: ErrorCode, reason: str) -> None:
        """Send a close frame after what is queued, flush, and close the transport."""
        self.close_code = self.close_code or code.name.lower()
        if self.conn.state in (State.OPEN, State.HANDSHAKE):
            with contextlib.suppress(LocalProtocolError):
                self.conn.send(Close(code, reason))
        self._finish(graceful=True)

    def _finish(self, *, graceful: bool) -> None:
        """Stop deliveries, write what is queued (answers, then our close), close the transport."""
        self.opened = False
        self.closing = True
        self.hub.set_timer(self, None)
        self._backlog = None
        self._suspended = False
        if graceful:
            ordered = self._ordered
            if ordered:
                # Deliveries (acknowledged to their publishers) and answers held behind a
                # snapshot still go out, ahead of our close; the rest of the snapshot does not.
                for item in ordered:
                    if isinstance(item, tuple):
                        self.outbox.push_final(item[0])
                    elif item.ok is not None:
                        self.outbox.push_final(item.ok)
                self._ordered = None
                self._ordered_bytes = 0
            self.outbox.push_final(self.conn.data_to_send())
            self.flush()
        self.io.close(graceful=graceful)


class _Snapshot:
    """A new subscription's ``ok`` and retained snapshot (or history replay), pulled from its
    cursor a budget at a time: nothing is built before it is about to go out."""

    __slots__ = ("allow", "answered", "ok", "sid", "source", "waiting")

    def __init__(
        self, sid: int, ok: bytes | None, source: SnapshotCursor | None, *, waiting: bool = False
    ) -> None:
        self.sid = sid
        self.ok: bytes | None = ok
        #: Its ``ok`` is known (sent, or about to be).
        self.answered = ok is not None
        #: Where the messages come from; ``None`` once exhausted or cancelled.
        self.source = source
        #: A filter set when the policy changed meanwhile (the subscription's new grant).
        self.allow: Callable[[str], bool] | None = None
        #: A replay read from the history engine is not complete yet (``replayed``): nothing
        #: behind it goes out before it is.
        self.waiting = waiting

    def extend(self, messages: SnapshotCursor | list[Message]) -> None:
        """A replay's next page (or, for a subscription that waited for its position, the
        retained snapshot): after what is left of the previous one."""
        self.source = iter(messages) if self.source is None else chain(self.source, messages)

    def take(self, max_frames: int, max_bytes: int, max_steps: int) -> tuple[list[bytes], int, int]:
        """Up to ``max_frames`` frames (stopping once ``max_bytes`` are reached or after
        ``max_steps`` pulls): ``(frames, their bytes, pulls made)``."""
        source = self.source
        out: list[bytes] = []
        if source is None:
            return out, 0, 0
        size = steps = 0
        allow, sid = self.allow, self.sid
        while len(out) < max_frames and size < max_bytes and steps < max_steps:
            steps += 1
            msg = next(source, _END)
            if msg is None:
                continue
            if msg is _END:
                self.source = None
                break
            assert isinstance(msg, Message)
            if allow is not None and not allow(msg.topic):
                continue
            data = encode_frame(replace(msg, sid=sid))
            out.append(data)
            size += len(data)
        return out, size, steps

    def cancel(self) -> None:
        self.source = None


_END = object()
