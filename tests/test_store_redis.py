"""RedisStore against a REAL redis-server (tests/redisproc.py): the Store protocol as SQLiteStore
implements it (save/apply/retained, an empty value clears, the limits and their error codes), the
limits shared by two stores (two nodes), one node's values reaching the other's snapshots through
the change feed, and a reload after Redis comes back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from redisproc import RedisProcess

from tessera_mq.broker.backplane import Publication
from tessera_mq.broker.cluster import RedisBackplane, RedisSettings
from tessera_mq.broker.store import StoreError
from tessera_mq.broker.store_redis import RedisStore, decode_change, decode_value
from tessera_mq.broker.store_sqlite import RetainLimits
from tessera_mq.client.protocol.errors import ErrorCode


def pub(topic: str, payload: bytes, **kw: object) -> Publication:
    return Publication(topic, payload, retain=True, **kw)  # type: ignore[arg-type]


async def stored(store: RedisStore, *pubs: Publication) -> None:
    """What the hub does for a retained publish: save, then apply in the routing step."""
    await store.save(pubs)
    store.apply(pubs)


def view(store: RedisStore, pattern: str) -> dict[str, bytes]:
    return {p.topic: p.payload for p in store.retained(pattern)}


async def until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def store(redis_server: RedisProcess) -> AsyncIterator[RedisStore]:
    s = RedisStore(RedisSettings(redis_server.url))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_save_apply_retained_and_clear(store: RedisStore) -> None:
    first = pub("status.d1.temp", b"21", headers={"unit": "C"}, sender="x509:svc")
    await store.save([first])
    assert view(store, "status.>") == {}, "saved is not visible before apply"
    store.apply([first])
    await stored(store, pub("status.d2.temp", b"19"), pub("other.x", b"1"))
    assert view(store, "status.*.temp") == {"status.d1.temp": b"21", "status.d2.temp": b"19"}
    assert view(store, ">") == {"status.d1.temp": b"21", "status.d2.temp": b"19", "other.x": b"1"}
    assert view(store, "other.x") == {"other.x": b"1"}
    (got,) = store.retained("status.d1.temp")
    assert (got.headers, got.sender, got.retain) == ({"unit": "C"}, "x509:svc", True)
    await stored(store, pub("status.d1.temp", b""))  # an empty retained publish clears
    assert view(store, "status.>") == {"status.d2.temp": b"19"}
    # the snapshot is a copy: later applies do not change it
    snap = store.retained("status.>")
    await stored(store, pub("status.d3.temp", b"5"))
    assert [p.topic for p in snap] == ["status.d2.temp"]


async def test_a_cursor_is_fixed_when_made_and_matches_lazily(
    store: RedisStore, redis_server: RedisProcess
) -> None:
    """The snapshot cursor a new subscription pulls over many turns: later local applies,
    another node's changes (the feed) and a full reload of the mirror do not change what it
    yields; non-matching candidates are steps (``None``), not a scan in one call."""
    await stored(store, *(pub(f"dev.d{i}.state", b"v%d" % i) for i in range(50)))
    await stored(store, pub("dev.d0.other", b"x"))
    cursor = store.retained_cursor("dev.*.state")
    first = next(cursor)
    assert first is not None and first.topic == "dev.d0.state"
    await stored(store, pub("dev.d1.state", b"new"), pub("dev.d2.state", b""))
    await stored(store, pub("dev.fresh.state", b"f"))
    other = RedisStore(RedisSettings(redis_server.url))
    await other.open()
    try:
        await stored(other, pub("dev.d3.state", b"remote"))
        await until(lambda: view(store, "dev.d3.state") == {"dev.d3.state": b"remote"})
        await store._reload()  # the mirror is replaced as after a feed outage
    finally:
        await other.close()
    rest = list(cursor)
    got = [(p.topic, p.payload) for p in rest if p is not None]
    assert got == [(f"dev.d{i}.state", b"v%d" % i) for i in range(1, 50)]
    assert rest.count(None) == 1  # dev.d0.other: looked at, passed over
    assert view(store, "dev.d1.state") == {"dev.d1.state": b"new"}  # the store moved on


async def test_not_retained_is_not_stored(store: RedisStore) -> None:
    plain = Publication("status.x", b"1")
    assert not store.wants(plain)
    assert store.wants(pub("status.x", b"1"))
    await store.save([plain])
    store.apply([plain])
    assert view(store, ">") == {}


async def test_values_are_in_redis_and_a_new_store_loads_them(
    store: RedisStore, redis_server: RedisProcess
) -> None:
    await stored(store, pub("a.b", b"x", headers={"k": "v"}), pub("a.c", b"y"))
    r = aioredis.Redis.from_url(redis_server.url)
    try:
        raw = await r.hgetall("tessera:retained")
        assert set(raw) == {b"a.b", b"a.c"}
        version, value = decode_value("a.b", raw[b"a.b"])
        assert version >= 1 and (value.payload, value.headers) == (b"x", {"k": "v"})
        assert int(await r.get("tessera:retained:bytes")) == len(b"x" + b"kv" + b"y")
    finally:
        await r.aclose()
    again = RedisStore(RedisSettings(redis_server.url))  # a restarted broker
    await again.open()
    try:
        assert view(again, "a.*") == {"a.b": b"x", "a.c": b"y"}
    finally:
        await again.close()


async def test_limits_refuse_with_the_wire_codes(redis_server: RedisProcess) -> None:
    limits = RetainLimits(max_value_bytes=8, max_topics=2, max_total_bytes=10)
    s = RedisStore(RedisSettings(redis_server.url), limits)
    await s.open()
    try:
        with pytest.raises(StoreError) as info:
            await s.save([pub("a.x", b"123456789")])
        assert info.value.code == ErrorCode.RETAINED_TOO_LARGE
        await stored(s, pub("a.x", b"12345"), pub("a.y", b"1"))
        with pytest.raises(StoreError) as info:
            await s.save([pub("a.z", b"1")])
        assert info.value.code == ErrorCode.RETAINED_LIMIT
        assert "2 retained topics" in info.value.message
        with pytest.raises(StoreError) as info:
            await s.save([pub("a.y", b"123456")])  # 5 + 6 > 10 bytes in all
        assert info.value.code == ErrorCode.RETAINED_LIMIT
        assert "10 bytes" in info.value.message
        # a refused job writes nothing, not even its acceptable part
        with pytest.raises(StoreError):
            await s.save([pub("a.x", b"1"), pub("a.z", b"1")])
        assert view(s, "a.*") == {"a.x": b"12345", "a.y": b"1"}
        # replacing a value counts its new size only; clearing frees its slot
        await stored(s, pub("a.x", b"123456789"[:8]))
        await stored(s, pub("a.y", b""))
        await stored(s, pub("a.z", b"12"))
        assert view(s, "a.*") == {"a.x": b"12345678", "a.z": b"12"}
    finally:
        await s.close()


async def test_two_nodes_share_the_values_and_the_limits(redis_server: RedisProcess) -> None:
    limits = RetainLimits(max_topics=3)
    a = RedisStore(RedisSettings(redis_server.url), limits)
    b = RedisStore(RedisSettings(redis_server.url), limits)
    await a.open()
    await b.open()
    try:
        await stored(a, pub("status.n1", b"up"), pub("status.n2", b"up"))
        await until(lambda: len(view(b, "status.*")) == 2, what="b sees a's values")
        assert view(b, "status.*") == {"status.n1": b"up", "status.n2": b"up"}
        await stored(b, pub("status.n3", b"up"))
        with pytest.raises(StoreError) as info:  # 3 topics in all, whichever node wrote them
            await a.save([pub("status.n4", b"up")])
        assert info.value.code == ErrorCode.RETAINED_LIMIT
        await stored(b, pub("status.n1", b""))
        await until(lambda: "status.n1" not in view(a, ">"), what="a sees b's clear")
        await until(lambda: "status.n3" in view(a, ">"), what="a sees b's value")
        # last writer wins everywhere (Redis orders the writes)
        await stored(a, pub("status.n2", b"a"))
        await stored(b, pub("status.n2", b"b"))
        await until(lambda: view(a, "status.n2") == {"status.n2": b"b"}, what="convergence")
        assert view(b, "status.n2") == {"status.n2": b"b"}
    finally:
        await a.close()
        await b.close()


async def test_redis_down_fails_saves_and_a_restart_reloads(
    redis_server: RedisProcess,
) -> None:
    a = RedisStore(RedisSettings(redis_server.url))
    await a.open()
    try:
        await stored(a, pub("k.1", b"v"))
        redis_server.kill()
        with pytest.raises(StoreError) as info:
            await a.save([pub("k.2", b"v")])
        assert info.value.code == ErrorCode.STORE_FAILED
        assert view(a, "k.*") == {"k.1": b"v"}, "the mirror is served meanwhile"
        redis_server.restart()  # empty: no persistence in the fixture
        r = aioredis.Redis.from_url(redis_server.url)
        try:  # another node writes to the new Redis; the feed reconnects and reloads
            await until(lambda: a.health()["feed_connected"] is True, 10.0, "feed back")
            b = RedisStore(RedisSettings(redis_server.url))
            await b.open()
            await stored(b, pub("k.3", b"w"))
            await b.close()
            await until(lambda: view(a, "k.*") == {"k.3": b"w"}, 10.0, "reloaded mirror")
            await stored(a, pub("k.4", b"x"))  # the script is loaded again (NOSCRIPT)
            assert await r.hget("tessera:retained", "k.4") is not None
        finally:
            await r.aclose()
    finally:
        await a.close()


async def test_unreachable_redis_fails_open(redis_server: RedisProcess) -> None:
    redis_server.kill()
    s = RedisStore(RedisSettings(redis_server.url))
    with pytest.raises(StoreError, match="cannot reach redis"):
        await s.open()


async def test_a_restarted_worker_opens_during_an_outage_and_catches_up(
    redis_server: RedisProcess,
) -> None:
    """``fail_fast=False`` (what a worker restarted by --workers uses): open empty, refuse
    retained publishes while Redis is down, load the values once it is back."""
    writer = RedisStore(RedisSettings(redis_server.url))
    await writer.open()
    await stored(writer, pub("cfg.mode", b"eco"))
    await writer.close()
    redis_server.kill()
    s = RedisStore(RedisSettings(redis_server.url), fail_fast=False)
    await s.open()
    try:
        assert view(s, ">") == {}
        with pytest.raises(StoreError) as info:
            await s.save([pub("cfg.mode", b"on")])
        assert info.value.code == ErrorCode.STORE_FAILED
        redis_server.restart()  # empty (no persistence); another node writes again
        other = RedisStore(RedisSettings(redis_server.url))
        await other.open()
        await stored(other, pub("cfg.mode", b"eco"))
        await other.close()
        await until(lambda: view(s, ">") == {"cfg.mode": b"eco"}, 15.0, "caught up")
        await stored(s, pub("cfg.mode", b"on"))
        assert view(s, ">") == {"cfg.mode": b"on"}
    finally:
        await s.close()


async def test_malformed_values_and_changes_are_ignored(
    store: RedisStore, redis_server: RedisProcess
) -> None:
    r = aioredis.Redis.from_url(redis_server.url)
    try:
        await r.hset("tessera:retained", "bad.one", b"nonsense")
        await r.publish(store.channel, b"12:zz:999:short")
        await r.publish(store.channel, b"13:zz:3:a.b\xc1")
        await stored(store, pub("good.one", b"1"))
        again = RedisStore(RedisSettings(redis_server.url))
        await again.open()
        try:
            assert view(again, ">") == {"good.one": b"1"}
            assert again.health()["bad_values"] == 1
        finally:
            await again.close()
        await until(lambda: store.health().get("bad_changes") == 2, what="bad changes counted")
    finally:
        await r.aclose()
    with pytest.raises(ValueError, match="truncated"):
        decode_change(b"1:n:5:abc")
    assert decode_change(b"7:n1:3:a.b") == (7, "n1", "a.b", None)


async def test_the_backplane_glob_skips_the_change_feed(
    store: RedisStore, redis_server: RedisProcess
) -> None:
    got: list[Publication] = []
    bp = RedisBackplane(redis_server.url)
    await bp.start(got.append)
    try:
        bp.interest(">", True)  # a wildcard first token: PSUBSCRIBE <prefix>:*
        r = aioredis.Redis.from_url(redis_server.url)
        try:
            await until(lambda: bp.health()["glob"] is True, what="glob")
            await stored(store, pub("status.x", b"1"))
            await r.ping()
            await asyncio.sleep(0.2)
        finally:
            await r.aclose()
        assert bp.health()["bad_messages"] == 0
        assert got == []
    finally:
        await bp.stop()


async def test_ten_thousand_topics(store: RedisStore, redis_server: RedisProcess) -> None:
    """Scale check (the figures go to docs/scaling.md): 10k retained topics under 100 first
    tokens, saved by concurrent publishers, loaded by a new node, matched by a pattern."""
    n = 10_000
    pubs = [pub(f"dev{i % 100}.unit{i}.state", b"x" * 64) for i in range(n)]
    t0 = time.perf_counter()
    await asyncio.gather(*(stored(store, p) for p in pubs))
    save_s = time.perf_counter() - t0
    other = RedisStore(RedisSettings(redis_server.url))
    t0 = time.perf_counter()
    await other.open()
    load_s = time.perf_counter() - t0
    try:
        assert other.retained_count == n
        t0 = time.perf_counter()
        one = other.retained("dev7.>")
        bucket_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        everything = other.retained("*.*.state")
        all_s = time.perf_counter() - t0
        assert len(one) == n // 100 and len(everything) == n
        print(
            f"\n10k topics: save {save_s:.3f} s ({n / save_s:.0f}/s), load {load_s:.3f} s, "
            f"snapshot of one first token {bucket_s * 1e3:.2f} ms, of all {all_s * 1e3:.1f} ms"
        )
    finally:
        await other.close()


def test_the_mirror_orders_changes_by_version_and_bounds_cleared_topics() -> None:
    """The mirror (sans-I/O): an older change never replaces a newer one, a clear included;
    what it remembers of cleared topics is bounded."""
    from tessera_mq.broker.store_redis import _Mirror  # noqa: PLC0415 - the module's own helper

    m = _Mirror()
    assert m.put(2, "a.b", pub("a.b", b"new"))
    assert not m.put(1, "a.b", pub("a.b", b"old"))
    assert m.put(3, "a.b", None)
    assert not m.put(2, "a.b", pub("a.b", b"new")), "a late older value stays cleared"
    assert (len(m), m.match(">")) == (0, [])
    for i in range(10_000):
        m.put(10 + 2 * i, f"t{i}.x", pub(f"t{i}.x", b"v"))
        m.put(11 + 2 * i, f"t{i}.x", None)
    assert len(m) == 0 and len(m.versions) <= m.CLEARED_MARGIN + 1
    assert m.put(50_000, "z.y", pub("z.y", b"1")) and [p.topic for p in m.match("z.*")] == ["z.y"]


async def test_a_remote_retained_value_is_visible_in_the_step_that_routes_it(
    store: RedisStore, redis_server: RedisProcess
) -> None:
    """Node B's backplane hands each remote retained publication to B's store just before
    routing it (``on_retained`` -> ``observe``): a subscription made on B after that step has
    it in its snapshot even when B's change feed has not delivered it (here B's store follows
    another prefix's feed, so only the backplane can tell it)."""
    b_store = RedisStore(RedisSettings(redis_server.url), prefix="elsewhere")
    await b_store.open()
    seen_at_routing: list[dict[str, bytes]] = []

    def inject(p: Publication) -> None:
        seen_at_routing.append(view(b_store, p.topic))

    a_bp = RedisBackplane(redis_server.url)
    b_bp = RedisBackplane(redis_server.url)
    b_bp.on_retained = b_store.observe
    await a_bp.start(lambda p: None)
    await b_bp.start(inject)
    try:
        b_bp.interest("cfg.>", True)
        await until(lambda: b_bp.health()["channels"] == 1, what="interest")
        await asyncio.sleep(0.05)
        p1 = pub("cfg.mode", b"eco")
        await stored(store, p1)  # what node A's hub does: save, apply, then the backplane
        assert a_bp.publish(p1)
        await until(lambda: len(seen_at_routing) == 1, what="routed on B")
        assert seen_at_routing == [{"cfg.mode": b"eco"}]
        # an older version arriving later changes nothing; a clear applies
        stale = pub("cfg.mode", b"old", extra={"retained_version": 1})
        b_store.observe(stale)
        assert view(b_store, "cfg.mode") == {"cfg.mode": b"eco"}
        p2 = pub("cfg.mode", b"")
        await stored(store, p2)
        assert a_bp.publish(p2)
        await until(lambda: len(seen_at_routing) == 2, what="clear routed on B")
        assert seen_at_routing[1] == {}
    finally:
        await a_bp.stop()
        await b_bp.stop()
        await b_store.close()
