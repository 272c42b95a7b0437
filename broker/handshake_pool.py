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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

__all__ = [
    "DEFAULT_MAX_PER_SOURCE",
    "DEFAULT_MAX_QUEUED",
    "DEFAULT_WORKERS",
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
