"""The clustered store: retained values in Redis, shared by every broker process and node of one
topic space (``[cluster]``; docs/scaling.md, docs/messaging.md "What crosses nodes").

It implements :class:`~broker.store.Store` with the same semantics as the embedded
:class:`~broker.store_sqlite.SQLiteStore`:

* **Durable before ``ok`` = acknowledged by Redis.** ``save`` returns once Redis has executed the
  write (what survives a Redis restart is Redis' own persistence: ``appendonly yes`` with
  ``appendfsync always`` for the embedded store's guarantee; docs/scaling.md).
* **Bounded, globally.** The per-value size is checked on the event loop; the topic count and
  total bytes are checked by Redis in the same script that writes, against every node's values,
  so two nodes cannot together exceed the limits. A refusal is a
  :class:`~broker.store.StoreError` with the wire code (``RETAINED_TOO_LARGE``,
  ``RETAINED_LIMIT``); Redis unreachable is ``STORE_FAILED``. An empty retained publish clears.
* **Batched.** ``save`` calls from any number of publishers queue jobs; one writer task sends
  every job waiting (up to :data:`MAX_BATCH_JOBS`) in one pipelined round trip, one script call
  per job (each job succeeds or is refused alone, as a transaction would in SQLite).
* **Reads from memory.** ``retained_cursor`` is synchronous (the hub fixes a new subscription's
  snapshot in one step and pulls it lazily), so every node keeps a mirror of all retained values
  (the limits bound it), indexed by first topic token, loaded with ``HSCAN`` at ``open`` and kept
  current by a change feed (below). A local write becomes visible in the mirror when the hub calls
  ``apply`` (in the step that routes it), exactly as with SQLite.

Keys (``<prefix>`` is ``[cluster] channel_prefix``)
    ``<prefix>:retained`` hash: field = topic, value = ``b"<version>:" + msgpack([payload,
    headers or nil, sender or nil])``. ``<prefix>:retained:size`` hash: topic -> counted bytes
    (payload plus header keys and values, as the limit counts them). ``<prefix>:retained:bytes``:
    their sum. ``<prefix>:retained:version``: the last version given; a write takes the
    larger of the next number and Redis' clock in microseconds, so versions also grow across a
    Redis restart that lost the data (what every node's mirror compares).

Change feed
    The same script PUBLISHes every change on ``<prefix>:\\x00retained`` as
    ``b"<version>:<node>:<topic length>:" + topic + value`` (an empty value: cleared). Every
    node's store SUBSCRIBEs to it and applies a change whose version is above the one it holds
    for the topic (its own changes it ignores: ``apply`` makes those visible). After a lost
    connection it re-subscribes and reloads the whole hash (changes arriving meanwhile are
    applied after, by version), so a node's mirror converges on Redis' content.

Across nodes: when another node's backplane receives the topic's channel (``follows``, i.e.
``RedisBackplane.receives``), the change becomes visible there in the step that routes its live
copy (the backplane's ``on_retained`` hook calls :meth:`RedisStore.observe`; the version travels
in ``Publication.extra``), so the snapshot/live switch is exact there too: no gap, no duplicate.
The change from the feed then waits :data:`_FEED_GRACE_SECONDS` and applies only if the live
copy did not come (an outage). When the node does not receive the channel (no local subscriber
on that first token), the feed applies the change at once. While Redis is unreachable ``save``
fails (``STORE_FAILED``) and ``retained`` serves the mirror as it was.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from tessera_mq.broker.backplane import Publication
from tessera_mq.broker.cluster import DEFAULT_CHANNEL_PREFIX, INTERNAL_CHANNEL_MARK, RedisSettings
from tessera_mq.broker.redis_common import (
    BACKOFF_FIRST_SECONDS,
    BACKOFF_MAX_SECONDS,
    COMMAND_TIMEOUT_SECONDS,
    aclose_quietly,
    cancel_and_wait,
    raise_if_cancelled,
    resend_noscript,
)
from tessera_mq.broker.store import RetainedCursor, StoreError, retained_cursor
from tessera_mq.broker.store_sqlite import RetainLimits
from tessera_mq.client.protocol.errors import ErrorCode

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis.asyncio.client import PubSub

__all__ = ["MAX_BATCH_JOBS", "RedisStore", "decode_change", "decode_value"]

log = logging.getLogger("tessera.store")

#: Jobs (``save`` calls) sent in one pipelined round trip at most (as SQLiteStore's
#: ``MAX_BATCH_JOBS`` joins them into one transaction).
MAX_BATCH_JOBS = 1024
#: Fields asked for per ``HSCAN`` step while loading the mirror (Redis' default is 10).
_SCAN_COUNT = 1000
#: Seconds a remote change from the feed waits for its live copy through the backplane when
#: the backplane follows its topic (see ``RedisStore.follows``); the live copy normally comes
#: within a millisecond or two after the change on loopback.
_FEED_GRACE_SECONDS = 0.5
#: Bytes of the random id that marks this store's own changes on the feed.
_NODE_ID_BYTES = 8

#: Checks the global limits and writes the jobs' values atomically (Redis runs a script alone).
#: KEYS: values hash, sizes hash, total bytes, version counter.
#: ARGV: feed channel, node id, max topics, max total bytes, then per value: topic, counted
#: size (-1: clear), encoded value. Returns {1, version...} or {0, "topics" | "bytes"}.
_SAVE_SCRIPT = """
local max_topics = tonumber(ARGV[3])
local max_total = tonumber(ARGV[4])
local count = redis.call('HLEN', KEYS[2])
local total = tonumber(redis.call('GET', KEYS[3]) or '0')
local pending = {}
local n = (#ARGV - 4) / 3
for i = 0, n - 1 do
  local topic = ARGV[5 + 3 * i]
  local size = tonumber(ARGV[6 + 3 * i])
  local old = pending[topic]
  if old == nil then old = tonumber(redis.call('HGET', KEYS[2], topic) or '-1') end
  if size < 0 then
    if old >= 0 then
      count = count - 1
      total = total - old
    end
  else
    if old < 0 then
      if count >= max_topics then return {0, 'topics'} end
      count = count + 1
      old = 0
    end
    if total - old + size > max_total then return {0, 'bytes'} end
    total = total - old + size
  end
  pending[topic] = size
end
local out = {1}
for i = 0, n - 1 do
  local topic = ARGV[5 + 3 * i]
  local size = tonumber(ARGV[6 + 3 * i])
  local value = ARGV[7 + 3 * i]
  -- Versions grow within a Redis lifetime (the counter) and across a restart that lost the
  -- data (Redis' clock in microseconds): a new write always outranks what mirrors hold.
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local version = math.max(tonumber(redis.call('GET', KEYS[4]) or '0') + 1, now)
  local v = string.format('%d', version)  -- never "1e+15": Lua numbers are doubles
  redis.call('SET', KEYS[4], v)
  if size < 0 then
    redis.call('HDEL', KEYS[1], topic)
    redis.call('HDEL', KEYS[2], topic)
    value = ''
  else
    redis.call('HSET', KEYS[1], topic, v .. ':' .. value)
    redis.call('HSET', KEYS[2], topic, size)
  end
  redis.call('PUBLISH', ARGV[1],
    v .. ':' .. ARGV[2] .. ':' .. string.len(topic) .. ':' .. topic .. value)
  out[#out + 1] = version
end
redis.call('SET', KEYS[3], total)
return out
"""


def _value_bytes(pub: Publication) -> int:
    n = len(pub.payload)
    if pub.headers:
        for k, v in pub.headers.items():
            n += len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass"))
    return n


def _encode(pub: Publication) -> bytes:
    headers = dict(pub.headers) if pub.headers else None
    return msgpack.packb([pub.payload, headers, pub.sender], use_bin_type=True)  # type: ignore[no-any-return]


def _publication(topic: str, blob: bytes) -> Publication:
    obj = msgpack.unpackb(blob, raw=False, use_list=True)
    if not isinstance(obj, list) or len(obj) != 3:
        raise ValueError("not a 3-element array")
    payload, headers, sender = obj
    if not isinstance(payload, bytes) or (sender is not None and not isinstance(sender, str)):
        raise ValueError("fields of the wrong type")
    if headers is not None and not (
        isinstance(headers, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
    ):
        raise ValueError("headers must map strings to strings")
    return Publication(topic, payload, headers, sender=sender, retain=True)


def decode_value(topic: str, raw: bytes) -> tuple[int, Publication]:
    """``(version, publication)`` from a value of the ``<prefix>:retained`` hash; raises
    ValueError if malformed."""
    head, sep, blob = raw.partition(b":")
    if not sep or not head.isdigit():
        raise ValueError("no version")
    try:
        return int(head), _publication(topic, blob)
    except ValueError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ValueError(f"not msgpack: {type(exc).__name__}") from None


def decode_change(raw: bytes) -> tuple[int, str, str, Publication | None]:
    """``(version, node, topic, publication or None for a clear)`` from the change feed;
    raises ValueError if malformed."""
    parts = raw.split(b":", 3)
    if len(parts) != 4 or not parts[0].isdigit() or not parts[2].isdigit():
        raise ValueError("not a change")
    version, node, length, rest = int(parts[0]), parts[1], int(parts[2]), parts[3]
    if length > len(rest):
        raise ValueError("truncated change")
    try:
        topic = rest[:length].decode("utf-8")
        node_id = node.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("topic is not UTF-8") from None
    blob = rest[length:]
    if not blob:
        return version, node_id, topic, None
    try:
        return version, node_id, topic, _publication(topic, blob)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"not msgpack: {type(exc).__name__}") from None


@dataclass(slots=True)
class _Job:
    pubs: list[Publication]
    future: asyncio.Future[list[int]]


class _Mirror:
    """Every retained value as this node knows it: first token -> topic -> publication, and
    each topic's version (the number Redis gave its last write)."""

    __slots__ = ("buckets", "count", "versions")

    #: Versions of cleared topics kept beyond the number of values (see ``put``).
    CLEARED_MARGIN = 4096

    def __init__(self) -> None:
        self.buckets: dict[str, dict[str, Publication]] = {}
        self.versions: dict[str, int] = {}
        self.count = 0

    def put(self, version: int, topic: str, pub: Publication | None) -> bool:
        """Apply a change unless the mirror already holds a newer one for ``topic``."""
        if self.versions.get(topic, 0) >= version:
            return False
        first = topic.split(".", 1)[0]
        bucket = self.buckets.get(first)
        had = bucket is not None and topic in bucket
        # A clear is remembered as its version too: a late older change of the topic (a
        # local ``apply`` after another node's clear) cannot bring the value back.
        self.versions[topic] = version
        if pub is None:
            if bucket is not None and had:
                del bucket[topic]
                self.count -= 1
                if not bucket:
                    del self.buckets[first]
            if len(self.versions) > 2 * self.count + self.CLEARED_MARGIN:
                # Bounded: forget the versions of cleared topics (they matter only for changes
                # crossing each other within moments).
                self.versions = {
                    t: v
                    for t, v in self.versions.items()
                    if t in self.buckets.get(t.split(".", 1)[0], ())
                }
            return True
        if bucket is None:
            bucket = self.buckets[first] = {}
        bucket[topic] = pub
        if not had:
            self.count += 1
        return True

    def __len__(self) -> int:
        return self.count

    def match(self, pattern: str) -> list[Publication]:
        return [p for p in self.cursor(pattern) if p is not None]

    def cursor(self, pattern: str) -> RetainedCursor:
        return retained_cursor(self.buckets, pattern)


class RedisStore:
    """Retained values in Redis (see the module docstring)."""

    def __init__(
        self,
        settings: RedisSettings,
        limits: RetainLimits | None = None,
        *,
        prefix: str = DEFAULT_CHANNEL_PREFIX,
        node_id: str | None = None,
        fail_fast: bool = True,
    ) -> None:
        self.settings = settings
        self.limits = limits or RetainLimits()
        self.prefix = prefix
        self.node = node_id or os.urandom(_NODE_ID_BYTES).hex()
        if not self.node.isalnum():
            raise ValueError("node_id must be letters and digits")
        self.key = f"{prefix}:retained"
        self._keys = [self.key, f"{prefix}:retained:size", f"{prefix}:retained:bytes"]
        self._keys.append(f"{prefix}:retained:version")
        self.channel = f"{prefix}:{INTERNAL_CHANNEL_MARK}retained"
        #: ``open`` raises when Redis is unreachable; False: open empty and catch up later.
        self.fail_fast = fail_fast
        self._client: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        #: EVALSHA of the script, computed here; loaded into Redis on the first NOSCRIPT.
        self._sha = hashlib.sha1(_SAVE_SCRIPT.encode(), usedforsecurity=False).hexdigest()
        self._mirror = _Mirror()
        #: Changes applied during a reload (``apply``, ``observe``): replayed on the new mirror.
        self._reloading: list[tuple[int, str, Publication | None]] | None = None
        self._queue: collections.deque[_Job] = collections.deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._feed: asyncio.Task[None] | None = None
        self._feed_up = False
        self._write_failing = False
        #: Issue #11: does the backplane deliver ``topic`` from other nodes right now
        #: (``RedisBackplane.receives``)? Then a remote change waits for its live copy
        #: (``observe``) for up to :data:`_FEED_GRACE_SECONDS` before the feed applies it.
        self.follows: Callable[[str], bool] | None = None
        self._deferred = 0
        #: Topics of our writes whose outcome is unknown (the reply was lost): our own change
        #: for them on the feed is applied (bounded by the topics written during one outage;
        #: emptied by a reload, which reads what Redis holds).
        self._unsure: set[str] = set()
        self.stats: collections.Counter[str] = collections.Counter()

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, subscribe to the change feed and load the mirror. Redis unreachable: raises
        :class:`StoreError` (the broker does not start), or with ``fail_fast=False`` (a worker
        restarted during an outage) opens with an empty mirror that the feed fills once Redis
        is back; saves fail with ``STORE_FAILED`` meanwhile."""
        self._client = self.settings.client()
        pubsub: PubSub | None = None
        try:
            pubsub = await self._subscribe()
            await self._reload()
        except Exception as exc:
            if pubsub is not None:
                await aclose_quietly(pubsub)
                pubsub = None
            if self.fail_fast:
                await self.close()
                raise StoreError(
                    f"cannot reach redis at {self.settings.safe_url()}: {type(exc).__name__}"
                ) from None
            log.warning(
                "store: redis at %s unreachable (%s); starting without retained values until "
                "it is back",
                self.settings.safe_url(),
                type(exc).__name__,
            )
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write_loop(), name="redis-store-writer")
        self._feed = loop.create_task(self._feed_loop(pubsub), name="redis-store-feed")
        log.info(
            "store open: %s key %s, %d retained values",
            self.settings.safe_url(),
            self.key,
            len(self._mirror),
        )

    async def close(self) -> None:
        for job in self._queue:
            _fail(job, StoreError("the store is closing"))
        self._queue.clear()
        tasks = [t for t in (self._writer, self._feed) if t is not None]
        self._writer = self._feed = None
        await cancel_and_wait(tasks, "store")  # closing the connections below ends a stuck one
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            await aclose_quietly(pubsub)
        client, self._client = self._client, None
        await aclose_quietly(client)

    # --- the Store protocol ---------------------------------------------------------------

    def wants(self, pub: Publication) -> bool:
        return pub.retain

    async def save(self, pubs: Sequence[Publication]) -> None:
        if self._writer is None:
            raise StoreError("the store is not open")
        rows = [p for p in pubs if p.retain]
        if not rows:
            return
        lim = self.limits.max_value_bytes
        for pub in rows:
            size = _value_bytes(pub)
            if pub.payload and size > lim:
                self.stats["refused"] += 1
                raise StoreError(
                    f"retained value of {size} bytes is over the limit of {lim}",
                    ErrorCode.RETAINED_TOO_LARGE,
                )
        job = _Job(rows, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._wake.set()
        versions = await job.future
        for pub, version in zip(rows, versions, strict=True):
            pub.extra["retained_version"] = version

    def apply(self, pubs: Sequence[Publication]) -> None:
        for pub in pubs:
            if not pub.retain:
                continue
            version = pub.extra.get("retained_version")
            if not isinstance(version, int):
                continue  # not saved by this store
            value = pub if pub.payload else None
            self._mirror.put(version, pub.topic, value)
            if self._reloading is not None:
                self._reloading.append((version, pub.topic, value))

    def observe(self, pub: Publication) -> None:
        """A retained publication from another node, about to be routed here (the backplane's
        ``on_retained``): visible to snapshots from this step on, if it is newer than what the
        mirror holds (its change on the feed usually came first; then this does nothing)."""
        version = pub.extra.get("retained_version")
        if pub.retain and type(version) is int and version > 0:
            value = Publication(pub.topic, pub.payload, pub.headers, pub.sender, True)
            change = value if pub.payload else None
            if self._mirror.put(version, pub.topic, change):
                self.stats["remote_changes_routed"] += 1
            if self._reloading is not None:
                self._reloading.append((version, pub.topic, change))

    def retained(self, pattern: str) -> Sequence[Publication]:
        return self._mirror.match(pattern)

    def retained_cursor(self, pattern: str) -> RetainedCursor:
        return self._mirror.cursor(pattern)

    # --- info -----------------------------------------------------------------------------

    @property
    def retained_count(self) -> int:
        return len(self._mirror)

    def health(self) -> Mapping[str, object]:
        return {
            "engine": "redis",
            "url": self.settings.safe_url(),
            "key": self.key,
            "retained": len(self._mirror),
            "feed_connected": self._feed_up,
            **self.stats,
        }

    # --- writing --------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [queue.popleft() for _ in range(min(len(queue), MAX_BATCH_JOBS))]
            await self._write(batch)

    async def _load_script(self) -> None:
        client = self._client
        assert client is not None
        async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
            sha = await client.script_load(_SAVE_SCRIPT)
        self._sha = sha.decode() if isinstance(sha, bytes) else str(sha)

    async def _write(self, batch: list[_Job]) -> None:
        try:
            results = await self._send(batch)
            await resend_noscript(results, batch, self._send, self._load_script)
        except asyncio.CancelledError:
            for job in batch:
                _fail(job, StoreError("the store is closing"))
            raise
        except Exception as exc:
            # Redis unreachable, or the reply lost: the values may or may not have been
            # written; the publishers are told it failed (docs/messaging.md).
            if not self._write_failing:
                log.error(  # noqa: TRY400 - the cause's type, no traceback (a known outage)
                    "store write to %s failed (%d publishes refused): %s",
                    self.settings.safe_url(),
                    len(batch),
                    type(exc).__name__,
                )
            self._write_failing = True
            self.stats["failed"] += len(batch)
            for job in batch:
                # If Redis did write it, our own change on the feed is the only news of it.
                self._unsure.update(p.topic for p in job.pubs)
                _fail(job, StoreError(f"the store could not write: {type(exc).__name__}"))
            return
        if self._write_failing:
            log.warning("store writes to %s succeed again", self.settings.safe_url())
            self._write_failing = False
        self.stats["round_trips"] += 1
        for job, result in zip(batch, results, strict=True):
            self._resolve(job, result)

    async def _send(self, batch: list[_Job]) -> list[Any]:
        """One pipelined round trip: one script call per job."""
        client = self._client
        assert client is not None
        lim = self.limits
        head: list[Any] = [*self._keys, self.channel, self.node, lim.max_topics]
        head.append(lim.max_total_bytes)
        pipe = client.pipeline(transaction=False)
        for job in batch:
            args = list(head)
            for pub in job.pubs:
                if pub.payload:
                    args += [pub.topic, _value_bytes(pub), _encode(pub)]
                else:
                    args += [pub.topic, -1, b""]
            pipe.evalsha(self._sha, len(self._keys), *args)
        async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
            results = await pipe.execute(raise_on_error=False)
        raise_if_cancelled()
        return list(results)

    def _resolve(self, job: _Job, result: object) -> None:
        if isinstance(result, Exception):
            self.stats["failed"] += 1
            log.error("store write failed: %s", type(result).__name__)
            _fail(job, StoreError(f"the store could not write: {type(result).__name__}"))
            return
        if not isinstance(result, list) or not result:
            self.stats["failed"] += 1
            _fail(job, StoreError("the store could not write: unexpected reply"))
            return
        if result[0] == 0:
            self.stats["refused"] += 1
            what = result[1] if len(result) > 1 else b""
            lim = self.limits
            message = (
                f"the broker holds {lim.max_topics} retained topics, its limit"
                if what in (b"topics", "topics")
                else f"retained values would exceed {lim.max_total_bytes} bytes in all"
            )
            _fail(job, StoreError(message, ErrorCode.RETAINED_LIMIT))
            return
        versions = [int(v) for v in result[1:]]
        self.stats["writes"] += len(versions)
        if not job.future.done():
            job.future.set_result(versions)

    # --- the mirror -----------------------------------------------------------------------

    async def _subscribe(self) -> PubSub:
        client = self._client
        assert client is not None
        pubsub = client.pubsub()
        self._pubsub = pubsub
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                await pubsub.subscribe(self.channel)
        except BaseException:
            self._pubsub = None
            await aclose_quietly(pubsub)
            raise
        return pubsub

    async def _reload(self) -> None:
        """Load the whole hash into a new mirror (after subscribing: the changes made while
        it loads wait in the feed and are applied after it, by version)."""
        client = self._client
        assert client is not None
        started = time.monotonic()
        self._reloading = []
        try:
            mirror = _Mirror()
            bad = 0
            cursor = 0
            while True:
                async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                    cursor, fields = await client.hscan(self.key, cursor, count=_SCAN_COUNT)
                raise_if_cancelled()
                for field, raw in fields.items() if isinstance(fields, dict) else ():
                    if not isinstance(field, bytes) or not isinstance(raw, bytes):
                        bad += 1
                        continue
                    try:
                        topic = field.decode("utf-8")
                        version, value = decode_value(topic, raw)
                    except ValueError:  # UnicodeDecodeError included
                        bad += 1
                        continue
                    mirror.put(version, topic, value)
                if cursor == 0:
                    break
            for version, topic, change in self._reloading:
                mirror.put(version, topic, change)
        finally:
            self._reloading = None
        self._mirror = mirror
        self._unsure.clear()
        self.stats["reloads"] += 1
        if bad:
            self.stats["bad_values"] += bad
            log.warning("store: ignored %d malformed value(s) in %s", bad, self.key)
        log.debug(
            "store: loaded %d retained values in %.3f s", len(mirror), time.monotonic() - started
        )

    async def _feed_loop(self, pubsub: PubSub | None) -> None:
        delay = BACKOFF_FIRST_SECONDS
        while True:
            if pubsub is None:
                await asyncio.sleep(delay)
                try:
                    pubsub = await self._subscribe()
                    await self._reload()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    if pubsub is not None:
                        self._pubsub = None
                        await aclose_quietly(pubsub)
                    pubsub = None
                    delay = min(delay * 2, BACKOFF_MAX_SECONDS)
                    continue
                log.warning("store change feed from %s is back", self.settings.safe_url())
                delay = BACKOFF_FIRST_SECONDS
            self._feed_up = True
            try:
                await self._read_feed(pubsub)
            except asyncio.CancelledError:
                self._feed_up = False
                raise  # close() closes the connection
            except Exception as exc:
                self.stats["feed_outages"] += 1
                log.warning(
                    "store change feed from %s lost (%s): retained values changed on other "
                    "nodes are not seen until it is back",
                    self.settings.safe_url(),
                    type(exc).__name__,
                )
            self._feed_up = False
            self._pubsub = None
            await aclose_quietly(pubsub)
            pubsub = None

    async def _read_feed(self, pubsub: PubSub) -> None:
        while True:
            msg = await pubsub.get_message(timeout=None)
            raise_if_cancelled()
            if msg is None or msg.get("type") != "message":
                continue
            data = msg.get("data")
            if not isinstance(data, bytes):
                continue
            try:
                version, node, topic, pub = decode_change(data)
            except ValueError:
                self.stats["bad_changes"] += 1
                continue
            if node == self.node and topic not in self._unsure:
                continue  # our own: ``apply`` makes it visible in the step that routes it
            self._unsure.discard(topic)
            follows = self.follows
            if node != self.node and follows is not None and follows(topic):
                # Its live copy is on its way through the backplane and ``observe`` will make
                # it visible in the step that routes it (a snapshot taken before then has the
                # old value, the live copy follows: no duplicate, nothing out of order). The
                # feed is the fallback if the live copy does not come (an outage).
                self._deferred += 1
                asyncio.get_running_loop().call_later(
                    _FEED_GRACE_SECONDS, self._late_change, version, topic, pub
                )
                continue
            if self._mirror.put(version, topic, pub):
                self.stats["remote_changes"] += 1

    def _late_change(self, version: int, topic: str, pub: Publication | None) -> None:
        self._deferred -= 1
        if self._mirror.put(version, topic, pub):
            self.stats["remote_changes_late"] += 1  # the live copy did not come in time


def _fail(job: _Job, err: StoreError) -> None:
    if not job.future.done():
        job.future.set_exception(err)
