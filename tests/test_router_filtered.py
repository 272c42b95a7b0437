"""ACL-filtered wildcard subscriptions in ``broker.router`` (issue #10), in-process: real
:class:`auth.acl.Grant` objects from a real policy, subscribers that record what they get."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tessera_mq.auth.acl import Policy, matches
from tessera_mq.auth.identity import Identity
from tessera_mq.broker.router import Router

POLICY = Policy.from_text(
    """
[[allow]]
principals = ["x509:dash"]
subscribe = ["status.>"]

[[deny]]
principals = ["x509:dash"]
subscribe = ["status.secret.>"]

[[allow]]
principals = ["x509:org"]
subscribe = ["org.a.>", "org.b.>"]
"""
)
DASH = Identity("x509", "dash")
ORG = Identity("x509", "org")


class Sink:
    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0

    def deliver(self, data: bytes, count: int) -> None:
        self.count += count

    def __repr__(self) -> str:
        return f"Sink({self.name})"


def test_denied_subtree_is_not_delivered() -> None:
    router = Router()
    dash, plain = Sink("dash"), Sink("plain")
    grant = POLICY.subscription(DASH, "status.>")
    assert grant.possible and not grant.unrestricted
    router.subscribe(dash, "status.>", grant)
    router.subscribe(plain, "status.>")  # unrestricted: no grant needed
    assert set(router.match("status.eu")) == {dash, plain}
    assert set(router.match("status.secret.keys")) == {plain}
    assert set(router.match("status.secret")) == {dash, plain}
    assert router.subscription_count == 2


def test_union_of_allowed_subtrees() -> None:
    router = Router()
    org = Sink("org")
    grant = POLICY.subscription(ORG, "org.>")
    router.subscribe(org, "org.>", grant)
    assert router.match("org.a.x") == (org,)
    assert router.match("org.b.y.z") == (org,)
    assert router.match("org.c.x") == ()
    assert router.match("org.a") == ()


def test_one_copy_when_an_unrestricted_subscription_also_matches() -> None:
    router = Router()
    dash = Sink("dash")
    router.subscribe(dash, "status.>", POLICY.subscription(DASH, "status.>"))
    router.subscribe(dash, "status.eu.>", POLICY.subscription(DASH, "status.eu.>"))
    assert router.match("status.eu.x") == (dash,)
    assert router.route("status.eu.x", b"p") == 1
    assert dash.count == 1


def test_unsubscribe_filtered_and_pruning() -> None:
    router = Router()
    dash = Sink("dash")
    grant = POLICY.subscription(DASH, "status.>")
    router.subscribe(dash, "status.>", grant)
    router.subscribe(dash, "status.>", grant)  # two sids, one pattern
    router.unsubscribe(dash, "status.>", grant)
    assert router.match("status.eu") == (dash,)
    router.unsubscribe(dash, "status.>", grant)
    assert router.match("status.eu") == ()
    assert router.subscription_count == 0
    assert not router._filtered.children and not router._filtered.rest
    router.unsubscribe(dash, "status.>", grant)  # unknown: ignored
    router.unsubscribe(dash, "nothing.here", grant)
    assert router.subscription_count == 0


def test_decisions_are_cached_per_topic() -> None:
    calls: list[tuple[str, ...]] = []
    grant = POLICY.subscription(DASH, "status.>")

    class Counting:
        unrestricted = False

        def allows(self, topic: object) -> bool:
            calls.append(tuple(topic))  # type: ignore[arg-type]
            return grant.allows(topic)  # type: ignore[arg-type]

    router = Router()
    dash = Sink("dash")
    router.subscribe(dash, "status.>", Counting())
    for _ in range(100):
        router.route("status.eu", b"x")
    assert dash.count == 100
    assert calls == [("status", "eu")]  # asked once; the topic's match is cached


_token = st.sampled_from(("status", "secret", "org", "a", "b", "x"))
_topics = st.lists(_token, min_size=1, max_size=4).map(".".join)
_patterns = st.lists(
    st.sampled_from(("status", "org", "a", "secret", "*")), min_size=0, max_size=3
).map(lambda t: ".".join([*t, ">"]))


@settings(max_examples=150, deadline=None)
@given(patterns=st.lists(_patterns, min_size=1, max_size=4), topic=_topics)
def test_router_delivers_exactly_what_the_acl_allows(patterns: list[str], topic: str) -> None:
    """A subscriber gets a topic iff one of its subscriptions matches it and its grant allows
    it; unrestricted and filtered subscriptions mix freely."""
    router = Router()
    subs = {name: Sink(name) for name in ("dash", "org")}
    granted: dict[str, list[str]] = {name: [] for name in subs}
    for (name, sink), pattern in itertools.product(subs.items(), patterns):
        grant = POLICY.subscription(Identity("x509", name), pattern)
        if grant.possible:
            router.subscribe(sink, pattern, grant)
            granted[name].append(pattern)
    tokens = tuple(topic.split("."))
    for name, sink in subs.items():
        identity = Identity("x509", name)
        expected = any(
            matches(tuple(p.split(".")), tokens) and POLICY.subscription(identity, p).allows(topic)
            for p in granted[name]
        )
        assert (sink in router.match(topic)) is expected, (name, granted[name], topic)


def test_the_filtered_fanout_bench_runs() -> None:
    """bench/filtered_fanout.py (the bench row of issue #10) stays runnable: seconds, tiny."""
    script = Path(__file__).resolve().parent.parent / "bench" / "filtered_fanout.py"
    done = subprocess.run(
        [sys.executable, str(script), "--subs", "10", "--publishes", "200"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["case"] for r in rows] == ["unrestricted", "filtered", "filtered, cold"]
    assert all(r["us_per_publish"] > 0 for r in rows)
