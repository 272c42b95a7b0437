"""Status and commands against REAL broker processes over mutual TLS: retained values (late
subscribers, across a restart, cleared, filtered by the ACL, snapshot-then-live with no
duplicate), request/reply (no responders at once, timeouts without late leaks, another identity
can neither read nor answer), a forged sender replaced by the real identity, queue groups (each
message once, rebalanced when a member process is SIGKILLed)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from brokerproc import REPO_ROOT, BrokerProcess, RawClient

from tessera_mq import client as client_sdk
from tessera_mq.auth.tls import client_context
from tessera_mq.client import BrokerError, ErrorCode, NoResponders, PermissionDenied, RequestTimeout

TIMEOUT = 5.0

# bob is the service: publishes status, serves commands. alice is an operator: reads public
# status, sends commands. mallory may publish commands and chat, read chat only.
ACL = """\
[[allow]]
principals = ["x509:bob"]
publish = ["status.>", "chat.>"]
subscribe = ["cmd.>", "jobs.>", "chat.>"]

[[allow]]
principals = ["x509:alice"]
publish = ["cmd.>", "jobs.>", "chat.>"]
subscribe = ["status.*.public", "jobs.>", "chat.>"]

[[allow]]
principals = ["x509:mallory"]
publish = ["cmd.>", "chat.>"]
subscribe = ["chat.>"]
"""


def start(
    factory: Any,
    data_dir: Path | None,
    messaging: str = "",
    acl: str = ACL,
    limits: dict[str, object] | None = None,
) -> tuple[BrokerProcess, Path]:
    """A broker with ``data_dir`` (top-level key) and a ``[messaging]`` table."""
    cfg: Path = factory.config(acl=acl, limits=limits)
    text = cfg.read_text(encoding="utf-8")
    if data_dir is not None:
        text = f"data_dir = {json.dumps(str(data_dir))}\n" + text
    if messaging:
        text += "\n[messaging]\n" + messaging + "\n"
    cfg.write_text(text, encoding="utf-8")
    return factory.serve(cfg), cfg


def connect(broker: BrokerProcess, pki: Any, name: str, **kw: Any) -> client_sdk.connect:
    return client_sdk.connect(broker.url, **pki.client(name), timeout=TIMEOUT, **kw)


async def drain(sub: Any, quiet: float = 0.3) -> list[Any]:
    """Everything the subscription receives until it is quiet for ``quiet`` seconds."""
    out = []
    while True:
        try:
            out.append(await sub.get(timeout=quiet))
        except TimeoutError:
            return out


# --- retained values ----------------------------------------------------------------------


async def test_late_subscriber_gets_retained_values_then_live(
    broker_factory: Any, pki: Any, tmp_path: Path
) -> None:
    broker, _ = start(broker_factory, tmp_path / "data")
    async with connect(broker, pki, "bob") as svc, connect(broker, pki, "alice") as alice:
        assert "retain" in (svc.welcome.features or ())
        await svc.publish("status.d1.public", b"on", retain=True)
        await svc.publish("status.d2.public", b"off", retain=True, headers={"unit": "w"})
        await svc.publish("status.d3.public", b"transient")  # not retained
        sub = await alice.subscribe("status.*.public")
        first = await drain(sub)
        assert {(m.topic, m.payload, m.retained) for m in first} == {
            ("status.d1.public", b"on", True),
            ("status.d2.public", b"off", True),
        }
        assert next(m for m in first if m.topic == "status.d2.public").headers == {"unit": "w"}
        await svc.publish("status.d1.public", b"dim", retain=True)
        live = await sub.get(timeout=TIMEOUT)
        assert (live.topic, live.payload, live.retained) == ("status.d1.public", b"dim", False)


async def test_retained_values_survive_a_restart_and_an_empty_publish_clears(
    broker_factory: Any, pki: Any, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    broker, cfg = start(broker_factory, data)
    async with connect(broker, pki, "bob") as svc:
        await svc.publish("status.d1.public", b"on", retain=True)
        await svc.publish("status.d2.public", b"on", retain=True)
    assert broker.stop() == 0
    broker = broker_factory.serve(cfg)
    async with connect(broker, pki, "bob") as svc, connect(broker, pki, "alice") as alice:
        sub = await alice.subscribe("status.*.public")
        assert {m.topic for m in await drain(sub)} == {"status.d1.public", "status.d2.public"}
        await svc.publish("status.d1.public", b"", retain=True)  # clear
        cleared = await sub.get(timeout=TIMEOUT)
        assert (cleared.topic, cleared.payload) == ("status.d1.public", b"")
        again = await alice.subscribe("status.*.public")
        assert [(m.topic, m.payload) for m in await drain(again)] == [("status.d2.public", b"on")]


async def test_retained_values_obey_subscribe_rights(
    broker_factory: Any, pki: Any, tmp_path: Path
) -> None:
    broker, _ = start(broker_factory, tmp_path / "data")
    async with connect(broker, pki, "bob") as svc, connect(broker, pki, "alice") as alice:
        await svc.publish("status.d1.public", b"ok", retain=True)
        await svc.publish("status.d1.private", b"secret", retain=True)
        # An ACL-filtered wildcard (issue #10): accepted, and it sees only what alice may read.
        wide = await alice.subscribe("status.>")
        assert [m.payload for m in await drain(wide)] == [b"ok"]
        sub = await alice.subscribe("status.*.public")
        assert [m.payload for m in await drain(sub)] == [b"ok"]
    async with connect(broker, pki, "mallory") as mallory:
        with pytest.raises(PermissionDenied):
            await mallory.subscribe("status.*.public")


async def test_retained_limits_are_clear_errors(
    broker_factory: Any, pki: Any, tmp_path: Path
) -> None:
    broker, _ = start(
        broker_factory, tmp_path / "data", "retain_max_value_bytes = 8\nretain_max_topics = 2"
    )
    async with connect(broker, pki, "bob") as svc:
        with pytest.raises(BrokerError) as info:
            await svc.publish("status.a.public", b"123456789", retain=True)
        assert info.value.code == ErrorCode.RETAINED_TOO_LARGE
        await svc.publish("status.a.public", b"1", retain=True)
        await svc.publish("status.b.public", b"1", retain=True)
        with pytest.raises(BrokerError) as info:
            await svc.publish("status.c.public", b"1", retain=True)
        assert info.value.code == ErrorCode.RETAINED_LIMIT
        await svc.publish("status.c.public", b"plain, not retained")  # still fine


async def test_snapshot_then_live_without_gap_or_duplicate_under_load(
    broker_factory: Any, pki: Any, tmp_path: Path
) -> None:
    """A publisher keeps changing 20 retained values while a subscriber joins: for each topic
    the subscriber sees a non-decreasing sequence ending at the last value, each value once."""
    broker, _ = start(broker_factory, tmp_path / "data")
    async with connect(broker, pki, "bob") as svc, connect(broker, pki, "alice") as alice:
        topics = [f"status.d{i}.public" for i in range(20)]
        for t in topics:
            await svc.publish(t, b"0", retain=True)

        async def churn() -> None:
            for n in range(1, 30):
                await asyncio.gather(
                    *(svc.publish(t, str(n).encode(), retain=True) for t in topics)
                )

        task = asyncio.create_task(churn())
        await asyncio.sleep(0.05)
        sub = await alice.subscribe("status.*.public")
        await task
        seen: dict[str, list[int]] = {t: [] for t in topics}
        for m in await drain(sub, quiet=0.5):
            seen[m.topic].append(int(m.payload))
        for t, values in seen.items():
            assert values, t
            assert values == sorted(set(values)), (t, values)  # in order, no duplicate
            assert values[-1] == 29, (t, values)


async def test_ten_thousand_retained_topics_reach_a_new_subscriber(
    broker_factory: Any, pki: Any, tmp_path: Path
) -> None:
    broker, _ = start(broker_factory, tmp_path / "data")
    async with connect(broker, pki, "bob") as svc, connect(broker, pki, "alice") as alice:
        n = 10_000
        for start_i in range(0, n, 500):
            await asyncio.gather(
                *(
                    svc.publish(f"status.d{i}.public", b"x" * 50, retain=True)
                    for i in range(start_i, start_i + 500)
                )
            )
        t0 = time.perf_counter()
        sub = await alice.subscribe("status.*.public", max_pending=n + 10)
        got = 0
        while got < n:
            m = await sub.get(timeout=TIMEOUT)
            assert m.retained
            got += 1
        elapsed = time.perf_counter() - t0
        assert elapsed < 10, elapsed
        assert sub.dropped == 0


# --- request/reply ------------------------------------------------------------------------


async def test_request_reply_carries_verified_identities(broker_factory: Any, pki: Any) -> None:
    broker, _ = start(broker_factory, None)
    async with connect(broker, pki, "bob") as svc, connect(broker, pki, "alice") as alice:
        service = await svc.serve("cmd.device.*").start()

        async def serve_one() -> None:
            req = await anext(aiter(service))
            assert req.sender == "x509:alice"
            assert req.topic == "cmd.device.d1"
            await req.respond(b"done:" + req.payload, headers={"status": "0"})

        task = asyncio.create_task(serve_one())
        reply = await alice.request("cmd.device.d1", b"reboot", timeout=TIMEOUT)
        await task
        assert (reply.payload, reply.sender, reply.headers) == (
            b"done:reboot",
            "x509:bob",
            {"status": "0"},
        )


async def test_no_responders_fails_at_once(broker_factory: Any, pki: Any) -> None:
    broker, _ = start(broker_factory, None)
    async with connect(broker, pki, "alice") as alice:
        t0 = time.perf_counter()
        with pytest.raises(NoResponders):
            await alice.request("cmd.device.d1", b"x", timeout=30)
        assert time.perf_counter() - t0 < 2


async def test_timeout_is_clean_and_a_late_reply_never_leaks(broker_factory: Any, pki: Any) -> None:
    broker, _ = start(broker_factory, None)
    async with connect(broker, pki, "bob") as svc, connect(broker, pki, "alice") as alice:
        service = await svc.serve("cmd.>").start()
        it = aiter(service)
        with pytest.raises(RequestTimeout):
            await alice.request("cmd.slow", b"first", timeout=0.3)
        late = await anext(it)
        assert late.payload == b"first"
        with pytest.raises(BrokerError) as info:
            await late.respond(b"too late")  # the broker forgot the request
        assert info.value.code == ErrorCode.UNKNOWN_REQUEST

        async def answer_next() -> None:
            req = await anext(it)
            await req.respond(b"answer:" + req.payload)

        task = asyncio.create_task(answer_next())
        reply = await alice.request("cmd.slow", b"second", timeout=TIMEOUT)
        await task
        assert reply.payload == b"answer:second"  # not the late answer to "first"


async def test_another_identity_can_neither_serve_nor_answer(broker_factory: Any, pki: Any) -> None:
    broker, _ = start(broker_factory, None)
    async with connect(broker, pki, "bob") as svc, connect(broker, pki, "alice") as alice:
        async with connect(broker, pki, "mallory") as mallory:
            with pytest.raises(PermissionDenied):
                await mallory.serve("cmd.>").start()
            with pytest.raises(PermissionDenied):
                await mallory.subscribe("cmd.>")  # the topic space shows no requests either
        service = await svc.serve("cmd.>").start()
        it = aiter(service)
        # mallory forges replies with every small token on her own connection
        cred = pki.clients["mallory"]
        raw = RawClient(broker.host, broker.port, client_context(pki.ca, cred.cert, cred.key))
        with raw:
            assert "request" in raw.hello()["features"]
            pending = asyncio.create_task(alice.request("cmd.x", b"q", timeout=TIMEOUT))
            req = await anext(it)
            for token in range(5):
                raw.send(op="reply", token=token, payload=b"forged", ack=100 + token)
            answers = [await asyncio.to_thread(raw.recv) for _ in range(5)]
            assert all(
                a is not None and a["op"] == "error" and a["code"] == ErrorCode.UNKNOWN_REQUEST
                for a in answers
            ), answers
            await req.respond(b"genuine")
            reply = await pending
        assert (reply.payload, reply.sender) == (b"genuine", "x509:bob")


async def test_request_needs_publish_rights(broker_factory: Any, pki: Any) -> None:
    broker, _ = start(broker_factory, None)
    async with connect(broker, pki, "bob") as svc:
        with pytest.raises(PermissionDenied):
            await svc.request("cmd.x", b"q")  # bob may not publish on cmd.>


# --- verified sender ----------------------------------------------------------------------


async def test_a_forged_sender_is_replaced_by_the_real_identity(
    broker_factory: Any, pki: Any
) -> None:
    broker, _ = start(broker_factory, None, 'sender = ["chat.>"]')
    async with connect(broker, pki, "alice") as alice:
        sub = await alice.subscribe("chat.>")
        cred = pki.clients["mallory"]
        raw = RawClient(broker.host, broker.port, client_context(pki.ca, cred.cert, cred.key))
        with raw:
            raw.hello()
            raw.send(op="pub", topic="chat.room", payload=b"hi", sender="x509:bob", ack=1)
            ok = await asyncio.to_thread(raw.recv)
            assert ok == {"op": "ok", "ack": 1}
        msg = await sub.get(timeout=TIMEOUT)
        assert (msg.payload, msg.sender) == (b"hi", "x509:mallory")
        await alice.publish("chat.room", b"me")
        assert (await sub.get(timeout=TIMEOUT)).sender == "x509:alice"


async def test_plain_deliveries_carry_no_sender_unless_configured(
    broker_factory: Any, pki: Any
) -> None:
    broker, _ = start(broker_factory, None)
    async with connect(broker, pki, "alice") as alice:
        sub = await alice.subscribe("chat.>")
        await alice.publish("chat.room", b"x")
        assert (await sub.get(timeout=TIMEOUT)).sender is None


# --- queue groups ---------------------------------------------------------------------------


async def test_queue_group_gives_each_message_to_one_member(broker_factory: Any, pki: Any) -> None:
    broker, _ = start(broker_factory, None)
    async with (
        connect(broker, pki, "bob") as b1,
        connect(broker, pki, "bob") as b2,
        connect(broker, pki, "alice") as alice,
    ):
        m1 = await b1.subscribe("jobs.>", group="workers")
        m2 = await b2.subscribe("jobs.>", group="workers")
        watcher = await alice.subscribe("jobs.>")  # a plain subscriber still sees everything
        for i in range(100):
            await alice.publish(f"jobs.j{i}", str(i).encode())
        got1 = [int(m.payload) for m in await drain(m1)]
        got2 = [int(m.payload) for m in await drain(m2)]
        assert sorted(got1 + got2) == list(range(100))  # each exactly once
        assert got1 and got2  # shared
        assert len(await drain(watcher)) == 100


def _member(broker: BrokerProcess, pki: Any, out: Path) -> subprocess.Popen[bytes]:
    """A group member in its own process (``tessera sub --group``), writing what it gets."""
    creds = pki.client("bob")
    cmd = [
        sys.executable,
        "-m",
        "tessera_mq.client.cli",
        "sub",
        "jobs.>",
        "--group",
        "workers",
        "--raw",
        "--url",
        broker.url,
        "--ca",
        str(creds["ca"]),
        "--cert",
        str(creds["cert"]),
        "--key",
        str(creds["key"]),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    with out.open("wb") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.DEVNULL, env=env)


async def test_group_rebalances_when_a_member_is_sigkilled(
    broker_factory: Any, pki: Any, tmp_path: Path
) -> None:
    broker, _ = start(broker_factory, None)
    out_a, out_b = tmp_path / "a.txt", tmp_path / "b.txt"
    a, b = _member(broker, pki, out_a), _member(broker, pki, out_b)
    try:
        async with connect(broker, pki, "alice") as alice:
            deadline = time.monotonic() + 20
            n = 0  # warm up until both members have received
            while time.monotonic() < deadline:
                await alice.publish(f"jobs.warm{n}", b"w")
                n += 1
                await asyncio.sleep(0.05)
                if b"w" in out_a.read_bytes() and b"w" in out_b.read_bytes():
                    break
            else:
                pytest.fail("the two members never both received")
            a.send_signal(signal.SIGKILL)
            a.wait(timeout=10)
            await asyncio.sleep(0.5)  # the broker notices the dead member's connection
            for i in range(50):
                await alice.publish(f"jobs.j{i}", f"m{i}".encode())
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                lines = out_b.read_bytes().split()
                if sum(1 for x in lines if x.startswith(b"m")) >= 50:
                    break
                await asyncio.sleep(0.1)
            got = [x for x in out_b.read_bytes().split() if x.startswith(b"m")]
            assert sorted(got) == sorted(f"m{i}".encode() for i in range(50))
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)


# --- the blocking facade ----------------------------------------------------------------------


def test_sync_facade_retain_request_serve(broker_factory: Any, pki: Any, tmp_path: Path) -> None:
    import threading  # noqa: PLC0415

    from tessera_mq.client import sync  # noqa: PLC0415

    broker, _ = start(broker_factory, tmp_path / "data")
    with (
        sync.connect(broker.url, **pki.client("bob"), timeout=TIMEOUT) as svc,
        sync.connect(broker.url, **pki.client("alice"), timeout=TIMEOUT) as alice,
    ):
        svc.publish("status.d1.public", b"on", retain=True)
        sub = alice.subscribe("status.*.public")
        first = sub.get(timeout=TIMEOUT)
        assert (first.payload, first.retained) == (b"on", True)
        service = svc.serve("cmd.>", group="svc")

        def serve_one() -> None:
            for req in service:
                req.respond(b"ok:" + req.payload)
                return

        t = threading.Thread(target=serve_one)
        t.start()
        reply = alice.request("cmd.x", b"go", timeout=TIMEOUT)
        t.join(timeout=TIMEOUT)
        assert (reply.payload, reply.sender) == (b"ok:go", "x509:bob")


async def test_a_member_that_stops_reading_does_not_stall_its_group(
    broker_factory: Any, pki: Any
) -> None:
    broker, _ = start(broker_factory, None, limits={"max_pending_bytes": 256 * 1024})
    cred = pki.clients["bob"]
    raw = RawClient(
        broker.host,
        broker.port,
        client_context(pki.ca, cred.cert, cred.key),
        recv_buffer_bytes=4096,
    )
    with raw:
        raw.hello()
        raw.send(op="sub", sid=1, pattern="jobs.>", group="workers")
        assert raw.recv() == {"op": "ok", "sid": 1}
        # ... and from now on it reads nothing.
        async with connect(broker, pki, "bob") as live, connect(broker, pki, "alice") as alice:
            member = await live.subscribe("jobs.>", group="workers", max_pending=1000)
            payload = b"x" * 16_384
            n = 800  # 13 MB: more than the stuck member's socket buffers and outbox hold
            for i in range(n):
                await alice.publish(f"jobs.j{i}", payload)
            got = await drain(member, quiet=1.0)
            topics = {m.topic for m in got}
            # The stuck member takes its turn until the kernel's socket buffers are full and its
            # outbox is half full (128 KiB here); from then on the live member gets everything.
            assert {f"jobs.j{i}" for i in range(n - 200, n)} <= topics
            assert len(got) >= n // 2, len(got)
            assert len({m.topic for m in got}) == len(got)  # each once
