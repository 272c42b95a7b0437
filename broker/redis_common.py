"""What the three Redis-backed parts share: the backplane (``broker/cluster.py``), the
retained store (``broker/store_redis.py``) and the history engine (``broker/history_redis.py``).

Timeouts and backoff, the handling of tasks around redis-py (which may swallow a cancellation
inside a read), closing a connection without waiting on a dead peer, and the one recovery
every pipelined script call needs: a restarted Redis forgot the script (``NOSCRIPT``, nothing
of those calls ran), so load it and send them once more. No redis import at module level:
the ``[cluster]`` extra stays optional.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

__all__ = [
    "BACKOFF_FIRST_SECONDS",
    "BACKOFF_MAX_SECONDS",
    "CANCEL_WAIT_SECONDS",
    "COMMAND_TIMEOUT_SECONDS",
    "aclose_quietly",
    "cancel_and_wait",
    "raise_if_cancelled",
    "resend_noscript",
    "retrieve",
    "supervise",
]

log = logging.getLogger("tessera.broker.cluster")

#: Seconds one Redis round trip may take before the engine counts Redis as unreachable.
COMMAND_TIMEOUT_SECONDS = 5.0
#: Seconds to wait for tasks to end once cancelled, and for a connection to close.
CANCEL_WAIT_SECONDS = 1.0
#: Reconnect backoff: first delay, ceiling (seconds), doubling in between.
BACKOFF_FIRST_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 5.0

J = TypeVar("J")


class _Closable(Protocol):
    def aclose(self) -> Awaitable[Any]: ...


def raise_if_cancelled() -> None:
    """After a call into redis-py: it may swallow a cancellation (seen with ``UNSUBSCRIBE``
    racing a shutdown), leaving the task "cancelling" but running; honour it here."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def retrieve(task: asyncio.Task[Any]) -> None:
    """Done callback: mark a task's outcome as seen (its error was handled or is moot)."""
    if not task.cancelled():
        task.exception()


async def cancel_and_wait(tasks: Sequence[asyncio.Task[Any]], what: str) -> None:
    """Cancel ``tasks`` and wait for them, bounded: a task that does not end on cancel (a read
    inside the client library) must not hold up shutdown; closing the connection afterwards
    ends it."""
    for task in tasks:
        task.add_done_callback(retrieve)
        task.cancel()
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=CANCEL_WAIT_SECONDS)
    if pending:
        names = ", ".join(sorted(t.get_name() for t in pending))
        log.warning("%s: %s did not stop on cancel", what, names)


async def supervise(tasks: Sequence[asyncio.Task[None]], what: str) -> None:
    """Until the first of ``tasks`` fails (its error is raised here); every one is cancelled on
    the way out, however this ends."""
    for task in tasks:
        # Before any await: a task finishing late with an error has that error seen, never
        # logged as lost, even if this is cancelled itself while waiting below.
        task.add_done_callback(retrieve)
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            exc = task.exception()
            if exc is not None:
                raise exc
    finally:
        await cancel_and_wait(tasks, what)


async def aclose_quietly(connection: _Closable | None) -> None:
    """Close a redis-py client or pub/sub connection; a dead peer neither raises nor holds
    this up for more than :data:`CANCEL_WAIT_SECONDS`."""
    if connection is None:
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CANCEL_WAIT_SECONDS):
            await connection.aclose()


async def resend_noscript(
    results: list[Any],
    batch: Sequence[J],
    send: Callable[[list[J]], Awaitable[list[Any]]],
    load: Callable[[], Awaitable[object]],
) -> None:
    """``results`` of one pipelined round trip of script calls, one per job of ``batch``:
    those Redis answered ``NOSCRIPT`` did not run; load the script and send them once more,
    their new results in place."""
    from redis.exceptions import NoScriptError  # noqa: PLC0415 - the optional extra

    again = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if not again:
        return
    await load()
    for i, result in zip(again, await send([batch[i] for i in again]), strict=True):
        results[i] = result
