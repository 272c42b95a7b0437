"""History in Redis: one sequence per stream for the whole cluster (``[cluster]`` with
``[[messaging.history]]``; docs/scaling.md, "State in Redis: history").

It implements :class:`~broker.history.HistoryEngine` for every broker process and node of one
topic space, so a client may reconnect to any of them and resume without a gap.

One numbering, delivered in sequence order everywhere
    A publish on a history topic runs one Lua script that takes the stream's next sequence
    number, appends the publication to the stream (``XADD`` with the ID ``0-<seq>``: the ID *is*
    the sequence; ``MAXLEN`` = ``max_messages``) and PUBLISHes the numbered publication on the
    stream's feed channel, atomically: Redis' order of the feed is the sequence order. Every
    node, the publishing one included, delivers history publications from the feed in the order
    it receives them (never through the backplane: no duplicates); the publisher's ``ok`` comes
    after the script returned and, when this node follows the stream, after the feed delivered
    it here (so, as for any publish, the ``ok`` never overtakes a local delivery).

Epoch
    ``<prefix>:history-meta:<pattern>`` holds the stream's ``epoch`` and last ``seq``. The
    script creates it (a new epoch: Redis' clock in microseconds and a random token from the
    node) when it is missing, or when the stream is missing although ``seq`` says it held
    messages: the data was lost (Redis restarted empty, a key evicted); the sequence restarts at
    1 under the new epoch and a client that resumes with the old one is told it has a gap.
    Epochs are never reused (the clock, and the token).

Interest
    One feed channel per stream, ``<prefix>:\\x00history:<pattern>``; a node SUBSCRIBEs to it
    while some local subscription overlaps the stream's pattern. Once Redis confirmed the
    SUBSCRIBE, the node reads the stream's position (``epoch``, last ``seq``) and from then on
    delivers what follows: the feed messages that arrived meanwhile are held and those at or
    below the position dropped. Its *position* is the last sequence number it delivered.

Recovery
    A ``sub`` within a stream is answered with the node's position (the boundary between what
    the subscription gets from history and what it gets live: everything above it reaches the
    subscription through the feed, held behind the replay in the handler). With ``since``, the
    messages in ``(since, position]`` are read with ``XRANGE`` in pages of
    :data:`REPLAY_PAGE_ENTRIES`, one page at a time as the connection's outbox drains (the
    hub's ``_replay``); ``recovered`` is ``true`` when the first page starts at ``since + 1``
    within ``max_age`` (age is checked on read against Redis' clock: entries carry the time they
    were appended). A later page that no longer starts where the previous one ended (trimmed by
    ``max_messages`` meanwhile, or Redis lost) ends the subscription with ``STORE_FAILED``.

Outage
    While Redis is unreachable, history publishes fail with ``STORE_FAILED`` (neither kept nor
    delivered); a ``sub`` within a stream is answered ``recovered: false`` (with ``since``) or
    without a position, at once when the feed is known to be down, else after at most
    :data:`COMMAND_TIMEOUT_SECONDS`; logged once per outage, counted in :meth:`health`. The
    feed reconnects with backoff and re-reads each stream's position. What was published while
    a node's feed was down is not delivered live there (Redis pub/sub is at-most-once), but it
    is in the stream: a client resumes it with ``since``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from tessera_mq.broker.backplane import Publication
from tessera_mq.broker.cluster import (
    DEFAULT_CHANNEL_PREFIX,
    INTERNAL_CHANNEL_MARK,
    RedisSettings,
    encode_publication,
)
from tessera_mq.broker.config import HistoryConfig
from tessera_mq.broker.history import (
    Deliver,
    Entries,
    Page,
    Resumption,
    StreamIndex,
    overlaps,
)
from tessera_mq.broker.redis_common import (
    BACKOFF_FIRST_SECONDS,
    BACKOFF_MAX_SECONDS,
    COMMAND_TIMEOUT_SECONDS,
    aclose_quietly,
    cancel_and_wait,
    resend_noscript,
    supervise,
)
from tessera_mq.broker.store import StoreError
from tessera_mq.client.protocol.topics import split_pattern

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis.asyncio.client import PubSub

__all__ = ["REPLAY_PAGE_ENTRIES", "RedisHistory", "decode_feed"]

log = logging.getLogger("tessera.history")

#: Entries read per ``XRANGE`` of a replay (Redis' own examples page streams by 10-1000; one
#: page is also what the handler holds beyond the outbox for that subscription).
REPLAY_PAGE_ENTRIES = 256
#: Appends sent in one pipelined round trip at most (as the clustered store's MAX_BATCH_JOBS).
_MAX_BATCH = 1024
#: Feed messages held per stream while its position is being read (normally a millisecond's
#: worth; past it they are dropped and counted, and the stream's live deliveries have a gap).
_MAX_HELD = 10_000
#: Seconds before reading a stream's position again after a failed read.
_RESYNC_SECONDS = 0.5

#: KEYS: stream, meta. ARGV: random token. Creates the meta (a new epoch) when it is missing or
#: the stream's data was lost; returns the epoch and the last sequence number.
_ENSURE = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
local seq = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
if (not epoch) or (seq > 0 and redis.call('EXISTS', KEYS[1]) == 0) then
  local t = redis.call('TIME')
  epoch = string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2])) .. '-' .. ARGV[1]
  seq = 0
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'seq', '0')
end
"""

#: KEYS: stream, meta. ARGV: random token, feed channel, max messages, encoded publication.
#: Returns {epoch, seq}.
_APPEND_SCRIPT = (
    _ENSURE
    + """
seq = seq + 1
local s = string.format('%d', seq)
local t = redis.call('TIME')
local ms = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], '0-' .. s, 't', ms, 'm', ARGV[4])
redis.call('HSET', KEYS[2], 'seq', s)
redis.call('PUBLISH', ARGV[2], epoch .. ':' .. s .. ':' .. ARGV[4])
return {epoch, seq}
"""
)

#: KEYS: stream, meta. ARGV: random token. Returns {epoch, seq}.
_POSITION_SCRIPT = _ENSURE + "\nreturn {epoch, seq}\n"

#: KEYS: stream, meta. ARGV: first seq, last seq, count. Returns {epoch, now ms, entries}.
_READ_SCRIPT = """
local epoch = redis.call('HGET', KEYS[2], 'epoch') or ''
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local entries = redis.call('XRANGE', KEYS[1], '0-' .. ARGV[1], '0-' .. ARGV[2], 'COUNT', ARGV[3])
return {epoch, now, entries}
"""


class HistoryReadError(Exception):
    """A replay page is not where the previous one ended (trimmed meanwhile, or Redis lost)."""


def _decode_publication(blob: bytes) -> Publication:
    """A publication as :func:`~broker.cluster.encode_publication` encodes it."""
    try:
        obj = msgpack.unpackb(blob, raw=False, strict_map_key=True, use_list=False)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ValueError(f"not msgpack: {type(exc).__name__}") from None
    if type(obj) is not tuple or len(obj) != 6:
        raise ValueError("a publication is not a 6-element array")
    topic, payload, headers, sender, retain, extra = obj
    if (
        type(topic) is not str
        or type(payload) is not bytes
        or type(retain) is not bool
        or (sender is not None and type(sender) is not str)
        or (extra is not None and type(extra) is not dict)
    ):
        raise ValueError("publication fields of the wrong type")
    if headers is not None and not (
        type(headers) is dict and all(type(k) is str and type(v) is str for k, v in headers.items())
    ):
        raise ValueError("headers must map strings to strings")
    return Publication(topic, payload, headers, sender, retain, dict(extra) if extra else {})


def decode_feed(raw: bytes) -> tuple[str, int, Publication]:
    """``(epoch, seq, publication)`` from a feed message ``<epoch>:<seq>:<publication>``;
    raises ValueError if malformed."""
    parts = raw.split(b":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        raise ValueError("not a feed message")
    try:
        epoch = parts[0].decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("epoch is not ASCII") from None
    return epoch, int(parts[1]), _decode_publication(parts[2])


def _entries(raw: object) -> list[tuple[int, int, Publication]]:
    """``(seq, appended ms, publication)`` from an ``XRANGE`` reply; raises ValueError."""
    out: list[tuple[int, int, Publication]] = []
    if not isinstance(raw, list):
        raise ValueError("not a list of entries")  # noqa: TRY004 - the one documented error
    for item in raw:
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], bytes):
            raise ValueError("not an entry")
        ident, fields = item
        head, _, seq = ident.partition(b"-")
        if head != b"0" or not seq.isdigit() or not isinstance(fields, list):
            raise ValueError("not one of our entries")
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        t, m = values.get(b"t"), values.get(b"m")
        if not isinstance(t, bytes) or not t.isdigit() or not isinstance(m, bytes):
            raise ValueError("entry fields missing")
        out.append((int(seq), int(t), _decode_publication(m)))
    return out


@dataclass(slots=True)
class _Append:
    stream: _Stream
    blob: bytes
    future: asyncio.Future[tuple[str, int]]


class _Stream:
    """One configured pattern as this node follows it."""

    __slots__ = (
        "channel",
        "config",
        "delivered",
        "epoch",
        "held",
        "interest",
        "keys",
        "reading",
        "subscribed",
        "synced",
        "tokens",
        "waiters",
        "waiting_acks",
    )

    def __init__(self, config: HistoryConfig, prefix: str) -> None:
        self.config = config
        self.tokens = split_pattern(config.pattern)
        self.keys = [
            f"{prefix}:history:{config.pattern}",
            f"{prefix}:history-meta:{config.pattern}",
        ]
        self.channel = f"{prefix}:{INTERNAL_CHANNEL_MARK}history:{config.pattern}".encode()
        #: Local patterns overlapping this stream (the feed is followed while above 0).
        self.interest = 0
        #: SUBSCRIBEd (sent); ``synced``: confirmed and the position read.
        self.subscribed = False
        self.synced = False
        self.reading = False  #: the position is being read
        self.epoch = ""
        #: The node's position: the last sequence number delivered here.
        self.delivered = 0
        #: Feed messages that came before the position was read.
        self.held: list[bytes] = []
        #: New subscriptions waiting for the position.
        self.waiters: list[asyncio.Future[tuple[str, int]]] = []
        #: Publishers waiting for their publication's local delivery, by seq.
        self.waiting_acks: dict[int, asyncio.Future[None]] = {}

    def unsync(self) -> None:
        self.synced = self.reading = False
        self.held = []
        self._release()

    def _release(self) -> None:
        acks, self.waiting_acks = self.waiting_acks, {}
        for fut in acks.values():
            if not fut.done():
                fut.set_result(None)


class RedisHistory(StreamIndex["_Stream"]):
    """History streams in Redis (see the module docstring)."""

    def __init__(
        self,
        settings: RedisSettings,
        configs: Sequence[HistoryConfig],
        *,
        prefix: str = DEFAULT_CHANNEL_PREFIX,
    ) -> None:
        self.settings = settings
        self.prefix = prefix
        super().__init__([_Stream(c, prefix) for c in configs])
        self._by_channel = {s.channel: s for s in self.streams}
        #: Called with a retained publication just before the feed routes it (the clustered
        #: store's ``observe``: the value is visible to snapshots from that step on).
        self.on_retained: Callable[[Publication], None] | None = None
        self._deliver: Deliver | None = None
        self._client: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        self._shas: dict[str, str] = {
            s: hashlib.sha1(s.encode(), usedforsecurity=False).hexdigest()
            for s in (_APPEND_SCRIPT, _POSITION_SCRIPT, _READ_SCRIPT)
        }
        self._queue: collections.deque[_Append] = collections.deque()
        self._wake_writer = asyncio.Event()
        self._wake_sync = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._readers: set[asyncio.Task[None]] = set()
        self._feed_up = False
        self._write_failing = False
        self._outage_since: float | None = None
        self.stats: collections.Counter[str] = collections.Counter()

    # --- what the hub asks ----------------------------------------------------------------

    def number(self, pub: Publication, now: float) -> tuple[int, str] | None:
        return None  # Redis numbers history publications (``append``)

    def appends(self, topic: str) -> bool:
        return self.for_topic(topic) is not None

    def interest(self, pattern: str, added: bool) -> None:
        tokens = split_pattern(pattern)
        for stream in self.streams:
            if overlaps(stream.tokens, tokens):
                stream.interest += 1 if added else -1
                self._wake_sync.set()

    async def append(self, pub: Publication) -> None:
        stream = self.for_topic(pub.topic)
        assert stream is not None, "the hub appends only history topics"
        if self._client is None:
            raise StoreError("the history engine is not running")
        # what other nodes need with it (the store's ``retained_version``, and whatever the hub
        # put there for them); the numbering is the feed's own
        extra = {k: v for k, v in pub.extra.items() if k not in ("seq", "epoch")}
        blob = encode_publication(
            Publication(pub.topic, pub.payload, pub.headers, pub.sender, pub.retain, extra)
        )
        job = _Append(stream, blob, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._wake_writer.set()
        epoch, seq = await job.future
        if not stream.synced or (epoch == stream.epoch and stream.delivered >= seq):
            return  # not followed here (no local subscriber), or delivered already
        fut = stream.waiting_acks.get(seq)
        if fut is None:
            fut = stream.waiting_acks[seq] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                await fut
        except TimeoutError:
            self.stats["acks_before_local_delivery"] += 1  # kept in Redis all the same
        finally:
            stream.waiting_acks.pop(seq, None)

    def resume(
        self, pattern: str, since: int | None, epoch: str | None, now: float
    ) -> Resumption | asyncio.Future[Resumption] | None:
        stream = self.for_pattern(pattern)
        if stream is None:
            return None
        if stream.synced:
            return self._position(stream, since, epoch, stream.epoch, stream.delivered)
        if not self._feed_up:
            self.stats["positions_unavailable"] += 1
            return _unknown(since)  # Redis is unreachable: say so at once, never hang
        # Filed now, in the step that filed the subscription: the position read next is its
        # boundary (what the feed brings above it reaches the subscription live).
        fut: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
        stream.waiters.append(fut)
        return asyncio.ensure_future(self._after_sync(stream, fut, since, epoch))

    async def _after_sync(
        self,
        stream: _Stream,
        fut: asyncio.Future[tuple[str, int]],
        since: int | None,
        epoch: str | None,
    ) -> Resumption:
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                have_epoch, top = await fut
        except Exception:
            self.stats["positions_unavailable"] += 1
            return _unknown(since)
        finally:
            with contextlib.suppress(ValueError):
                stream.waiters.remove(fut)
        found = self._position(stream, since, epoch, have_epoch, top)
        return found if isinstance(found, Resumption) else await found

    def _position(
        self, stream: _Stream, since: int | None, asked: str | None, epoch: str, top: int
    ) -> Resumption | asyncio.Future[Resumption]:
        if since is None:
            return Resumption(epoch, top, None)
        if asked not in (None, epoch) or since > top:
            return Resumption(epoch, top, False)
        if since == top:
            return Resumption(epoch, top, True)
        return asyncio.ensure_future(self._first_page(stream, since, epoch, top))

    async def _first_page(self, stream: _Stream, since: int, epoch: str, top: int) -> Resumption:
        gap = Resumption(epoch, top, False)
        try:
            have, now_ms, entries = await self._read(stream, since + 1, top)
        except Exception as exc:
            self.stats["reads_failed"] += 1
            log.warning("history read of %r failed: %s", stream.config.pattern, type(exc).__name__)
            return gap
        if have != epoch or not entries or entries[0][0] != since + 1:
            return gap  # another epoch, or trimmed by max_messages
        age = stream.config.max_age
        if age is not None and now_ms - entries[0][1] > age * 1000:
            return gap  # older than max_age: no longer kept
        kept, more = self._page_of(stream, entries, top, epoch)
        return Resumption(epoch, top, True, kept, more)

    def _page_of(
        self, stream: _Stream, entries: list[tuple[int, int, Publication]], top: int, epoch: str
    ) -> Page:
        last = entries[-1][0]
        more = None if last >= top else functools.partial(self._page, stream, last + 1, top, epoch)
        kept: Entries = [(seq, pub) for seq, _t, pub in entries]
        return kept, more

    async def _page(self, stream: _Stream, first: int, top: int, epoch: str) -> Page:
        have, _now, entries = await self._read(stream, first, top)
        if have != epoch or not entries or entries[0][0] != first:
            raise HistoryReadError(f"the stream no longer holds seq {first} of epoch {epoch}")
        return self._page_of(stream, entries, top, epoch)

    async def _read(
        self, stream: _Stream, first: int, last: int
    ) -> tuple[str, int, list[tuple[int, int, Publication]]]:
        self.stats["reads"] += 1
        reply = await self._call(_READ_SCRIPT, stream.keys, [first, last, REPLAY_PAGE_ENTRIES])
        if not isinstance(reply, list) or len(reply) != 3:
            raise ValueError("unexpected reply")
        epoch, now_ms, raw = reply
        if not isinstance(epoch, bytes) or not isinstance(now_ms, int):
            raise ValueError("unexpected reply")  # noqa: TRY004 - the one documented error
        return epoch.decode("ascii", "replace"), now_ms, _entries(raw)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._client = self.settings.client()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._write_loop(), name="redis-history-writer"),
            loop.create_task(self._feed_loop(), name="redis-history-feed"),
        ]
        log.info(
            "history in redis at %s: %d stream(s)", self.settings.safe_url(), len(self.streams)
        )

    async def stop(self) -> None:
        for job in self._queue:
            _fail(job.future, StoreError("the history engine is stopping"))
        self._queue.clear()
        tasks = [*self._tasks, *self._readers]
        self._tasks = []
        await cancel_and_wait(tasks, "history")
        for stream in self.streams:
            stream.unsync()
        await self._close_pubsub()
        client, self._client = self._client, None
        await aclose_quietly(client)

    def health(self) -> Mapping[str, object]:
        out: dict[str, object] = {
            "engine": "redis",
            "url": self.settings.safe_url(),
            "streams": len(self.streams),
            "followed": sum(1 for s in self.streams if s.synced),
            "feed_connected": self._feed_up,
            **self.stats,
        }
        if self._outage_since is not None:
            out["outage_seconds"] = round(time.monotonic() - self._outage_since, 3)
        return out

    # --- Redis calls ----------------------------------------------------------------------

    async def _call(self, script: str, keys: list[str], args: list[str | int]) -> Any:
        client = self._client
        if client is None:
            raise StoreError("the history engine is not running")
        from redis.exceptions import ConnectionError as RedisConnectionError  # noqa: PLC0415
        from redis.exceptions import NoScriptError  # noqa: PLC0415 - the optional extra

        sha = self._shas[script]
        async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
            try:
                try:
                    return await client.evalsha(sha, len(keys), *keys, *args)
                except RedisConnectionError:
                    # A pooled connection that died with a restarted Redis fails once (the
                    # client does not retry: settings.client()); these scripts only read, or
                    # create a missing position, so running them again is safe.
                    return await client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:  # a restarted Redis forgot it: nothing ran
                await client.script_load(script)
                return await client.evalsha(sha, len(keys), *keys, *args)

    async def _write_loop(self) -> None:
        queue = self._queue
        while True:
            if not queue:
                self._wake_writer.clear()
                await self._wake_writer.wait()
                continue
            batch = [queue.popleft() for _ in range(min(len(queue), _MAX_BATCH))]
            await self._write(batch)

    async def _send(self, batch: list[_Append]) -> list[Any]:
        client = self._client
        assert client is not None
        token = os.urandom(4).hex()
        pipe = client.pipeline(transaction=False)
        sha = self._shas[_APPEND_SCRIPT]
        for job in batch:
            s = job.stream
            args: list[str | bytes | int] = [token, s.channel, s.config.max_messages, job.blob]
            pipe.evalsha(sha, 2, *s.keys, *args)
        async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
            results = await pipe.execute(raise_on_error=False)
        return list(results)

    async def _load_append_script(self) -> None:
        client = self._client
        assert client is not None
        async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
            await client.script_load(_APPEND_SCRIPT)

    async def _write(self, batch: list[_Append]) -> None:
        try:
            results = await self._send(batch)
            await resend_noscript(results, batch, self._send, self._load_append_script)
        except asyncio.CancelledError:
            for job in batch:
                _fail(job.future, StoreError("the history engine is stopping"))
            raise
        except Exception as exc:
            # Redis unreachable, or the reply lost (then it may have been kept and delivered).
            if not self._write_failing:
                log.error(  # noqa: TRY400 - the cause's type, no traceback (a known outage)
                    "history append to %s failed (%d publishes refused): %s",
                    self.settings.safe_url(),
                    len(batch),
                    type(exc).__name__,
                )
            self._write_failing = True
            self.stats["appends_failed"] += len(batch)
            for job in batch:
                _fail(job.future, StoreError(f"history could not be kept: {type(exc).__name__}"))
            return
        if self._write_failing:
            log.warning("history appends to %s succeed again", self.settings.safe_url())
            self._write_failing = False
        self.stats["round_trips"] += 1
        for job, result in zip(batch, results, strict=True):
            if isinstance(result, list) and len(result) == 2 and isinstance(result[1], int):
                self.stats["appends"] += 1
                if not job.future.done():
                    job.future.set_result((bytes(result[0]).decode("ascii", "replace"), result[1]))
            else:
                self.stats["appends_failed"] += 1
                log.error("history append failed: %s", type(result).__name__)
                _fail(job.future, StoreError("history could not be kept: unexpected reply"))

    # --- the feed -------------------------------------------------------------------------

    async def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        await aclose_quietly(pubsub)

    async def _feed_loop(self) -> None:
        delay = BACKOFF_FIRST_SECONDS
        while True:
            client = self._client
            assert client is not None
            try:
                pubsub = client.pubsub()
                self._pubsub = pubsub
                async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                    # something to read from before any stream is followed (as the backplane)
                    await pubsub.subscribe(f"{self.prefix}:{INTERNAL_CHANNEL_MARK}idle")
                self._feed_up = True
                if self._outage_since is not None:
                    log.warning(
                        "history feed from %s is back after %.1f s",
                        self.settings.safe_url(),
                        time.monotonic() - self._outage_since,
                    )
                    self._outage_since = None
                delay = BACKOFF_FIRST_SECONDS
                self._wake_sync.set()
                await self._serve(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    self.stats["feed_outages"] += 1
                    log.warning(
                        "history feed from %s lost (%s): history publishes fail and new "
                        "subscriptions get no history position until it is back",
                        self.settings.safe_url(),
                        type(exc).__name__,
                    )
            finally:
                self._feed_up = False
                for stream in self.streams:
                    stream.subscribed = False
                    stream.unsync()
                    for fut in stream.waiters:
                        _fail(fut, StoreError("the history feed is down"))
            await self._close_pubsub()
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_SECONDS)

    async def _serve(self, pubsub: PubSub) -> None:
        tasks = [
            asyncio.create_task(self._reader(pubsub), name="redis-history-reader"),
            asyncio.create_task(self._syncer(pubsub), name="redis-history-sync"),
        ]
        await supervise(tasks, "history feed")

    async def _syncer(self, pubsub: PubSub) -> None:
        """SUBSCRIBE to the feed of each stream some local pattern overlaps, UNSUBSCRIBE from
        the others (the reader reads the position once Redis confirms)."""
        while True:
            await self._wake_sync.wait()
            self._wake_sync.clear()
            add = [s for s in self.streams if s.interest > 0 and not s.subscribed]
            drop = [s for s in self.streams if s.interest <= 0 and s.subscribed]
            async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
                if add:
                    for s in add:
                        s.subscribed = True
                    await pubsub.subscribe(*(s.channel for s in add))
                if drop:
                    for s in drop:
                        s.subscribed = False
                        s.unsync()
                        s.epoch, s.delivered = "", 0  # followed again later: from then on
                    await pubsub.unsubscribe(*(s.channel for s in drop))

    async def _reader(self, pubsub: PubSub) -> None:
        while True:
            msg = await pubsub.get_message(timeout=None)
            if msg is None:
                continue
            channel = msg.get("channel")
            stream = self._by_channel.get(channel) if isinstance(channel, bytes) else None
            if stream is None:
                continue  # the idle channel
            kind = msg.get("type")
            if kind == "subscribe":
                self._resync(stream)  # confirmed: read the position
            elif kind == "message":
                data = msg.get("data")
                if not isinstance(data, bytes) or not stream.subscribed:
                    continue
                if stream.synced:
                    self._feed_message(stream, data)
                elif len(stream.held) < _MAX_HELD:
                    stream.held.append(data)
                else:
                    self.stats["feed_dropped"] += 1

    async def _sync(self, stream: _Stream) -> None:
        """Read the position of a stream whose feed Redis just confirmed; then deliver what the
        feed brought meanwhile above it."""
        try:
            reply = await self._call(_POSITION_SCRIPT, stream.keys, [os.urandom(4).hex()])
            epoch, seq = bytes(reply[0]).decode("ascii", "replace"), int(reply[1])
        except Exception as exc:
            stream.reading = False
            self.stats["reads_failed"] += 1
            log.warning(
                "history position of %r unavailable: %s", stream.config.pattern, type(exc).__name__
            )
            for fut in stream.waiters:
                _fail(fut, StoreError("history position unavailable"))
            if stream.subscribed:  # try again while the feed is up (it ends on an outage)
                asyncio.get_running_loop().call_later(_RESYNC_SECONDS, self._resync, stream)
            return
        if not stream.subscribed or not stream.reading:
            return  # unfollowed, or the feed broke, meanwhile
        if stream.epoch == epoch and stream.delivered < seq:
            # The feed was down while the stream was followed (its connection broke): what was
            # published meanwhile is delivered now, from the stream, before what follows.
            try:
                await self._catch_up(stream, seq)
            except Exception as exc:
                self.stats["reads_failed"] += 1
                log.warning(
                    "history catch-up of %r failed (%s): live subscribers here miss seq %d-%d",
                    stream.config.pattern,
                    type(exc).__name__,
                    stream.delivered + 1,
                    seq,
                )
            if not stream.subscribed or not stream.reading:
                return
        stream.reading = False
        if stream.epoch and epoch != stream.epoch:
            self._new_epoch(stream)
        stream.epoch, stream.delivered, stream.synced = epoch, seq, True
        for fut in stream.waiters:  # exactly this position: what follows comes live
            if not fut.done():
                fut.set_result((epoch, seq))
        held, stream.held = stream.held, []
        for data in held:
            self._feed_message(stream, data)

    async def _catch_up(self, stream: _Stream, top: int) -> None:
        """Deliver ``(delivered, top]`` from the stream, a page at a time (what is trimmed
        already is counted in ``feed_gaps``)."""
        epoch = stream.epoch
        while stream.delivered < top and stream.subscribed and stream.reading:
            have, _now, entries = await self._read(stream, stream.delivered + 1, top)
            if have != epoch or not entries:
                raise HistoryReadError("the stream no longer holds them")
            for seq, _t, pub in entries:
                self._deliver_one(stream, seq, epoch, pub)
            self.stats["caught_up"] += len(entries)

    def _resync(self, stream: _Stream) -> None:
        if self._feed_up and stream.subscribed and not stream.synced and not stream.reading:
            stream.reading = True
            task = asyncio.get_running_loop().create_task(self._sync(stream))
            self._readers.add(task)
            task.add_done_callback(self._readers.discard)

    def _new_epoch(self, stream: _Stream) -> None:
        self.stats["epochs_changed"] += 1
        log.warning(
            "history stream %r has a new epoch: redis lost its messages (a client resuming "
            "with the old epoch is told it has a gap)",
            stream.config.pattern,
        )

    def _feed_message(self, stream: _Stream, data: bytes) -> None:
        try:
            epoch, seq, pub = decode_feed(data)
        except ValueError:
            self.stats["bad_messages"] += 1
            return
        if epoch != stream.epoch:
            # Redis lost the stream and began a new epoch: follow it (subscribers see the new
            # epoch on the deliveries; a client resuming with the old one is told of the gap).
            self._new_epoch(stream)
            stream.epoch, stream.delivered = epoch, 0
        elif seq <= stream.delivered:
            self.stats["duplicates_dropped"] += 1
            return
        self._deliver_one(stream, seq, epoch, pub)

    def _deliver_one(self, stream: _Stream, seq: int, epoch: str, pub: Publication) -> None:
        if seq <= stream.delivered:
            return
        if seq != stream.delivered + 1:
            self.stats["feed_gaps"] += 1
        stream.delivered = seq
        self.stats["delivered"] += 1
        if pub.retain and self.on_retained is not None:
            self.on_retained(pub)
        deliver = self._deliver
        assert deliver is not None
        deliver(pub, seq, epoch)
        acks = stream.waiting_acks
        if acks:
            for s in [s for s in acks if s <= seq]:
                fut = acks.pop(s)
                if not fut.done():
                    fut.set_result(None)


def _unknown(since: int | None) -> Resumption:
    """No position can be given (Redis unreachable): a gap for a resumption."""
    return Resumption(None, None, False if since is not None else None)


def _fail(fut: asyncio.Future[Any], err: StoreError) -> None:
    if not fut.done():
        fut.set_exception(err)
