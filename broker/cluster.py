"""The Redis backplane: broker processes and nodes sharing one topic space (docs/scaling.md).

:class:`RedisBackplane` implements :class:`~broker.backplane.Backplane` on Redis pub/sub with
redis-py's asyncio client (the optional ``cluster`` extra; this module is imported only when
``[cluster]`` is configured). The model is centrifuge's ``RedisBroker``: Redis carries each
publication once per node that wants it; every node encodes it once for its own subscribers.

Channels and interest
    A publication goes to exactly one Redis channel, ``<prefix>:<first topic token>``
    (``tessera:status`` for ``status.eu.node-17``). A node SUBSCRIBEs to the channel of each first
    token its local patterns name; as soon as one local pattern starts with a wildcard (``*.x``,
    ``>``) it PSUBSCRIBEs to ``<prefix>:*`` instead and drops its channels. Redis matches every
    PUBLISH against every PSUBSCRIBE pattern of every client, linearly, so one glob per node at
    most keeps Redis' cost per publish flat; a PSUBSCRIBE per Tessera pattern would make it grow
    with the number of distinct patterns in the cluster, and a channel per full topic would need
    one PSUBSCRIBE per wildcard pattern. What reaches a node and matches no local subscriber is
    routed to nobody (one trie walk).

Exactly once, in order
    Each node has a random id and numbers its Redis messages (one counter per process). Every
    node reads all its channels over one connection, so publications from one origin arrive in
    the order they were sent; a node drops any message whose number is not above the last
    one seen from that origin (the same message arriving over a channel and the glob during
    a switch between the two) and any message of its own (no echo).

Encoding
    One Redis message carries the consecutive publications of one writer round to one channel:
    ``[1, node, seq, [[topic, payload, headers, sender, retain, extra], ...]]`` in msgpack
    (``headers``/``extra`` ``nil`` when empty); each publication is encoded once, at
    ``publish``. Under load a batch holds many publications, so Redis' cost and the node's
    per-message cost are paid per batch, not per publication. docs/scaling.md shows the bytes.

Queue groups and requests across nodes
    Each node advertises on ``<prefix>:\x00dir`` which (pattern, group) it has queue-group
    members and responders for: its whole set when it changes (after the interest it implies
    has reached Redis) and every :data:`DIRECTORY_HEARTBEAT_SECONDS`; a node not heard from for
    :data:`DIRECTORY_TTL_SECONDS` is forgotten, one that stops says so (``bye``). A new node
    asks, and every other answers with its set. The hub (broker/hub.py) names one node per
    matching group in each publication (``extra["q"]``); a request goes, through the target
    node's own channel ``<prefix>:\x00node:<id hex>``, to one node per service group, and the
    reply comes back on the requester's node channel. The state is
    :class:`~broker.messaging.Directory`; the encodings are in docs/scaling.md.

Outage
    ``publish`` queues (bounded by ``max_queue_messages``) for one writer task that sends
    pipelined PUBLISH batches. When Redis is unreachable, local delivery is unaffected;
    ``publish`` returns ``False`` (counted in ``refused_disconnected``) and keeps nothing, the
    batch in flight and the queue at the moment of failure are counted in ``lost``; the outage
    is logged once, counted in ``outages`` and shown in :meth:`health`; the backplane reconnects
    with exponential backoff and re-subscribes. Redis pub/sub itself is at-most-once: a node
    that is disconnected misses what others published meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from tessera_mq.broker.backplane import Publication
from tessera_mq.broker.messaging import GROUP, SERVICE, ClusterEvents, Directory, Key, RemoteRequest
from tessera_mq.broker.redis_common import (
    BACKOFF_FIRST_SECONDS,
    BACKOFF_MAX_SECONDS,
    aclose_quietly,
    raise_if_cancelled,
    supervise,
)
from tessera_mq.client.protocol.topics import MULTI_WILDCARD, SINGLE_WILDCARD

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis.asyncio.client import PubSub

__all__ = [
    "DEFAULT_CHANNEL_PREFIX",
    "DEFAULT_MAX_QUEUE_MESSAGES",
    "DIRECTORY_HEARTBEAT_SECONDS",
    "DIRECTORY_TTL_SECONDS",
    "INTERNAL_CHANNEL_MARK",
    "BackplaneError",
    "RedisBackplane",
    "RedisSettings",
    "decode_batch",
    "encode_batch",
    "encode_publication",
    "glob_escape",
]

log = logging.getLogger("tessera.broker.cluster")

#: Channel names are ``<prefix>:<first token>``; nodes of one topic space share the prefix.
DEFAULT_CHANNEL_PREFIX = "tessera"
#: Channels ``<prefix>:\x00...`` carry no publications (no topic starts with NUL): the idle
#: channel below and the clustered store's change feed. The glob matches them; they are skipped.
INTERNAL_CHANNEL_MARK = "\x00"
#: Publications queued for Redis before ``publish`` refuses (centrifuge's Redis broker and
#: NATS' per-connection pending limit bound the same queue; at ~1 KiB each this is ~10 MiB).
DEFAULT_MAX_QUEUE_MESSAGES = 10_000
#: Publications taken from the queue for one pipelined round trip; consecutive ones to the same
#: channel travel as one Redis message (a batch), up to :data:`_BATCH_BYTES` each.
_BATCH_MESSAGES = 512
#: Bytes of publications in one Redis message: well under Redis' pub/sub output buffer limits
#: (``client-output-buffer-limit pubsub 32mb 8mb 60`` by default).
_BATCH_BYTES = 256 * 1024
#: Origins whose last sequence number is remembered (one per broker process ever seen; a
#: restarted process has a new id). Least recently heard is forgotten first.
_MAX_ORIGINS = 4096
#: Seconds to connect (TCP, TLS, AUTH) and for one command before the engine counts as down.
_CONNECT_TIMEOUT_SECONDS = 5.0
#: Seconds ``stop`` waits for the queue to reach Redis.
_STOP_FLUSH_SECONDS = 2.0
#: Encoding version (first element of the array).
_WIRE_VERSION = 1
#: Bytes of the random node id.
_NODE_ID_BYTES = 8
#: Log a malformed message from Redis once per this many.
_BAD_MESSAGE_LOG_EVERY = 1000
#: Seconds between a node's directory advertisements (queue groups and responders). Like
#: Centrifugo's presence and node pings (its node info is re-published every few seconds).
DIRECTORY_HEARTBEAT_SECONDS = 1.0
#: Seconds after its last advertisement a node is forgotten (a killed node's groups stop
#: being chosen and the requests waiting on it fail with NO_RESPONDERS): five heartbeats, so a
#: loaded node that skips a few is not dropped.
DIRECTORY_TTL_SECONDS = 5.0


class BackplaneError(Exception):
    """The backplane cannot start (Redis unreachable, refused AUTH, bad URL)."""


def glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters (``* ? [ ] \\``) so ``text`` matches only itself."""
    out = []
    for ch in text:
        if ch in "*?[]\\":
            out.append("\\")
        out.append(ch)
    return "".join(out)


def _is_internal(channel: object, internal: bytes) -> bool:
    if isinstance(channel, str):
        channel = channel.encode()
    return isinstance(channel, bytes) and channel.startswith(internal)


def encode_publication(pub: Publication, packer: msgpack.Packer | None = None) -> bytes:
    """One publication as Redis carries it, inside a batch (see :func:`encode_batch`).
    A reused ``packer`` (one per backplane: not shared between threads) saves creating one
    per call, about 0.5 us of the 0.7."""
    fields = (
        pub.topic,
        pub.payload,
        dict(pub.headers) if pub.headers else None,
        pub.sender,
        pub.retain,
        pub.extra or None,
    )
    if packer is None:
        return msgpack.packb(fields, use_bin_type=True)  # type: ignore[no-any-return]
    return packer.pack(fields)  # type: ignore[no-any-return]


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def encode_batch(node: bytes, seq: int, items: Sequence[bytes]) -> bytes:
    """One Redis message: ``[1, node, seq, [publication, ...]]`` from pre-encoded
    publications (:func:`encode_publication`), joined without decoding them again."""
    head: bytes = msgpack.packb([_WIRE_VERSION, node, seq], use_bin_type=True)
    # fixarray(3) -> fixarray(4): the batch array follows as the fourth element
    return b"\x94" + head[1:] + _array_header(len(items)) + b"".join(items)


def decode_batch(data: bytes) -> tuple[bytes, int, list[Publication]]:
    """``(node, seq, publications)`` from a Redis message; raises ValueError if malformed.

    The ingest path of every node (each remote publication passes here once per node): exact
    ``type`` checks and tuples instead of lists keep it near 0.6 us per publication."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ValueError(f"not msgpack: {type(exc).__name__}") from None
    if type(obj) is not tuple or len(obj) != 4 or obj[0] != _WIRE_VERSION:
        raise ValueError("not a version-1 batch array")
    _, node, seq, items = obj
    if type(node) is not bytes or type(seq) is not int or type(items) is not tuple:
        raise ValueError("batch fields of the wrong type")
    pubs: list[Publication] = []
    append = pubs.append
    for item in items:
        if type(item) is not tuple or len(item) != 6:
            raise ValueError("a publication is not a 6-element array")
        topic, payload, headers, sender, retain, extra = item
        if (
            type(topic) is not str
            or type(payload) is not bytes
            or type(retain) is not bool
            or (sender is not None and type(sender) is not str)
            or (extra is not None and type(extra) is not dict)
        ):
            raise ValueError("publication fields of the wrong type")
        if headers is not None:
            if type(headers) is not dict:
                raise ValueError("headers must map strings to strings")
            for k, v in headers.items():
                if type(k) is not str or type(v) is not str:
                    raise ValueError("headers must map strings to strings")
        append(Publication(topic, payload, headers, sender, retain, dict(extra) if extra else {}))
    return node, seq, pubs


def _first_token(pattern: str) -> str:
    return pattern.split(".", 1)[0]


@dataclass(frozen=True)
class RedisSettings:
    """How a broker process reaches Redis: one place for the backplane and the clustered
    store (broker/store_redis.py), from ``[cluster]`` (``redis``, ``username``,
    ``password_file``, ``tls_ca``)."""

    url: str
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None

    def safe_url(self) -> str:
        """The URL without any credentials (for logs and health)."""
        scheme, sep, rest = self.url.partition("://")
        if "@" in rest:
            rest = rest.rsplit("@", 1)[1]
        return f"{scheme}{sep}{rest}"

    def client(self) -> aioredis.Redis:
        """A new client: fails fast (no retries; the callers reconnect themselves), TLS 1.2+
        with the server certificate and host name verified for ``rediss://``."""
        import redis.asyncio as aioredis  # noqa: PLC0415 - the optional extra
        from redis.asyncio.retry import Retry  # noqa: PLC0415
        from redis.backoff import NoBackoff  # noqa: PLC0415

        kwargs: dict[str, Any] = {
            "socket_connect_timeout": _CONNECT_TIMEOUT_SECONDS,
            "socket_keepalive": True,
            # We reconnect and re-subscribe ourselves; the client must fail fast, not retry.
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
        }
        if self.username is not None:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password
        if self.url.startswith("rediss://"):
            kwargs["ssl_cert_reqs"] = "required"
            kwargs["ssl_check_hostname"] = True
            kwargs["ssl_min_version"] = ssl.TLSVersion.TLSv1_2
            if self.tls_ca is not None:
                kwargs["ssl_ca_certs"] = self.tls_ca
        return aioredis.Redis.from_url(self.url, **kwargs)


class RedisBackplane:
    """Publications cross between broker processes and nodes through Redis pub/sub."""

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        channel_prefix: str = DEFAULT_CHANNEL_PREFIX,
        max_queue_messages: int = DEFAULT_MAX_QUEUE_MESSAGES,
        node_id: bytes | None = None,
        fail_fast: bool = True,
    ) -> None:
        self.url = url
        self.settings = RedisSettings(url, username, password, tls_ca)
        self.prefix = channel_prefix
        self.max_queue_messages = max_queue_messages
        #: ``start`` raises when Redis is unreachable (a first start: a wrong URL shows at
        #: once); False: start in an outage and reconnect (a worker restarted by --workers).
        self.fail_fast = fail_fast
        self.node = node_id or os.urandom(_NODE_ID_BYTES)
        if not 1 <= len(self.node) <= 255:
            raise ValueError("node_id must be 1 to 255 bytes")
        #: How our own messages start (array(4), version 1, bin8 node): echoes are recognised
        #: and dropped without decoding them.
        self._echo_prefix = bytes((0x94, _WIRE_VERSION, 0xC4, len(self.node))) + self.node
        self._inject: Callable[[Publication], None] | None = None
        #: Issue #11: called with each remote retained publication just before it is injected
        #: (in the same step): the clustered store makes it visible to snapshots as it is
        #: routed (``RedisStore.observe``), so a new subscription never misses it.
        self.on_retained: Callable[[Publication], None] | None = None
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque()
        self._packer = msgpack.Packer(use_bin_type=True)
        self._seq = 0
        self._last_seq: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        #: Local patterns (the hub reports first appearance / last removal of each).
        self._patterns: set[str] = set()
        self._first_tokens: collections.Counter[str] = collections.Counter()
        self._wild = 0
        #: What the Redis connection is subscribed to right now.
        self._channels: set[str] = set()
        self._globbed = False
        self._connected = False
        self._stopping = False
        self._outage_since: float | None = None
        self._wake_writer = asyncio.Event()
        self._wake_sync = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._client: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        #: ``refused_disconnected + lost`` when the current outage began.
        self._lost_mark = 0
        #: Queue groups and requests across nodes (broker/messaging.py).
        self.directory = Directory(DIRECTORY_TTL_SECONDS)
        self._events: ClusterEvents | None = None
        #: Messages to one node's channel (requests, replies) and directory advertisements,
        #: sent by the writer ahead of the publication batches.
        self._direct: collections.deque[tuple[str, bytes]] = collections.deque()
        self._dir_channel = f"{self.prefix}:{INTERNAL_CHANNEL_MARK}dir"
        self._node_channel = self._channel_of(self.node)
        self._dir_channel_b = self._dir_channel.encode()
        self._node_channel_b = self._node_channel.encode()
        self._announce = False  #: the local entries changed since the last advertisement
        self._ask = False  #: ask the other nodes for theirs with the next advertisement

    # --- the Backplane protocol ----------------------------------------------------------

    async def start(self, inject: Callable[[Publication], None]) -> None:
        """Connect once (raising :class:`BackplaneError` if Redis cannot be reached: a typo
        in the URL shows at start-up), then keep the connection up in a background task."""
        self._inject = inject
        try:
            await self._connect()
        except Exception as exc:
            await self._close_connection()
            if self.fail_fast:
                raise BackplaneError(f"cannot reach redis at {self._safe_url()}: {exc}") from None
            self._outage(exc)  # serve locally; _run reconnects
        else:
            log.info("redis backplane connected to %s (node %s)", self._safe_url(), self.node.hex())
        self._task = asyncio.get_running_loop().create_task(self._run(), name="redis-backplane")

    async def stop(self) -> None:
        """Send what is queued (bounded by a short timeout), then disconnect; what is left is
        counted in ``lost``."""
        if self._connected and not self._stopping:
            # Other nodes stop choosing this one at once (not after the TTL).
            self._direct.append((self._dir_channel, self._encode_directory("bye")))
        self._stopping = True
        self._wake_writer.set()
        deadline = time.monotonic() + _STOP_FLUSH_SECONDS
        while (  # noqa: ASYNC110
            (self._queue or self._direct) and self._connected and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.01)
        self.stats["lost"] += len(self._queue)
        self._queue.clear()
        self._direct.clear()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close_connection()
        self._connected = False

    def interest(self, pattern: str, added: bool) -> None:
        first = _first_token(pattern)
        wild = first in (SINGLE_WILDCARD, MULTI_WILDCARD)
        if added:
            if pattern in self._patterns:
                return
            self._patterns.add(pattern)
            if wild:
                self._wild += 1
            else:
                self._first_tokens[first] += 1
        else:
            if pattern not in self._patterns:
                return
            self._patterns.discard(pattern)
            if wild:
                self._wild -= 1
            else:
                self._first_tokens[first] -= 1
                if self._first_tokens[first] <= 0:
                    del self._first_tokens[first]
        self._wake_sync.set()

    def publish(self, pub: Publication) -> bool:
        if not self._connected or self._stopping:
            self.stats["refused_disconnected"] += 1
            return False
        if len(self._queue) >= self.max_queue_messages:
            self.stats["refused_queue_full"] += 1
            return False
        channel = f"{self.prefix}:{_first_token(pub.topic)}"
        self._queue.append((channel, encode_publication(pub, self._packer)))
        if len(self._queue) == 1:
            self._wake_writer.set()
        return True

    def receives(self, topic: str) -> bool:
        """Does a publication on ``topic`` from another node reach this node now (connected,
        and Redis confirmed the subscription to its channel or to the glob)? Issue #11: the
        clustered store then waits for the live copy rather than its change feed."""
        if not self._connected or self._stopping:
            return False
        return self._globbed or f"{self.prefix}:{_first_token(topic)}" in self._channels

    def health(self) -> Mapping[str, object]:
        out: dict[str, object] = {
            "engine": "redis",
            "url": self._safe_url(),
            "node": self.node.hex(),
            "connected": self._connected,
            "queue": len(self._queue),
            "queue_max": self.max_queue_messages,
            "channels": len(self._channels),
            "glob": self._globbed,
            "outages": self.stats["outages"],
            "published": self.stats["published"],
            "redis_messages": self.stats["redis_messages"],
            "received": self.stats["received"],
            "refused_disconnected": self.stats["refused_disconnected"],
            "refused_queue_full": self.stats["refused_queue_full"],
            "lost": self.stats["lost"],
            "duplicates_dropped": self.stats["duplicates_dropped"],
            "bad_messages": self.stats["bad_messages"],
            "peers": len(self.directory),
            "remote_groups": self.directory.entries(GROUP),
            "remote_services": self.directory.entries(SERVICE),
            "direct_sent": self.stats["direct_sent"],
            "direct_received": self.stats["direct_received"],
            "direct_refused": self.stats["direct_refused"],
        }
        if self._outage_since is not None:
            out["outage_seconds"] = round(time.monotonic() - self._outage_since, 3)
        return out

    # --- connection ----------------------------------------------------------------------

    def _safe_url(self) -> str:
        return self.settings.safe_url()

    def _make_client(self) -> aioredis.Redis:
        return self.settings.client()

    async def _connect(self) -> None:
        """A command connection and a pub/sub connection with the current interest."""
        client = self._make_client()
        self._client = client
        # asyncio.timeout, not wait_for: wait_for runs the awaitable in a task of its own, whose
        # exception goes unretrieved (and is logged) when a cancel and a failure cross.
        async with asyncio.timeout(_CONNECT_TIMEOUT_SECONDS):
            await client.ping()
            self._pubsub = client.pubsub()
            self._channels = set()
            self._globbed = False
            # Something to read from even with no interest yet: redis-py's pub/sub wants one
            # subscription before it reads. Nothing publishes on this channel (under the
            # prefix, so a Redis ACL of ``&<prefix>:*`` covers it); whatever does is counted
            # as malformed.
            await self._pubsub.subscribe(
                f"{self.prefix}:\x00idle", self._dir_channel, self._node_channel
            )
            await self._sync_interest()
            # Ours (after the interest it implies reached Redis), and everyone else's.
            await client.publish(self._dir_channel, self._encode_directory("dir", ask=True))
        self._announce = self._ask = False
        self._connected = True

    async def _close_connection(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        client, self._client = self._client, None
        await aclose_quietly(pubsub)
        await aclose_quietly(client)

    async def _run(self) -> None:
        """Keep the engine connected: serve until it fails, then back off and reconnect."""
        delay = BACKOFF_FIRST_SECONDS
        while not self._stopping:
            if self._connected:
                try:
                    await self._serve()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._outage(exc)
                await self._close_connection()
                delay = BACKOFF_FIRST_SECONDS
                continue
            await asyncio.sleep(delay)
            try:
                await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception:
                await self._close_connection()
                delay = min(delay * 2, BACKOFF_MAX_SECONDS)
                continue
            assert self._outage_since is not None
            log.warning(
                "redis backplane reconnected to %s after %.1f s; %d publication(s) were not "
                "sent to other nodes meanwhile",
                self._safe_url(),
                time.monotonic() - self._outage_since,
                self.stats["refused_disconnected"] + self.stats["lost"] - self._lost_mark,
            )
            self._outage_since = None

    def _outage(self, exc: BaseException) -> None:
        """The engine went away: log once, count, drop what cannot be sent."""
        self._connected = False
        self._outage_since = time.monotonic()
        self.stats["outages"] += 1
        self._lost_mark = self.stats["refused_disconnected"] + self.stats["lost"]
        self.stats["lost"] += len(self._queue)
        self._queue.clear()
        self._direct.clear()
        # Other nodes' groups and responders cannot be reached: local-only until reconnected.
        events = self._events
        for node in self.directory.clear():
            if events is not None:
                events.peer_gone(node)
        log.warning(
            "redis backplane lost %s (%s); local delivery continues, publications are not "
            "sent to or received from other nodes until it reconnects",
            self._safe_url(),
            type(exc).__name__,
        )

    async def _serve(self) -> None:
        """Reader, writer and interest sync until one of them fails."""
        tasks = [
            asyncio.create_task(self._reader(), name="redis-backplane-reader"),
            asyncio.create_task(self._writer(), name="redis-backplane-writer"),
            asyncio.create_task(self._syncer(), name="redis-backplane-sync"),
            asyncio.create_task(self._heartbeat(), name="redis-backplane-heartbeat"),
        ]
        await supervise(tasks, "redis backplane")

    async def _writer(self) -> None:
        client = self._client
        assert client is not None
        queue = self._queue
        direct = self._direct
        while True:
            if not queue and not direct:
                self._wake_writer.clear()
                await self._wake_writer.wait()
                continue
            pipe = client.pipeline(transaction=False)
            sent = len(direct)
            while direct:
                pipe.publish(*direct.popleft())
            n = min(len(queue), _BATCH_MESSAGES)
            messages = 0
            if n:
                channel, data = queue.popleft()
                run, size = [data], len(data)
                for _ in range(n - 1):
                    nxt, data = queue.popleft()
                    if nxt != channel or size + len(data) > _BATCH_BYTES:
                        self._seq += 1
                        pipe.publish(channel, encode_batch(self.node, self._seq, run))
                        messages += 1
                        channel, run, size = nxt, [], 0
                    run.append(data)
                    size += len(data)
                self._seq += 1
                pipe.publish(channel, encode_batch(self.node, self._seq, run))
                messages += 1
            try:
                async with asyncio.timeout(_CONNECT_TIMEOUT_SECONDS):
                    await pipe.execute()
            except BaseException as exc:
                self.stats["lost"] += n  # in flight: Redis may or may not have sent them
                if self._stopping and isinstance(exc, Exception):
                    return
                raise
            self.stats["published"] += n
            self.stats["redis_messages"] += messages
            self.stats["direct_sent"] += sent
            raise_if_cancelled()

    async def _syncer(self) -> None:
        while True:
            await self._wake_sync.wait()
            self._wake_sync.clear()
            try:
                async with asyncio.timeout(_CONNECT_TIMEOUT_SECONDS):
                    await self._sync_interest()
                    if self._announce:  # after the interest a new group needs is in Redis
                        await self._advertise()
            except Exception:
                if self._stopping:
                    return  # the connection is being closed under it: moot
                raise
            raise_if_cancelled()

    async def _advertise(self) -> None:
        client = self._client
        assert client is not None
        ask, self._announce, self._ask = self._ask, False, False
        await client.publish(self._dir_channel, self._encode_directory("dir", ask=ask))

    async def _heartbeat(self) -> None:
        """Advertise the local entries every heartbeat; forget nodes that stopped."""
        while True:
            await asyncio.sleep(DIRECTORY_HEARTBEAT_SECONDS)
            async with asyncio.timeout(_CONNECT_TIMEOUT_SECONDS):
                await self._advertise()
            raise_if_cancelled()
            for node in self.directory.expire(time.monotonic()):
                log.warning(
                    "redis backplane: node %s not heard from for %.0f s; its queue groups and "
                    "responders are forgotten",
                    node.hex(),
                    DIRECTORY_TTL_SECONDS,
                )
                if self._events is not None:
                    self._events.peer_gone(node)

    async def _sync_interest(self) -> None:
        """Bring the Redis subscriptions to the current interest. Switching to the glob, it
        subscribes first and unsubscribes after (never a gap; the overlap is deduplicated)."""
        pubsub = self._pubsub
        assert pubsub is not None
        glob = f"{glob_escape(self.prefix)}:*"
        want_glob = self._wild > 0
        want = set() if want_glob else {f"{self.prefix}:{t}" for t in self._first_tokens}
        if want_glob and not self._globbed:
            await pubsub.psubscribe(glob)
            self._globbed = True
        add = sorted(want - self._channels)
        if add:
            await pubsub.subscribe(*add)
            self._channels.update(add)
        drop = sorted(self._channels - want)
        if drop:
            await pubsub.unsubscribe(*drop)
            self._channels.difference_update(drop)
        if self._globbed and not want_glob:
            await pubsub.punsubscribe(glob)
            self._globbed = False

    async def _reader(self) -> None:
        pubsub = self._pubsub
        assert pubsub is not None
        internal = f"{self.prefix}:{INTERNAL_CHANNEL_MARK}".encode()
        while True:
            try:
                msg = await pubsub.get_message(timeout=None)
            except Exception:
                if self._stopping:
                    return
                raise
            raise_if_cancelled()
            if msg is None:
                continue
            kind = msg.get("type")
            if kind == "pmessage" and _is_internal(msg.get("channel"), internal):
                continue  # the clustered store's change feed (broker/store_redis.py)
            if kind in ("message", "pmessage"):
                data = msg.get("data")
                if isinstance(data, bytes):
                    channel = msg.get("channel")
                    if kind == "message" and channel == self._node_channel_b:
                        self._receive_direct(data)
                    elif kind == "message" and channel == self._dir_channel_b:
                        self._receive_directory(data)
                    else:
                        self._receive(data)

    def _receive(self, data: bytes) -> None:
        if data.startswith(self._echo_prefix):
            return  # our own, echoed by Redis
        try:
            node, seq, pubs = decode_batch(data)
        except ValueError as exc:
            self.stats["bad_messages"] += 1
            if self.stats["bad_messages"] % _BAD_MESSAGE_LOG_EVERY == 1:
                log.warning(
                    "redis backplane: ignored %d malformed message(s) on %s:* (%s)",
                    self.stats["bad_messages"],
                    self.prefix,
                    exc,
                )
            return
        if node == self.node:
            return  # our own, echoed by Redis
        last = self._last_seq.get(node)
        if last is not None:
            if seq <= last:
                self.stats["duplicates_dropped"] += len(pubs)
                return
            self._last_seq.move_to_end(node)
        elif len(self._last_seq) >= _MAX_ORIGINS:
            self._last_seq.popitem(last=False)
        self._last_seq[node] = seq
        self.stats["received"] += len(pubs)
        inject = self._inject
        assert inject is not None
        on_retained = self.on_retained
        for pub in pubs:
            if on_retained is not None and pub.retain:
                on_retained(pub)
            inject(pub)

    # --- queue groups and requests across nodes (ClusterMessaging) ------------------------

    def _channel_of(self, node: bytes) -> str:
        return f"{self.prefix}:{INTERNAL_CHANNEL_MARK}node:{node.hex()}"

    def attach(self, events: ClusterEvents) -> None:
        self._events = events

    def advertise(self, kind: str, key: Key, added: bool) -> None:
        directory = self.directory
        changed = directory.add_local(kind, key) if added else directory.remove_local(kind, key)
        if changed:
            self._announce = True
            self._wake_sync.set()

    def _encode_directory(self, what: str, *, ask: bool = False) -> bytes:
        if what == "bye":
            return msgpack.packb([_WIRE_VERSION, "bye", self.node], use_bin_type=True)  # type: ignore[no-any-return]
        d = self.directory
        groups = [list(k) for k in d.local(GROUP)]
        services = [list(k) for k in d.local(SERVICE)]
        return msgpack.packb(  # type: ignore[no-any-return]
            [_WIRE_VERSION, "dir", self.node, ask, groups, services], use_bin_type=True
        )

    def _send_direct(self, node: bytes, message: list[object]) -> bool:
        if not self._connected or self._stopping:
            self.stats["direct_refused"] += 1
            return False
        if len(self._direct) >= self.max_queue_messages:
            self.stats["direct_refused"] += 1
            return False
        self._direct.append((self._channel_of(node), msgpack.packb(message, use_bin_type=True)))
        self._wake_writer.set()
        return True

    def send_request(self, node: bytes, xid: int, request: RemoteRequest) -> bool:
        return self._send_direct(
            node,
            [
                _WIRE_VERSION,
                "req",
                self.node,
                xid,
                request.topic,
                request.payload,
                dict(request.headers) if request.headers else None,
                request.sender,
                request.timeout_ms,
                [list(k) for k in request.keys],
            ],
        )

    def send_reply(
        self,
        node: bytes,
        xid: int,
        payload: bytes,
        headers: Mapping[str, str] | None,
        sender: str | None,
    ) -> bool:
        return self._send_direct(
            node,
            [
                _WIRE_VERSION,
                "res",
                self.node,
                xid,
                payload,
                dict(headers) if headers else None,
                sender,
            ],
        )

    def send_withdraw(self, node: bytes, xid: int) -> bool:
        return self._send_direct(node, [_WIRE_VERSION, "gone", self.node, xid])

    def _bad(self, what: str) -> None:
        self.stats["bad_messages"] += 1
        if self.stats["bad_messages"] % _BAD_MESSAGE_LOG_EVERY == 1:
            log.warning(
                "redis backplane: ignored %d malformed message(s) on %s:* (%s)",
                self.stats["bad_messages"],
                self.prefix,
                what,
            )

    def _receive_directory(self, data: bytes) -> None:
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=False)
        except Exception:  # msgpack raises several unrelated types on bad input
            self._bad("directory: not msgpack")
            return
        if type(obj) is not tuple or len(obj) < 3 or obj[0] != _WIRE_VERSION:
            self._bad("directory: not a version-1 array")
            return
        what, node = obj[1], obj[2]
        if type(node) is not bytes:
            self._bad("directory: node is not bytes")
            return
        if node == self.node:
            return  # our own
        if what == "bye" and len(obj) == 3:
            if self.directory.drop(node):
                log.info("redis backplane: node %s left", node.hex())
                if self._events is not None:
                    self._events.peer_gone(node)
            return
        if what != "dir" or len(obj) != 6 or type(obj[3]) is not bool:
            self._bad("directory: unknown message")
            return
        groups, services = _keys(obj[4], named=True), _keys(obj[5], named=False)
        if groups is None or services is None:
            self._bad("directory: bad entries")
            return
        if self.directory.update(node, groups, services, time.monotonic()):
            log.info("redis backplane: node %s joined", node.hex())
        if obj[3]:  # a new node asks for everyone's entries
            self._announce = True
            self._wake_sync.set()

    def _receive_direct(self, data: bytes) -> None:
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=False)
        except Exception:  # msgpack raises several unrelated types on bad input
            self._bad("node channel: not msgpack")
            return
        events = self._events
        if (
            type(obj) is not tuple
            or len(obj) < 4
            or obj[0] != _WIRE_VERSION
            or type(obj[2]) is not bytes
            or type(obj[3]) is not int
        ):
            self._bad("node channel: not a version-1 array")
            return
        what, origin, xid = obj[1], obj[2], obj[3]
        self.stats["direct_received"] += 1
        if events is None:
            return
        if what == "req" and len(obj) == 10:
            _, _, _, _, topic, payload, headers, sender, timeout_ms, raw_keys = obj
            keys = _keys(raw_keys, named=False)
            if (
                type(topic) is not str
                or type(payload) is not bytes
                or not _headers_ok(headers)
                or (sender is not None and type(sender) is not str)
                or type(timeout_ms) is not int
                or timeout_ms <= 0
                or keys is None
            ):
                self._bad("node channel: bad request")
                return
            events.remote_request(
                origin,
                xid,
                RemoteRequest(topic, payload, headers, sender, timeout_ms, tuple(keys)),
            )
        elif what == "res" and len(obj) == 7:
            _, _, _, _, payload, headers, sender = obj
            if (
                type(payload) is not bytes
                or not _headers_ok(headers)
                or (sender is not None and type(sender) is not str)
            ):
                self._bad("node channel: bad reply")
                return
            events.remote_reply(origin, xid, payload, headers, sender)
        elif what == "gone" and len(obj) == 4:
            events.remote_withdraw(origin, xid)
        else:
            self._bad("node channel: unknown message")


def _headers_ok(headers: object) -> bool:
    if headers is None:
        return True
    if type(headers) is not dict:
        return False
    return all(type(k) is str and type(v) is str for k, v in headers.items())


def _keys(raw: object, *, named: bool) -> list[Key] | None:
    """``[[pattern, group], ...]`` from a directory or request message (``None``: malformed);
    ``named``: every group has a name (queue groups)."""
    if type(raw) is not tuple:
        return None
    out: list[Key] = []
    for item in raw:
        if type(item) is not tuple or len(item) != 2 or type(item[0]) is not str:
            return None
        name = item[1]
        if not (type(name) is str or (name is None and not named)):
            return None
        out.append((item[0], name))
    return out
