"""The broker core's promises, tried from outside against real broker processes (issue #8).

1. An ``ok`` is never sent for a publish that is not queued for its subscribers: publishers
   flooding acknowledged publishes, SIGTERM mid-stream, and every acknowledged publish reaches
   its subscriber before the broker's ``going away``.
2. Replies are bounded: a client that never reads and keeps asking is disconnected as a slow
   consumer instead of growing the broker's memory.
3. Negotiated heartbeats are honoured per session (a ping after one interval, a close after two).
4. Answers to requests complete before a fatal frame go out before the close, however the bytes
   were cut.

Clients here speak the wire by hand over real TLS (asyncio streams, frames built with msgpack).
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
from brokerproc import BrokerProcess, frame, pack
from timing import scaled

from tessera_mq.auth.tls import client_context
from tessera_mq.client import ErrorCode

TIMEOUT = scaled(10.0)


class AsyncRaw:
    """A raw wire-protocol client on asyncio streams (real TLS)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def recv(self) -> dict[str, Any] | None:
        try:
            head = await self.reader.readexactly(4)
            body = await self.reader.readexactly(int.from_bytes(head, "big"))
        except (asyncio.IncompleteReadError, ConnectionResetError, ssl.SSLError):
            return None
        obj = msgpack.unpackb(body, raw=False)
        assert isinstance(obj, dict)
        return obj

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def hello(self, **fields: Any) -> dict[str, Any]:
        await self.send(pack({"op": "hello", "version": 1, "client": "core-test/1", **fields}))
        welcome = await asyncio.wait_for(self.recv(), TIMEOUT)
        assert welcome is not None and welcome["op"] == "welcome", welcome
        return welcome

    def close(self) -> None:
        self.writer.transport.abort()


@asynccontextmanager
async def raw(broker: BrokerProcess, pki: Any, name: str, **kw: Any) -> AsyncIterator[AsyncRaw]:
    cred = pki.clients[name]
    ctx = client_context(pki.ca, cred.cert, cred.key)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            broker.host, broker.port, ssl=ctx, server_hostname="localhost", **kw
        ),
        TIMEOUT,
    )
    client = AsyncRaw(reader, writer)
    try:
        yield client
    finally:
        client.close()


# --- 1. acknowledged publishes survive a graceful shutdown ------------------------------------

PUBLISHERS = 10
FLOOD_SECONDS = 1.5
MAX_PER_PUBLISHER = 200_000  # bounds the test even on a fast machine


async def _publisher(client: AsyncRaw, topic: str, acked: set[int], stop: asyncio.Event) -> None:
    async def read_acks() -> None:
        while True:
            obj = await client.recv()
            if obj is None:
                return
            if obj["op"] == "ok" and "ack" in obj:
                acked.add(obj["ack"])
            elif obj["op"] == "close":
                return

    reader = asyncio.create_task(read_acks())
    seq = 0
    try:
        while not stop.is_set() and seq < MAX_PER_PUBLISHER:
            batch = b"".join(
                pack({"op": "pub", "topic": topic, "payload": b"%d" % i, "ack": i + 1})
                for i in range(seq, seq + 200)
            )
            seq += 200
            try:
                await client.send(batch)
            except (ConnectionError, ssl.SSLError):
                break
        await asyncio.wait_for(reader, TIMEOUT)
    finally:
        reader.cancel()


async def _subscriber(client: AsyncRaw, got: set[int], closes: list[dict[str, Any]]) -> None:
    while True:
        obj = await client.recv()
        if obj is None:
            return
        if obj["op"] == "msg":
            got.add(int(obj["payload"]) + 1)  # the ack id of that publish
        elif obj["op"] == "close":
            closes.append(obj)
            return


def test_acknowledged_publishes_are_delivered_before_shutdown(broker_factory: Any) -> None:
    broker = broker_factory.start(shutdown_timeout=20)
    pki = broker_factory.pki

    async def scenario() -> tuple[list[set[int]], list[set[int]], list[dict[str, Any]]]:
        acked = [set() for _ in range(PUBLISHERS)]  # type: list[set[int]]
        got = [set() for _ in range(PUBLISHERS)]  # type: list[set[int]]
        closes: list[dict[str, Any]] = []
        stop = asyncio.Event()
        async with contextlib_nested(broker, pki, 2 * PUBLISHERS) as clients:
            subs, pubs = clients[:PUBLISHERS], clients[PUBLISHERS:]
            for i, sub in enumerate(subs):
                await sub.hello()
                await sub.send(pack({"op": "sub", "sid": 1, "pattern": f"core.t{i}"}))
                ok = await asyncio.wait_for(sub.recv(), TIMEOUT)
                assert ok is not None and ok["op"] == "ok", ok
            for pub in pubs:
                await pub.hello()
            tasks = [
                asyncio.create_task(_subscriber(s, got[i], closes)) for i, s in enumerate(subs)
            ]
            tasks += [
                asyncio.create_task(_publisher(p, f"core.t{i}", acked[i], stop))
                for i, p in enumerate(pubs)
            ]
            await asyncio.sleep(FLOOD_SECONDS)
            broker.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        return acked, got, closes

    acked, got, closes = asyncio.run(scenario())
    assert broker.wait() == 0
    total_acked = sum(len(a) for a in acked)
    assert total_acked > 1000, "the flood never got going"
    lost = {i: len(a - g) for i, (a, g) in enumerate(zip(acked, got, strict=True)) if a - g}
    assert not lost, f"acknowledged but never delivered (per publisher): {lost} of {total_acked}"
    assert closes and all(c["code"] == ErrorCode.GOING_AWAY for c in closes)


@asynccontextmanager
async def contextlib_nested(
    broker: BrokerProcess, pki: Any, n: int
) -> AsyncIterator[list[AsyncRaw]]:
    clients: list[AsyncRaw] = []
    managers = [raw(broker, pki, "alice") for _ in range(n)]
    try:
        for m in managers:
            clients.append(await m.__aenter__())
        yield clients
    finally:
        for m in managers[: len(clients)]:
            await m.__aexit__(None, None, None)


# --- 2. replies are bounded --------------------------------------------------------------------


def test_a_client_that_never_reads_its_replies_is_disconnected(broker_factory: Any) -> None:
    broker = broker_factory.start(limits={"max_pending_bytes": 128 * 1024})
    pki = broker_factory.pki
    mark = broker.log_mark()

    async def scenario() -> int:
        async with raw(broker, pki, "mallory", limit=2**16) as client:
            await client.hello()
            # Shrink what the client takes in, then never read again.
            sock = client.writer.get_extra_info("socket")
            sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
            client.writer.transport.pause_reading()
            sent = 0
            batch = b"".join(pack({"op": "unsub", "sid": i}) for i in range(1000))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and sent < 2_000_000:
                try:
                    client.writer.write(batch)
                    await asyncio.wait_for(client.writer.drain(), 2)
                except (TimeoutError, ConnectionError, ssl.SSLError):
                    break
                sent += 1000
                if broker.audit_events(mark) and any(
                    e["event"] == "slow_consumer" for e in broker.audit_events(mark)
                ):
                    break
            return sent

    sent = asyncio.run(scenario())
    record = broker.wait_for_audit("slow_consumer", since=mark, timeout=TIMEOUT)
    assert record["policy"] == "disconnect"
    assert record["pending_bytes"] > 128 * 1024
    assert sent < 2_000_000, "never disconnected"


# --- 3. negotiated heartbeats -------------------------------------------------------------------


def test_negotiated_heartbeat_is_honoured(broker_factory: Any) -> None:
    broker = broker_factory.start(limits={"heartbeat_interval": 30})
    pki = broker_factory.pki

    async def scenario() -> tuple[float, float, dict[str, Any]]:
        async with raw(broker, pki, "alice") as client:
            welcome = await client.hello(heartbeat_ms=1000)
            assert welcome["heartbeat_ms"] == 1000
            start = time.monotonic()
            ping = await asyncio.wait_for(client.recv(), TIMEOUT)
            t_ping = time.monotonic() - start
            assert ping is not None and ping["op"] == "ping", ping
            close = await asyncio.wait_for(client.recv(), TIMEOUT)
            t_close = time.monotonic() - start
            assert close is not None
            return t_ping, t_close, close

    t_ping, t_close, close = asyncio.run(scenario())
    assert close["op"] == "close" and close["code"] == ErrorCode.HEARTBEAT_TIMEOUT
    assert 0.9 <= t_ping <= 1.6, t_ping
    assert 1.9 <= t_close <= 2.8, t_close


# --- 4. answers before a fatal frame --------------------------------------------------------------


@pytest.mark.parametrize(
    "fatal",
    [
        (70 * 1024 * 1024).to_bytes(4, "big"),  # oversize prefix
        frame(b"\xc1garbage"),  # malformed msgpack body
    ],
    ids=["oversize-prefix", "malformed-body"],
)
def test_ok_before_a_fatal_frame_in_the_same_write_is_sent_before_the_close(
    broker_factory: Any, fatal: bytes
) -> None:
    broker = broker_factory.start()
    pki = broker_factory.pki

    async def scenario() -> list[dict[str, Any]]:
        async with raw(broker, pki, "alice") as sub, raw(broker, pki, "alice") as client:
            await sub.hello()
            await sub.send(pack({"op": "sub", "sid": 1, "pattern": "fatal.t"}))
            assert (await sub.recv() or {}).get("op") == "ok"
            await client.hello()
            await client.send(
                pack({"op": "pub", "topic": "fatal.t", "payload": b"x", "ack": 9}) + fatal
            )
            frames = []
            while (obj := await asyncio.wait_for(client.recv(), TIMEOUT)) is not None:
                frames.append(obj)
                if obj["op"] == "close":
                    break
            delivered = await asyncio.wait_for(sub.recv(), TIMEOUT)
            assert delivered is not None and delivered["op"] == "msg"
            return frames

    frames = asyncio.run(scenario())
    assert [f["op"] for f in frames] == ["ok", "close"], frames
    assert frames[0]["ack"] == 9
