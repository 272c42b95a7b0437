"""Hostile and broken peers against a real broker process, while well-behaved clients carry on.

A raw client (a real client certificate, frames built by hand with msgpack) sends what the SDK
never would: bad msgpack, an oversize length prefix, frames before hello, unknown operations.
Each gets the documented close or error frame with the right code, the broker logs it, and a
connected SDK pair keeps publishing and receiving throughout. A stalled TLS handshake is closed
after ``handshake_timeout``, and a subscriber that never reads is disconnected under the
slow-consumer policy while a normal subscriber loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from brokerproc import BrokerProcess, RawClient, frame, pack
from timing import scaled

from tessera_mq import client as client_sdk
from tessera_mq.auth.tls import client_context
from tessera_mq.client import ErrorCode

TIMEOUT = scaled(5.0)
HANDSHAKE_TIMEOUT = 0.5
HELLO_TIMEOUT = 0.5
MAX_PENDING_BYTES = 128 * 1024

LIMITS = {
    "handshake_timeout": HANDSHAKE_TIMEOUT,
    "hello_timeout": HELLO_TIMEOUT,
    "max_pending_bytes": MAX_PENDING_BYTES,
}


@pytest.fixture(scope="module")
def broker(module_broker_factory: Any) -> BrokerProcess:
    return module_broker_factory.start(limits=LIMITS)


def connect(broker: BrokerProcess, pki: Any, name: str, **kwargs: Any) -> client_sdk.connect:
    return client_sdk.connect(broker.url, **pki.client(name), timeout=TIMEOUT, **kwargs)


def raw_client(broker: BrokerProcess, pki: Any, name: str = "mallory", **kw: Any) -> RawClient:
    cred = pki.clients[name]
    return RawClient(broker.host, broker.port, client_context(pki.ca, cred.cert, cred.key), **kw)


@dataclass
class Bystanders:
    """alice publishes, bob receives: must work before, during and after every abuse."""

    alice: client_sdk.Client
    bob: client_sdk.Client
    sub: client_sdk.Subscription
    n: int = 0

    async def round_trip(self) -> None:
        self.n += 1
        payload = f"bystander-{self.n}".encode()
        await self.alice.publish("bystander.check", payload)
        msg = await self.sub.get(timeout=TIMEOUT)
        assert msg.payload == payload


@pytest.fixture
async def bystanders(broker: BrokerProcess, pki: Any) -> AsyncIterator[Bystanders]:
    async with connect(broker, pki, "alice") as alice, connect(broker, pki, "bob") as bob:
        b = Bystanders(alice, bob, await bob.subscribe("bystander.>"))
        await b.round_trip()
        yield b
        await b.round_trip()
        assert alice.is_open and bob.is_open


def raw_conn_id(broker: BrokerProcess, since: int, name: str = "mallory") -> int:
    """The broker's id of the (last) connection of ``name`` authenticated after ``since``."""
    record = broker.wait_for_audit("auth_success", since=since, identity=f"x509:{name}")
    conn = record["conn"]
    assert isinstance(conn, int)
    return conn


# --- broken frames ------------------------------------------------------------------------

HELLO = pack({"op": "hello", "version": 1, "client": "raw"})

FATAL: dict[str, tuple[bool, bytes, ErrorCode]] = {
    # label: (send hello first?, bytes sent, close code expected)
    "bad msgpack": (True, frame(b"\xc1\xc1\xc1"), ErrorCode.PROTOCOL_ERROR),
    "truncated msgpack map": (True, frame(b"\x82\xa2op"), ErrorCode.PROTOCOL_ERROR),
    "body is not a map": (True, frame(msgpack.packb([1, 2, 3])), ErrorCode.PROTOCOL_ERROR),
    "no op": (True, pack({"topic": "x"}), ErrorCode.PROTOCOL_ERROR),
    "pub without topic": (True, pack({"op": "pub", "payload": b"x"}), ErrorCode.PROTOCOL_ERROR),
    "payload not bin": (
        True,
        pack({"op": "pub", "topic": "a", "payload": "text"}),
        ErrorCode.PROTOCOL_ERROR,
    ),
    "sid out of range": (
        True,
        pack({"op": "sub", "sid": -1, "pattern": "a"}),
        ErrorCode.PROTOCOL_ERROR,
    ),
    "server-only op from a client": (
        True,
        pack({"op": "msg", "topic": "a", "payload": b""}),
        ErrorCode.PROTOCOL_ERROR,
    ),
    "oversize length prefix": (True, b"\xff\xff\xff\xff", ErrorCode.FRAME_TOO_LARGE),
    "oversize length prefix before hello": (
        False,
        (64 * 1024 + 1).to_bytes(4, "big"),
        ErrorCode.FRAME_TOO_LARGE,
    ),
    "subscribe before hello": (
        False,
        pack({"op": "sub", "sid": 1, "pattern": "a"}),
        ErrorCode.NOT_READY,
    ),
    "publish before hello": (
        False,
        pack({"op": "pub", "topic": "a", "payload": b"x"}),
        ErrorCode.NOT_READY,
    ),
    "unknown op before hello": (False, pack({"op": "frobnicate"}), ErrorCode.UNKNOWN_OPERATION),
    "unsupported protocol version": (
        False,
        pack({"op": "hello", "version": 0, "client": "old"}),
        ErrorCode.UNSUPPORTED_VERSION,
    ),
    "second hello": (True, HELLO, ErrorCode.PROTOCOL_ERROR),
}


@pytest.mark.parametrize("label", list(FATAL))
async def test_fatal_frame_closes_only_that_connection(
    broker: BrokerProcess, pki: Any, bystanders: Bystanders, label: str
) -> None:
    send_hello, data, code = FATAL[label]
    mark = broker.log_mark()

    def abuse() -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        with raw_client(broker, pki) as raw:
            if send_hello:
                raw.hello()
            raw.send_raw(data)
            return raw.read_to_close()

    close, before = await asyncio.to_thread(abuse)
    assert close is not None, f"no close frame; got {before}"
    assert close["code"] == code, close
    assert isinstance(close.get("reason"), str) and close["reason"]
    assert before == []  # nothing but the close (the welcome was read by hello())
    conn = raw_conn_id(broker, mark)
    broker.wait_for_log(
        rf"WARNING +tessera\.broker: \[c{conn} [^\]]*x509:mallory\] protocol error, closing: "
        rf"{code.name}",
        since=mark,
    )
    broker.wait_for_audit("close", since=mark, conn=conn, code=code.name.lower())
    await bystanders.round_trip()


REJECTED: dict[str, tuple[dict[str, Any], ErrorCode, dict[str, Any]]] = {
    # label: (frame sent after hello, error code, fields the error frame must echo)
    "unknown op": ({"op": "frobnicate", "x": 1}, ErrorCode.UNKNOWN_OPERATION, {}),
    "invalid topic": (
        {"op": "pub", "topic": "a..b", "payload": b"x", "ack": 5},
        ErrorCode.INVALID_TOPIC,
        {"ack": 5},
    ),
    "wildcard in a publish topic": (
        {"op": "pub", "topic": "a.*", "payload": b"x", "ack": 6},
        ErrorCode.INVALID_TOPIC,
        {"ack": 6},
    ),
    "invalid pattern": (
        {"op": "sub", "sid": 9, "pattern": "a.>.b"},
        ErrorCode.INVALID_TOPIC,
        {"sid": 9},
    ),
    "unknown subscription id": (
        {"op": "unsub", "sid": 12345},
        ErrorCode.INVALID_SUBSCRIPTION,
        {"sid": 12345},
    ),
}


@pytest.mark.parametrize("label", list(REJECTED))
async def test_bad_request_gets_an_error_and_the_connection_stays(
    broker: BrokerProcess, pki: Any, bystanders: Bystanders, label: str
) -> None:
    request, code, echoed = REJECTED[label]
    mark = broker.log_mark()

    def abuse() -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
        with raw_client(broker, pki) as raw:
            raw.hello()
            raw.send(**request)
            error, before = raw.recv_until("error")
            # still open: a ping is answered, a subscription works
            raw.send(op="ping")
            _, before_pong = raw.recv_until("pong")
            raw.send(op="sub", sid=1, pattern="chat.after")
            ok, _ = raw.recv_until("ok")
            assert ok == {"op": "ok", "sid": 1}
            # a close frame is not echoed: the broker just closes the transport
            raw.send(op="close", code=0, reason="")
            assert raw.read_to_close() == (None, [])
            return error, before, before_pong

    error, before, before_pong = await asyncio.to_thread(abuse)
    assert before == [] and before_pong == []
    assert error["code"] == code, error
    for key, value in echoed.items():
        assert error.get(key) == value, error
    if code in (ErrorCode.UNKNOWN_OPERATION, ErrorCode.INVALID_TOPIC):
        conn = raw_conn_id(broker, mark)
        broker.wait_for_log(rf"\[c{conn} [^\]]*\] rejected request: {code.name}", since=mark)
    await bystanders.round_trip()


async def test_frames_split_byte_by_byte_are_reassembled(
    broker: BrokerProcess, pki: Any, bystanders: Bystanders
) -> None:
    def slow_talker() -> dict[str, Any]:
        with raw_client(broker, pki) as raw:
            raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(HELLO)):
                raw.send_raw(HELLO[i : i + 1])
            welcome = raw.recv()
            assert welcome is not None and welcome["op"] == "welcome"
            data = pack({"op": "sub", "sid": 3, "pattern": "chat.bytes"}) + pack({"op": "ping"})
            for i in range(len(data)):
                raw.send_raw(data[i : i + 1])
            replies = [raw.recv(), raw.recv()]
            # (the core answers a ping at once, so the pong may overtake the ok)
            assert sorted(replies, key=str) == [
                {"op": "ok", "sid": 3},
                {"op": "pong"},
            ]
            return welcome

    welcome = await asyncio.to_thread(slow_talker)
    assert welcome["identity"] == {"mechanism": "x509", "name": "mallory"}
    await bystanders.round_trip()


async def test_requests_pipelined_behind_hello(
    broker: BrokerProcess, pki: Any, bystanders: Bystanders
) -> None:
    """hello, sub, pub and ping in one write: the welcome still comes first."""

    def pipeline() -> list[dict[str, Any]]:
        with raw_client(broker, pki) as raw:
            raw.send_raw(
                HELLO
                + pack({"op": "sub", "sid": 1, "pattern": "chat.pipe"})
                + pack({"op": "pub", "topic": "chat.pipe", "payload": b"p", "ack": 2})
                + pack({"op": "ping"})
            )
            return [raw.recv() or {} for _ in range(5)]

    replies = await asyncio.to_thread(pipeline)
    assert replies[0]["op"] == "welcome"
    assert sorted(replies[1:], key=str) == sorted(
        [
            {"op": "ok", "sid": 1},
            {"op": "ok", "ack": 2},
            {"op": "msg", "topic": "chat.pipe", "payload": b"p"},
            {"op": "pong"},
        ],
        key=str,
    )
    await bystanders.round_trip()


async def test_eof_in_the_middle_of_a_frame(
    broker: BrokerProcess, pki: Any, bystanders: Bystanders
) -> None:
    mark = broker.log_mark()

    def abuse() -> None:
        with raw_client(broker, pki) as raw:
            raw.hello()
            raw.send_raw(pack({"op": "pub", "topic": "chat.x", "payload": b"y" * 1000})[:500])
            raw.sock.shutdown(socket.SHUT_WR)  # EOF: TLS close_notify then FIN
            assert raw.read_to_close() == (None, [])

    await asyncio.to_thread(abuse)
    conn = raw_conn_id(broker, mark)
    broker.wait_for_audit("close", since=mark, conn=conn)
    await bystanders.round_trip()


async def test_not_tls_at_all(broker: BrokerProcess, bystanders: Bystanders) -> None:
    mark = broker.log_mark()

    def http_client() -> bytes:
        with socket.create_connection((broker.host, broker.port), timeout=TIMEOUT) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            chunks = []
            with contextlib.suppress(ConnectionResetError):
                while chunk := s.recv(4096):
                    chunks.append(chunk)
            return b"".join(chunks)

    reply = await asyncio.to_thread(http_client)
    assert b"HTTP" not in reply
    broker.wait_for_audit("auth_failure", since=mark, reason="tls_protocol")
    await bystanders.round_trip()


async def test_abuse_throughout_does_not_disturb_a_publishing_pair(
    broker: BrokerProcess, pki: Any
) -> None:
    """A steady stream between two SDK clients loses nothing while every fatal case runs."""
    count = 0
    stop = asyncio.Event()
    async with connect(broker, pki, "alice") as alice, connect(broker, pki, "bob") as bob:
        sub = await bob.subscribe("stream.>", max_pending=100_000)

        async def publisher() -> None:
            nonlocal count
            while not stop.is_set():
                await alice.publish("stream.seq", str(count).encode())
                count += 1
                if count % 20 == 0:
                    await asyncio.sleep(0)

        def abuse_all() -> list[int]:
            codes = []
            for send_hello, data, _code in FATAL.values():
                with raw_client(broker, pki) as raw:
                    if send_hello:
                        raw.hello()
                    raw.send_raw(data)
                    close, _ = raw.read_to_close()
                    codes.append(close["code"] if close else -1)
            return codes

        task = asyncio.create_task(publisher())
        try:
            codes = await asyncio.to_thread(abuse_all)
        finally:
            stop.set()
            await task
        assert codes == [int(code) for _, _, code in FATAL.values()]
        assert count > 0
        received = [int((await sub.get(timeout=TIMEOUT)).payload) for _ in range(count)]
        assert received == list(range(count))  # every message, in order, once
        assert sub.dropped == 0


# --- timeouts -----------------------------------------------------------------------------


def _wait_for_close(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            data += chunk
    return data


async def test_stalled_tls_handshake_is_closed_after_handshake_timeout(
    broker: BrokerProcess, bystanders: Bystanders
) -> None:
    mark = broker.log_mark()

    def stall() -> tuple[float, bytes]:
        with socket.create_connection((broker.host, broker.port), timeout=10) as s:
            started = time.monotonic()
            data = _wait_for_close(s)  # send nothing at all
            return time.monotonic() - started, data

    elapsed, data = await asyncio.to_thread(stall)
    assert data == b""  # not even a TLS alert: the broker just drops it
    assert HANDSHAKE_TIMEOUT * 0.8 <= elapsed < HANDSHAKE_TIMEOUT + 3, elapsed
    broker.wait_for_audit("handshake_timeout", since=mark, stage="security_handshake")
    await bystanders.round_trip()


async def test_many_stalled_handshakes_at_once(
    broker: BrokerProcess, bystanders: Bystanders
) -> None:
    def stall_many(n: int) -> float:
        socks = [socket.create_connection((broker.host, broker.port), timeout=10) for _ in range(n)]
        started = time.monotonic()
        try:
            for s in socks:
                assert _wait_for_close(s) == b""
        finally:
            for s in socks:
                s.close()
        return time.monotonic() - started

    task = asyncio.create_task(asyncio.to_thread(stall_many, 50))
    await bystanders.round_trip()  # served while 50 connections hang
    elapsed = await task
    assert elapsed < HANDSHAKE_TIMEOUT + 3


async def test_tls_without_hello_is_closed_after_hello_timeout(
    broker: BrokerProcess, pki: Any, bystanders: Bystanders
) -> None:
    mark = broker.log_mark()

    def no_hello() -> tuple[float, dict[str, Any] | None, list[dict[str, Any]]]:
        with raw_client(broker, pki, timeout=10) as raw:
            started = time.monotonic()
            close, before = raw.read_to_close()
            return time.monotonic() - started, close, before

    elapsed, close, before = await asyncio.to_thread(no_hello)
    assert before == []
    assert close is not None and close["code"] == ErrorCode.HANDSHAKE_TIMEOUT
    assert HELLO_TIMEOUT * 0.8 <= elapsed < HELLO_TIMEOUT + 3, elapsed
    broker.wait_for_audit("handshake_timeout", since=mark, stage="hello")
    await bystanders.round_trip()


# --- slow consumer ------------------------------------------------------------------------


async def test_slow_consumer_is_disconnected_and_others_lose_nothing(
    broker: BrokerProcess, pki: Any
) -> None:
    payload_size = 16 * 1024
    mark = broker.log_mark()

    def subscribe_and_stall() -> RawClient:
        raw = raw_client(broker, pki, recv_buffer_bytes=4096, timeout=TIMEOUT)
        raw.hello()
        raw.send(op="sub", sid=1, pattern="slow.>")
        raw.recv_until("ok")
        return raw  # and now it never reads

    raw = await asyncio.to_thread(subscribe_and_stall)
    conn = raw_conn_id(broker, mark)
    with raw:
        async with connect(broker, pki, "alice") as alice, connect(broker, pki, "bob") as bob:
            sub = await bob.subscribe("slow.>", max_pending=100_000)
            received: list[int] = []

            async def consume() -> None:
                async for msg in sub:
                    received.append(int(msg.payload[:8]))

            consumer = asyncio.create_task(consume())
            sent = 0
            disconnected: dict[str, Any] | None = None
            # Far more than the stalled client's buffers plus max_pending_bytes can hold.
            limit = (32 * 1024 * 1024) // payload_size
            while sent < limit:
                await alice.publish("slow.data", b"%08d" % sent + b"x" * (payload_size - 8))
                sent += 1
                if sent % 16 == 0:
                    events = broker.audit_events(mark)
                    disconnected = next(
                        (e for e in events if e["event"] == "slow_consumer" and e["conn"] == conn),
                        None,
                    )
                    if disconnected is not None:
                        break
            assert disconnected is not None, f"no slow_consumer record after {sent} messages"
            assert disconnected["policy"] == "disconnect"
            assert disconnected["pending_bytes"] > MAX_PENDING_BYTES
            # some more after the disconnect: the normal subscriber still gets everything
            for _ in range(20):
                await alice.publish("slow.data", b"%08d" % sent)
                sent += 1
            async with asyncio.timeout(TIMEOUT * 2):
                while len(received) < sent:
                    await asyncio.sleep(0.01)
            await sub.unsubscribe()
            await consumer
        assert received == list(range(sent))  # zero loss, in order, no duplicates
        assert sub.dropped == 0

        # The stalled client finally reads: what was in flight, then close SLOW_CONSUMER.
        close, before = await asyncio.to_thread(raw.read_to_close)
    assert close is not None, f"no close frame after {len(before)} frames"
    assert close["code"] == ErrorCode.SLOW_CONSUMER
    assert all(f["op"] == "msg" for f in before)
    assert len(before) < sent
    broker.wait_for_audit("close", since=mark, conn=conn, code="slow_consumer")
