"""msgpack codec: round trips of every operation, exact bytes of the documented examples, and a
decoder that raises only RemoteProtocolError (or its UnknownOperation subclass) on any input."""

from __future__ import annotations

import re
from pathlib import Path
from types import MappingProxyType
from typing import Any

import msgpack
import pytest
from helpers_protocol import (
    STRATEGIES,
    WIRE_TYPES,
    body,
    events_st,
    headers_st,
    publish_st,
    topic_st,
)
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from tessera_mq.client.protocol import (
    Close,
    EndOfStream,
    Error,
    ErrorCode,
    Event,
    Hello,
    LocalProtocolError,
    Message,
    Ok,
    Ping,
    Pong,
    ProtocolFailure,
    Publish,
    Rejected,
    RemoteProtocolError,
    Subscribe,
    Unsubscribe,
    Welcome,
)
from tessera_mq.client.protocol.codec import (
    OPS,
    UnknownOperation,
    decode,
    encode,
    encode_frame,
    encode_message_frame,
    op_of,
)
from tessera_mq.client.protocol.limits import (
    MAX_FRAME_BYTES_CEILING,
    MAX_HEADER_FIELD_BYTES,
    MAX_HEADERS,
    MAX_ID,
    MAX_REASON_BYTES,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", WIRE_TYPES, ids=lambda k: OPS[k])
@given(data=st.data())
@settings(deadline=None, max_examples=50)
def test_round_trip_every_operation(kind: type[Any], data: st.DataObject) -> None:
    event = data.draw(STRATEGIES[kind])
    encoded = encode(event)
    assert decode(encoded) == event
    assert decode(memoryview(encoded)) == event
    assert encode(decode(encoded)) == encoded  # canonical: re-encoding gives the same bytes
    whole = encode_frame(event)
    assert whole[:4] == len(encoded).to_bytes(4, "big")
    assert whole[4:] == encoded
    assert msgpack.unpackb(encoded)["op"] == op_of(event) == OPS[kind]


def test_ops_are_the_documented_names() -> None:
    assert [OPS[k] for k in WIRE_TYPES] == [
        "hello",
        "welcome",
        "sub",
        "unsub",
        "pub",
        "msg",
        "ok",
        "error",
        "ping",
        "pong",
        "close",
    ]


@pytest.mark.parametrize("kind", [Rejected, ProtocolFailure, EndOfStream])
def test_core_events_are_not_wire_operations(kind: type[Any]) -> None:
    event = EndOfStream() if kind is EndOfStream else kind(ErrorCode.PROTOCOL_ERROR, "x")
    with pytest.raises(LocalProtocolError):
        encode(event)
    with pytest.raises(LocalProtocolError):
        op_of(event)


@pytest.mark.parametrize(
    "event",
    [
        Publish("日本.ürün.😀", "ペイロード".encode(), {"ключ": "значение", "": ""}, ack=0),
        Publish("a", b"", {}, ack=MAX_ID),
        Message("a.b", b"\x00" * 100, {"k": "v" * MAX_HEADER_FIELD_BYTES}),
        Hello(version=0, client="", heartbeat_ms=0),
        Welcome(max_frame=0, heartbeat_ms=0, identity="CN=x,O=y" * 100),
        Error(0xFFFF, "", sid=0, ack=0, topic="t"),
        Close(0xFFFF, "é" * 4096),
        Ok(),
        Ok(sid=1, ack=2),
    ],
)
def test_round_trip_edges(event: Event) -> None:
    assert decode(encode(event)) == event


def test_ping_pong_bodies_are_fresh_bytes() -> None:
    assert type(encode(Ping())) is bytes
    assert encode(Ping()) == msgpack.packb({"op": "ping"})
    assert encode(Pong()) == msgpack.packb({"op": "pong"})


def test_absent_optional_fields_are_omitted() -> None:
    assert msgpack.unpackb(encode(Publish("t", b"p"))) == {
        "op": "pub",
        "topic": "t",
        "payload": b"p",
    }
    assert msgpack.unpackb(encode(Ok(sid=1))) == {"op": "ok", "sid": 1}
    assert msgpack.unpackb(encode(Hello())) == {"op": "hello", "version": 1, "client": ""}


# --- documented examples (docs/protocol.md shows exactly these bytes) --------------------------

#: (event, the whole frame in hex). Generated with the codec; the doc pastes the same bytes.
GOLDEN: list[tuple[Event, str]] = [
    (
        Hello(version=1, client="tessera-py/0.1.0"),
        "0000002b83a26f70a568656c6c6fa776657273696f6e01a6636c69656e74b0746573736572612d70792f"
        "302e312e30",
    ),
    (
        Hello(version=1, client="my-client/2.3", heartbeat_ms=10000),
        "0000003884a26f70a568656c6c6fa776657273696f6e01a6636c69656e74ad6d792d636c69656e742f32"
        "2e33ac6865617274626561745f6d73cd2710",
    ),
    (
        Welcome(
            version=1,
            server="tessera/0.1.0",
            mechanism="x509",
            identity="alice",
            max_frame=1048576,
            heartbeat_ms=30000,
        ),
        "0000006d86a26f70a777656c636f6d65a776657273696f6e01a6736572766572ad746573736572612f30"
        "2e312e30a86964656e7469747982a96d656368616e69736da478353039a46e616d65a5616c696365a96d"
        "61785f6672616d65ce00100000ac6865617274626561745f6d73cd7530",
    ),
    (
        Subscribe(sid=1, pattern="status.>"),
        "0000001e83a26f70a3737562a373696401a77061747465726ea87374617475732e3e",
    ),
    (
        Unsubscribe(sid=1),
        "0000000f82a26f70a5756e737562a373696401",
    ),
    (
        Publish(topic="status.eu", payload=b"up", ack=2),
        "0000002984a26f70a3707562a5746f706963a97374617475732e6575a77061796c6f6164c4027570a361"
        "636b02",
    ),
    (
        Publish(topic="status.eu", payload=b"up", headers={"enc": "text"}),
        "0000003684a26f70a3707562a5746f706963a97374617475732e6575a77061796c6f6164c4027570a768"
        "65616465727381a3656e63a474657874",
    ),
    (
        Message(topic="status.eu", payload=b"up"),
        "0000002483a26f70a36d7367a5746f706963a97374617475732e6575a77061796c6f6164c4027570",
    ),
    (
        Ok(sid=1),
        "0000000c82a26f70a26f6ba373696401",
    ),
    (
        Ok(ack=2),
        "0000000c82a26f70a26f6ba361636b02",
    ),
    (
        Error(ErrorCode.PERMISSION_DENIED, "not allowed to publish to 'cmd.x'", topic="cmd.x"),
        "0000004784a26f70a56572726f72a4636f646506a76d657373616765d9216e6f7420616c6c6f77656420"
        "746f207075626c69736820746f2027636d642e7827a5746f706963a5636d642e78",
    ),
    (
        Error(ErrorCode.INVALID_TOPIC, "bad pattern", sid=5),
        "0000002984a26f70a56572726f72a4636f646505a76d657373616765ab626164207061747465726ea373"
        "696405",
    ),
    (
        Ping(),
        "0000000981a26f70a470696e67",
    ),
    (
        Pong(),
        "0000000981a26f70a4706f6e67",
    ),
    (
        Close(ErrorCode.NORMAL, ""),
        "0000001883a26f70a5636c6f7365a4636f646500a6726561736f6ea0",
    ),
    (
        Close(ErrorCode.GOING_AWAY, "broker shutting down"),
        "0000002c83a26f70a5636c6f7365a4636f64650da6726561736f6eb462726f6b6572207368757474696e"
        "6720646f776e",
    ),
]


def _hex(s: str) -> str:
    return re.sub(r"\s+", "", s)


@pytest.mark.parametrize(("event", "hexed"), GOLDEN, ids=lambda v: getattr(v, "__name__", ""))
def test_golden_frames(event: Event, hexed: str) -> None:
    wire = bytes.fromhex(_hex(hexed))
    assert encode_frame(event) == wire
    assert decode(wire[4:]) == event


def test_every_operation_has_a_golden_example() -> None:
    assert {type(e) for e, _ in GOLDEN} == set(WIRE_TYPES)


def test_docs_show_the_golden_frames() -> None:
    # Every ```hex block in docs/protocol.md is a frame the codec produces, and every golden
    # example is shown there: the document cannot drift from the code.
    text = DOCS.read_text(encoding="utf-8")
    blocks = {_hex(b) for b in re.findall(r"```hex\n(.*?)```", text, flags=re.S)}
    golden = {_hex(h) for _, h in GOLDEN}
    assert golden <= blocks, sorted(golden - blocks)
    for block in blocks:
        wire = bytes.fromhex(block)
        assert encode_frame(decode(wire[4:])) == wire


# --- the delivery frame ------------------------------------------------------------------------


@given(pub=publish_st)
@example(pub=Publish("a", b"", {}))
@example(pub=Publish("a", b"", None, ack=MAX_ID))
@settings(deadline=None, max_examples=50)
def test_delivery_frame_equals_message_frame_and_fits_the_publish(pub: Publish) -> None:
    delivery = encode_message_frame(pub.topic, pub.payload, pub.headers)
    assert delivery == encode_frame(Message(pub.topic, pub.payload, pub.headers))
    assert decode(delivery[4:]) == Message(pub.topic, pub.payload, pub.headers)
    # What a broker accepted as a publish always fits the same limit as a delivery.
    assert len(delivery) <= len(encode_frame(pub))


@given(topic=topic_st, payload=st.binary(max_size=70_000), headers=headers_st)
@settings(
    deadline=None,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_delivery_frame_is_never_longer_than_the_pub_body(
    topic: str, payload: bytes, headers: dict[str, str] | None
) -> None:
    # Payload sizes that cross the bin8/bin16/bin32 length formats.
    for ack in (None, 0, MAX_ID):
        pub = encode(Publish(topic, payload, headers, ack))
        assert len(encode_message_frame(topic, payload, headers)) - 4 <= len(pub)


def test_delivery_frame_accepts_any_mapping() -> None:
    frozen = MappingProxyType({"a": "b"})
    assert encode_message_frame("t", b"", frozen) == encode_frame(Message("t", b"", {"a": "b"}))


# --- decoding: fields, types, ranges ----------------------------------------------------------


def test_unknown_keys_are_ignored() -> None:
    d = {"op": "sub", "sid": 1, "pattern": "a.*", "future": [1, {"x": b"y"}], "also": None}
    assert decode(body(d)) == Subscribe(1, "a.*")


def test_map_key_order_is_irrelevant() -> None:
    d = {"op": "pub", "topic": "t", "payload": b"p", "headers": {"a": "1"}, "ack": 9}
    reordered = dict(reversed(list(d.items())))
    assert body(d) != body(reordered)
    assert decode(body(d)) == decode(body(reordered)) == Publish("t", b"p", {"a": "1"}, 9)


@pytest.mark.parametrize(
    ("d", "expected"),
    [
        ({"op": "ok", "sid": None, "ack": None}, Ok()),
        (
            {"op": "pub", "topic": "t", "payload": b"", "headers": None, "ack": None},
            Publish("t", b""),
        ),
        ({"op": "hello", "version": 1, "heartbeat_ms": None}, Hello(client="")),
        ({"op": "error", "code": 1, "topic": None}, Error(1)),
        ({"op": "close"}, Close(0, "")),
        (
            {"op": "welcome", "version": 1, "max_frame": 65536, "heartbeat_ms": 0},
            Welcome(max_frame=65536, heartbeat_ms=0),
        ),
    ],
)
def test_nil_and_absent_optional_fields(d: dict[str, Any], expected: Event) -> None:
    assert decode(body(d)) == expected


@pytest.mark.parametrize(
    "value",
    [1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, MAX_ID],
)
def test_any_integer_encoding_is_accepted(value: int) -> None:
    # msgpack may carry a small non-negative integer in any int format; all mean the same.
    for fmt in (b"\xcc", b"\xcd", b"\xce", b"\xcf", b"\xd0", b"\xd1", b"\xd2", b"\xd3"):
        width = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}[fmt[0]]
        signed = fmt[0] >= 0xD0
        if value >= 1 << (8 * width - signed):
            continue
        raw = b"\x83\xa2op\xa3sub\xa7pattern\xa1a\xa3sid" + fmt + value.to_bytes(width, "big")
        assert decode(raw) == Subscribe(value, "a")


OVERSIZE = "x" * (MAX_REASON_BYTES + 1)

#: (frame map, what the error message names). Each must raise RemoteProtocolError (not a subclass).
MALFORMED: list[tuple[Any, str]] = [
    # required fields missing
    ({"op": "hello"}, "version"),
    ({"op": "welcome", "version": 1, "heartbeat_ms": 1}, "max_frame"),
    ({"op": "welcome", "version": 1, "max_frame": 65536}, "heartbeat_ms"),
    ({"op": "sub", "sid": 1}, "pattern"),
    ({"op": "sub", "pattern": "a"}, "sid"),
    ({"op": "unsub"}, "sid"),
    ({"op": "pub", "payload": b""}, "topic"),
    ({"op": "pub", "topic": "a"}, "payload"),
    ({"op": "msg", "topic": "a"}, "payload"),
    ({"op": "error"}, "code"),
    # wrong types: bool, float, negative or huge where an unsigned int is expected
    ({"op": "sub", "sid": True, "pattern": "a"}, "sid"),
    ({"op": "sub", "sid": 1.0, "pattern": "a"}, "sid"),
    ({"op": "sub", "sid": -1, "pattern": "a"}, "sid"),
    ({"op": "sub", "sid": MAX_ID + 1, "pattern": "a"}, "sid"),
    ({"op": "sub", "sid": 2**64 - 1, "pattern": "a"}, "sid"),
    ({"op": "sub", "sid": "1", "pattern": "a"}, "sid"),
    ({"op": "unsub", "sid": None}, "sid"),
    ({"op": "ok", "ack": -5}, "ack"),
    ({"op": "ok", "sid": False}, "sid"),
    ({"op": "pub", "topic": "a", "payload": b"", "ack": 1.5}, "ack"),
    ({"op": "hello", "version": "1"}, "version"),
    ({"op": "hello", "version": 1, "heartbeat_ms": -1}, "heartbeat_ms"),
    (
        {
            "op": "welcome",
            "version": 1,
            "max_frame": MAX_FRAME_BYTES_CEILING + 1,
            "heartbeat_ms": 1,
        },
        "max_frame",
    ),
    ({"op": "error", "code": 0x10000}, "code"),
    ({"op": "error", "code": None}, "code"),
    ({"op": "close", "code": -1}, "code"),
    ({"op": "close", "code": "x"}, "code"),
    # strings where bin is expected, and the reverse
    ({"op": "pub", "topic": "a", "payload": "text"}, "payload"),
    ({"op": "msg", "topic": "a", "payload": None}, "payload"),
    ({"op": "pub", "topic": b"a", "payload": b""}, "topic"),
    ({"op": "sub", "sid": 1, "pattern": b"a"}, "pattern"),
    ({"op": "error", "code": 1, "topic": 5}, "topic"),
    ({"op": "hello", "version": 1, "client": None}, "client"),
    ({"op": "error", "code": 1, "message": b"m"}, "message"),
    ({"op": "close", "reason": None}, "reason"),
    (
        {"op": "welcome", "version": 1, "max_frame": 65536, "heartbeat_ms": 1, "identity": None},
        "identity",
    ),
    (
        {
            "op": "welcome",
            "version": 1,
            "max_frame": 65536,
            "heartbeat_ms": 1,
            "identity": {"name": 1},
        },
        "identity.name",
    ),
    (
        {"op": "welcome", "version": 1, "max_frame": 65536, "heartbeat_ms": 1, "server": []},
        "server",
    ),
    # headers
    ({"op": "pub", "topic": "a", "payload": b"", "headers": []}, "headers"),
    ({"op": "pub", "topic": "a", "payload": b"", "headers": {"a": 1}}, "headers"),
    ({"op": "pub", "topic": "a", "payload": b"", "headers": {"a": b"b"}}, "headers"),
    ({"op": "pub", "topic": "a", "payload": b"", "headers": {b"a": "b"}}, "headers"),
    ({"op": "msg", "topic": "a", "payload": b"", "headers": {"a": None}}, "headers"),
    (
        {
            "op": "pub",
            "topic": "a",
            "payload": b"",
            "headers": {str(i): "" for i in range(MAX_HEADERS + 1)},
        },
        "headers",
    ),
    (
        {
            "op": "pub",
            "topic": "a",
            "payload": b"",
            "headers": {"k": "v" * (MAX_HEADER_FIELD_BYTES + 1)},
        },
        "headers",
    ),
    (
        {
            "op": "pub",
            "topic": "a",
            "payload": b"",
            "headers": {"k" * (MAX_HEADER_FIELD_BYTES + 1): ""},
        },
        "headers",
    ),
    # a key of 342 three-byte characters: 1026 bytes, within 1024 *characters*
    ({"op": "pub", "topic": "a", "payload": b"", "headers": {"€" * 342: ""}}, "headers"),
    ({"op": "pub", "topic": "a", "payload": b"", "headers": {"k": "€" * 342}}, "headers"),
    # text lengths
    ({"op": "hello", "version": 1, "client": OVERSIZE}, "client"),
    ({"op": "error", "code": 1, "message": "m" * 4097}, "message"),
    ({"op": "close", "reason": "r" * 4097}, "reason"),
    # the op itself
    ({"op": None}, "op"),
    ({"op": 1}, "op"),
    ({"op": b"ping"}, "op"),
    ({b"op": "ping"}, "op"),
    ({"Op": "ping"}, "op"),
    ({}, "op"),
    # not a map
    (["op", "ping"], "map"),
    ("ping", "map"),
    (None, "map"),
    (7, "map"),
]


@pytest.mark.parametrize(
    ("d", "names"), MALFORMED, ids=lambda v: str(v)[:60] if isinstance(v, dict) else None
)
def test_malformed_frames(d: Any, names: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(body(d))
    assert type(info.value) is RemoteProtocolError
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    assert names in str(info.value)


def test_header_limits_are_inclusive() -> None:
    headers = {
        "k" * (MAX_HEADER_FIELD_BYTES - 2) + str(i): "€" * (MAX_HEADER_FIELD_BYTES // 3)
        for i in range(10)
    }
    headers.update({str(i): "" for i in range(MAX_HEADERS - 10)})
    assert len(headers) == MAX_HEADERS
    assert decode(encode(Publish("a", b"", headers))) == Publish("a", b"", headers)


@pytest.mark.parametrize("op", ["nope", "PING", "ping ", "", "x" * 1000, "hello\x00"])
def test_unknown_operation(op: str) -> None:
    with pytest.raises(UnknownOperation) as info:
        decode(body({"op": op, "sid": 1}))
    assert info.value.code is ErrorCode.UNKNOWN_OPERATION
    assert isinstance(info.value, RemoteProtocolError)
    assert len(str(info.value)) < 100  # a huge op name is not echoed back whole


def ext(type_byte: int, data: bytes) -> bytes:
    """A raw msgpack ext value (the Python API refuses negative types such as -1, timestamp)."""
    fixed = {1: b"\xd4", 2: b"\xd5", 4: b"\xd6", 8: b"\xd7", 16: b"\xd8"}
    head = fixed.get(len(data)) or b"\xc7" + bytes([len(data)])
    return head + bytes([type_byte & 0xFF]) + data


#: Raw bodies that are not even well-formed frames. Each must raise RemoteProtocolError.
NASTY: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("reserved byte 0xc1", b"\xc1"),
    ("truncated map", b"\x82\xa2op"),
    ("trailing bytes", msgpack.packb({"op": "ping"}) + b"\x00"),
    ("two maps", msgpack.packb({"op": "ping"}) * 2),
    ("invalid utf-8 value", b"\x81\xa2op\xa2\xff\xfe"),
    ("invalid utf-8 key", b"\x81\xa2\xff\xfe\xa4ping"),
    ("overlong utf-8", b"\x81\xa2op\xa3\xc0\xaf\x00"),
    ("encoded surrogate", b"\x81\xa2op\xa3\xed\xa0\x80"),
    ("int key", b"\x82\x01\x01\xa2op\xa4ping"),
    ("nil key", b"\x81\xc0\xa4ping"),
    ("float key", b"\x81\xcb" + b"\x00" * 8 + b"\xa1a"),
    ("array key", b"\x81\x91\x01\xa1a"),
    ("map key", b"\x81\x81\x01\x01\xa1a"),
    ("nested non-str key", msgpack.packb({"op": "welcome", "version": 1, "identity": {1: 2}})),
    ("array depth bomb", b"\x91" * 100_000),
    ("map depth bomb", b"\x81\xa1a" * 100_000),
    ("huge array claim", b"\xdd\xff\xff\xff\xff"),
    ("huge map claim", b"\xdf\xff\xff\xff\xff"),
    ("huge str claim", b"\xdb\xff\xff\xff\xff"),
    ("huge bin claim", b"\x81\xa2op\xc6\xff\xff\xff\xff"),
    ("huge ext claim", b"\xc9\xff\xff\xff\xff\x01"),
    ("ext as body", ext(5, b"x")),
    ("ext as op", b"\x81\xa2op" + ext(1, b"ping")),
    ("ext as payload", b"\x83\xa2op\xa3pub\xa5topic\xa1a\xa7payload" + ext(0, b"\x00\x01")),
    ("ext as key", b"\x81" + ext(2, b"ab") + b"\xa1a"),
    ("timestamp32 as op", b"\x81\xa2op" + ext(-1, b"\x00\x00\x00\x00")),
    ("timestamp bad length", b"\x81\xa2op" + ext(-1, b"\x00\x00\x00")),
    ("timestamp64 bad nanos", b"\x81\xa2op" + ext(-1, b"\xff" * 8)),
    ("timestamp96 bad nanos", b"\x81\xa2op" + ext(-1, b"\xff" * 12)),
    ("timestamp as key", b"\x81" + ext(-1, b"\x00" * 4) + b"\xa2op"),
    ("timestamp as sid", b"\x83\xa2op\xa3sub\xa7pattern\xa1a\xa3sid" + ext(-1, b"\x00" * 4)),
    ("float32 sid", b"\x83\xa2op\xa3sub\xa7pattern\xa1a\xa3sid\xca\x3f\x80\x00\x00"),
    ("nan sid", b"\x83\xa2op\xa3sub\xa7pattern\xa1a\xa3sid\xcb\x7f\xf8" + b"\x00" * 6),
    ("negative int64 sid", b"\x83\xa2op\xa3sub\xa7pattern\xa1a\xa3sid\xd3" + b"\xff" * 8),
    ("bool payload", b"\x83\xa2op\xa3pub\xa5topic\xa1a\xa7payload\xc3"),
]


@pytest.mark.parametrize("raw", [r for _, r in NASTY], ids=[n for n, _ in NASTY])
def test_nasty_bodies(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode(raw)


def test_duplicate_keys_take_the_last_value() -> None:
    # msgpack does not forbid duplicate keys; docs/protocol.md says senders must not send them.
    assert decode(b"\x82\xa2op\xa4ping\xa2op\xa4pong") == Pong()


# --- decoding never raises anything else -------------------------------------------------------


def _decode_or_protocol_error(raw: bytes) -> Event | None:
    """Decode ``raw``; the only exceptions allowed are the two documented ones, with their codes."""
    error: RemoteProtocolError | None = None
    try:
        event = decode(raw)
    except RemoteProtocolError as exc:  # anything else fails the test with its traceback
        error = exc
    if error is None:
        assert type(event) in OPS
        return event
    expected = {
        UnknownOperation: ErrorCode.UNKNOWN_OPERATION,
        RemoteProtocolError: ErrorCode.PROTOCOL_ERROR,
    }
    assert error.code is expected[type(error)]
    return None


@given(raw=st.binary(max_size=512))
@settings(deadline=None, max_examples=200)
def test_random_bytes_raise_only_remote_protocol_error(raw: bytes) -> None:
    _decode_or_protocol_error(raw)


@given(
    event=events_st,
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 10**6),
)
@settings(deadline=None, max_examples=150)
def test_mutated_frames_raise_only_remote_protocol_error(
    event: Event, edits: list[tuple[int, int]], cut: int
) -> None:
    raw = bytearray(encode(event))
    for pos, value in edits:
        raw[pos % len(raw)] = value
    _decode_or_protocol_error(bytes(raw))
    _decode_or_protocol_error(bytes(raw[: cut % (len(raw) + 1)]))


_ints = st.integers(-(2**63), 2**64 - 1)
_scalars = (
    st.none()
    | st.booleans()
    | _ints
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4) | _ints, inner, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = sorted(
    {"version", "client", "heartbeat_ms", "server", "identity", "max_frame", "sid", "pattern"}
    | {"topic", "payload", "headers", "ack", "code", "message", "reason"}
)


@given(
    op=st.sampled_from([*OPS.values(), "nope"]),
    fields=st.dictionaries(st.sampled_from(_FIELDS), _values, max_size=6),
)
@settings(deadline=None, max_examples=150)
def test_structured_garbage_raises_only_remote_protocol_error(
    op: str, fields: dict[str, Any]
) -> None:
    raw = body({"op": op, **fields})
    event = _decode_or_protocol_error(raw)
    if event is not None:
        assert OPS[type(event)] == op


@given(value=_values)
@settings(deadline=None)
def test_any_msgpack_value_raises_only_remote_protocol_error(value: Any) -> None:
    assume(not (isinstance(value, dict) and isinstance(value.get("op"), str)))
    try:
        raw = body(value)
    except (ValueError, OverflowError):  # e.g. an int key the packer refuses
        return
    _decode_or_protocol_error(raw)
