"""``broker.expiry.SessionWatch`` in-process: a fake loop and clock, no sockets, no sleeps."""

from __future__ import annotations

from typing import Any

from tessera_mq.auth.identity import Identity
from tessera_mq.broker.expiry import SessionWatch, credential_expires_at
from tessera_mq.client.protocol import ErrorCode


class FakeTimer:
    def __init__(self, delay: float, callback: Any, args: tuple[Any, ...]) -> None:
        self.delay, self.callback, self.args, self.cancelled = delay, callback, args, False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        assert not self.cancelled
        self.callback(*self.args)


class FakeLoop:
    def __init__(self) -> None:
        self.timers: list[FakeTimer] = []

    def call_later(self, delay: float, callback: Any, *args: Any) -> FakeTimer:
        timer = FakeTimer(delay, callback, args)
        self.timers.append(timer)
        return timer


class Layer:
    def __init__(self, expires: float | None) -> None:
        self.credential_expires_at = expires


class Handler:
    def __init__(self, name: str) -> None:
        self.identity = Identity("x509", name)
        self.conn_id = 7
        self.peer = "127.0.0.1:1"
        self.listener = "127.0.0.1:2"
        self.subs = {2: "b.>", 1: "a"}
        self.closing = False
        self.closed: list[tuple[ErrorCode, str]] = []

    def who(self) -> str:
        return f"[{self.identity}]"

    def close(self, code: ErrorCode, reason: str) -> None:
        self.closed.append((code, reason))
        self.closing = True


class Session:
    def __init__(self, name: str, expires: float | None) -> None:
        self.handler = Handler(name)
        self.layer = Layer(expires)


def make(max_age: float | None = None) -> tuple[SessionWatch, FakeLoop, list[str]]:
    loop = FakeLoop()
    audits: list[str] = []
    watch = SessionWatch(
        lambda: loop,  # type: ignore[arg-type, return-value]
        lambda event, handler, level: audits.append(event),
        max_age=lambda: max_age,
        clock=lambda: 1000.0,
    )
    return watch, loop, audits


def test_the_session_closes_when_its_credential_ends() -> None:
    watch, loop, audits = make()
    session = Session("alice", 1060.0)
    watch.authenticated(session)  # type: ignore[arg-type]
    (timer,) = loop.timers
    assert timer.delay == 60.0
    timer.fire()
    assert session.handler.closed == [
        (ErrorCode.CREDENTIAL_EXPIRED, "credential expired: re-authenticate")
    ]
    assert audits == ["credential_expired"]


def test_no_end_no_timer_and_lost_cancels() -> None:
    watch, loop, _ = make()
    forever = Session("bob", None)
    watch.authenticated(forever)  # type: ignore[arg-type]
    assert loop.timers == []
    ending = Session("carol", 1005.0)
    watch.authenticated(ending)  # type: ignore[arg-type]
    watch.lost(ending.handler)  # type: ignore[arg-type]
    assert loop.timers[0].cancelled
    assert [r["identity"] for r in watch.describe()] == ["x509:bob"]


def test_max_session_age_comes_first_unless_the_credential_ends_sooner() -> None:
    watch, loop, _ = make(max_age=30.0)
    watch.authenticated(Session("a", None))  # type: ignore[arg-type]
    watch.authenticated(Session("b", 1100.0))  # type: ignore[arg-type]
    watch.authenticated(Session("c", 1010.0))  # type: ignore[arg-type]
    assert [t.delay for t in loop.timers] == [30.0, 30.0, 10.0]


def test_an_already_ended_credential_closes_at_once_and_a_closing_session_is_left_alone() -> None:
    watch, loop, audits = make()
    late = Session("late", 990.0)
    watch.authenticated(late)  # type: ignore[arg-type]
    assert loop.timers[0].delay == 0.0
    late.handler.closing = True  # closed for another reason meanwhile
    loop.timers[0].fire()
    assert late.handler.closed == []
    assert audits == []


def test_describe() -> None:
    watch, _, _ = make()
    watch.authenticated(Session("alice", 1060.0))  # type: ignore[arg-type]
    (row,) = watch.describe()
    assert row == {
        "conn": 7,
        "identity": "x509:alice",
        "mechanism": "x509",
        "peer": "127.0.0.1:1",
        "listener": "127.0.0.1:2",
        "since": "1970-01-01T00:16:40+00:00",
        "credential_expires_at": "1970-01-01T00:17:40+00:00",
        "subscriptions": {"1": "a", "2": "b.>"},
    }


def test_credential_expires_at_reads_the_inner_layer_of_a_stack() -> None:
    class Stack:
        inner = Layer(5.0)
        credential_expires_at = 9.0

    assert credential_expires_at(Stack()) == 5.0  # type: ignore[arg-type]
    assert credential_expires_at(Layer(None)) is None  # type: ignore[arg-type]
    assert credential_expires_at(object()) is None  # type: ignore[arg-type]
