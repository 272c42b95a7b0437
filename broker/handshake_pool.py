"""A fair, bounded thread pool for blocking handshake steps (GSS accept, keytab reads).

Pre-authentication work must not let one source deny service to others. A plain
``ThreadPoolExecutor`` is one FIFO: 100 connections from one address flooding tokens push every
other client's handshake behind theirs, and steps for connections that have long been closed or
passed their deadline still run. This pool instead keeps

* one bounded queue per **source** (the peer IP address): a source may have at most
  ``max_per_source`` steps queued or running; the next one is refused at once (``submit``
  returns ``None``, counted as ``refused_source``), and so is any step beyond ``max_queued``
  queued in all (``refused_full``);
* **round-robin** scheduling over sources with queued work: a worker takes one step from the
  next source in turn, so a client from a quiet address waits for at most one step per busy
  source, however deep their queues are;
* a small fixed number of worker threads;
* **no work for the dead**: a step whose future was cancelled (the driver cancels it when its
  connection closes) or whose deadline has passed when a worker reaches it is skipped and its
  future cancelled (``skipped_cancelled``, ``skipped_deadline``).

Steps are submitted like ``Executor.submit`` and return a ``concurrent.futures.Future``; an
asyncio driver wraps it with ``asyncio.wrap_future``. Deadlines are in the pool's ``clock``
(default ``time.monotonic``, which is also the default asyncio loop clock).

Precedents: nginx ``limit_conn`` per ``$binary_remote_addr``; HAProxy's per-source
``sc_conn_cur`` tracking; deficit round robin (Shreedhar and Varghese, 1995) with one step as
the quantum.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

__all__ = [
    "DEFAULT_FAILURES_PER_SECOND",
    "DEFAULT_FAILURE_BURST",
    "DEFAULT_MAX_HELD_PER_SOURCE",
    "DEFAULT_MAX_PER_SOURCE",
    "DEFAULT_MAX_QUEUED",
    "DEFAULT_WORKERS",
    "FailureGate",
    "HandshakePool",
]

T = TypeVar("T")

DEFAULT_WORKERS: Final = 4
"""Worker threads. A Kerberos acceptor step takes 0.1-1 ms of CPU; on a 2-core host more
threads only add GIL contention (the old ``ThreadPoolExecutor`` used 4 too)."""

DEFAULT_MAX_PER_SOURCE: Final = 16
"""Steps one source address may have queued or running. Each connection has at most one step
in the pool at a time, so this bounds the concurrent handshakes of one address that get CPU;
16 covers a NAT of busy clients (nginx examples use ``limit_conn addr 10``-``20``)."""

DEFAULT_MAX_QUEUED: Final = 4096
"""Steps queued in all, across sources: bounds memory when many addresses flood at once."""


@dataclass
class _Job:
    future: concurrent.futures.Future[Any]
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    deadline: float | None
    source: str


@dataclass
class _Source:
    queue: collections.deque[_Job] = field(default_factory=collections.deque)
    in_pool: int = 0  #: queued + running


class HandshakePool:
    """Per-source bounded, round-robin scheduled worker threads for blocking handshake steps."""

    def __init__(
        self,
        workers: int = DEFAULT_WORKERS,
        *,
        max_per_source: int = DEFAULT_MAX_PER_SOURCE,
        max_queued: int = DEFAULT_MAX_QUEUED,
        clock: Callable[[], float] = time.monotonic,
        thread_name_prefix: str = "tessera-handshake",
    ) -> None:
        if workers < 1 or max_per_source < 1 or max_queued < 1:
            raise ValueError("workers, max_per_source and max_queued must be positive")
        self._max_per_source = max_per_source
        self._max_queued = max_queued
        self._clock = clock
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._sources: dict[str, _Source] = {}
        self._ring: collections.deque[str] = collections.deque()  #: sources with queued jobs
        self._queued = 0
        self._shutdown = False
        self._stats: collections.Counter[str] = collections.Counter()
        self._threads = [
            threading.Thread(target=self._run, name=f"{thread_name_prefix}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    # -- API -----------------------------------------------------------------------------------

    def submit(
        self,
        source: str,
        fn: Callable[..., T],
        /,
        *args: Any,
        deadline: float | None = None,
    ) -> concurrent.futures.Future[T] | None:
        """Queue ``fn(*args)`` for *source*; ``None`` when refused (the source already has
        ``max_per_source`` steps in the pool, the pool holds ``max_queued``, or it is shut
        down). Cancel the returned future to drop the step if it has not started; a step still
        queued at *deadline* (pool clock) is dropped too."""
        with self._lock:
            if self._shutdown:
                self._stats["refused_shutdown"] += 1
                return None
            state = self._sources.get(source)
            if state is not None and state.in_pool >= self._max_per_source:
                self._stats["refused_source"] += 1
                return None
            if self._queued >= self._max_queued:
                self._stats["refused_full"] += 1
                return None
            if state is None:
                state = self._sources[source] = _Source()
            future: concurrent.futures.Future[T] = concurrent.futures.Future()
            if not state.queue:
                self._ring.append(source)
            state.queue.append(_Job(future, fn, args, deadline, source))
            state.in_pool += 1
            self._queued += 1
            self._stats["submitted"] += 1
            self._work.notify()
        return future

    def stats(self) -> dict[str, int]:
        """Counters: submitted, completed, refused_source, refused_full, refused_shutdown,
        skipped_cancelled, skipped_deadline; and the current queued and sources."""
        with self._lock:
            return {**self._stats, "queued": self._queued, "sources": len(self._sources)}

    def in_pool(self, source: str) -> int:
        """Steps of *source* queued or running."""
        with self._lock:
            state = self._sources.get(source)
            return state.in_pool if state is not None else 0

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting steps. With *cancel_futures*, queued steps are cancelled; otherwise
        they still run. With *wait*, return once the workers have exited."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                for state in self._sources.values():
                    while state.queue:
                        job = state.queue.popleft()
                        self._queued -= 1
                        state.in_pool -= 1
                        job.future.cancel()
                self._ring.clear()
                self._drop_idle()
            self._work.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()

    # -- workers -------------------------------------------------------------------------------

    def _next(self) -> _Job | None:
        """The next job in round-robin order (called with the lock held); None to exit."""
        while True:
            while not self._ring:
                if self._shutdown:
                    return None
                self._work.wait()
            source = self._ring.popleft()
            state = self._sources[source]
            job = state.queue.popleft()
            self._queued -= 1
            if state.queue:
                self._ring.append(source)  # back of the ring: every other source goes first
            if job.future.cancelled():
                self._stats["skipped_cancelled"] += 1
            elif job.deadline is not None and self._clock() >= job.deadline:
                job.future.cancel()
                self._stats["skipped_deadline"] += 1
            elif job.future.set_running_or_notify_cancel():
                return job
            else:  # cancelled between the two checks
                self._stats["skipped_cancelled"] += 1
            self._release(state, source)

    def _release(self, state: _Source, source: str) -> None:
        state.in_pool -= 1
        if state.in_pool == 0 and not state.queue:
            del self._sources[source]

    def _drop_idle(self) -> None:
        for source in [s for s, st in self._sources.items() if st.in_pool == 0]:
            del self._sources[source]

    def _run(self) -> None:
        while True:
            with self._lock:
                job = self._next()
            if job is None:
                return
            try:
                result = job.fn(*job.args)
            except BaseException as exc:  # delivered to the submitter, like an Executor
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)
            with self._lock:
                self._stats["completed"] += 1
                state = self._sources.get(job.source)
                if state is not None:
                    self._release(state, job.source)


DEFAULT_FAILURES_PER_SECOND: Final = 50.0
"""Failed handshakes per second one source address may sustain before its new connections are
held (not read) until the budget refills (fail2ban-style; a real client fails a few times)."""

DEFAULT_FAILURE_BURST: Final = 100
"""Failed handshakes one source may have in a burst (a reconnect storm with a stale ticket)."""

DEFAULT_MAX_HELD_PER_SOURCE: Final = 256
"""Connections one address may have held at once; more are closed at accept. A flooder that
sends and closes without waiting would otherwise pile up held sockets until the deadline."""

_MAX_TRACKED_SOURCES: Final = 65_536  #: buckets kept; full buckets are forgotten first


class FailureGate:
    """A per-source token bucket of handshakes that do not succeed, sans-I/O (clock passed in).

    Before reading a new connection the driver calls :meth:`admit`: ``0.0`` means go ahead (one
    token is spent), otherwise hold the connection (stop reading it) for that many seconds and
    ask again. When the handshake succeeds the driver calls :meth:`succeeded`, which gives the
    token back, so many good clients behind one address are never held; failures keep theirs.
    A flooding address is so paced to ``rate`` failed handshakes per second, one connection per
    token (held connections resume one at a time, not in a herd), and a flooder that waits for
    its verdict waits for the budget: its held connections cost the broker nothing.
    """

    def __init__(
        self,
        rate: float = DEFAULT_FAILURES_PER_SECOND,
        burst: int = DEFAULT_FAILURE_BURST,
        *,
        max_held: int = DEFAULT_MAX_HELD_PER_SOURCE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_held < 1:
            raise ValueError("rate, burst and max_held must be positive")
        self._rate = rate
        self._max_held = max_held
        self._held: collections.Counter[str] = collections.Counter()
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  #: source -> (tokens, at)
        self.held = 0  #: times admit() answered "hold" (for the stats)
        self.refused = 0  #: connections refused because their address had max_held held

    def _tokens(self, source: str, now: float) -> float:
        tokens, at = self._buckets.get(source, (self._burst, now))
        return min(self._burst, tokens + (now - at) * self._rate)

    def admit(self, source: str, *, held: bool = False) -> float:
        """Spend a token of *source* and return ``0.0``, or return the seconds to wait, or
        ``math.inf``: refuse the connection (its address already has ``max_held`` held).
        *held* says whether the asking connection is held already (it asks again)."""
        now = self._clock()
        tokens = self._tokens(source, now)
        if tokens < 1.0 - 1e-9:  # (the epsilon: a refill of exactly one token, in floats)
            if not held:
                if self._held[source] >= self._max_held:
                    self.refused += 1
                    return math.inf
                self._held[source] += 1
            self.held += 1
            return (1.0 - tokens) / self._rate
        if held:
            self.release(source)
        if len(self._buckets) >= _MAX_TRACKED_SOURCES and source not in self._buckets:
            self._forget_full(now)
        self._buckets[source] = (tokens - 1.0, now)
        return 0.0

    def release(self, source: str) -> None:
        """A held connection of *source* is gone (closed, or admitted)."""
        self._held[source] -= 1
        if self._held[source] <= 0:
            del self._held[source]

    def succeeded(self, source: str) -> None:
        """The handshake admitted for *source* succeeded: its token comes back."""
        now = self._clock()
        tokens = min(self._burst, self._tokens(source, now) + 1.0)
        if tokens >= self._burst:
            self._buckets.pop(source, None)  # full again: nothing to remember
        else:
            self._buckets[source] = (tokens, now)

    def _forget_full(self, now: float) -> None:
        full = [s for s in self._buckets if self._tokens(s, now) >= self._burst]
        for source in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[source]
