"""The ACL enforced by a real broker process: an allow/deny matrix over real TLS identities.

A denied subscribe or publish gets PermissionDenied, the connection stays usable, a denied
publish reaches nobody, deny wins over allow, ``{name}`` is the caller's own name, a denied
publish without acknowledgement is reported to ``on_error``, and an empty ACL denies everything.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from brokerproc import BrokerProcess
from timing import scaled

from tessera_mq import client as client_sdk
from tessera_mq.client import ErrorCode, PermissionDenied, TesseraError

TIMEOUT = scaled(5.0)

ACL = """\
[[allow]]                       # allow[0]
principals = ["x509:alice"]
publish = ["status.>", "cmd.>"]
subscribe = ["status.*", "cmd.{name}.>"]

[[allow]]                       # allow[1]
principals = ["x509:bob"]
publish = ["cmd.>"]
subscribe = ["status.>", "cmd.{name}.>"]

[[allow]]                       # allow[2]: everyone authenticated
principals = ["*"]
publish = ["chat.>"]
subscribe = ["chat.>"]

[[deny]]                        # deny[0]
principals = ["x509:mallory"]
publish = ["chat.secret.>"]
subscribe = ["chat.secret.>"]

[[deny]]                        # deny[1]: even though allow[0] grants cmd.>
principals = ["x509:alice"]
publish = ["cmd.reboot.>"]
"""

PUB, SUB = "publish", "subscribe"

MATRIX = [
    # (who, action, subject, allowed, deciding rule in the audit reason)
    ("alice", PUB, "status.eu.node1", True, None),
    ("alice", PUB, "status", False, "no allow rule matches"),
    ("alice", SUB, "status.eu", True, None),
    ("alice", SUB, "status.>", True, None),  # filtered: delivers only what status.* allows
    ("alice", SUB, "cmd.alice.>", True, None),  # {name} = alice
    ("alice", SUB, "cmd.alice.restart", True, None),
    ("alice", SUB, "cmd.bob.>", False, "no allow rule matches"),
    ("alice", SUB, "cmd.*.>", True, None),  # filtered: delivers only cmd.alice.…
    ("alice", PUB, "cmd.bob.restart", True, None),
    ("alice", PUB, "cmd.reboot.now", False, "denied by deny[1]"),  # deny wins over allow[0]
    ("bob", SUB, "status.>", True, None),
    ("bob", PUB, "status.eu", False, "no allow rule matches"),
    ("bob", SUB, "cmd.bob.>", True, None),
    ("bob", SUB, "cmd.alice.>", False, "no allow rule matches"),
    ("bob", PUB, "chat.room1", True, None),
    ("mallory", PUB, "chat.room1", True, None),
    ("mallory", SUB, "chat.room1", True, None),
    ("mallory", SUB, "chat.public.>", True, None),
    ("mallory", SUB, "chat.secret.x", False, "denied by deny[0]"),
    ("mallory", SUB, "chat.>", True, None),  # filtered: chat.secret.> is not delivered
    ("mallory", SUB, "chat.*.x", True, None),  # filtered: chat.secret.x is not delivered
    ("mallory", SUB, "chat.secret.>", False, "denied by deny[0]"),  # nothing readable
    ("mallory", PUB, "chat.secret.x", False, "denied by deny[0]"),
    ("mallory", PUB, "status.eu", False, "no allow rule matches"),
    ("mallory", SUB, "status.eu", False, "no allow rule matches"),
    ("carol", SUB, "chat.>", True, None),
    ("carol", SUB, "cmd.carol.>", False, "no allow rule matches"),  # {name} only in allow[0/1]
]


@pytest.fixture(scope="module")
def broker(module_broker_factory: Any) -> BrokerProcess:
    return module_broker_factory.start(ACL)


def connect(broker: BrokerProcess, pki: Any, name: str, **kwargs: Any) -> client_sdk.connect:
    return client_sdk.connect(broker.url, **pki.client(name), timeout=TIMEOUT, **kwargs)


async def still_usable(client: client_sdk.Client) -> None:
    """The connection survived: everyone may use chat.>, round trip through the broker."""
    sub = await client.subscribe("chat.usable")
    await client.publish("chat.usable", b"ping")
    assert (await sub.get(timeout=TIMEOUT)).payload == b"ping"
    await sub.unsubscribe()


@pytest.mark.parametrize(
    ("who", "action", "subject", "allowed", "reason"),
    MATRIX,
    ids=[f"{w}-{a}-{s}" for w, a, s, *_ in MATRIX],
)
async def test_matrix(
    broker: BrokerProcess,
    pki: Any,
    who: str,
    action: str,
    subject: str,
    allowed: bool,
    reason: str | None,
) -> None:
    mark = broker.log_mark()
    async with connect(broker, pki, who) as client:
        if allowed:
            if action == SUB:
                sub = await client.subscribe(subject)
                assert sub.active
            else:
                await client.publish(subject, b"x")
        else:
            attempt = client.subscribe(subject) if action == SUB else client.publish(subject, b"x")
            with pytest.raises(PermissionDenied) as info:
                await attempt
            assert info.value.code is ErrorCode.PERMISSION_DENIED
            assert subject in str(info.value)
            assert client.is_open
            await still_usable(client)
            record = broker.wait_for_audit(
                "denied", since=mark, action=action, subject=subject, identity=f"x509:{who}"
            )
            assert record["reason"] == reason
    if allowed:
        assert not [e for e in broker.audit_events(mark) if e["event"] == "denied"]


async def test_denied_publish_reaches_nobody(broker: BrokerProcess, pki: Any) -> None:
    async with connect(broker, pki, "bob") as bob, connect(broker, pki, "mallory") as mallory:
        sub = await bob.subscribe("chat.>")  # bob may read chat.secret.x
        with pytest.raises(PermissionDenied):
            await mallory.publish("chat.secret.x", b"leak")
        await mallory.publish("chat.room1", b"fine")
        msg = await sub.get(timeout=TIMEOUT)
        assert (msg.topic, msg.payload) == ("chat.room1", b"fine")  # the denied one never came


async def test_name_substitution_routes_commands_to_their_owner(
    broker: BrokerProcess, pki: Any
) -> None:
    async with connect(broker, pki, "alice") as alice, connect(broker, pki, "bob") as bob:
        alice_cmds = await alice.subscribe("cmd.alice.>")
        bob_cmds = await bob.subscribe("cmd.bob.>")
        with pytest.raises(PermissionDenied):
            await alice.subscribe("cmd.bob.>")
        with pytest.raises(PermissionDenied):
            await bob.subscribe("cmd.alice.>")
        await bob.publish("cmd.alice.restart", b"for alice")
        await alice.publish("cmd.bob.restart", b"for bob")
        assert (await alice_cmds.get(timeout=TIMEOUT)).payload == b"for alice"
        assert (await bob_cmds.get(timeout=TIMEOUT)).payload == b"for bob"


async def test_denials_leave_the_connection_and_its_subscriptions_intact(
    broker: BrokerProcess, pki: Any
) -> None:
    async with connect(broker, pki, "mallory") as mallory, connect(broker, pki, "bob") as bob:
        sub = await mallory.subscribe("chat.public.>")
        for _ in range(3):  # repeated denials, mixed kinds; cached decisions stay denials
            with pytest.raises(PermissionDenied):
                await mallory.subscribe("chat.secret.>")
            with pytest.raises(PermissionDenied):
                await mallory.publish("chat.secret.y", b"x")
        await bob.publish("chat.public.news", b"still subscribed")
        assert (await sub.get(timeout=TIMEOUT)).payload == b"still subscribed"
        await still_usable(mallory)


async def test_denied_publish_without_ack_goes_to_on_error(broker: BrokerProcess, pki: Any) -> None:
    errors: list[TesseraError] = []
    got_error = asyncio.Event()

    def on_error(err: TesseraError) -> None:
        errors.append(err)
        got_error.set()

    async with (
        connect(broker, pki, "mallory", on_error=on_error) as mallory,
        connect(broker, pki, "bob") as bob,
        connect(broker, pki, "alice") as alice,
    ):
        bob_sub = await bob.subscribe("chat.>")
        await alice.publish("chat.a", b"1", ack=False)
        await mallory.publish("chat.secret.z", b"denied", ack=False)  # returns at once
        await mallory.publish("chat.room1", b"2", ack=False)
        await alice.publish("chat.b", b"3", ack=False)
        async with asyncio.timeout(TIMEOUT):
            await got_error.wait()
        (err,) = errors
        assert isinstance(err, PermissionDenied)
        assert "chat.secret.z" in str(err)
        # others are not affected, nor is mallory's connection
        got = sorted([(await bob_sub.get(timeout=TIMEOUT)).payload for _ in range(3)])
        assert got == [b"1", b"2", b"3"]
        assert mallory.is_open
        await mallory.publish("chat.room1", b"4")  # acknowledged: the connection works
        assert (await bob_sub.get(timeout=TIMEOUT)).payload == b"4"
        assert len(errors) == 1


@pytest.fixture(scope="module")
def empty_acl_broker(module_broker_factory: Any) -> BrokerProcess:
    return module_broker_factory.start("")


@pytest.mark.parametrize("who", ["alice", "bob"])
async def test_empty_acl_denies_everything(
    empty_acl_broker: BrokerProcess, pki: Any, who: str
) -> None:
    broker = empty_acl_broker
    mark = broker.log_mark()
    async with connect(broker, pki, who) as client:
        assert client.identity == f"x509:{who}"  # authenticated, but may do nothing
        for pattern in (">", "status.*", f"cmd.{who}.>", "x"):
            with pytest.raises(PermissionDenied):
                await client.subscribe(pattern)
        for topic in ("status.eu", "x"):
            with pytest.raises(PermissionDenied):
                await client.publish(topic, b"x")
        assert client.is_open
    records = [e for e in broker.audit_events(mark) if e["event"] == "denied"]
    assert len(records) == 6
    assert {r["reason"] for r in records} == {"no allow rule matches"}


async def test_denied_publish_log_carries_no_payload(broker: BrokerProcess, pki: Any) -> None:
    mark = broker.log_mark()
    secret = b"very-secret-payload-4711"
    async with connect(broker, pki, "mallory") as mallory:
        with pytest.raises(PermissionDenied):
            await mallory.publish("chat.secret.q", secret)
    broker.wait_for_audit("denied", since=mark, subject="chat.secret.q")
    assert secret.decode() not in broker.log()


async def test_connection_survives_many_denials(broker: BrokerProcess, pki: Any) -> None:
    async with connect(broker, pki, "bob") as bob:
        for i in range(50):
            with pytest.raises(PermissionDenied):
                await bob.publish(f"status.n{i}", b"x")
        results = await asyncio.gather(
            *(bob.subscribe(f"cmd.alice.{i}") for i in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, PermissionDenied) for r in results), results
        await still_usable(bob)
