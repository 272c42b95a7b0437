"""The ``drop`` slow-consumer policy against a real broker: a stalled subscriber loses counted
deliveries and is told how many, stays connected, and nobody else loses anything."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from brokerproc import BrokerProcess, RawClient
from timing import scaled

from tessera_mq import client as client_sdk
from tessera_mq.auth.tls import client_context
from tessera_mq.client import ErrorCode

TIMEOUT = scaled(5.0)
MAX_PENDING_BYTES = 128 * 1024


@pytest.fixture(scope="module")
def broker(module_broker_factory: Any) -> BrokerProcess:
    return module_broker_factory.start(
        limits={"max_pending_bytes": MAX_PENDING_BYTES, "slow_consumer": "drop"}
    )


def _connect(broker: BrokerProcess, pki: Any, name: str) -> client_sdk.connect:
    return client_sdk.connect(broker.url, **pki.client(name), timeout=TIMEOUT)


async def test_drop_policy_counts_and_reports_and_keeps_the_connection(
    broker: BrokerProcess, pki: Any
) -> None:
    payload_size = 16 * 1024
    mark = broker.log_mark()
    cred = pki.clients["mallory"]

    def subscribe_and_stall() -> RawClient:
        raw = RawClient(
            broker.host,
            broker.port,
            client_context(pki.ca, cred.cert, cred.key),
            recv_buffer_bytes=4096,
            timeout=TIMEOUT,
        )
        raw.hello()
        raw.send(op="sub", sid=1, pattern="drop.>")
        raw.recv_until("ok")
        return raw  # and now it stops reading

    raw = await asyncio.to_thread(subscribe_and_stall)
    with raw:
        async with _connect(broker, pki, "alice") as alice, _connect(broker, pki, "bob") as bob:
            sub = await bob.subscribe("drop.>", max_pending=100_000)
            sent = 0
            record = None
            limit = (32 * 1024 * 1024) // payload_size
            while sent < limit and record is None:
                await alice.publish("drop.data", b"%08d" % sent + b"x" * (payload_size - 8))
                sent += 1
                if sent % 16 == 0:
                    record = next(
                        (
                            e
                            for e in broker.audit_events(mark)
                            if e["event"] == "slow_consumer" and e.get("identity") == "x509:mallory"
                        ),
                        None,
                    )
            assert record is not None, f"no slow_consumer record after {sent} messages"
            assert record["policy"] == "drop"
            for _ in range(20):  # these are dropped for mallory too
                await alice.publish("drop.data", b"%08d" % sent)
                sent += 1
            got = [int((await sub.get(timeout=TIMEOUT)).payload[:8]) for _ in range(sent)]
            assert got == list(range(sent))  # zero loss for the subscriber that keeps up

        # The stalled client reads again: the backlog, then the count of what it missed.
        def drain() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            return raw.recv_until("error")

        notice, delivered = await asyncio.to_thread(drain)
        assert notice["code"] == ErrorCode.SLOW_CONSUMER
        assert all(f["op"] == "msg" for f in delivered)
        assert notice["dropped"] > 0
        assert len(delivered) + notice["dropped"] == sent  # every delivery is accounted for
        # ... and the connection is still usable.
        raw.send(op="ping")
        pong, _ = await asyncio.to_thread(raw.recv_until, "pong")
        assert pong["op"] == "pong"
