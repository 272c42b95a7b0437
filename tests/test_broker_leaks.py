"""No file-descriptor, task, connection or subscription leaks across connect/disconnect cycles
(a CI-sized version; bench/soak.py runs the 100k-cycle version)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from brokerproc import BrokerProcess
from timing import scaled

from tessera_mq import client as client_sdk
from tessera_mq.auth.tls import client_context
from tessera_mq.broker import admin

TIMEOUT = scaled(10.0)


@pytest.fixture(scope="module")
def broker(module_broker_factory: Any) -> BrokerProcess:
    return module_broker_factory.start(limits={"handshake_timeout": 1.0})


async def _stats(broker: BrokerProcess) -> dict[str, Any]:
    """The broker's own counters, from its admin socket (``tessera-broker stats``)."""
    socket_path = broker.workdir / "tessera-admin.sock"
    answer = await asyncio.to_thread(admin.request, socket_path, "stats", timeout=TIMEOUT)
    assert answer.get("ok") is True, answer
    stats = answer["stats"]
    assert isinstance(stats, dict)
    return stats


async def _settle(broker: BrokerProcess, baseline: dict[str, Any]) -> dict[str, Any]:
    """Stats once the broker has finished tearing down what the clients left."""
    for _ in range(50):
        stats = await _stats(broker)
        if stats["connections"] == 0 and stats["open_fds"] <= baseline["open_fds"]:
            return stats
        await asyncio.sleep(0.1)
    return stats


async def test_connect_disconnect_cycles_leak_nothing(broker: BrokerProcess, pki: Any) -> None:
    baseline = await _stats(broker)
    assert baseline["connections"] == 0
    creds = pki.client("alice")

    # Clean sessions with subscriptions, several at a time.
    async def cycle(i: int) -> None:
        async with client_sdk.connect(broker.url, **creds, timeout=TIMEOUT) as c:
            await c.subscribe(f"leak.{i}.>")
            await c.subscribe("leak.*")
            await c.publish(f"leak.{i}.x", b"x")

    for start in range(0, 300, 10):
        await asyncio.gather(*(cycle(i) for i in range(start, start + 10)))

    # Abrupt endings: TCP only, TLS handshake abandoned half-way, session reset without close.
    def rude() -> None:
        ctx = client_context(pki.ca, pki.clients["alice"].cert, pki.clients["alice"].key)
        for i in range(60):
            sock = socket.create_connection((broker.host, broker.port), timeout=TIMEOUT)
            if i % 3 == 1:
                sock.sendall(b"\x16\x03\x01\x00\xff")  # a TLS record header, then nothing
            elif i % 3 == 2:
                tls = ctx.wrap_socket(sock, server_hostname="localhost")
                sock = tls
            linger_rst = b"\x01\x00\x00\x00\x00\x00\x00\x00"
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_rst)
            sock.close()  # RST

    await asyncio.to_thread(rude)
    after = await _settle(broker, baseline)
    print(f"\nbefore {baseline}\nafter  {after}")
    assert after["connections"] == 0
    assert after["subscriptions"] == 0
    assert after["tasks"] == baseline["tasks"]
    assert after["open_fds"] <= baseline["open_fds"]
