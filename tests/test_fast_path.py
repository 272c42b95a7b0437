"""The publish fast paths (issue #14) change nothing a client can see.

A plain ``pub`` frame skips the event object (``Connection.publish_sink``), and a run of them to
one topic is taken from a read in one piece (``PublishSink.publish_run``), relabelled ``pub`` ->
``msg`` in place of being decoded and re-encoded. These tests drive the real hub, handlers and
router in-process (tests/test_hub.py's fake clock) and compare, for the same byte stream cut at
the same places, what every client receives with the fast paths on and with them off (the
general path: one event per frame), including bad input that merely resembles a fast-path frame.
"""

from __future__ import annotations

from typing import Any

import msgpack
from helpers_protocol import frame
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hub import FakeIO, TestHub, client

from auth.acl import Policy
from broker.handler import RequestHandler
from client_sdk.protocol.codec import encode_message_frame
from client_sdk.protocol.events import Error, Event, Message, Ok

PAYLOAD = b"\0" * 8 + b"x" * 248


def pub(topic: str, payload: bytes = PAYLOAD, **extra: Any) -> bytes:
    return frame({"op": "pub", "topic": topic, "payload": payload, **extra})


def raw(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def general_path_only(handler: RequestHandler) -> None:
    handler.conn.publish_sink = None


def run(stream: bytes, cuts: list[int], fast: bool) -> tuple[list[Event], list[Event], Any]:
    """Feed ``stream`` from a publisher (alice, also subscribed to ``t.>``) cut at ``cuts``,
    one loop turn per read; returns what the publisher and a second subscriber received."""
    hub = TestHub()
    sub, sub_io = client(hub, "bob")
    publisher, pub_io = client(hub, "alice")
    if not fast:
        general_path_only(sub)
        general_path_only(publisher)
    for who, io in ((sub, sub_io), (publisher, pub_io)):
        who.receive(frame({"op": "sub", "sid": 1, "pattern": "t.>"}), hub.clock)
        hub.settle()
        assert io.events() == [Ok(sid=1)]
    last = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        if cut <= last or cut > len(stream):
            continue
        publisher.receive(stream[last:cut], hub.clock)
        hub.turn()
        last = cut
    hub.settle()
    return pub_io.events(), sub_io.events(), pub_io.closed


def split(events: list[Event]) -> tuple[list[Event], list[Event]]:
    return [e for e in events if isinstance(e, Message)], [
        e for e in events if not isinstance(e, Message)
    ]


def same_either_way(stream: bytes, cuts: list[int]) -> tuple[list[Event], list[Event], Any]:
    """The other subscriber's deliveries, the publisher's deliveries, the publisher's answers
    and how it was closed are the same with and without the fast paths. (The fast paths take a
    run at a fraction of the per-turn budget, so a publisher that hears itself may get an answer
    and one of its own deliveries in the other order: both orders keep the guarantee that an
    ``ok`` leaves after its publish was queued for every subscriber.)"""
    fast = run(stream, cuts, fast=True)
    general = run(stream, cuts, fast=False)
    assert fast[1] == general[1]
    mine_fast, answers_fast = split(fast[0])
    mine_general, answers_general = split(general[0])
    assert mine_fast == mine_general
    # The same answers; their order may differ in one known way: the general path queues the
    # core's own answer to a bad topic while it decodes, ahead of the handler's answers to the
    # requests before it in the same read; the fast path answers those as it meets them.
    assert sorted(map(repr, answers_fast)) == sorted(map(repr, answers_general))
    assert fast[2] == general[2]
    return fast


def test_a_run_of_publishes_is_delivered_in_order_and_byte_identical() -> None:
    hub = TestHub()
    sub, sub_io = client(hub, "bob")
    publisher, _ = client(hub, "alice")
    sub.receive(frame({"op": "sub", "sid": 1, "pattern": "t.>"}), hub.clock)
    hub.settle()
    sub_io.events()
    payloads = [i.to_bytes(4, "big") * 64 for i in range(500)]
    stream = b"".join(pub("t.run", p) for p in payloads)
    publisher.receive(stream[:1000], hub.clock)  # the first frames teach the run's head
    hub.settle()
    publisher.receive(stream[1000:], hub.clock)
    hub.settle()
    assert bytes(sub_io.out) == b"".join(encode_message_frame("t.run", p) for p in payloads)
    assert hub.publishes_in == 500
    assert hub.deliveries_out == 500


def test_the_run_keeps_order_with_other_requests_and_acks() -> None:
    stream = b"".join(
        [
            *(pub("t.a") for _ in range(20)),
            frame({"op": "unsub", "sid": 1}),  # the publisher stops hearing itself here
            *(pub("t.a", ack=i) for i in range(3)),
            *(pub("t.a") for _ in range(20)),
            pub("t.b", payload=b"other"),
            frame({"op": "sub", "sid": 2, "pattern": "t.a"}),
            *(pub("t.a") for _ in range(20)),
        ]
    )
    mine, theirs, closed = same_either_way(stream, [900, 901, 4000])
    assert closed is None
    assert [e for e in mine if not isinstance(e, Message)] == [
        Ok(sid=1),
        Ok(ack=0),
        Ok(ack=1),
        Ok(ack=2),
        Ok(sid=2),
    ]
    assert len([e for e in mine if isinstance(e, Message)]) == 20 + 20
    assert len(theirs) == 20 + 3 + 20 + 1 + 20
    assert theirs[43] == Message("t.b", b"other")


def test_a_denied_topic_is_answered_for_every_publish_of_the_run() -> None:
    stream = b"".join(pub("u.secret") for _ in range(30)) + pub("t.ok")
    mine, theirs, closed = same_either_way(stream, [500, 3000])
    errors = [e for e in mine if isinstance(e, Error)]
    assert len(errors) == 30 and all(e.topic == "u.secret" for e in errors)
    assert theirs == [Message("t.ok", PAYLOAD)]
    assert closed is None


def test_a_frame_that_resembles_the_run_but_is_not_valid_fails_as_before() -> None:
    good = pub("t.a")
    body = good[4:]
    head = body[: body.index(b"\xa7payload") + 8]
    lying_length = raw(head + b"\xc5\x01\x01" + PAYLOAD)  # bin says 257 bytes, 256 follow
    not_bin = raw(head + b"\xda\x01\x00" + PAYLOAD)  # a str where the bin goes
    for bad in (lying_length, not_bin):
        stream = good * 10 + bad + good * 5
        _, theirs, closed = same_either_way(stream, [len(good) + 3])
        assert closed is True  # a protocol error: close frame, then the transport closes
        assert len(theirs) == 10


def test_non_canonical_and_header_publishes_take_the_general_path_unchanged() -> None:
    reordered = raw(msgpack.packb({"payload": b"p", "op": "pub", "topic": "t.r"}))
    with_headers = pub("t.h", headers={"k": "v"})
    stream = pub("t.a") * 3 + reordered + with_headers + pub("t.a") * 3
    _, theirs, _ = same_either_way(stream, [5, 100])
    assert theirs[3] == Message("t.r", b"p")
    assert theirs[4] == Message("t.h", PAYLOAD, {"k": "v"})
    assert len(theirs) == 8


_FRAMES = st.sampled_from(
    [
        pub("t.a"),
        pub("t.a"),
        pub("t.a"),
        pub("t.b", b"short"),
        pub("t.a", ack=7),
        pub("t.a", b"y" * 70000),
        pub("u.denied"),
        pub("t..bad"),
        pub("t.h", headers={"a": "b"}),
        frame({"op": "unsub", "sid": 1}),
        frame({"op": "sub", "sid": 1, "pattern": "t.a"}),
        frame({"op": "ping"}),
        raw(b"\x83\xa2op\xa3pub\xa5topic\xa3t.a\xa7payload\xc4\x05abc"),  # short bin: fatal
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    frames=st.lists(_FRAMES, min_size=1, max_size=40),
    cuts=st.lists(st.integers(min_value=1, max_value=100_000), max_size=6),
)
def test_any_stream_any_cut_same_result_with_or_without_the_fast_paths(
    frames: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(frames)
    same_either_way(stream, [c % (len(stream) + 1) for c in cuts])


def test_fake_io_is_the_one_from_test_hub() -> None:
    # the comparison above relies on FakeIO decoding what was written, frame by frame
    io = FakeIO()
    io.write(encode_message_frame("t.x", b"1"))
    assert io.events() == [Message("t.x", b"1")]


def test_an_equal_size_frame_to_another_topic_inside_a_run_keeps_its_place() -> None:
    # the same size and the same bytes but for the topic: the strided check must see it
    stream = pub("t.a") * 50 + pub("t.c", b"\1" * len(PAYLOAD)) + pub("t.a") * 50
    _, theirs, _ = same_either_way(stream, [10])
    assert [m.topic for m in theirs if isinstance(m, Message)] == ["t.a"] * 50 + ["t.c"] + [
        "t.a"
    ] * 50
    assert theirs[50] == Message("t.c", b"\1" * len(PAYLOAD))


def test_a_policy_change_stops_a_run_that_is_no_longer_allowed() -> None:
    hub = TestHub()
    sub, sub_io = client(hub, "bob")
    publisher, pub_io = client(hub, "alice")
    sub.receive(frame({"op": "sub", "sid": 1, "pattern": "t.>"}), hub.clock)
    hub.settle()
    sub_io.events()
    publisher.receive(pub("t.a") * 20, hub.clock)  # learnt, allowed, taken as runs
    hub.settle()
    assert len(sub_io.events()) == 20
    hub.set_policy(
        Policy.from_text(
            '[[allow]]\nprincipals = ["x509:bob"]\nsubscribe = ["t.>"]\n'
            '[[allow]]\nprincipals = ["x509:alice"]\npublish = ["t.other"]\n'
        )
    )
    publisher.receive(pub("t.a") * 20, hub.clock)
    hub.settle()
    assert sub_io.events() == []
    errors = [e for e in pub_io.events() if isinstance(e, Error)]
    assert len(errors) == 20 and {e.topic for e in errors} == {"t.a"}
