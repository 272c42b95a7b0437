"""Unit tests for ``broker.router``: the subscription trie and fan-out (the backplane is the hub's:
tests/test_hub.py).

No sockets and no event loop: subscribers are plain objects that record the frames they get.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera_mq.broker import router as router_module
from tessera_mq.broker.router import Router
from tessera_mq.client.protocol.codec import decode
from tessera_mq.client.protocol.events import Message
from tessera_mq.client.protocol.framing import FrameDecoder
from tessera_mq.client.protocol.topics import matches, validate_pattern, validate_topic


class Sink:
    """A subscriber that keeps every frame it is handed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.frames: list[bytes] = []

    def deliver(self, frame: bytes, count: int) -> None:
        assert count == 1  # a router without a scheduler hands over one frame at a time
        self.frames.append(frame)

    def __repr__(self) -> str:
        return f"Sink({self.name})"


def decode_frame(frame: bytes) -> Message:
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    event = decode(frame[4:])
    assert isinstance(event, Message)
    return event


def node_count(router: Router) -> int:
    """Trie nodes below the root (white-box: pruning must bring this back to 0)."""
    stack = [router._root]
    n = 0
    while stack:
        node = stack.pop()
        n += len(node.children)
        stack.extend(node.children.values())
    return n


@pytest.fixture
def router() -> Router:
    return Router()


# --- matching -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a.b.c", "a.b.c", True),
        ("a.b.c", "a.b", False),
        ("a.b.c", "a.b.c.d", False),
        ("a.b.c", "a.b.x", False),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.x.c", True),
        ("a.*.c", "a.c", False),
        ("a.*.c", "a.b.b.c", False),
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("*", "a", True),
        ("*", "a.b", False),
        ("*.*", "a.b", True),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c.d", True),
        ("a.>", "a", False),
        ("a.>", "b.a", False),
        (">", "a", True),
        (">", "a.b.c", True),
        ("*.>", "a", False),
        ("*.>", "a.b", True),
        ("a.*.>", "a.b", False),
        ("a.*.>", "a.b.c", True),
        ("*.b.*", "a.b.c", True),
        ("*.b.*", "a.x.c", False),
    ],
)
def test_single_subscription(router: Router, pattern: str, topic: str, expected: bool) -> None:
    sink = Sink("s")
    router.subscribe(sink, pattern)
    assert (router.match(topic) == (sink,)) is expected
    assert matches(pattern, topic) is expected  # the router agrees with the reference rules


def test_many_subscribers_each_matched_once(router: Router) -> None:
    a, b, c, d = Sink("a"), Sink("b"), Sink("c"), Sink("d")
    router.subscribe(a, "x.y.z")
    router.subscribe(a, "x.*.z")  # a second pattern of `a` matching the same topics
    router.subscribe(a, "x.>")
    router.subscribe(b, "x.*.*")
    router.subscribe(c, "y.>")
    router.subscribe(d, ">")
    assert set(router.match("x.y.z")) == {a, b, d}
    assert len(router.match("x.y.z")) == 3  # deduplicated: `a` once despite three patterns
    assert set(router.match("x.y")) == {a, d}
    assert set(router.match("y.q")) == {c, d}
    assert set(router.match("z")) == {d}


def test_route_encodes_once_and_hands_the_same_bytes_to_all(router: Router) -> None:
    a, b = Sink("a"), Sink("b")
    router.subscribe(a, "t.>")
    router.subscribe(a, "t.*")
    router.subscribe(b, "t.x")
    n = router.route("t.x", b"payload", {"k": "v"})
    assert n == 2
    assert len(a.frames) == 1  # one frame per subscriber, however many patterns match
    assert len(b.frames) == 1
    assert a.frames[0] is b.frames[0]  # byte-identical: the very same object
    msg = decode_frame(a.frames[0])
    assert (msg.topic, msg.payload, msg.headers) == ("t.x", b"payload", {"k": "v"})


def test_no_subscriber_no_encoding(router: Router) -> None:
    assert router.route("nobody.home", b"x") == 0
    assert router.route("nobody.home", b"x") == 0


def test_frame_without_headers_has_no_headers_key(router: Router) -> None:
    a = Sink("a")
    router.subscribe(a, "t")
    router.route("t", b"")
    body = msgpack.unpackb(a.frames[0][4:], raw=False)
    assert body == {"op": "msg", "topic": "t", "payload": b""}


# --- refcounting, unsubscribe, pruning, cache -----------------------------------------------


def test_same_pattern_twice_is_refcounted(router: Router) -> None:
    a = Sink("a")
    router.subscribe(a, "r.*")
    router.subscribe(a, "r.*")
    assert router.subscription_count == 2
    router.route("r.1", b"x")
    assert len(a.frames) == 1  # still one copy
    router.unsubscribe(a, "r.*")
    assert router.subscription_count == 1
    assert router.match("r.1") == (a,)  # one subscription left: still matched
    router.unsubscribe(a, "r.*")
    assert router.subscription_count == 0
    assert router.match("r.1") == ()


def test_same_pattern_twice_with_rest_wildcard(router: Router) -> None:
    a = Sink("a")
    router.subscribe(a, "r.>")
    router.subscribe(a, "r.>")
    router.unsubscribe(a, "r.>")
    assert router.match("r.1.2") == (a,)
    router.unsubscribe(a, "r.>")
    assert router.match("r.1.2") == ()
    assert node_count(router) == 0


def test_unsubscribe_of_other_subscriber_or_unknown_pattern_is_a_no_op(router: Router) -> None:
    a, b = Sink("a"), Sink("b")
    router.subscribe(a, "p.q")
    router.unsubscribe(b, "p.q")  # b never subscribed
    router.unsubscribe(a, "p.r")  # a never subscribed to that
    router.unsubscribe(a, "z.>")  # nothing under z at all
    router.unsubscribe(a, "p.q.>")
    assert router.subscription_count == 1
    assert router.match("p.q") == (a,)


@pytest.mark.parametrize(
    "patterns",
    [
        ["a"],
        ["a.b.c.d"],
        ["a.>"],
        [">"],
        ["*.*.*"],
        ["a.b", "a.b.c", "a.>", "a.*.c", "a.b.>", "*"],
    ],
)
def test_unsubscribe_prunes_every_node(router: Router, patterns: list[str]) -> None:
    sinks = [Sink(str(i)) for i in range(3)]
    for sink in sinks:
        for p in patterns:
            router.subscribe(sink, p)
    assert node_count(router) > 0 or patterns == [">"]
    for sink in sinks:
        for p in reversed(patterns):
            router.unsubscribe(sink, p)
    assert router.subscription_count == 0
    assert node_count(router) == 0
    assert router._root.empty()


def test_unsubscribe_keeps_nodes_still_in_use(router: Router) -> None:
    a, b = Sink("a"), Sink("b")
    router.subscribe(a, "a.b.c")
    router.subscribe(b, "a.b")
    router.unsubscribe(a, "a.b.c")
    assert router.match("a.b") == (b,)
    assert router.match("a.b.c") == ()
    assert node_count(router) == 2  # a, a.b


def test_match_cache_is_invalidated_by_subscribe_and_unsubscribe(router: Router) -> None:
    a, b = Sink("a"), Sink("b")
    router.subscribe(a, "c.*")
    assert router.match("c.1") == (a,)
    assert router.match("c.1") == (a,)  # served from the cache
    router.subscribe(b, "c.>")
    assert set(router.match("c.1")) == {a, b}  # the cached answer did not survive
    router.unsubscribe(a, "c.*")
    assert router.match("c.1") == (b,)
    router.unsubscribe(b, "c.>")
    assert router.match("c.1") == ()


def test_cache_for_unmatched_topic_is_invalidated(router: Router) -> None:
    a = Sink("a")
    assert router.match("late.topic") == ()
    router.subscribe(a, "late.topic")
    assert router.match("late.topic") == (a,)


def test_cache_is_bounded(router: Router) -> None:
    a = Sink("a")
    router.subscribe(a, ">")
    for i in range(router_module._MATCH_CACHE_ENTRIES + 10):
        router.match(f"t{i}")
    assert len(router._cache) <= router_module._MATCH_CACHE_ENTRIES


def test_lookup_does_not_visit_unrelated_branches(router: Router) -> None:
    """10 000 unrelated subscriptions do not change what a lookup returns (cost is the trie walk
    along the topic's own tokens; checked functionally, timing is the benchmark's job)."""
    target = Sink("target")
    others = [Sink(f"o{i}") for i in range(100)]
    for i in range(10_000):
        router.subscribe(others[i % 100], f"unrelated{i}.x.>")
    router.subscribe(target, "hot.*.x")
    assert router.match("hot.a.x") == (target,)
    assert router.match("unrelated7.x.y") == (others[7],)


# --- property: the trie agrees with brute force ----------------------------------------------

_TOKENS = st.sampled_from(["a", "b", "c"])
_PATTERN_TOKENS = st.sampled_from(["a", "b", "c", "*"])


@st.composite
def patterns(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(_PATTERN_TOKENS, min_size=1, max_size=4))
    if draw(st.booleans()):
        tokens.append(">")
    return validate_pattern(".".join(tokens))


topics = st.lists(_TOKENS, min_size=1, max_size=5).map(lambda t: validate_topic(".".join(t)))

# An operation: (subscribe?, subscriber index, pattern)
operations = st.lists(
    st.tuples(st.booleans(), st.integers(0, 3), patterns()), min_size=1, max_size=40
)


@settings(max_examples=200, deadline=None)
@given(ops=operations, probes=st.lists(topics, min_size=1, max_size=10))
def test_router_matches_brute_force(ops: list[tuple[bool, int, str]], probes: list[str]) -> None:
    router = Router()
    sinks = [Sink(str(i)) for i in range(4)]
    live: dict[tuple[int, str], int] = {}  # (subscriber, pattern) -> refcount
    for is_subscribe, who, pattern in ops:
        key = (who, pattern)
        if is_subscribe:
            router.subscribe(sinks[who], pattern)
            live[key] = live.get(key, 0) + 1
        elif live.get(key):
            router.unsubscribe(sinks[who], pattern)
            live[key] -= 1
        # interleave lookups with changes so stale cache entries would show
        for topic in probes:
            expected = {sinks[w] for (w, p), n in live.items() if n and matches(p, topic)}
            got = router.match(topic)
            assert len(got) == len(set(got)), "a subscriber was returned twice"
            assert set(got) == expected, (topic, got, expected)
    assert router.subscription_count == sum(live.values())
    for (who, pattern), n in live.items():
        for _ in range(n):
            router.unsubscribe(sinks[who], pattern)
    assert router.subscription_count == 0
    assert node_count(router) == 0


# --- batched mode (the broker's): blocks per subscriber set, publish order kept --------------


class BlockSink:
    def __init__(self) -> None:
        self.blocks: list[tuple[bytes, int]] = []

    def deliver(self, data: bytes, count: int) -> None:
        self.blocks.append((data, count))

    def topics(self) -> list[str]:
        out = []
        for data, count in self.blocks:
            decoder = FrameDecoder()
            bodies = decoder.feed(data)
            assert len(bodies) == count
            out += [msgpack.unpackb(b, raw=False)["topic"] for b in bodies]
        return out


def test_batched_fan_out_joins_consecutive_publishes_and_keeps_order() -> None:
    scheduled: list[int] = []
    router = Router(schedule=lambda: scheduled.append(1))
    a, b = BlockSink(), BlockSink()
    router.subscribe(a, "s.>")
    router.subscribe(b, "s.x")
    for topic in ("s.x", "s.x", "s.y", "s.x"):
        router.route(topic, b"p")
    assert scheduled == [1]  # one flush per turn, asked for once
    assert a.blocks == [] and b.blocks == []  # nothing before the flush
    router.flush_pending()
    # a is in every block; the s.y publish starts a new block, so order is kept for a.
    assert a.topics() == ["s.x", "s.x", "s.y", "s.x"]
    assert [count for _, count in a.blocks] == [2, 1, 1]
    assert b.topics() == ["s.x", "s.x", "s.x"]
    assert a.blocks[0][0] is b.blocks[0][0]  # one bytes object shared by the block's subscribers
    router.flush_pending()  # nothing pending: nothing happens
    assert len(a.blocks) == 3
