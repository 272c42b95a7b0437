"""broker.handshake_pool: per-source bounds, round-robin fairness, skipping dead work.

In-process with real threads; ordering is made deterministic with one worker held on an event
(no sleeps), and deadlines use a fake clock.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
from collections.abc import Iterator

import pytest

from tessera_mq.broker.handshake_pool import FailureGate, HandshakePool

WAIT_SECONDS = 10.0  # generous bound for a worker thread to pick up a job on a loaded machine


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pool(clock: FakeClock) -> Iterator[HandshakePool]:
    p = HandshakePool(1, max_per_source=4, max_queued=8, clock=clock)
    yield p
    p.shutdown(wait=True, cancel_futures=True)


def hold(pool: HandshakePool, source: str = "blocker") -> tuple[threading.Event, threading.Event]:
    """Occupy the single worker until the returned ``release`` event is set."""
    started, release = threading.Event(), threading.Event()

    def blocker() -> None:
        started.set()
        release.wait(WAIT_SECONDS)

    assert pool.submit(source, blocker) is not None
    assert started.wait(WAIT_SECONDS)
    return started, release


def test_result_and_exception_reach_the_future(pool: HandshakePool) -> None:
    ok = pool.submit("10.0.0.1", lambda a, b: a + b, 2, 3)
    assert ok is not None and ok.result(WAIT_SECONDS) == 5

    def boom() -> None:
        raise ValueError("bad token")

    failed = pool.submit("10.0.0.1", boom)
    assert failed is not None
    with pytest.raises(ValueError, match="bad token"):
        failed.result(WAIT_SECONDS)
    stats = pool.stats()
    assert stats["completed"] == 2 and stats["queued"] == 0 and stats["sources"] == 0


def test_round_robin_over_sources(pool: HandshakePool) -> None:
    """A quiet source's step runs after at most one step of each busy source."""
    _, release = hold(pool)
    order: list[str] = []
    futures = [pool.submit("flood", order.append, f"flood-{i}") for i in range(3)]
    futures.append(pool.submit("good", order.append, "good"))
    futures += [pool.submit("other", order.append, f"other-{i}") for i in range(2)]
    assert all(f is not None for f in futures)
    release.set()
    concurrent.futures.wait([f for f in futures if f is not None], timeout=WAIT_SECONDS)
    assert order == ["flood-0", "good", "other-0", "flood-1", "other-1", "flood-2"]


def test_one_source_is_bounded_and_refusals_are_counted(pool: HandshakePool) -> None:
    _, release = hold(pool, "flood")  # running counts against its source: 1 of 4
    accepted = [pool.submit("flood", lambda: None) for _ in range(3)]
    assert all(f is not None for f in accepted)
    assert pool.submit("flood", lambda: None) is None  # 5th step of one source
    assert pool.submit("flood", lambda: None) is None
    assert pool.in_pool("flood") == 4
    good = pool.submit("good", lambda: "in")  # another source is not affected
    assert good is not None
    assert pool.stats()["refused_source"] == 2
    release.set()
    assert good.result(WAIT_SECONDS) == "in"


def test_total_queue_is_bounded() -> None:
    p = HandshakePool(1, max_per_source=100, max_queued=3)
    try:
        _, release = hold(p)
        queued = [p.submit(f"s{i}", lambda: None) for i in range(3)]
        assert all(f is not None for f in queued)
        assert p.submit("s9", lambda: None) is None
        assert p.stats()["refused_full"] == 1
        release.set()
    finally:
        p.shutdown(wait=True)


def test_cancelled_steps_never_run(pool: HandshakePool) -> None:
    """The driver cancels the step of a connection that closed while it was queued."""
    _, release = hold(pool)
    ran: list[int] = []
    gone = pool.submit("10.0.0.2", ran.append, 1)
    alive = pool.submit("10.0.0.2", ran.append, 2)
    assert gone is not None and alive is not None
    assert gone.cancel()
    release.set()
    alive.result(WAIT_SECONDS)
    assert ran == [2]
    assert pool.stats()["skipped_cancelled"] == 1
    assert pool.in_pool("10.0.0.2") == 0


def test_steps_past_their_deadline_are_skipped(pool: HandshakePool, clock: FakeClock) -> None:
    _, release = hold(pool)
    ran: list[str] = []
    late = pool.submit("10.0.0.3", ran.append, "late", deadline=clock.now + 5)
    timely = pool.submit("10.0.0.3", ran.append, "timely", deadline=clock.now + 60)
    assert late is not None and timely is not None
    clock.now += 10  # the first connection's handshake deadline passes while it waits
    release.set()
    timely.result(WAIT_SECONDS)
    assert ran == ["timely"]
    assert late.cancelled()
    assert pool.stats()["skipped_deadline"] == 1


def test_shutdown_cancels_queued_steps_and_refuses_new_ones(clock: FakeClock) -> None:
    p = HandshakePool(1, clock=clock)
    _, release = hold(p)
    queued = p.submit("10.0.0.4", lambda: None)
    assert queued is not None
    release.set()
    p.shutdown(wait=True, cancel_futures=True)
    assert queued.cancelled() or queued.done()
    assert p.submit("10.0.0.4", lambda: None) is None
    assert p.stats()["refused_shutdown"] == 1


def test_configuration_is_validated() -> None:
    with pytest.raises(ValueError, match="positive"):
        HandshakePool(0)
    with pytest.raises(ValueError, match="positive"):
        HandshakePool(1, max_per_source=0)


# -- FailureGate: pacing of addresses whose handshakes fail ---------------------------------


def test_gate_admits_a_burst_then_paces_failures(clock: FakeClock) -> None:
    gate = FailureGate(rate=10, burst=3, clock=clock)
    assert [gate.admit("flood") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert gate.admit("flood") == pytest.approx(0.1)  # 1 token at 10/s
    assert gate.admit("good") == 0.0  # other addresses have their own budget
    clock.now += 0.1
    assert gate.admit("flood") == 0.0
    assert gate.admit("flood") == pytest.approx(0.1)  # one connection per token, no herd
    assert gate.held == 2


def test_gate_refunds_successful_handshakes(clock: FakeClock) -> None:
    """Many good clients behind one address (a NAT) are never held."""
    gate = FailureGate(rate=1, burst=2, clock=clock)
    for _ in range(100):
        assert gate.admit("nat") == 0.0
        gate.succeeded("nat")
    assert gate.held == 0


def test_gate_configuration_is_validated() -> None:
    with pytest.raises(ValueError, match="positive"):
        FailureGate(rate=0)


def test_gate_bounds_held_connections_per_address(clock: FakeClock) -> None:
    gate = FailureGate(rate=1, burst=1, max_held=2, clock=clock)
    assert gate.admit("flood") == 0.0
    assert gate.admit("flood") > 0  # held 1
    assert gate.admit("flood") > 0  # held 2
    assert gate.admit("flood") == math.inf  # a third held one is refused
    assert gate.refused == 1
    gate.release("flood")  # a held connection closed
    assert gate.admit("flood") > 0
    clock.now += 1
    assert gate.admit("flood", held=True) == 0.0  # admitted: no longer held
    assert gate.admit("flood") > 0
