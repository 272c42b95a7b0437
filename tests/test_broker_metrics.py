"""``[metrics] bind``: Prometheus metrics scraped from a real broker process under real traffic,
``/healthz`` and ``/readyz``; and ``[log] format = "json"`` (one JSON object per line with the
connection label as fields)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from brokerproc import BrokerProcess, RawClient
from prometheus_client.parser import text_string_to_metric_families

from tessera_mq import client as client_sdk
from tessera_mq.auth.tls import client_context
from tessera_mq.broker.metrics import BrokerCollector

TIMEOUT = 5.0


def start(factory: Any, extra: str, **kwargs: Any) -> BrokerProcess:
    config: Path = factory.config(**kwargs)
    config.write_text(config.read_text(encoding="utf-8") + extra, encoding="utf-8")
    return factory.serve(config)  # type: ignore[no-any-return]


def metrics_address(broker: BrokerProcess) -> tuple[str, int]:
    out = broker.wait_for_stdout(r"^metrics http://")
    m = re.search(r"^metrics http://([\d.]+):(\d+)/metrics$", out, re.MULTILINE)
    assert m, out
    return m[1], int(m[2])


def get(address: tuple[str, int], path: str, method: str = "GET") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection(*address, timeout=TIMEOUT)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read().decode()
    finally:
        conn.close()


def samples(address: tuple[str, int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, ctype, body = get(address, "/metrics")
    assert status == 200 and ctype.startswith("text/plain"), (status, ctype)
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_under_traffic(broker_factory: Any, pki: Any) -> None:
    broker = start(
        broker_factory, '\n[metrics]\nbind = "127.0.0.1:0"\n', limits={"max_connections": 4}
    )
    address = metrics_address(broker)
    before = samples(address)
    assert before[("tessera_connections", ())] == 0
    assert before[("tessera_connections_accepted_total", ())] == 0

    alice = pki.client("alice")
    async with (
        client_sdk.connect(broker.url, timeout=TIMEOUT, **alice) as a,
        client_sdk.connect(broker.url, timeout=TIMEOUT, **alice) as b,
        client_sdk.connect(broker.url, timeout=TIMEOUT, **alice) as c,
    ):
        subs = [await a.subscribe("m.>"), await b.subscribe("m.*"), await b.subscribe("x.>")]
        for i in range(20):
            await c.publish(f"m.{i}", b"payload")
        for sub in subs[:2]:
            for _ in range(20):
                await sub.get(timeout=TIMEOUT)
        # A fourth connection fits; a fifth is refused at accept (max_connections = 4).
        async with client_sdk.connect(broker.url, timeout=TIMEOUT, **alice):
            with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the SDK reports
                async with client_sdk.connect(broker.url, timeout=TIMEOUT, **alice):
                    pass
            during = await asyncio.to_thread(samples, address)
            assert during[("tessera_connections", ())] == 4
        assert during[("tessera_subscriptions", ())] == 3
        assert during[("tessera_connections_accepted_total", ())] == 4
        assert during[("tessera_connections_refused_total", (("reason", "max_connections"),))] == 1
        assert during[("tessera_connections_refused_total", (("reason", "per_identity"),))] == 0
        assert during[("tessera_open_fds", ())] > 0
        assert during[("tessera_resident_memory_bytes", ())] > 1_000_000
        assert ("tessera_event_loop_lag_seconds", ()) in during
        assert ("process_cpu_seconds_total", ()) in during
        # Counters the broker reports once it counts them (tolerated while it does not).
        for name in ("tessera_messages_in_total", "tessera_deliveries_total"):
            if (name, ()) in during:
                expected = 20 if name == "tessera_messages_in_total" else 40
                assert during[(name, ())] >= expected, name

    after = await asyncio.to_thread(samples, address)
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while after[("tessera_connections", ())] != 0:  # closes are processed asynchronously
        assert asyncio.get_running_loop().time() < deadline, after
        await asyncio.sleep(0.05)
        after = await asyncio.to_thread(samples, address)
    assert after[("tessera_subscriptions", ())] == 0
    assert after[("tessera_connections_accepted_total", ())] == 4


def test_health_and_readiness(broker_factory: Any) -> None:
    broker = start(broker_factory, '\n[metrics]\nbind = "127.0.0.1:0"\n')
    address = metrics_address(broker)
    assert get(address, "/healthz")[::2] == (200, "ok\n")
    assert get(address, "/readyz")[::2] == (200, "ready\n")
    assert get(address, "/nope")[0] == 404
    assert get(address, "/metrics", method="POST")[0] == 405
    assert get(address, "/healthz", method="HEAD")[0] == 200


def test_metrics_listener_is_opt_in(broker_factory: Any) -> None:
    broker = broker_factory.start()
    assert not any(line.startswith("metrics ") for line in broker.stdout_lines)


def test_collector_tolerates_missing_and_new_keys() -> None:
    """What the broker will add (per-reason auth failures, per-listener connections, bytes) is
    exported when present; unknown numeric keys become gauges; nothing is required."""
    info: dict[str, Any] = {"connections": 2}
    collector = BrokerCollector(lambda: info)
    names = {f.name for f in collector.collect()}
    assert "tessera_connections" in names and "tessera_messages_in" not in names
    info.update(
        publishes_in=7,
        bytes_out=100,
        auth_failures={"tls_bad_cert": 3, "bad_credentials": 1},
        connections_by_listener={"0.0.0.0:7443": {"x509": 2}},
        loop_lag_seconds=0.002,
        brand_new_gauge=5,
        not_a_number="x",
    )
    got = {
        (s.name, tuple(s.labels.items())): s.value for f in collector.collect() for s in f.samples
    }
    assert got[("tessera_messages_in_total", ())] == 7
    assert got[("tessera_bytes_out_total", ())] == 100
    assert got[("tessera_auth_failures_total", (("reason", "tls_bad_cert"),))] == 3
    by_listener = (("listener", "0.0.0.0:7443"), ("mechanism", "x509"))
    assert got[("tessera_listener_connections", by_listener)] == 2
    assert got[("tessera_event_loop_lag_seconds", ())] == 0.002
    assert got[("tessera_brand_new_gauge", ())] == 5
    assert not any("not_a_number" in name for name, _ in got)


# --- structured logs -----------------------------------------------------------------------------


async def test_json_logs(broker_factory: Any, pki: Any) -> None:
    config: Path = broker_factory.config()
    text = config.read_text(encoding="utf-8").replace("[log]\n", '[log]\nformat = "json"\n')
    config.write_text(text, encoding="utf-8")
    broker = broker_factory.serve(config)
    async with client_sdk.connect(broker.url, timeout=TIMEOUT, **pki.client("alice")) as client:
        await client.publish("a.b", b"secret payload")
    broker.wait_for_log(r'"session open')
    records = [json.loads(line) for line in broker.log_lines()]  # every line is one object
    assert all({"ts", "level", "logger"} <= r.keys() for r in records)
    (opened,) = [r for r in records if r.get("message", "").startswith("session open")]
    assert opened["identity"] == "x509:alice" and opened["peer"].startswith("127.0.0.1:")
    assert isinstance(opened["conn"], int) and opened["level"] == "info"
    audits = [r["audit"] for r in records if r["logger"] == "tessera.audit"]
    assert any(a["event"] == "auth_success" and a["identity"] == "x509:alice" for a in audits)
    assert "secret payload" not in broker.log()


async def test_slow_consumer_disconnects_are_counted(broker_factory: Any, pki: Any) -> None:
    broker = start(
        broker_factory,
        '\n[metrics]\nbind = "127.0.0.1:0"\n',
        limits={"max_pending_bytes": 128 * 1024},
    )
    address = metrics_address(broker)
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
        raw.send(op="sub", sid=1, pattern="slow.>")
        raw.recv_until("ok")
        return raw  # and now it stops reading

    raw = await asyncio.to_thread(subscribe_and_stall)
    with raw:
        async with client_sdk.connect(broker.url, timeout=TIMEOUT, **pki.client("alice")) as alice:
            for sent in range(2048):
                await alice.publish("slow.data", b"x" * 16 * 1024)
                if sent % 16 == 0 and any(
                    e["event"] == "slow_consumer" for e in broker.audit_events(mark)
                ):
                    break
            else:
                pytest.fail("the stalled subscriber was never disconnected")
            got = await asyncio.to_thread(samples, address)
    assert got[("tessera_slow_consumer_disconnects_total", ())] == 1
    assert got[("tessera_slow_consumer_dropped_total", ())] == 0
    assert got[("tessera_connections_accepted_total", ())] == 2


def test_the_metrics_listener_bounds_bad_requests(broker_factory: Any) -> None:
    """A request head without an end, or larger than 8 KiB, is dropped without an answer; the
    listener keeps serving."""
    broker = start(broker_factory, '\n[metrics]\nbind = "127.0.0.1:0"\n')
    address = metrics_address(broker)
    with socket.create_connection(address, timeout=TIMEOUT) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 16_384)
        # closed, nothing sent (a reset if unread bytes were left: nothing sent either)
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(1024) == b""
    with socket.create_connection(address, timeout=TIMEOUT) as s:
        s.sendall(b"NOT HTTP\r\n\r\n")
        assert s.recv(1024).startswith(b"HTTP/1.1 400 ")
    assert get(address, "/healthz")[0] == 200
    assert broker.unexpected_log_lines() == []
