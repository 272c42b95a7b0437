"""ACL-filtered wildcard subscriptions through a REAL broker process (issue #10).

``status.>`` with ``status.secret.>`` denied delivers everything but that subtree; ``org.>``
for an identity allowed ``org.a.>`` and ``org.b.>`` delivers exactly those organisations; a
subscription that can never deliver anything is refused. The publisher is allowed everything,
so every topic is published and the filter alone decides.
"""

from __future__ import annotations

from typing import Any

import pytest
from brokerproc import BrokerProcess

from tessera_mq import client as client_sdk
from tessera_mq.client import PermissionDenied

TIMEOUT = 5.0

ACL = """\
[[allow]]
principals = ["x509:alice"]
publish = [">"]
subscribe = [">"]

[[allow]]
principals = ["x509:bob"]
subscribe = ["status.>", "org.a.>", "org.b.>"]

[[deny]]
principals = ["x509:bob"]
subscribe = ["status.secret.>"]
"""


@pytest.fixture(scope="module")
def broker(module_broker_factory: Any) -> BrokerProcess:
    return module_broker_factory.start(ACL)


def connect(broker: BrokerProcess, pki: Any, name: str) -> client_sdk.connect:
    return client_sdk.connect(broker.url, **pki.client(name), timeout=TIMEOUT)


async def received(sub: client_sdk.Subscription, marker: str) -> list[str]:
    """Topics delivered to ``sub`` up to and including the ``marker`` topic."""
    topics: list[str] = []
    while True:
        msg = await sub.get(timeout=TIMEOUT)
        topics.append(msg.topic)
        if msg.topic == marker:
            return topics


async def test_denied_subtree_is_filtered_out(broker: BrokerProcess, pki: Any) -> None:
    async with connect(broker, pki, "alice") as alice, connect(broker, pki, "bob") as bob:
        sub = await bob.subscribe("status.>")
        for topic in ("status.eu", "status.secret.keys", "status.secret", "status.secret.a.b"):
            await alice.publish(topic, b"x")
        await alice.publish("status.end", b"end")
        assert await received(sub, "status.end") == ["status.eu", "status.secret", "status.end"]


async def test_org_wildcard_delivers_exactly_the_allowed_organisations(
    broker: BrokerProcess, pki: Any
) -> None:
    async with connect(broker, pki, "alice") as alice, connect(broker, pki, "bob") as bob:
        sub = await bob.subscribe("org.>")
        for topic in ("org.a.x", "org.c.x", "org.b.y.z", "org.a", "org.d.secret"):
            await alice.publish(topic, b"x")
        await alice.publish("org.b.end", b"end")
        assert await received(sub, "org.b.end") == ["org.a.x", "org.b.y.z", "org.b.end"]


async def test_a_subscription_that_can_deliver_nothing_is_refused(
    broker: BrokerProcess, pki: Any
) -> None:
    mark = broker.log_mark()
    async with connect(broker, pki, "bob") as bob:
        for pattern in ("status.secret.>", "org.c.>", "other"):
            with pytest.raises(PermissionDenied):
                await bob.subscribe(pattern)
        assert bob.is_open
    record = broker.wait_for_audit("denied", since=mark, subject="status.secret.>")
    assert record["reason"] == "denied by deny[0]"
