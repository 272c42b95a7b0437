"""Retained values shared by broker nodes through a REAL redis-server (issue #11,
broker/store_redis.py): a value retained on one node is the snapshot of a late subscriber on the
other, marked retained; it outlives a restart of both brokers; an empty publish clears it on
every node; the limits are the cluster's, not one node's; ``--workers 2`` share them too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from brokerproc import BrokerProcess
from redisproc import RedisProcess
from test_cluster_brokers import ACL, cluster_config, connect, wait_subscribed
from timing import scaled

from tessera_mq import client as client_sdk
from tessera_mq.client import BrokerError
from tessera_mq.client.protocol.errors import ErrorCode

TIMEOUT = scaled(5.0)


async def snapshot(client: Any, pattern: str, want: int | None = None) -> list[Any]:
    """The retained snapshot a new subscription to ``pattern`` receives; with ``want``, retried
    (a new subscription each time) until it holds that many values: another node's change
    reaches this node's mirror a moment after the writer's ``ok``."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        sub = await client.subscribe(pattern)
        got = []
        try:
            while True:
                got.append(await sub.get(timeout=scaled(0.3)))
        except TimeoutError:
            pass
        await sub.unsubscribe()
        if want is None or len(got) == want or time.monotonic() > deadline:
            return got


def with_messaging(path: Path, text: str, data_dir: Path | None = None) -> Path:
    body = path.read_text(encoding="utf-8")
    if data_dir is not None:
        body = f"data_dir = {json.dumps(str(data_dir))}\n" + body
    path.write_text(body + "\n[messaging]\n" + text + "\n", encoding="utf-8")
    return path


async def test_a_value_retained_on_one_node_is_the_snapshot_on_another_and_survives_restarts(
    broker_factory: Any, redis_server: RedisProcess, pki: Any, tmp_path: Path
) -> None:
    cfg_a = cluster_config(broker_factory, redis_server)
    # data_dir set on B: with [cluster] it is not where retained values are kept
    cfg_b = with_messaging(cluster_config(broker_factory, redis_server), "", tmp_path / "b")
    a = broker_factory.serve(cfg_a)
    b = broker_factory.serve(cfg_b)
    async with connect(a.url, pki, "alice") as pub, connect(b.url, pki, "alice") as late:
        assert "retain" in (pub.welcome.features or ())
        assert "retain" in (late.welcome.features or ())
        await pub.publish("status.d1.temp", b"21", retain=True, headers={"unit": "C"})
        await pub.publish("status.d2.temp", b"19", retain=True)
        await pub.publish("status.d3.temp", b"transient")  # not retained
        got = await snapshot(late, "status.*.temp", want=2)
        assert {(m.topic, m.payload, m.retained) for m in got} == {
            ("status.d1.temp", b"21", True),
            ("status.d2.temp", b"19", True),
        }
        assert next(m.headers for m in got if m.topic == "status.d1.temp") == {"unit": "C"}
        # live after the snapshot, from the other node: not marked retained
        live_sub = await late.subscribe("status.d1.temp")
        assert [(m.payload, m.retained) for m in await drain(live_sub)] == [(b"21", True)]
        await wait_subscribed(redis_server, "tessera:status", 1)  # B's interest reached Redis
        await pub.publish("status.d1.temp", b"22", retain=True)
        live = await live_sub.get(timeout=TIMEOUT)
        assert (live.payload, live.retained) == (b"22", False)
    assert not (tmp_path / "b" / "tessera.sqlite3").exists()
    assert a.stop() == 0
    assert b.stop() == 0
    b = broker_factory.serve(cfg_b)
    async with connect(b.url, pki, "alice") as late:
        got = await snapshot(late, "status.>")
        assert {(m.topic, m.payload) for m in got} == {
            ("status.d1.temp", b"22"),
            ("status.d2.temp", b"19"),
        }
        # an empty retained publish on B clears it on A (restarted) too
        await late.publish("status.d1.temp", b"", retain=True)
    a = broker_factory.serve(cfg_a)
    async with connect(a.url, pki, "alice") as other:
        got = await snapshot(other, "status.>", want=1)
        assert [(m.topic, m.payload) for m in got] == [("status.d2.temp", b"19")]
    r = aioredis.Redis.from_url(redis_server.url)
    try:
        assert set(await r.hkeys("tessera:retained")) == {b"status.d2.temp"}
    finally:
        await r.aclose()


async def drain(sub: client_sdk.Subscription) -> list[Any]:
    out = []
    try:
        while True:
            out.append(await sub.get(timeout=scaled(0.3)))
    except TimeoutError:
        return out


async def test_retained_limits_are_the_clusters(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    limits = "retain_max_topics = 2\nretain_max_value_bytes = 8"
    a = broker_factory.serve(with_messaging(cluster_config(broker_factory, redis_server), limits))
    b = broker_factory.serve(with_messaging(cluster_config(broker_factory, redis_server), limits))
    async with connect(a.url, pki, "alice") as on_a, connect(b.url, pki, "alice") as on_b:
        with pytest.raises(BrokerError) as info:
            await on_a.publish("status.a", b"123456789", retain=True)
        assert info.value.code == ErrorCode.RETAINED_TOO_LARGE
        await on_a.publish("status.a", b"1", retain=True)
        await on_b.publish("status.b", b"1", retain=True)
        with pytest.raises(BrokerError) as info:  # two topics in the cluster, one per node
            await on_b.publish("status.c", b"1", retain=True)
        assert info.value.code == ErrorCode.RETAINED_LIMIT
        await on_b.publish("status.c", b"plain, not retained")  # still fine


async def test_retained_snapshots_obey_the_acl_of_the_receiving_node(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a = broker_factory.serve(cluster_config(broker_factory, redis_server, acl=ACL))
    b = broker_factory.serve(cluster_config(broker_factory, redis_server, acl=ACL))
    async with connect(a.url, pki, "alice") as alice, connect(b.url, pki, "bob") as bob:
        await alice.publish("public.news", b"hello", retain=True)
        await alice.publish("private.key", b"secret", retain=True)
        got = await snapshot(bob, "public.>", want=1)
        assert [(m.topic, m.payload, m.retained) for m in got] == [("public.news", b"hello", True)]
    # mallory may subscribe to everything on B: she sees both (the control for the above)
    async with connect(b.url, pki, "mallory") as mallory:
        got = await snapshot(mallory, ">", want=2)
        assert {m.topic for m in got} == {"public.news", "private.key"}


async def test_two_workers_on_one_port_serve_the_same_retained_values(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    cfg = cluster_config(broker_factory, redis_server)
    proc = broker_factory.track(
        BrokerProcess(["serve", "--config", str(cfg), "--workers", "2"], workdir=cfg.parent)
    ).start()
    async with connect(proc.url, pki, "alice") as pub:
        await pub.publish("cfg.mode", b"eco", retain=True)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(connect(proc.url, pki, "alice")) for _ in range(8)
        ]
        # the kernel spread the connections over both workers (2**-7 odds otherwise)
        opened = proc.wait_for_log(r"session open", count=9)
        assert any("[worker 0]" in line for line in opened)
        assert any("[worker 1]" in line for line in opened)
        for c in clients:  # whichever worker it reached, the same snapshot
            got = await snapshot(c, "cfg.>", want=1)
            assert [(m.topic, m.payload, m.retained) for m in got] == [("cfg.mode", b"eco", True)]
    code = proc.stop(timeout=scaled(40.0))
    assert code == 0, proc.log()[-6000:]


async def test_the_store_state_is_in_the_stats(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a = broker_factory.serve(cluster_config(broker_factory, redis_server))
    async with connect(a.url, pki, "alice") as c:
        await c.publish("cfg.x", b"1", retain=True)
    mark = a.log_mark()
    a.send_signal(signal.SIGUSR1)
    (line,) = a.wait_for_log(r"stats \{", since=mark)
    stats = json.loads(line.split("stats ", 1)[1])
    store = stats["store"]
    assert (store["engine"], store["feed_connected"], store["retained"]) == ("redis", True, 1)
    assert store["writes"] == 1


async def test_late_subscribers_on_another_node_see_a_busy_topic_without_gap_or_duplicate(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    """A publisher on A updates one retained counter as fast as it is acknowledged; on B new
    subscriptions start meanwhile (B already receives the topic's channel). Each sees the
    counter from its snapshot (or first live value) on, every value once, in order."""
    a = broker_factory.serve(cluster_config(broker_factory, redis_server))
    b = broker_factory.serve(cluster_config(broker_factory, redis_server))
    n = 300
    async with (
        connect(a.url, pki, "alice") as pub,
        connect(b.url, pki, "alice") as holder,
        connect(b.url, pki, "alice") as late,
    ):
        await holder.subscribe("ctr.>")  # B's interest in tessera:ctr stays up throughout
        await wait_subscribed(redis_server, "tessera:ctr", 1)
        await pub.publish("ctr.x", b"0", retain=True)

        async def publish_all() -> None:
            for i in range(1, n + 1):
                await pub.publish("ctr.x", str(i).encode(), retain=True)

        task = asyncio.get_running_loop().create_task(publish_all())
        subs = []
        while not task.done():
            subs.append(await late.subscribe("ctr.x"))
            await asyncio.sleep(0.01)
        await task
        assert len(subs) >= 5
        for sub in subs:
            got = [int(m.payload) for m in await drain(sub)]
            assert got, "every subscription gets at least the snapshot"
            assert got == list(range(got[0], n + 1)), got


async def test_redis_down_refuses_retained_publishes_and_they_work_again_after(
    broker_factory: Any, redis_server: RedisProcess, pki: Any
) -> None:
    a = broker_factory.serve(cluster_config(broker_factory, redis_server))
    async with connect(a.url, pki, "alice") as c:
        local = await c.subscribe("cfg.>")
        await c.publish("cfg.mode", b"eco", retain=True)
        assert (await local.get(timeout=TIMEOUT)).payload == b"eco"
        redis_server.kill()
        with pytest.raises(BrokerError) as info:
            await c.publish("cfg.mode", b"on", retain=True)
        assert info.value.code == ErrorCode.STORE_FAILED  # neither stored nor delivered
        await c.publish("cfg.plain", b"still delivered locally")
        got = await local.get(timeout=TIMEOUT)
        assert (got.topic, got.payload) == ("cfg.plain", b"still delivered locally")
        a.wait_for_log(r"store write to redis://127\.0\.0\.1:\d+ failed", timeout=TIMEOUT)
        redis_server.restart()  # empty: no persistence in the fixture
        deadline = time.monotonic() + scaled(15.0)
        codes: list[int] = []
        while True:  # the client library reconnects on the next command
            try:
                await c.publish("cfg.mode", b"on", retain=True)
                break
            except BrokerError as exc:
                codes.append(exc.code)
                assert time.monotonic() < deadline, "retained publishes did not come back"
                await asyncio.sleep(0.2)
        assert set(codes) <= {ErrorCode.STORE_FAILED}
        got = await snapshot(c, "cfg.mode", want=1)
        assert [(m.payload, m.retained) for m in got] == [(b"on", True)]
