"""The embedded store: retained values in SQLite in the broker's data directory.

* **Durable before ``ok``.** ``save`` returns once the transaction holding the value has been
  committed with ``journal_mode=WAL`` and ``synchronous=FULL`` (the WAL is fsynced on every
  commit), so a retained value the publisher saw acknowledged survives a crash or power loss.
* **Off the loop, batched.** One writer thread owns the SQLite connection. ``save`` calls from
  any number of publishers queue jobs; the thread takes every job waiting (up to
  :data:`MAX_BATCH_JOBS`) into one transaction, so one fsync acknowledges many publishes.
* **Bounded.** Per-value size, topic count and total bytes are checked on the event loop before
  anything is queued (:class:`RetainLimits`); a refusal is a :class:`~broker.store.StoreError`
  with the wire code for the publisher. An empty retained publish deletes the value.
* **Reads from memory.** Every retained value is also held in memory (the limits bound it) and
  indexed by first topic token, so a new subscription's snapshot is a lazy cursor over the
  matching bucket(s) (:func:`broker.store.retained_cursor`), never a disk read on the loop.

The row format is ``retained(topic TEXT PRIMARY KEY, payload BLOB, headers BLOB, sender TEXT,
updated REAL)``; ``headers`` is a msgpack map or NULL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import msgpack

from tessera_mq.broker.backplane import Publication
from tessera_mq.broker.store import RetainedCursor, StoreError, retained_cursor
from tessera_mq.client.protocol.errors import ErrorCode

__all__ = ["DB_FILE_NAME", "MAX_BATCH_JOBS", "RetainLimits", "SQLiteStore"]

log = logging.getLogger("tessera.store")

_T = TypeVar("_T")

#: The database file inside the data directory.
DB_FILE_NAME = "tessera.sqlite3"

#: Jobs (``save`` calls) joined into one transaction at most; Kafka's and NATS JetStream's
#: group commits batch by size in the same way, so one slow fsync serves many publishers.
MAX_BATCH_JOBS = 1024


@dataclass(frozen=True)
class RetainLimits:
    """Bounds on retained values (``[retain]`` in the configuration)."""

    max_value_bytes: int = 64 * 1024
    """Largest retained value: payload plus header keys and values, in bytes (MQTT brokers
    commonly cap retained payloads; mosquitto's ``retain_expiry``/``message_size_limit``)."""
    max_topics: int = 100_000
    """Topics holding a retained value at once."""
    max_total_bytes: int = 256 * 1024 * 1024
    """Bytes of all retained values together (they are also held in memory)."""

    def __post_init__(self) -> None:
        if self.max_value_bytes < 1 or self.max_topics < 1 or self.max_total_bytes < 1:
            raise ValueError("retain limits must be positive")


def _value_bytes(pub: Publication) -> int:
    n = len(pub.payload)
    if pub.headers:
        for k, v in pub.headers.items():
            n += len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass"))
    return n


@dataclass(slots=True)
class _Job:
    rows: list[tuple[str, Publication | None]]  # (topic, value) - None deletes
    future: asyncio.Future[None]
    undo: list[tuple[str, int | None]] = field(default_factory=list)  # sizes before


_STOP = object()


class SQLiteStore:
    """Retained values in ``<data_dir>/tessera.sqlite3`` (see the module docstring)."""

    def __init__(
        self,
        data_dir: str | Path,
        limits: RetainLimits | None = None,
        *,
        busy_timeout: float = 5.0,
    ) -> None:
        self.path = Path(data_dir) / DB_FILE_NAME
        self.limits = limits or RetainLimits()
        self._busy_timeout = busy_timeout
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: What is durable or on its way (sizes only): the limits are checked against this.
        self._sizes: dict[str, int] = {}
        self._total = 0
        #: What ``retained`` returns: first token -> topic -> publication.
        self._visible: dict[str, dict[str, Publication]] = {}
        #: Counters for ``info()``: transactions committed, values written, refusals.
        self.stats = {"transactions": 0, "writes": 0, "refused": 0, "failed": 0}

    # --- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[list[tuple[str, bytes, bytes | None, str | None]]] = (
            self._loop.create_future()
        )
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="tessera-store", daemon=True
        )
        self._thread.start()
        rows = await ready
        for topic, payload, headers, sender in rows:
            hdrs = msgpack.unpackb(headers) if headers is not None else None
            pub = Publication(topic, payload, hdrs, sender=sender, retain=True)
            size = _value_bytes(pub)
            self._sizes[topic] = size
            self._total += size
            self._bucket(topic)[topic] = pub
        log.info("store open: %s, %d retained values", self.path, len(rows))

    async def close(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(thread.join)
        self._thread = None

    # --- the Store protocol ---------------------------------------------------------------

    def wants(self, pub: Publication) -> bool:
        return pub.retain

    async def save(self, pubs: Sequence[Publication]) -> None:
        if self._thread is None or self._loop is None:
            raise StoreError("the store is not open")
        rows: list[tuple[str, Publication | None]] = []
        undo: list[tuple[str, int | None]] = []
        try:
            for pub in pubs:
                if not pub.retain:
                    continue
                self._reserve(pub, rows, undo)
        except StoreError:
            self._undo(undo)
            self.stats["refused"] += 1
            raise
        if not rows:
            return
        job = _Job(rows, self._loop.create_future(), undo)
        self._queue.put(job)
        await job.future

    def apply(self, pubs: Sequence[Publication]) -> None:
        for pub in pubs:
            if not pub.retain:
                continue
            bucket = self._bucket(pub.topic)
            if pub.payload:
                bucket[pub.topic] = pub
            else:
                bucket.pop(pub.topic, None)

    def retained(self, pattern: str) -> Sequence[Publication]:
        return [p for p in self.retained_cursor(pattern) if p is not None]

    def retained_cursor(self, pattern: str) -> RetainedCursor:
        return retained_cursor(self._visible, pattern)

    # --- info -----------------------------------------------------------------------------

    @property
    def retained_count(self) -> int:
        return len(self._sizes)

    @property
    def retained_bytes(self) -> int:
        return self._total

    def health(self) -> Mapping[str, object]:
        return {
            "engine": "sqlite",
            "path": str(self.path),
            "retained": len(self._sizes),
            "retained_bytes": self._total,
            **self.stats,
        }

    # --- internals ------------------------------------------------------------------------

    def _bucket(self, topic: str) -> dict[str, Publication]:
        first = topic.split(".", 1)[0]
        bucket = self._visible.get(first)
        if bucket is None:
            bucket = self._visible[first] = {}
        return bucket

    def _reserve(
        self,
        pub: Publication,
        rows: list[tuple[str, Publication | None]],
        undo: list[tuple[str, int | None]],
    ) -> None:
        topic, lim = pub.topic, self.limits
        old = self._sizes.get(topic)
        if not pub.payload:  # an empty retained publish clears the value
            undo.append((topic, old))
            if old is not None:
                del self._sizes[topic]
                self._total -= old
            rows.append((topic, None))
            return
        size = _value_bytes(pub)
        if size > lim.max_value_bytes:
            raise StoreError(
                f"retained value of {size} bytes is over the limit of {lim.max_value_bytes}",
                ErrorCode.RETAINED_TOO_LARGE,
            )
        if old is None and len(self._sizes) >= lim.max_topics:
            raise StoreError(
                f"the broker holds {lim.max_topics} retained topics, its limit",
                ErrorCode.RETAINED_LIMIT,
            )
        if self._total - (old or 0) + size > lim.max_total_bytes:
            raise StoreError(
                f"retained values would exceed {lim.max_total_bytes} bytes in all",
                ErrorCode.RETAINED_LIMIT,
            )
        undo.append((topic, old))
        self._sizes[topic] = size
        self._total += size - (old or 0)
        rows.append((topic, pub))

    def _undo(self, undo: list[tuple[str, int | None]]) -> None:
        for topic, old in reversed(undo):
            cur = self._sizes.pop(topic, None)
            if cur is not None:
                self._total -= cur
            if old is not None:
                self._sizes[topic] = old
                self._total += old

    def _finish(self, job: _Job, err: StoreError | None) -> None:
        """On the loop: resolve one job's future (undo its reservation if it failed)."""
        if err is not None:
            self._undo(job.undo)
            self.stats["failed"] += 1
        if job.future.done():  # the publisher's save was cancelled
            return
        if err is None:
            job.future.set_result(None)
        else:
            job.future.set_exception(err)

    # --- the writer thread ----------------------------------------------------------------

    def _run(
        self, ready: asyncio.Future[list[tuple[str, bytes, bytes | None, str | None]]]
    ) -> None:
        loop = self._loop
        assert loop is not None
        try:
            db, rows = self._connect()
        except (sqlite3.Error, OSError) as exc:
            err: StoreError | None = StoreError(f"cannot open the store: {exc}")
        else:
            err = None
        if err is not None:
            log.error("cannot open the store at %s: %s", self.path, err)
            loop.call_soon_threadsafe(_set_exception, ready, err)
            return
        loop.call_soon_threadsafe(_set_result, ready, rows)
        try:
            self._write_loop(db, loop)
        finally:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def _connect(
        self,
    ) -> tuple[sqlite3.Connection, list[tuple[str, bytes, bytes | None, str | None]]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, payload BLOB NOT"
                " NULL, headers BLOB, sender TEXT, updated REAL NOT NULL)"
            )
            rows = db.execute("SELECT topic, payload, headers, sender FROM retained").fetchall()
        except BaseException:
            db.close()
            raise
        return db, rows

    def _write_loop(self, db: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            assert isinstance(item, _Job)
            batch = [item]
            stop = False
            while len(batch) < MAX_BATCH_JOBS:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                assert isinstance(nxt, _Job)
                batch.append(nxt)
            err = self._write(db, batch)
            for job in batch:
                loop.call_soon_threadsafe(self._finish, job, err)
            if stop:
                return

    def _write(self, db: sqlite3.Connection, batch: list[_Job]) -> StoreError | None:
        now = time.time()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                n = 0
                for job in batch:
                    for topic, pub in job.rows:
                        n += 1
                        if pub is None:
                            db.execute("DELETE FROM retained WHERE topic = ?", (topic,))
                            continue
                        headers = (
                            msgpack.packb(dict(pub.headers), use_bin_type=True)
                            if pub.headers is not None
                            else None
                        )
                        db.execute(
                            "INSERT OR REPLACE INTO retained VALUES (?, ?, ?, ?, ?)",
                            (topic, pub.payload, headers, pub.sender, now),
                        )
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            failure: sqlite3.Error | None = exc
        else:
            failure = None
        if failure is not None:
            log.error("store write failed (%d publishes refused): %s", len(batch), failure)
            return StoreError(f"the store could not write: {type(failure).__name__}")
        self.stats["transactions"] += 1
        self.stats["writes"] += n
        return None


def _set_result(fut: asyncio.Future[_T], value: _T) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[_T], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
