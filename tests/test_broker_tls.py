"""A real broker process over real mutually authenticated TLS: publish/subscribe, identities,
the refusals (no certificate, another CA, expired, TLS 1.1, a client that does not trust the
broker), and a graceful SIGTERM.

One broker serves the whole module; each test opens its own connections.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from brokerproc import BrokerProcess, RawClient
from timing import scaled

from tessera_mq import client as client_sdk
from tessera_mq.auth.tls import ALPN_PROTOCOL, client_context
from tessera_mq.client import (
    AuthenticationError,
    ConnectionClosed,
    ConnectionClosedError,
    ErrorCode,
    LocalProtocolError,
)
from tessera_mq.client.protocol import Publish, encode
from tessera_mq.client.protocol.topics import matches

TIMEOUT = scaled(5.0)


@pytest.fixture(scope="module")
def broker(module_broker_factory: Any) -> BrokerProcess:
    return module_broker_factory.start()


def connect(broker: BrokerProcess, pki: Any, name: str, **kwargs: Any) -> client_sdk.connect:
    return client_sdk.connect(broker.url, **pki.client(name), timeout=TIMEOUT, **kwargs)


def raw_client(broker: BrokerProcess, pki: Any, name: str, **kwargs: Any) -> RawClient:
    cred = pki.clients[name]
    ctx = client_context(pki.ca, cred.cert, cred.key)
    return RawClient(broker.host, broker.port, ctx, **kwargs)


async def read_until_payload(sub: client_sdk.Subscription, end: bytes) -> list[tuple[str, bytes]]:
    """Messages of ``sub`` up to (not including) the one whose payload is ``end``."""
    got: list[tuple[str, bytes]] = []
    while True:
        msg = await sub.get(timeout=TIMEOUT)
        if msg.payload == end:
            return got
        got.append((msg.topic, msg.payload))


# --- publish / subscribe ------------------------------------------------------------------


async def test_wildcards_exact_and_fanout_across_two_clients(
    broker: BrokerProcess, pki: Any
) -> None:
    async with (
        connect(broker, pki, "alice") as alice,
        connect(broker, pki, "bob") as bob,
        connect(broker, pki, "mallory") as publisher,
    ):
        subs = {
            "alice exact": await alice.subscribe("w.a.b"),
            "alice star": await alice.subscribe("w.*.b"),
            "alice rest": await alice.subscribe("w.>"),
            "bob star": await bob.subscribe("w.a.*"),
            "bob rest": await bob.subscribe("w.a.>"),
        }
        published = [
            ("w.a.b", b"1"),  # every subscription
            ("w.x.b", b"2"),  # alice star + rest
            ("w.a.c", b"3"),  # alice rest, bob star + rest
            ("w.a.b.c", b"4"),  # alice rest, bob rest
            ("w", b"5"),  # nobody: '>' needs one more token
            ("other.a.b", b"6"),  # nobody
        ]
        for topic, payload in published:
            await publisher.publish(topic, payload)
        await publisher.publish("w.a.b", b"end")  # matches every subscription; comes last
        for label, sub in subs.items():
            expected = [(t, p) for t, p in published if matches(sub.pattern, t)]
            # Each message exactly once per subscription, in publish order: no duplicate even
            # though one delivery frame serves several subscriptions of the same client.
            assert await read_until_payload(sub, b"end") == expected, label


async def test_one_delivery_frame_per_client_for_overlapping_subscriptions(
    broker: BrokerProcess, pki: Any
) -> None:
    def subscribe_raw() -> RawClient:
        raw = raw_client(broker, pki, "bob")
        raw.hello()
        for sid, pattern in ((1, "dup.>"), (2, "dup.*"), (3, "dup.x"), (4, "dup.x")):
            raw.send(op="sub", sid=sid, pattern=pattern)
            ok, _ = raw.recv_until("ok")
            assert ok.get("sid") == sid
        return raw

    raw = await asyncio.to_thread(subscribe_raw)
    with raw:
        async with connect(broker, pki, "alice") as alice:
            await alice.publish("dup.x", b"once")  # acknowledged: fanned out before the ok

        def frames_before_pong() -> list[dict[str, Any]]:
            raw.send(op="ping")
            _, before = raw.recv_until("pong")
            return before

        before = await asyncio.to_thread(frames_before_pong)
    assert before == [{"op": "msg", "topic": "dup.x", "payload": b"once"}]


async def test_headers_round_trip(broker: BrokerProcess, pki: Any) -> None:
    headers = {"content-type": "application/json", "trace-id": "abc-123", "empty": "", "ü": "✓"}
    async with connect(broker, pki, "alice") as alice, connect(broker, pki, "bob") as bob:
        sub = await bob.subscribe("hdr.*")
        await alice.publish("hdr.one", b'{"x": 1}', headers=headers)
        await alice.publish("hdr.two", b"no headers")
        first = await sub.get(timeout=TIMEOUT)
        second = await sub.get(timeout=TIMEOUT)
    assert (first.topic, first.payload, dict(first.headers or {})) == (
        "hdr.one",
        b'{"x": 1}',
        headers,
    )
    assert (second.topic, second.payload, second.headers) == ("hdr.two", b"no headers", None)


async def test_payload_bytes_are_preserved(broker: BrokerProcess, pki: Any) -> None:
    payloads = [b"", bytes(range(256)), b"\x00" * 1000, "text ✓".encode(), b"x" * 200_000]
    async with connect(broker, pki, "alice") as alice:
        sub = await alice.subscribe("bin.>")
        for i, p in enumerate(payloads):
            await alice.publish(f"bin.{i}", p)
        got = [(await sub.get(timeout=TIMEOUT)).payload for _ in payloads]
    assert got == payloads


async def test_publish_exactly_at_the_frame_limit(broker: BrokerProcess, pki: Any) -> None:
    """A publish whose frame body is exactly the announced limit is accepted and delivered
    (through many TLS records); a larger one is refused by the SDK before anything is sent."""
    async with connect(broker, pki, "alice") as alice, connect(broker, pki, "bob") as bob:
        sub = await bob.subscribe("big.x")
        limit = alice.max_payload
        assert limit == 1024 * 1024  # announced in the welcome

        def body_len(n: int) -> int:
            # alice has sent nothing yet: her first request id (the ack) is 1
            return len(encode(Publish("big.x", b"\0" * n, None, ack=1)))

        n = limit - body_len(0)
        while body_len(n) > limit:
            n -= 1
        assert body_len(n) == limit
        payload = os.urandom(n)
        await alice.publish("big.x", payload)
        assert (await sub.get(timeout=TIMEOUT)).payload == payload

        with pytest.raises(LocalProtocolError, match="exceeds"):
            await alice.publish("big.x", payload + b"12345678")
        await alice.publish("big.x", b"small")  # the connection is fine
        assert (await sub.get(timeout=TIMEOUT)).payload == b"small"


async def test_unsubscribe_stops_deliveries(broker: BrokerProcess, pki: Any) -> None:
    async with connect(broker, pki, "alice") as alice, connect(broker, pki, "bob") as bob:
        gone = await bob.subscribe("unsub.>")
        same = await bob.subscribe("unsub.>")  # the same pattern twice: refcounted in the router
        await alice.publish("unsub.a", b"before")
        assert (await gone.get(timeout=TIMEOUT)).payload == b"before"
        assert (await same.get(timeout=TIMEOUT)).payload == b"before"
        await gone.unsubscribe()
        assert not gone.active
        await alice.publish("unsub.a", b"after")
        assert (await same.get(timeout=TIMEOUT)).payload == b"after"
        # the ended subscription gets nothing more and its iteration ends
        assert [m async for m in gone] == []
        await same.unsubscribe()
        await gone.unsubscribe()  # idempotent
        # nothing left: a new subscription on the connection starts clean
        fresh = await bob.subscribe("unsub.b")
        await alice.publish("unsub.a", b"nobody")
        await alice.publish("unsub.b", b"fresh")
        assert (await fresh.get(timeout=TIMEOUT)).payload == b"fresh"


async def test_unsubscribe_stops_deliveries_on_the_wire(broker: BrokerProcess, pki: Any) -> None:
    """Seen from a raw client: after unsub the broker sends no delivery frame at all."""

    def setup() -> RawClient:
        raw = raw_client(broker, pki, "bob")
        raw.hello()
        raw.send(op="sub", sid=7, pattern="wire.>")
        raw.recv_until("ok")
        raw.send(op="unsub", sid=7)
        ok, before = raw.recv_until("ok")
        assert ok == {"op": "ok", "sid": 7} and before == []
        return raw

    raw = await asyncio.to_thread(setup)
    with raw:
        async with connect(broker, pki, "alice") as alice:
            await alice.publish("wire.x", b"should not arrive")

        def drain() -> list[dict[str, Any]]:
            raw.send(op="ping")
            return raw.recv_until("pong")[1]

        assert await asyncio.to_thread(drain) == []
        # unsubscribing again is answered with an error, and the connection stays up
        raw.send(op="unsub", sid=7)
        err, _ = await asyncio.to_thread(raw.recv_until, "error")
        assert err["code"] == ErrorCode.INVALID_SUBSCRIPTION and err["sid"] == 7


# --- identity -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alice", "bob", "carol"])
async def test_identity_is_the_certificate_cn(broker: BrokerProcess, pki: Any, name: str) -> None:
    async with connect(broker, pki, name) as client:
        assert client.identity == f"x509:{name}"
        assert client.welcome is not None and client.welcome.mechanism == "x509"
    broker.wait_for_audit("auth_success", identity=f"x509:{name}", mechanism="x509")
    broker.wait_for_log(rf"\[c\d+ 127\.0\.0\.1:\d+ x509:{name}\] session open")


@pytest.fixture(scope="module")
def email_broker(module_broker_factory: Any) -> BrokerProcess:
    return module_broker_factory.start(identity_fields=["san_email", "cn"])


@pytest.mark.parametrize(
    ("name", "identity"),
    [("carol", "x509:carol@example.com"), ("alice", "x509:alice")],  # alice has no SAN: CN
)
async def test_identity_fields_order(
    email_broker: BrokerProcess, pki: Any, name: str, identity: str
) -> None:
    async with connect(email_broker, pki, name) as client:
        assert client.identity == identity


async def test_tls_version_and_alpn(broker: BrokerProcess, pki: Any) -> None:
    def probe() -> tuple[str | None, str | None]:
        with raw_client(broker, pki, "alice") as raw:
            assert isinstance(raw.sock, ssl.SSLSocket)
            raw.hello()
            return raw.sock.version(), raw.sock.selected_alpn_protocol()

    version, alpn = await asyncio.to_thread(probe)
    assert version in ("TLSv1.2", "TLSv1.3")
    assert alpn == ALPN_PROTOCOL


async def test_a_tls12_client_is_accepted(broker: BrokerProcess, pki: Any) -> None:
    """The positive control of the TLS 1.1 refusal: 1.2 is the minimum, and it works."""
    cred = pki.clients["alice"]
    ctx = client_context(pki.ca, cred.cert, cred.key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    async with client_sdk.connect(broker.url, ssl_context=ctx, timeout=TIMEOUT) as client:
        assert client.identity == "x509:alice"


# --- refusals -----------------------------------------------------------------------------


def _tls11_context(pki: Any) -> dict[str, Any]:
    cred = pki.clients["alice"]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1/TLSv1_1 are deprecated
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # else OpenSSL 3 will not even offer TLS 1.1
    ctx.load_verify_locations(pki.ca)
    ctx.load_cert_chain(cred.cert, cred.key)
    return {"ssl_context": ctx}


REFUSALS: dict[str, tuple[Callable[[Any], dict[str, Any]], str, str, str]] = {
    # label: (connect kwargs, client-side message, audit reason, broker log detail)
    "no client certificate": (
        lambda pki: {"ca": pki.ca},
        "certificate required",
        "tls_no_client_cert",
        "no client certificate sent",
    ),
    "certificate from another CA": (
        lambda pki: pki.foreign_client("alice"),
        "unknown ca",
        "tls_bad_cert",
        "unable to get local issuer certificate",
    ),
    "expired certificate": (
        lambda pki: pki.client("expired"),
        "certificate expired",
        "tls_bad_cert",
        "certificate has expired",
    ),
    "TLS 1.1 client": (
        _tls11_context,
        "protocol version",
        "tls_protocol",
        "unsupported_protocol",
    ),
    "client does not trust the broker": (
        lambda pki: pki.client("alice", ca=pki.other_ca),
        "broker certificate rejected",
        "tls_peer_rejected",
        "client sent alert: unknown ca",
    ),
}


@pytest.mark.parametrize("label", list(REFUSALS))
async def test_refused(broker: BrokerProcess, pki: Any, label: str) -> None:
    make_kwargs, client_message, reason, detail = REFUSALS[label]
    mark = broker.log_mark()
    with pytest.raises(AuthenticationError, match=client_message) as info:
        async with client_sdk.connect(broker.url, timeout=TIMEOUT, **make_kwargs(pki)):
            pytest.fail("the connection was accepted")
    assert not isinstance(info.value, ConnectionClosed)
    assert info.value.code is ErrorCode.AUTHENTICATION_FAILED
    # The broker refused it too (not just the client giving up): an audit record and a log
    # line, both naming the connection.
    record = broker.wait_for_audit("auth_failure", since=mark, reason=reason)
    assert "identity" not in record
    broker.wait_for_log(
        rf"INFO +tessera\.broker: \[c{record['conn']} 127\.0\.0\.1:\d+ -\] handshake failed: "
        rf"{reason}: .*{re.escape(detail)}",
        since=mark,
    )
    # no session was ever opened for it
    assert not [e for e in broker.audit_events(mark) if e["event"] == "auth_success"]
    assert not any("session open" in x for x in broker.log_lines()[mark:])
    # and the broker still serves legitimate clients
    async with connect(broker, pki, "bob") as bob:
        assert bob.identity == "x509:bob"


async def test_refusal_logs_carry_no_secrets(broker: BrokerProcess, pki: Any) -> None:
    mark = broker.log_mark()
    with pytest.raises(AuthenticationError):
        async with client_sdk.connect(broker.url, timeout=TIMEOUT, **pki.client("expired")):
            pass
    broker.wait_for_audit("auth_failure", since=mark)
    text = "\n".join(broker.log_lines()[mark:])
    key_pem = Path(pki.clients["expired"].key).read_text()
    assert "PRIVATE KEY" not in text
    assert key_pem.splitlines()[1] not in text


# --- shutdown -----------------------------------------------------------------------------


async def test_sigterm_sends_going_away_and_exits_0(broker_factory: Any, pki: Any) -> None:
    broker = broker_factory.start(shutdown_timeout=5)
    # Reconnection off: this test is about what the broker's close tells the application.
    async with (
        connect(broker, pki, "alice", reconnect=False) as alice,
        connect(broker, pki, "bob", reconnect=False) as bob,
    ):
        sub_a = await alice.subscribe("bye.>")
        sub_b = await bob.subscribe("bye.*")
        await alice.publish("bye.now", b"last")
        assert (await sub_b.get(timeout=TIMEOUT)).payload == b"last"
        assert (await sub_a.get(timeout=TIMEOUT)).payload == b"last"

        broker.send_signal(signal.SIGTERM)
        for sub in (sub_a, sub_b):
            with pytest.raises(ConnectionClosedError) as info:
                await sub.get(timeout=TIMEOUT)
            assert info.value.code is ErrorCode.GOING_AWAY
            assert "shutting down" in info.value.reason
        async with asyncio.timeout(TIMEOUT):
            await alice.wait_closed()
            await bob.wait_closed()
        assert not alice.is_open
        with pytest.raises(ConnectionClosedError) as info:
            await alice.publish("bye.again", b"x")
        assert info.value.code is ErrorCode.GOING_AWAY
    assert await asyncio.to_thread(broker.wait) == 0
    broker.wait_for_log(r"shutting down: closing 2 connection\(s\)")
    broker.wait_for_log(r"INFO +tessera\.broker: stopped$")


async def test_sigint_also_stops_cleanly(broker_factory: Any, pki: Any) -> None:
    broker = broker_factory.start()
    async with connect(broker, pki, "alice", reconnect=False) as alice:
        sub = await alice.subscribe("x")
        broker.send_signal(signal.SIGINT)
        with pytest.raises(ConnectionClosedError) as info:
            await sub.get(timeout=TIMEOUT)
        assert info.value.code is ErrorCode.GOING_AWAY
    assert await asyncio.to_thread(broker.wait) == 0


async def test_sigterm_with_no_clients_exits_0(broker_factory: Any) -> None:
    broker = broker_factory.start()
    assert await asyncio.to_thread(broker.stop) == 0
    broker.wait_for_log(r"shutting down: closing 0 connection\(s\)", timeout=0)
    broker.wait_for_log(r"INFO +tessera\.broker: stopped$", timeout=0)
