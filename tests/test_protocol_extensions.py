"""Wire extensions of docs/protocol.md section 16 (retained values, requests, queue groups,
history, verified sender): exact bytes of every documented example, round trips, decoding whole
and byte by byte through the connection core, and the new fields' validation."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest
from helpers_protocol import (
    Pair,
    body,
    bytewise,
    frame,
    headers_st,
    open_client,
    open_server,
    pattern_st,
    topic_st,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera_mq.client.protocol import (
    Close,
    Connection,
    Error,
    ErrorCode,
    Event,
    LocalProtocolError,
    Message,
    NoResponders,
    Ok,
    ProtocolFailure,
    Publish,
    Rejected,
    RemoteProtocolError,
    Reply,
    Request,
    RequestTimeout,
    Response,
    Role,
    State,
    Subscribe,
    Welcome,
)
from tessera_mq.client.protocol.codec import (
    OPS,
    decode,
    encode,
    encode_frame,
    encode_message_frame,
    op_of,
)
from tessera_mq.client.protocol.connection import RECEIVABLE
from tessera_mq.client.protocol.errors import BrokerError, error_from_code
from tessera_mq.client.protocol.limits import (
    DELIVERY_OVERHEAD_BYTES,
    FEATURES,
    MAX_EPOCH_CHARS,
    MAX_FRAME_BYTES,
    MAX_GROUP_BYTES,
    MAX_ID,
    MAX_REQUEST_TIMEOUT_MS,
    MAX_SENDER_CHARS,
    MAX_SEQ,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

#: (event, the whole frame in hex), as shown in docs/protocol.md section 16.
GOLDEN: list[tuple[Event, str]] = [
    (
        Welcome(
            version=1,
            server="tessera/0.2.0",
            mechanism="x509",
            identity="alice",
            max_frame=1048576,
            heartbeat_ms=30000,
            features=("retain", "request", "group", "history", "sender"),
        ),
        "0000009b87a26f70a777656c636f6d65a776657273696f6e01a6736572766572ad746573736572612f30"
        "2e322e30a86964656e7469747982a96d656368616e69736da478353039a46e616d65a5616c696365a96d"
        "61785f6672616d65ce00100000ac6865617274626561745f6d73cd7530a8666561747572657395a67265"
        "7461696ea772657175657374a567726f7570a7686973746f7279a673656e646572",
    ),
    (
        Publish(topic="status.d1", payload=b"on", headers=None, ack=3, retain=True),
        "0000003185a26f70a3707562a5746f706963a97374617475732e6431a77061796c6f6164c4026f6ea361"
        "636b03a672657461696ec3",
    ),
    (
        Publish(topic="status.d1", payload=b"", headers=None, ack=4, retain=True),
        "0000002f85a26f70a3707562a5746f706963a97374617475732e6431a77061796c6f6164c400a361636b"
        "04a672657461696ec3",
    ),
    (
        Message(
            topic="status.d1",
            payload=b"on",
            headers=None,
            sid=1,
            retained=True,
            sender="x509:svc",
            seq=None,
            epoch=None,
            reply=None,
        ),
        "0000004386a26f70a36d7367a5746f706963a97374617475732e6431a77061796c6f6164c4026f6ea373"
        "696401a872657461696e6564c3a673656e646572a8783530393a737663",
    ),
    (
        Message(
            topic="events.eu",
            payload=b"x",
            headers=None,
            sid=None,
            retained=False,
            sender="x509:svc",
            seq=42,
            epoch="k3f9",
            reply=None,
        ),
        "0000004386a26f70a36d7367a5746f706963a96576656e74732e6575a77061796c6f6164c40178a67365"
        "6e646572a8783530393a737663a37365712aa565706f6368a46b336639",
    ),
    (
        Subscribe(sid=2, pattern="jobs.>", group="workers", serve=False, since=None, epoch=None),
        "0000002a84a26f70a3737562a373696402a77061747465726ea66a6f62732e3ea567726f7570a7776f72"
        "6b657273",
    ),
    (
        Subscribe(sid=4, pattern="cmd.device.*", group="svc", serve=True, since=None, epoch=None),
        "0000003385a26f70a3737562a373696404a77061747465726eac636d642e6465766963652e2aa567726f"
        "7570a3737663a57365727665c3",
    ),
    (
        Subscribe(sid=3, pattern="events.>", group=None, serve=False, since=41, epoch="k3f9"),
        "0000003085a26f70a3737562a373696403a77061747465726ea86576656e74732e3ea573696e636529a5"
        "65706f6368a46b336639",
    ),
    (
        Ok(sid=3, ack=None, epoch="k3f9", seq=45, recovered=True),
        "0000002785a26f70a26f6ba373696403a565706f6368a46b336639a37365712da97265636f7665726564c3",
    ),
    (
        Ok(sid=3, ack=None, epoch="n7q2", seq=2, recovered=False),
        "0000002785a26f70a26f6ba373696403a565706f6368a46e377132a373657102a97265636f7665726564c2",
    ),
    (
        Error(ErrorCode.STORE_FAILED, "history replay interrupted: subscribe again", sid=3),
        "0000004a84a26f70a56572726f72a4636f646515a76d657373616765d92b686973746f7279207265706c"
        "617920696e7465727275707465643a2073756273637269626520616761696ea373696403",
    ),
    (
        Request(rid=7, topic="cmd.device.d1", payload=b"reboot", headers=None, timeout_ms=5000),
        "0000003f85a26f70a3726571a372696407a5746f706963ad636d642e6465766963652e6431a77061796c"
        "6f6164c4067265626f6f74aa74696d656f75745f6d73cd1388",
    ),
    (
        Message(
            topic="cmd.device.d1",
            payload=b"reboot",
            headers=None,
            sid=4,
            retained=False,
            sender="x509:alice",
            seq=None,
            epoch=None,
            reply=1,
        ),
        "0000004a86a26f70a36d7367a5746f706963ad636d642e6465766963652e6431a77061796c6f6164c406"
        "7265626f6f74a373696404a673656e646572aa783530393a616c696365a57265706c7901",
    ),
    (
        Reply(token=1, payload=b"done", headers=None, ack=None),
        "0000001f83a26f70a57265706c79a5746f6b656e01a77061796c6f6164c404646f6e65",
    ),
    (
        Response(rid=7, payload=b"done", headers=None, sender="x509:svc"),
        "0000002b84a26f70a3726573a372696407a77061796c6f6164c404646f6e65a673656e646572a8783530"
        "393a737663",
    ),
    (
        Error(
            code=ErrorCode.NO_RESPONDERS,
            message="no responders",
            sid=None,
            ack=None,
            topic=None,
            dropped=None,
            rid=7,
        ),
        "0000002b84a26f70a56572726f72a4636f646511a76d657373616765ad6e6f20726573706f6e64657273"
        "a372696407",
    ),
]


def _hex(s: str) -> str:
    return re.sub(r"\s+", "", s)


@pytest.mark.parametrize(("event", "hexed"), GOLDEN, ids=lambda v: getattr(v, "__name__", ""))
def test_golden_frames(event: Event, hexed: str) -> None:
    wire = bytes.fromhex(_hex(hexed))
    assert encode_frame(event) == wire
    assert decode(wire[4:]) == event


def test_docs_section_16_shows_every_golden_frame() -> None:
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index("## 16. Status and commands") :]
    blocks = {_hex(b) for b in re.findall(r"```hex\n(.*?)```", section, flags=re.S)}
    assert {_hex(h) for _, h in GOLDEN} == blocks


def test_new_operations_have_wire_names() -> None:
    assert op_of(Request(1, "a", b"")) == "req" == OPS[Request]
    assert op_of(Reply(1, b"")) == "reply"
    assert op_of(Response(1, b"")) == "res"
    assert {t for _, t in [(e, type(e)) for e, _ in GOLDEN]} >= {Request, Reply, Response}


def test_features_are_the_documented_names() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for name in FEATURES:
        assert f"| `{name}` |" in text


# --- round trips --------------------------------------------------------------------------

uint32 = st.integers(0, MAX_ID)
opt_uint32 = st.none() | uint32
seq_st = st.none() | st.integers(0, MAX_SEQ)
epoch_st = st.none() | st.text(max_size=MAX_EPOCH_CHARS)
sender_st = st.none() | st.text(max_size=64)
group_st = st.none() | st.text(min_size=1, max_size=16)

STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    Publish: st.builds(
        Publish,
        topic=topic_st,
        payload=st.binary(max_size=64),
        headers=headers_st,
        ack=opt_uint32,
        retain=st.booleans(),
    ),
    Message: st.builds(
        Message,
        topic=topic_st,
        payload=st.binary(max_size=64),
        headers=headers_st,
        sid=opt_uint32,
        retained=st.booleans(),
        sender=sender_st,
        seq=seq_st,
        epoch=epoch_st,
        reply=opt_uint32,
    ),
    Subscribe: st.one_of(
        st.builds(Subscribe, sid=uint32, pattern=pattern_st, group=group_st, serve=st.booleans()),
        st.builds(
            Subscribe,
            sid=uint32,
            pattern=pattern_st,
            group=group_st,
            since=st.integers(0, MAX_SEQ),
            epoch=st.text(max_size=MAX_EPOCH_CHARS),
        ),
    ),
    Ok: st.builds(
        Ok,
        sid=opt_uint32,
        ack=opt_uint32,
        epoch=epoch_st,
        seq=seq_st,
        recovered=st.none() | st.booleans(),
    ),
    Error: st.builds(
        Error, code=st.integers(0, 0xFFFF), message=st.text(max_size=64), rid=opt_uint32
    ),
    Welcome: st.builds(
        Welcome,
        max_frame=st.integers(0, 2**26),
        features=st.none() | st.lists(st.text(max_size=64), max_size=32).map(tuple),
    ),
    Request: st.builds(
        Request,
        rid=uint32,
        topic=topic_st,
        payload=st.binary(max_size=64),
        headers=headers_st,
        timeout_ms=st.none() | st.integers(1, MAX_REQUEST_TIMEOUT_MS),
    ),
    Reply: st.builds(
        Reply, token=uint32, payload=st.binary(max_size=64), headers=headers_st, ack=opt_uint32
    ),
    Response: st.builds(
        Response, rid=uint32, payload=st.binary(max_size=64), headers=headers_st, sender=sender_st
    ),
}


@pytest.mark.parametrize("kind", list(STRATEGIES), ids=lambda k: OPS[k])
@given(data=st.data())
@settings(deadline=None, max_examples=60)
def test_round_trip_with_the_new_fields(kind: type[Any], data: st.DataObject) -> None:
    event = data.draw(STRATEGIES[kind])
    encoded = encode(event)
    assert decode(encoded) == event
    assert encode(decode(encoded)) == encoded  # canonical
    assert msgpack.unpackb(encoded)["op"] == OPS[kind]


def test_defaults_leave_the_version_1_bytes_unchanged() -> None:
    # An event that uses none of the new fields encodes exactly as before section 16 existed.
    assert msgpack.unpackb(encode(Publish("t", b"p", retain=False))) == {
        "op": "pub",
        "topic": "t",
        "payload": b"p",
    }
    assert msgpack.unpackb(encode(Message("t", b"p"))) == {
        "op": "msg",
        "topic": "t",
        "payload": b"p",
    }
    assert msgpack.unpackb(encode(Subscribe(1, "a"))) == {"op": "sub", "sid": 1, "pattern": "a"}
    assert "features" not in msgpack.unpackb(encode(Welcome()))


@given(
    topic=topic_st,
    payload=st.binary(max_size=256),
    headers=headers_st,
    sender=sender_st,
    seq=seq_st,
    epoch=epoch_st,
)
@settings(deadline=None, max_examples=60)
def test_delivery_frame_with_sender_and_history_equals_the_message_frame(
    topic: str,
    payload: bytes,
    headers: dict[str, str] | None,
    sender: str | None,
    seq: int | None,
    epoch: str | None,
) -> None:
    wire = encode_message_frame(topic, payload, headers, sender=sender, seq=seq, epoch=epoch)
    msg = Message(topic, payload, headers, sender=sender, seq=seq, epoch=epoch)
    assert wire == encode_frame(msg)
    pub = encode_frame(Publish(topic, payload, headers, ack=MAX_ID, retain=True))
    assert len(wire) - len(pub) <= DELIVERY_OVERHEAD_BYTES


def test_the_largest_broker_added_fields_fit_the_overhead() -> None:
    pub = Publish("t", b"x" * 100, ack=None)
    msg = Message(
        "t",
        b"x" * 100,
        sid=MAX_ID,
        retained=True,
        sender="\U0001f600" * MAX_SENDER_CHARS,
        seq=MAX_SEQ,
        epoch="\U0001f600" * MAX_EPOCH_CHARS,
        reply=MAX_ID,
    )
    assert len(encode(msg)) - len(encode(pub)) <= DELIVERY_OVERHEAD_BYTES


# --- validation of the new fields ---------------------------------------------------------

_MSG = {"op": "msg", "topic": "t", "payload": b""}
_SUB = {"op": "sub", "sid": 1, "pattern": "a.>"}


@pytest.mark.parametrize(
    "d",
    [
        {"op": "pub", "topic": "t", "payload": b"", "retain": 1},
        {"op": "pub", "topic": "t", "payload": b"", "retain": "yes"},
        {**_MSG, "retained": 0},
        {**_MSG, "sid": -1},
        {**_MSG, "sender": b"x509:a"},
        {**_MSG, "sender": "x" * (MAX_SENDER_CHARS + 1)},
        {**_MSG, "seq": MAX_SEQ + 1},
        {**_MSG, "seq": 1.0},
        {**_MSG, "epoch": 7},
        {**_MSG, "epoch": "e" * (MAX_EPOCH_CHARS + 1)},
        {**_MSG, "reply": MAX_ID + 1},
        {**_SUB, "group": 3},
        {**_SUB, "group": "g" * (MAX_GROUP_BYTES + 1)},
        {**_SUB, "serve": "true"},
        {**_SUB, "epoch": "e"},
        {**_SUB, "since": -1, "epoch": "e"},
        {"op": "ok", "sid": 1, "recovered": 1},
        {"op": "ok", "sid": 1, "seq": -2},
        {"op": "error", "code": 17, "rid": "7"},
        {
            "op": "welcome",
            "version": 1,
            "max_frame": 65536,
            "heartbeat_ms": 0,
            "features": "retain",
        },
        {"op": "welcome", "version": 1, "max_frame": 65536, "heartbeat_ms": 0, "features": [1]},
        {
            "op": "welcome",
            "version": 1,
            "max_frame": 65536,
            "heartbeat_ms": 0,
            "features": ["f"] * 33,
        },
        {"op": "req", "topic": "t", "payload": b""},
        {"op": "req", "rid": 1, "payload": b""},
        {"op": "req", "rid": 1, "topic": "t"},
        {"op": "req", "rid": 1, "topic": "t", "payload": "text"},
        {"op": "req", "rid": 1, "topic": "t", "payload": b"", "timeout_ms": 0},
        {
            "op": "req",
            "rid": 1,
            "topic": "t",
            "payload": b"",
            "timeout_ms": MAX_REQUEST_TIMEOUT_MS + 1,
        },
        {"op": "reply", "payload": b""},
        {"op": "reply", "token": 1},
        {"op": "reply", "token": 1, "payload": b"", "ack": -1},
        {"op": "res", "payload": b""},
        {"op": "res", "rid": 1, "payload": b"", "sender": 5},
    ],
)
def test_malformed_new_fields_are_protocol_errors(d: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(body(d))
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


def test_since_without_epoch_means_the_current_epoch() -> None:
    assert decode(body({**_SUB, "since": 3})) == Subscribe(1, "a.>", since=3)


def test_nil_means_absent_for_the_new_fields() -> None:
    d = {**_MSG, "sid": None, "retained": None, "sender": None, "seq": None, "reply": None}
    assert decode(body(d)) == Message("t", b"")
    assert decode(body({**_SUB, "group": None, "serve": None})) == Subscribe(1, "a.>")


def test_a_sender_field_sent_by_a_client_is_not_part_of_the_publish() -> None:
    # There is no client-settable sender: the key is unknown on a pub and simply dropped.
    pub = decode(body({"op": "pub", "topic": "t", "payload": b"x", "sender": "x509:admin"}))
    assert pub == Publish("t", b"x")
    assert "sender" not in msgpack.unpackb(encode(pub))


# --- through the connection core ----------------------------------------------------------

FEATURED = Welcome(server="t", mechanism="x509", identity="alice", features=tuple(sorted(FEATURES)))


@pytest.mark.parametrize("chunker", [lambda b: [b] if b else [], bytewise], ids=["whole", "bytes"])
def test_a_request_round_trip_through_both_cores(chunker: Any) -> None:
    requester, responder = Pair(chunker), Pair(chunker)
    requester.open(FEATURED)
    responder.open(FEATURED)
    serve = Subscribe(4, "cmd.device.*", group="svc", serve=True)
    assert responder.send(Role.CLIENT, serve) == [serve]
    req = Request(7, "cmd.device.d1", b"reboot", timeout_ms=5000)
    assert requester.send(Role.CLIENT, req) == [req]
    delivery = Message("cmd.device.d1", b"reboot", sid=4, sender="x509:alice", reply=1)
    assert responder.send(Role.SERVER, delivery) == [delivery]
    reply = Reply(1, b"done", ack=9)
    assert responder.send(Role.CLIENT, reply) == [reply]
    res = Response(7, b"done", sender="x509:svc")
    assert requester.send(Role.SERVER, res) == [res]
    err = Error(ErrorCode.NO_RESPONDERS, "no responders", rid=8)
    assert requester.send(Role.SERVER, err) == [err]


@pytest.mark.parametrize("chunker", [lambda b: [b] if b else [], bytewise], ids=["whole", "bytes"])
def test_extended_deliveries_decode_whole_and_byte_by_byte(chunker: Any) -> None:
    pair = Pair(chunker)
    pair.open(FEATURED)
    events = [e for e, _ in GOLDEN if type(e) in (Message, Ok, Error, Response)]
    assert pair.send(Role.SERVER, *events) == events


def test_req_with_an_invalid_topic_is_answered_with_its_rid() -> None:
    server = open_server()
    events = server.receive_data(frame({"op": "req", "rid": 5, "topic": "a.*", "payload": b""}))
    assert events == [Rejected(ErrorCode.INVALID_TOPIC, events[0].message, rid=5)]  # type: ignore[union-attr]
    (answer,) = [decode(b) for b in _bodies(server.data_to_send())]
    assert isinstance(answer, Error)
    assert (answer.code, answer.rid) == (ErrorCode.INVALID_TOPIC, 5)
    assert not server.closed


@pytest.mark.parametrize(
    "fields",
    [
        {"group": ""},
        {"group": "a.b"},
        {"group": "*"},
        {"group": ">"},
        {"group": "a b"},
        {"group": "é" * 33},
        {"serve": True, "since": 1, "epoch": "e"},
    ],
)
def test_bad_subscription_options_are_answered_not_fatal(fields: dict[str, Any]) -> None:
    server = open_server()
    events = server.receive_data(frame({**_SUB, **fields}))
    assert len(events) == 1
    assert isinstance(events[0], Rejected)
    assert (events[0].code, events[0].sid) == (ErrorCode.INVALID_SUBSCRIPTION, 1)
    (answer,) = [decode(b) for b in _bodies(server.data_to_send())]
    assert isinstance(answer, Error)
    assert answer.code == ErrorCode.INVALID_SUBSCRIPTION
    assert not server.closed


def test_group_names_at_the_limit_are_accepted() -> None:
    server = open_server()
    sub = Subscribe(1, "a.>", group="é" * 32)  # 64 bytes
    assert server.receive_data(encode_frame(sub)) == [sub]


def test_a_client_refuses_to_receive_client_operations_and_vice_versa() -> None:
    client = open_client()
    (failure,) = client.receive_data(encode_frame(Request(1, "t", b"")))
    assert isinstance(failure, ProtocolFailure)
    server = open_server()
    (failure,) = server.receive_data(encode_frame(Response(1, b"")))
    assert isinstance(failure, ProtocolFailure)
    with pytest.raises(LocalProtocolError):
        open_server().send(Request(1, "t", b""))
    with pytest.raises(LocalProtocolError):
        open_client().send(Response(1, b""))


def test_a_client_that_saw_features_accepts_the_delivery_overhead() -> None:
    big = Message("t", b"x" * (MAX_FRAME_BYTES - 100), sender="x509:" + "a" * 4000, sid=1)
    assert len(encode(big)) > MAX_FRAME_BYTES
    client = open_client(FEATURED)
    assert client.receive_data(encode_frame(big)) == [big]
    old = open_client()  # a broker without features never sends it; the limit stays
    (failure,) = old.receive_data(encode_frame(big))
    assert isinstance(failure, ProtocolFailure)
    assert failure.code is ErrorCode.FRAME_TOO_LARGE


def test_new_error_codes_map_to_their_exceptions() -> None:
    assert isinstance(error_from_code(17, "x"), NoResponders)
    err = error_from_code(18, "x")
    assert isinstance(err, RequestTimeout)
    assert isinstance(err, TimeoutError)
    for code in (19, 20, 21, 22):
        e = error_from_code(code, "x")
        assert type(e) is BrokerError
        assert e.code == code


def _bodies(data: bytes) -> list[bytes]:
    out = []
    while data:
        n = int.from_bytes(data[:4], "big")
        out.append(data[4 : 4 + n])
        data = data[4 + n :]
    return out


def test_old_connection_defaults_still_work() -> None:
    # A version 1 client from before section 16: plain sub/pub/msg work unchanged.
    pair = Pair()
    pair.open()
    assert pair.send(Role.CLIENT, Subscribe(1, "a.>")) == [Subscribe(1, "a.>")]
    assert pair.send(Role.SERVER, Ok(sid=1), Message("a.b", b"x")) == [
        Ok(sid=1),
        Message("a.b", b"x"),
    ]
    assert isinstance(pair.client, Connection)


# --- every (role, state, new operation) pair -----------------------------------------------

NEW_EVENTS: list[Event] = [
    Request(1, "a.b", b"x", timeout_ms=5),
    Reply(1, b"x", ack=2),
    Response(1, b"x", sender="x509:a"),
]


def _in_state(role: Role, state: str) -> Connection:
    if state == "handshake":
        return Connection(role)
    conn = open_server() if role is Role.SERVER else open_client(FEATURED)
    if state == "closing":
        conn.send(Close(ErrorCode.NORMAL, "bye"))
        conn.data_to_send()
    return conn


@pytest.mark.parametrize("role", [Role.CLIENT, Role.SERVER], ids=lambda r: r.value)
@pytest.mark.parametrize("state", ["handshake", "open", "closing"])
@pytest.mark.parametrize("event", NEW_EVENTS, ids=lambda e: OPS[type(e)])
def test_new_operations_in_every_state(role: Role, state: str, event: Event) -> None:
    conn = _in_state(role, state)
    events = conn.receive_data(encode_frame(event))
    allowed = state == "open" and type(event) in RECEIVABLE[role, State.OPEN]
    if allowed:
        assert events == [event]
        assert not conn.closed
    elif state == "closing":
        assert events == []  # dropped while waiting for the peer's close
    else:
        assert len(events) == 1 and isinstance(events[0], ProtocolFailure)
        expected = ErrorCode.NOT_READY if state == "handshake" else ErrorCode.PROTOCOL_ERROR
        assert events[0].code is expected
        assert conn.closed


@given(
    op=st.sampled_from(["req", "reply", "res", "msg", "sub", "ok", "welcome", "pub", "error"]),
    fields=st.dictionaries(
        st.sampled_from(
            [
                "rid",
                "token",
                "topic",
                "payload",
                "headers",
                "timeout_ms",
                "sender",
                "sid",
                "seq",
                "epoch",
                "reply",
                "retained",
                "retain",
                "group",
                "serve",
                "since",
                "recovered",
                "features",
                "ack",
                "code",
                "version",
                "max_frame",
                "heartbeat_ms",
                "pattern",
            ]
        ),
        st.none()
        | st.booleans()
        | st.integers(-(2**64), 2**64)
        | st.text(max_size=80)
        | st.binary(max_size=80)
        | st.lists(st.text(max_size=8), max_size=40)
        | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3),
        max_size=8,
    ),
)
@settings(deadline=None, max_examples=400)
def test_garbage_in_the_new_fields_raises_only_remote_protocol_error(
    op: str, fields: dict[str, Any]
) -> None:
    try:
        msgpack_body = body({"op": op, **fields})
    except (OverflowError, ValueError):
        return  # not representable in msgpack
    with contextlib.suppress(RemoteProtocolError):  # anything else fails the test
        decode(msgpack_body)


def test_a_server_that_announced_features_may_send_the_delivery_overhead() -> None:
    big = Response(1, b"x" * (MAX_FRAME_BYTES - 10), sender="x509:" + "a" * 100)
    server = Connection(Role.SERVER)
    server.receive_data(frame({"op": "hello", "version": 1, "client": "t"}))
    server.send(FEATURED)
    server.send(big)  # over max_frame, within max_frame + DELIVERY_OVERHEAD_BYTES
    plain = open_server()  # its welcome announced no features: the old limit holds
    with pytest.raises(LocalProtocolError):
        plain.send(big)
