"""The embedded SQLite store: durable before save returns, survives a reopen, limits with their
wire codes, empty values clear, batching across concurrent saves, the visible view changes only
on apply, and a locked database fails the save cleanly (real SQLite files, no mocks)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from tessera_mq.broker.backplane import Publication
from tessera_mq.broker.store import NullStore, StoreError
from tessera_mq.broker.store_sqlite import DB_FILE_NAME, RetainLimits, SQLiteStore
from tessera_mq.client.protocol.errors import ErrorCode


def retain(topic: str, payload: bytes, **kw: object) -> Publication:
    return Publication(topic, payload, retain=True, **kw)  # type: ignore[arg-type]


def rows(path: Path) -> dict[str, tuple[bytes, str | None]]:
    """What another process reading the database file sees right now."""
    db = sqlite3.connect(path / DB_FILE_NAME)
    try:
        return {t: (p, s) for t, p, s in db.execute("SELECT topic, payload, sender FROM retained")}
    finally:
        db.close()


async def test_saved_values_are_durable_when_save_returns(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    await store.open()
    try:
        await store.save([retain("status.d1", b"on", sender="x509:svc")])
        assert rows(tmp_path) == {"status.d1": (b"on", "x509:svc")}
        db = sqlite3.connect(tmp_path / DB_FILE_NAME)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        db.close()
    finally:
        await store.close()


async def test_values_survive_a_reopen_with_headers_and_sender(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    await store.open()
    await store.save([retain("status.d1", b"on", headers={"k": "v"}, sender="x509:svc")])
    await store.save([retain("status.d2", b"off")])
    await store.close()
    again = SQLiteStore(tmp_path)
    await again.open()
    try:
        got = {p.topic: p for p in again.retained("status.>")}
        assert set(got) == {"status.d1", "status.d2"}
        assert got["status.d1"].payload == b"on"
        assert got["status.d1"].headers == {"k": "v"}
        assert got["status.d1"].sender == "x509:svc"
        assert got["status.d1"].retain
        assert got["status.d2"].headers is None
        assert again.retained_count == 2
    finally:
        await again.close()


async def test_the_visible_view_changes_only_on_apply(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    await store.open()
    try:
        old = retain("status.d1", b"old")
        await store.save([old])
        store.apply([old])
        snapshot = store.retained("status.*")
        new = retain("status.d1", b"new")
        await store.save([new])
        assert [p.payload for p in store.retained("status.*")] == [b"old"]  # saved, not applied
        store.apply([new])
        assert [p.payload for p in store.retained("status.*")] == [b"new"]
        assert [p.payload for p in snapshot] == [b"old"]  # a snapshot is a copy
    finally:
        await store.close()


async def test_an_empty_retained_publish_clears_the_value(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path, RetainLimits(max_topics=1))
    await store.open()
    try:
        pub = retain("status.d1", b"on")
        await store.save([pub])
        store.apply([pub])
        clear = retain("status.d1", b"")
        await store.save([clear])
        store.apply([clear])
        assert store.retained(">") == []
        assert rows(tmp_path) == {}
        # the topic's slot is free again
        await store.save([retain("status.d2", b"on")])
        assert store.retained_count == 1
    finally:
        await store.close()


async def test_limits_refuse_with_the_wire_codes_and_store_nothing(tmp_path: Path) -> None:
    store = SQLiteStore(
        tmp_path, RetainLimits(max_value_bytes=10, max_topics=2, max_total_bytes=15)
    )
    await store.open()
    try:
        with pytest.raises(StoreError) as info:
            await store.save([retain("a", b"x" * 11)])
        assert info.value.code is ErrorCode.RETAINED_TOO_LARGE
        with pytest.raises(StoreError) as info:  # headers count towards the value
            await store.save([retain("a", b"x" * 5, headers={"kk": "vvvv"})])
        assert info.value.code is ErrorCode.RETAINED_TOO_LARGE
        await store.save([retain("a", b"x" * 10)])
        with pytest.raises(StoreError) as info:
            await store.save([retain("b", b"x" * 6)])  # 16 bytes in all
        assert info.value.code is ErrorCode.RETAINED_LIMIT
        await store.save([retain("b", b"x" * 5)])
        with pytest.raises(StoreError) as info:
            await store.save([retain("c", b"x")])  # a third topic
        assert info.value.code is ErrorCode.RETAINED_LIMIT
        await store.save([retain("a", b"y")])  # replacing a value needs no new slot
        assert (store.retained_count, store.retained_bytes) == (2, 6)
        assert set(rows(tmp_path)) == {"a", "b"}
        assert store.stats["refused"] == 4
    finally:
        await store.close()


async def test_a_refused_batch_stores_none_of_its_values(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path, RetainLimits(max_value_bytes=4))
    await store.open()
    try:
        with pytest.raises(StoreError):
            await store.save([retain("a", b"ok"), retain("b", b"too long")])
        assert (store.retained_count, store.retained_bytes) == (0, 0)
        assert rows(tmp_path) == {}
    finally:
        await store.close()


async def test_concurrent_saves_are_batched_into_few_transactions(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    await store.open()
    try:
        await asyncio.gather(*(store.save([retain(f"t.{i}", b"v")]) for i in range(500)))
        assert len(rows(tmp_path)) == 500
        assert store.stats["writes"] == 500
        # Saves queued while the writer was busy shared its next transaction.
        assert store.stats["transactions"] < 100
    finally:
        await store.close()


async def test_the_loop_keeps_running_while_the_writer_waits(tmp_path: Path) -> None:
    # Another process holds the write lock: the save waits off the loop, then fails cleanly,
    # and the reservation is undone.
    store = SQLiteStore(tmp_path, busy_timeout=0.3)
    await store.open()
    blocker = sqlite3.connect(tmp_path / DB_FILE_NAME, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        with pytest.raises(StoreError) as info:
            await store.save([retain("a", b"v")])
        task.cancel()
        assert info.value.code is ErrorCode.STORE_FAILED
        assert ticks >= 5  # the loop ran during the 0.3 s wait
        assert store.retained_count == 0
        blocker.execute("ROLLBACK")
        await store.save([retain("a", b"v")])  # and the store works again
        assert rows(tmp_path) == {"a": (b"v", None)}
    finally:
        blocker.close()
        await store.close()


async def test_an_unwritable_data_dir_fails_open(tmp_path: Path) -> None:
    file = tmp_path / "not-a-dir"
    file.write_text("x")
    store = SQLiteStore(file)
    with pytest.raises(StoreError):
        await store.open()


async def test_retained_matches_patterns_across_buckets(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    await store.open()
    try:
        pubs = [retain(t, b"v") for t in ("a", "a.b", "a.b.c", "x.b", "x.y.z")]
        await store.save(pubs)
        store.apply(pubs)

        def topics(pattern: str) -> set[str]:
            return {p.topic for p in store.retained(pattern)}

        assert topics("a") == {"a"}
        assert topics("a.>") == {"a.b", "a.b.c"}
        assert topics("*.b") == {"a.b", "x.b"}
        assert topics(">") == {"a", "a.b", "a.b.c", "x.b", "x.y.z"}
        assert topics("*") == {"a"}
        assert topics("nope.>") == set()
    finally:
        await store.close()


async def test_null_store_stores_nothing() -> None:
    store = NullStore()
    assert not store.wants(retain("a", b"v"))
    assert store.retained(">") == ()
