"""The socket driver of TLS-only listeners (``broker/session.py`` ``SocketSession``: an
``ssl.SSLSocket`` on the connection's own socket) against a real broker process: what a peer
does at the TLS level after the handshake, and a subscriber that stops reading while the
broker writes to it (the socket is full, OpenSSL must be offered the same bytes again)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import ssl
from typing import Any

import pytest
from brokerproc import BrokerProcess, RawClient, pack
from timing import scaled

from tessera_mq import client as client_sdk
from tessera_mq.auth.tls import client_context

TIMEOUT = scaled(10.0)
HELLO = pack({"op": "hello", "version": 1, "client": "raw"})


@pytest.fixture(scope="module")
def broker(module_broker_factory: Any) -> BrokerProcess:
    return module_broker_factory.start()


def raw_client(broker: BrokerProcess, pki: Any, name: str, **kw: Any) -> RawClient:
    cred = pki.clients[name]
    return RawClient(broker.host, broker.port, client_context(pki.ca, cred.cert, cred.key), **kw)


async def round_trip(broker: BrokerProcess, pki: Any) -> None:
    """The broker still serves: bob receives what alice publishes."""
    async with (
        client_sdk.connect(broker.url, **pki.client("alice"), timeout=TIMEOUT) as alice,
        client_sdk.connect(broker.url, **pki.client("bob"), timeout=TIMEOUT) as bob,
    ):
        sub = await bob.subscribe("still.here")
        await alice.publish("still.here", b"yes")
        assert (await sub.get(timeout=TIMEOUT)).payload == b"yes"


async def test_a_broken_record_after_the_handshake_drops_only_that_connection(
    broker: BrokerProcess, pki: Any
) -> None:
    mark = broker.log_mark()

    def forge() -> list[dict[str, Any]]:
        with raw_client(broker, pki, "mallory") as raw:
            raw.send_raw(HELLO)
            assert (raw.recv() or {}).get("op") == "welcome"
            # an application-data record whose contents do not authenticate, written below TLS
            socket.socket.sendall(raw.sock, b"\x17\x03\x03\x00\x20" + bytes(32))
            with contextlib.suppress(ssl.SSLError, OSError):
                return list(raw.frames())
            return []

    frames = await asyncio.to_thread(forge)
    assert not [f for f in frames if f.get("op") == "msg"]
    record = broker.wait_for_audit("auth_failure", since=mark, reason="tls_protocol")
    closed = broker.wait_for_audit("close", since=mark, conn=record["conn"])
    assert closed["code"] == "auth_failure"
    await round_trip(broker, pki)


async def test_close_notify_from_the_client_ends_its_session(
    broker: BrokerProcess, pki: Any
) -> None:
    mark = broker.log_mark()

    def say_goodbye() -> None:
        with raw_client(broker, pki, "carol") as raw:
            raw.send_raw(HELLO + pack({"op": "sub", "sid": 1, "pattern": "bye.>"}))
            assert (raw.recv() or {}).get("op") == "welcome"
            assert raw.recv() == {"op": "ok", "sid": 1}
            with contextlib.suppress(ssl.SSLError, OSError):
                raw.sock.unwrap()  # close_notify; the broker closes its end in turn

    await asyncio.to_thread(say_goodbye)
    opened = broker.wait_for_audit("auth_success", since=mark, identity="x509:carol")
    broker.wait_for_audit("close", since=mark, conn=opened["conn"])
    await round_trip(broker, pki)


async def test_a_subscriber_that_stops_reading_gets_everything_in_order_once_it_reads(
    broker: BrokerProcess, pki: Any
) -> None:
    """6 MiB queued for a subscriber whose receive window is 4 KiB: the broker's socket fills
    up, the rest waits in the broker, and all of it arrives in order once the client reads."""
    count, size = 768, 8192
    raw = raw_client(broker, pki, "bob", recv_buffer_bytes=4096, timeout=TIMEOUT)
    try:
        raw.send_raw(HELLO + pack({"op": "sub", "sid": 1, "pattern": "full.pipe"}))
        assert (raw.recv() or {}).get("op") == "welcome"
        assert raw.recv() == {"op": "ok", "sid": 1}
        async with client_sdk.connect(broker.url, **pki.client("alice"), timeout=TIMEOUT) as pub:
            for i in range(count):
                await pub.publish("full.pipe", i.to_bytes(4, "big") * (size // 4))

        def drain() -> list[int]:
            got = []
            for _ in range(count):
                msg = raw.recv() or {}
                assert msg.get("op") == "msg", msg
                payload = msg["payload"]
                assert len(payload) == size
                got.append(int.from_bytes(payload[:4], "big"))
            return got

        assert await asyncio.to_thread(drain) == list(range(count))
    finally:
        raw.close()
    await round_trip(broker, pki)


@pytest.mark.parametrize("driver", ["socket", "transport"])
async def test_both_tls_drivers_serve_and_say_which_one_runs(
    broker_factory: Any, pki: Any, driver: str
) -> None:
    """``TESSERA_TLS_DRIVER=transport`` is the operator's way back to the asyncio-transport
    driver for ``tls`` listeners (docs/operations.md); the stats say which one runs."""
    from tessera_mq.broker import admin  # noqa: PLC0415

    config = broker_factory.config()
    env = {"TESSERA_TLS_DRIVER": "transport"} if driver == "transport" else {}
    proc = broker_factory.track(
        BrokerProcess(["serve", "--config", str(config)], workdir=config.parent, env=env)
    ).start()
    await round_trip(proc, pki)
    answer = await asyncio.to_thread(
        admin.request, proc.workdir / "tessera-admin.sock", "stats", timeout=TIMEOUT
    )
    assert answer["stats"]["tls_driver"] == driver


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_out_of_descriptors_the_listener_pauses_instead_of_spinning_and_recovers(
    broker_factory: Any, pki: Any
) -> None:
    """``accept`` failing with EMFILE leaves the connection in the kernel's queue, so the
    listening socket stays readable: a driver that only logs would spin at 100% CPU. The
    socket driver stops accepting for 1 s at a time, logs it, and serves again once
    descriptors are free."""
    proc = broker_factory.start(limits={"handshake_timeout": 30.0})
    pid = proc.pid
    open_fds = len(os.listdir(f"/proc/{pid}/fd"))
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds + 8, hard))
    mark = proc.log_mark()
    clients = []
    try:
        for _ in range(24):  # more than the broker can take: the rest wait in the backlog
            clients.append(socket.create_connection((proc.host, proc.port), timeout=TIMEOUT))
        proc.wait_for_log(
            r"accept failed on .*Too many open files; not accepting for 1 s", since=mark
        )
        before = _cpu_seconds(pid)
        await asyncio.sleep(2.0)
        spent = _cpu_seconds(pid) - before
        assert spent < 1.0, f"the broker used {spent:.2f} s of CPU in 2 s while out of descriptors"
        assert proc.running
    finally:
        for c in clients:
            c.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    await round_trip(proc, pki)  # accepting again (within the 1 s retry)
