"""Broker processes sharing one topic space through a REAL redis-server (docs/scaling.md).

Two broker nodes on different ports with a publisher on one and subscribers on the other
(wildcards, ACL); ``--workers 2`` on one port (SO_REUSEPORT) with a supervisor that forwards
SIGTERM and restarts a killed worker; Redis killed and restarted mid-stream: local delivery goes
on, remote delivery stops for the outage and resumes after it, in order and without duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from brokerproc import BrokerProcess
from redisproc import RedisProcess
from timing import scaled

from tessera_mq import client as client_sdk
from tessera_mq.client import PermissionDenied

TIMEOUT = scaled(5.0)

ACL = """\
[[allow]]
principals = ["x509:alice"]
publish = [">"]
subscribe = [">"]

[[allow]]
principals = ["x509:bob"]
subscribe = ["public.>"]

[[allow]]
principals = ["x509:mallory"]
subscribe = [">"]
"""


def cluster_config(factory: Any, redis: RedisProcess, acl: str = ACL, **kwargs: Any) -> Path:
    path: Path = factory.config(acl=acl, **kwargs)
    with path.open("a", encoding="utf-8") as f:
        f.write(f'\n[cluster]\nredis = "{redis.url}"\n')
    return path


def connect(url: str, pki: Any, name: str, **kwargs: Any) -> Any:
    return client_sdk.connect(url, **pki.client(name), timeout=TIMEOUT, **kwargs)


async def wait_subscribed(redis: RedisProcess, channel: str, count: int) -> None:
    """Until ``count`` connections are SUBSCRIBEd to ``channel`` (interest reached Redis)."""
    r = aioredis.Redis.from_url(redis.url)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            ((_, n),) = await r.pubsub_numsub(channel)
            if n >= count:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{channel}: {n} subscriber(s), wanted {count}")
            await asyncio.sleep(0.02)
    finally:
        await r.aclose()


async def wait_globbed(redis: RedisProcess, count: int) -> None:
    r = aioredis.Redis.from_url(redis.url)
    try:
        deadline = time.monotonic() + TIMEOUT
        while await r.pubsub_numpat() < count:
            if time.monotonic() > deadline:
                raise AssertionError("no PSUBSCRIBE reached redis")
            await asyncio.sleep(0.02)
    finally:
        await r.aclose()


async def drain(sub: client_sdk.Subscription, n: int) -> list[client_sdk.Delivery]:
    return [await sub.get(timeout=TIMEOUT) for _ in range(n)]


async def assert_nothing_more(sub: client_sdk.Subscription) -> None:
    with pytest.raises(TimeoutError):
        await sub.get(timeout=0.3)


async def test_publisher_on_one_node_reaches_wildcard_subscribers_on_another_once_in_order(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a = broker_factory.serve(cluster_config(broker_factory, redis_server))
    b = broker_factory.serve(cluster_config(broker_factory, redis_server))
    assert a.port != b.port
    async with (
        connect(a.url, pki, "alice") as pub,
        connect(b.url, pki, "alice") as sub_b,
        connect(a.url, pki, "alice") as sub_a,
    ):
        all_b = await sub_b.subscribe("status.>")
        temp_b = await sub_b.subscribe("status.*.temp")
        local = await sub_a.subscribe("status.>")
        await wait_subscribed(redis_server, "tessera:status", 2)  # both nodes
        n = 200
        for i in range(n):
            topic = "status.eu.temp" if i % 2 == 0 else "status.us.load"
            await pub.publish(topic, str(i).encode(), headers={"i": str(i)})
        got = await drain(all_b, n)
        assert [int(m.payload) for m in got] == list(range(n))
        assert [m.headers for m in got[:2]] == [{"i": "0"}, {"i": "1"}]
        temps = await drain(temp_b, n // 2)
        assert [int(m.payload) for m in temps] == list(range(0, n, 2))
        assert [int(m.payload) for m in await drain(local, n)] == list(range(n))
        # exactly once: nothing after the last one, on either node
        for s in (all_b, temp_b, local):
            await assert_nothing_more(s)
        # a wildcard first token: the node switches to one glob and still gets each once
        wild = await sub_b.subscribe("*.eu.temp")
        await wait_globbed(redis_server, 1)
        await pub.publish("status.eu.temp", b"last")
        assert (await wild.get(timeout=TIMEOUT)).payload == b"last"
        assert (await all_b.get(timeout=TIMEOUT)).payload == b"last"
        await assert_nothing_more(all_b)
        await assert_nothing_more(wild)


async def test_the_acl_of_the_receiving_node_applies_to_remote_publications(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a = broker_factory.serve(cluster_config(broker_factory, redis_server))
    b = broker_factory.serve(cluster_config(broker_factory, redis_server))
    async with (
        connect(a.url, pki, "alice") as alice,
        connect(a.url, pki, "mallory") as mallory,
        connect(b.url, pki, "bob") as bob,
        connect(b.url, pki, "alice") as watcher,
    ):
        with pytest.raises(PermissionDenied):
            await bob.subscribe("private.>")
        public = await bob.subscribe("public.>")
        everything = await watcher.subscribe(">")
        await wait_globbed(redis_server, 1)  # ">" on B: one glob replaces its channels
        with pytest.raises(PermissionDenied):
            await mallory.publish("public.news", b"forged")  # denied on A: crosses nowhere
        await alice.publish("private.diary", b"secret")
        await alice.publish("public.news", b"hello")
        assert (await public.get(timeout=TIMEOUT)).payload == b"hello"
        await assert_nothing_more(public)
        seen = [(m.topic, m.payload) for m in await drain(everything, 2)]
        assert seen == [("private.diary", b"secret"), ("public.news", b"hello")]
        await assert_nothing_more(everything)


def test_workers_need_a_cluster_section(broker_factory: Any) -> None:
    cfg = broker_factory.config()
    proc = BrokerProcess(["serve", "--config", str(cfg), "--workers", "2"], workdir=cfg.parent)
    with pytest.raises(Exception, match="exited with 2 before listening"):
        proc.start()
    assert "--workers 2 needs [cluster] redis" in proc.log()
    proc = BrokerProcess(["serve", "--config", str(cfg), "--workers", "many"], workdir=cfg.parent)
    with pytest.raises(Exception, match="exited with 2 before listening"):
        proc.start()
    assert "--workers must be a number or 'auto'" in proc.log()


def _worker_pids(proc: BrokerProcess) -> list[int]:
    (line,) = proc.wait_for_log(r"2 workers listening \(pids")
    m = re.search(r"pids (\d+), (\d+)", line)
    assert m
    return [int(m[1]), int(m[2])]


async def test_two_workers_share_one_port_and_one_topic_space(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    cfg = cluster_config(broker_factory, redis_server)
    proc = broker_factory.track(
        BrokerProcess(["serve", "--config", str(cfg), "--workers", "2"], workdir=cfg.parent)
    ).start()
    assert len(proc.addresses) == 1  # the supervisor prints each listener once
    pids = _worker_pids(proc)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(connect(proc.url, pki, "alice")) for _ in range(12)
        ]
        subs = [await c.subscribe("w.>") for c in clients]
        # the kernel spread the connections over both workers (2**-11 odds otherwise)
        opened = proc.wait_for_log(r"session open", count=12)
        assert any("[worker 0]" in line for line in opened)
        assert any("[worker 1]" in line for line in opened)
        await wait_subscribed(redis_server, "tessera:w", 2)
        await clients[0].publish("w.x", b"to all")
        for s in subs:
            assert (await s.get(timeout=TIMEOUT)).payload == b"to all"
        for s in subs:
            await assert_nothing_more(s)

    # A worker dies: the supervisor reports it and starts another on the same port.
    mark = proc.log_mark()
    os.kill(pids[1], signal.SIGKILL)
    proc.wait_for_log(r"worker 1 \(pid \d+\) exited with -9; restarting it", since=mark)
    proc.wait_for_log(r"\[worker 1\] .*listening on", since=mark, timeout=20)
    for _ in range(6):  # whichever worker the kernel picks, it serves
        async with connect(proc.url, pki, "alice") as c:
            s = await c.subscribe("again.x")
            await c.publish("again.x", b"ok")
            assert (await s.get(timeout=TIMEOUT)).payload == b"ok"

    # SIGTERM forwarded, both workers stopped cleanly (each may take its shutdown_timeout)
    assert proc.stop(timeout=scaled(40.0)) == 0
    for pid in pids[:1]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert len(proc.wait_for_log(r"\[worker \d\] .*stopped", count=2)) >= 2


async def test_redis_killed_and_restarted_mid_stream(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a = broker_factory.serve(cluster_config(broker_factory, redis_server))
    b = broker_factory.serve(cluster_config(broker_factory, redis_server))
    async with (
        connect(a.url, pki, "alice") as pub,
        connect(a.url, pki, "alice") as local_c,
        connect(b.url, pki, "alice") as remote_c,
    ):
        local = await local_c.subscribe("m.>")
        remote = await remote_c.subscribe("m.>")
        await wait_subscribed(redis_server, "tessera:m", 2)
        i = 0

        async def publish(k: int) -> None:
            nonlocal i
            for _ in range(k):
                await pub.publish("m.x", str(i).encode())
                i += 1

        await publish(50)
        assert [int(m.payload) for m in await drain(remote, 50)] == list(range(50))

        mark_a, mark_b = a.log_mark(), b.log_mark()
        redis_server.kill()
        a.wait_for_log(r"redis backplane lost", since=mark_a)
        b.wait_for_log(r"redis backplane lost", since=mark_b)
        await publish(50)  # accepted and delivered locally during the outage
        redis_server.start()
        a.wait_for_log(r"redis backplane reconnected", since=mark_a, timeout=15)
        b.wait_for_log(r"redis backplane reconnected", since=mark_b, timeout=15)
        await wait_subscribed(redis_server, "tessera:m", 2)
        await publish(50)

        assert [int(m.payload) for m in await drain(local, 150)] == list(range(150))
        after = [int(m.payload) for m in await drain(remote, 50)]
        assert after == list(range(100, 150))  # the outage's 50 did not cross; nothing doubled
        await assert_nothing_more(remote)
        # logged once per outage, not once per reconnect attempt
        assert len(a.wait_for_log(r"redis backplane lost", since=mark_a)) == 1
        (line,) = a.wait_for_log(r"redis backplane reconnected", since=mark_a)
        assert re.search(r"(\d+) publication\(s\) were not sent", line)
        assert int(re.search(r"(\d+) publication\(s\)", line)[1]) >= 50  # type: ignore[index]


def _scrape(address: tuple[str, int]) -> dict[str, float]:
    import http.client  # noqa: PLC0415

    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    conn = http.client.HTTPConnection(*address, timeout=TIMEOUT)
    try:
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name.startswith("tessera_backplane_")
    }


async def test_backplane_state_is_exported_to_prometheus(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    cfg = cluster_config(broker_factory, redis_server)
    cfg.write_text(cfg.read_text() + '\n[metrics]\nbind = "127.0.0.1:0"\n')
    a = broker_factory.serve(cfg)
    m = re.search(r"^metrics http://([\d.]+):(\d+)/metrics$", a.wait_for_stdout("^metrics"), re.M)
    assert m
    address = (m[1], int(m[2]))
    async with connect(a.url, pki, "alice") as pub:
        await pub.publish("p.x", b"1")
        await pub.publish("p.x", b"2")
        deadline = time.monotonic() + TIMEOUT
        while _scrape(address).get("tessera_backplane_published_total", 0) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        before = _scrape(address)
        assert before["tessera_backplane_connected"] == 1
        assert before["tessera_backplane_outages_total"] == 0
        assert before["tessera_backplane_queue_max"] == 10_000
        mark = a.log_mark()
        redis_server.kill()
        a.wait_for_log(r"redis backplane lost", since=mark)
        await pub.publish("p.x", b"3")  # local only: refused by the backplane
        during = _scrape(address)
        assert during["tessera_backplane_connected"] == 0
        assert during["tessera_backplane_outages_total"] == 1
        assert during["tessera_backplane_refused_disconnected_total"] >= 1
        assert during["tessera_backplane_outage_seconds"] > 0
        redis_server.start()
        a.wait_for_log(r"redis backplane reconnected", since=mark, timeout=15)
        assert _scrape(address)["tessera_backplane_connected"] == 1


async def test_each_worker_serves_its_own_metrics(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    """``[metrics] bind`` with ``--workers 2``: one listener per worker (port + index, or a free
    port each with port 0), announced by the supervisor with the worker's tag."""
    cfg = cluster_config(broker_factory, redis_server)
    cfg.write_text(cfg.read_text() + '\n[metrics]\nbind = "127.0.0.1:0"\n')
    proc = broker_factory.track(
        BrokerProcess(["serve", "--config", str(cfg), "--workers", "2"], workdir=cfg.parent)
    ).start()
    out = proc.wait_for_stdout(r"^\[worker 1\] metrics http://")
    out = proc.wait_for_stdout(r"^\[worker 0\] metrics http://")
    found = re.findall(r"^\[worker (\d)\] metrics http://([\d.]+):(\d+)/metrics$", out, re.M)
    assert sorted(w for w, _, _ in found) == ["0", "1"]
    ports = {int(p) for _, _, p in found}
    assert len(ports) == 2
    for _, host, port in found:
        assert _scrape((host, int(port)))["tessera_backplane_connected"] == 1


def test_start_fails_clearly_without_redis(broker_factory: Any, redis_server: RedisProcess) -> None:
    cfg = cluster_config(broker_factory, redis_server)
    redis_server.kill()
    proc = BrokerProcess(["serve", "--config", str(cfg)], workdir=cfg.parent)
    with pytest.raises(Exception, match="exited with 1 before listening"):
        proc.start()
    assert "cannot reach redis at redis://127.0.0.1" in proc.log()


def test_workers_that_cannot_start_stop_the_supervisor_with_code_1(
    broker_factory: Any, redis_server: RedisProcess
) -> None:
    cfg = cluster_config(broker_factory, redis_server)
    redis_server.kill()
    proc = BrokerProcess(["serve", "--config", str(cfg), "--workers", "2"], workdir=cfg.parent)
    with pytest.raises(Exception, match="exited with 1 before listening"):
        proc.start()
    log = proc.log()
    assert "cannot reach redis at redis://127.0.0.1" in log
    assert re.search(r"worker \d exited with 1 before listening; stopping the others", log)


async def test_a_worker_restarted_during_a_redis_outage_starts_and_reconnects(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    """An outage plus a crashed worker must not become a crash loop: the replacement serves
    locally at once and joins the topic space when Redis is back."""
    cfg = cluster_config(broker_factory, redis_server)
    proc = broker_factory.track(
        BrokerProcess(["serve", "--config", str(cfg), "--workers", "2"], workdir=cfg.parent)
    ).start()
    pids = _worker_pids(proc)
    mark = proc.log_mark()
    redis_server.kill()
    proc.wait_for_log(r"redis backplane lost", since=mark, count=2)
    os.kill(pids[0], signal.SIGKILL)
    proc.wait_for_log(r"worker 0 \(pid \d+\) exited with -9; restarting it", since=mark)
    proc.wait_for_log(r"\[worker 0\] .*listening on", since=mark, timeout=20)
    proc.wait_for_log(r"\[worker 0\] .*redis backplane lost", since=mark)
    redis_server.start()
    proc.wait_for_log(r"\[worker 0\] .*redis backplane reconnected", since=mark, timeout=15)
    proc.wait_for_log(r"\[worker 1\] .*redis backplane reconnected", since=mark, timeout=15)
    assert proc.running
    async with connect(proc.url, pki, "alice") as c:
        s = await c.subscribe("after.x")
        await c.publish("after.x", b"ok")
        assert (await s.get(timeout=TIMEOUT)).payload == b"ok"
