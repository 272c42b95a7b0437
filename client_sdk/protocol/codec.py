"""msgpack encoding and validating decoding of frame bodies.

Each frame body is a msgpack map with string keys; ``op`` names the operation. Unknown keys are
ignored (so a later protocol version can add fields); missing required keys, wrong types, or
values out of range raise :class:`RemoteProtocolError`. Payloads are msgpack ``bin``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgpack

from tessera_mq.client.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from tessera_mq.client.protocol.events import (
    Close,
    Error,
    Event,
    Hello,
    Message,
    Ok,
    Ping,
    Pong,
    Publish,
    Reply,
    Request,
    Response,
    Subscribe,
    Unsubscribe,
    Welcome,
)
from tessera_mq.client.protocol.grammar import header_problem
from tessera_mq.client.protocol.limits import (
    FRAME_HEADER_BYTES,
    MAX_EPOCH_CHARS,
    MAX_FEATURE_CHARS,
    MAX_FEATURES,
    MAX_FRAME_BYTES_CEILING,
    MAX_GROUP_BYTES,
    MAX_ID,
    MAX_REASON_BYTES,
    MAX_REQUEST_TIMEOUT_MS,
    MAX_SENDER_CHARS,
    MAX_SEQ,
)

__all__ = [
    "OPS",
    "UnknownOperation",
    "decode",
    "encode",
    "encode_frame",
    "encode_message_frame",
    "op_of",
]

#: Operation names on the wire, by event type.
OPS: dict[type[Any], str] = {
    Hello: "hello",
    Welcome: "welcome",
    Subscribe: "sub",
    Unsubscribe: "unsub",
    Publish: "pub",
    Message: "msg",
    Ok: "ok",
    Error: "error",
    Ping: "ping",
    Pong: "pong",
    Close: "close",
    Request: "req",
    Reply: "reply",
    Response: "res",
}

_PING_BODY = msgpack.packb({"op": "ping"})
_PONG_BODY = msgpack.packb({"op": "pong"})


class UnknownOperation(RemoteProtocolError):
    """The frame is well-formed but names an operation this implementation does not know."""

    code = ErrorCode.UNKNOWN_OPERATION


def op_of(event: Event) -> str:
    """The wire name of the operation ``event`` represents."""
    try:
        return OPS[type(event)]
    except KeyError:
        raise LocalProtocolError(f"{type(event).__name__} is not a wire operation") from None


# --- encoding -----------------------------------------------------------------------------


def _prefix(body: bytes) -> bytes:
    return len(body).to_bytes(FRAME_HEADER_BYTES, "big") + body


def _put_optional(d: dict[str, Any], key: str, value: object) -> None:
    if value is not None:
        d[key] = value


def _to_map(event: Event) -> dict[str, Any]:
    if isinstance(event, Publish):
        d: dict[str, Any] = {"op": "pub", "topic": event.topic, "payload": event.payload}
        _put_optional(d, "headers", event.headers)
        _put_optional(d, "ack", event.ack)
        if event.retain:
            d["retain"] = True
    elif isinstance(event, Message):
        d = {"op": "msg", "topic": event.topic, "payload": event.payload}
        _put_optional(d, "headers", event.headers)
        _put_optional(d, "sid", event.sid)
        if event.retained:
            d["retained"] = True
        _put_optional(d, "sender", event.sender)
        _put_optional(d, "seq", event.seq)
        _put_optional(d, "epoch", event.epoch)
        _put_optional(d, "reply", event.reply)
    elif isinstance(event, Subscribe):
        d = {"op": "sub", "sid": event.sid, "pattern": event.pattern}
        _put_optional(d, "group", event.group)
        if event.serve:
            d["serve"] = True
        _put_optional(d, "since", event.since)
        _put_optional(d, "epoch", event.epoch)
    elif isinstance(event, Request):
        d = {"op": "req", "rid": event.rid, "topic": event.topic, "payload": event.payload}
        _put_optional(d, "headers", event.headers)
        _put_optional(d, "timeout_ms", event.timeout_ms)
    elif isinstance(event, Reply):
        d = {"op": "reply", "token": event.token, "payload": event.payload}
        _put_optional(d, "headers", event.headers)
        _put_optional(d, "ack", event.ack)
    elif isinstance(event, Response):
        d = {"op": "res", "rid": event.rid, "payload": event.payload}
        _put_optional(d, "headers", event.headers)
        _put_optional(d, "sender", event.sender)
    elif isinstance(event, Unsubscribe):
        d = {"op": "unsub", "sid": event.sid}
    elif isinstance(event, Ok):
        d = {"op": "ok"}
        _put_optional(d, "sid", event.sid)
        _put_optional(d, "ack", event.ack)
        _put_optional(d, "epoch", event.epoch)
        _put_optional(d, "seq", event.seq)
        _put_optional(d, "recovered", event.recovered)
    elif isinstance(event, Error):
        d = {"op": "error", "code": int(event.code), "message": event.message}
        _put_optional(d, "sid", event.sid)
        _put_optional(d, "ack", event.ack)
        _put_optional(d, "topic", event.topic)
        _put_optional(d, "dropped", event.dropped)
        _put_optional(d, "rid", event.rid)
    elif isinstance(event, Hello):
        d = {"op": "hello", "version": event.version, "client": event.client}
        _put_optional(d, "heartbeat_ms", event.heartbeat_ms)
    elif isinstance(event, Welcome):
        d = {
            "op": "welcome",
            "version": event.version,
            "server": event.server,
            "identity": {"mechanism": event.mechanism, "name": event.identity},
            "max_frame": event.max_frame,
            "heartbeat_ms": event.heartbeat_ms,
        }
        if event.features is not None:
            d["features"] = list(event.features)
    elif isinstance(event, Close):
        d = {"op": "close", "code": int(event.code), "reason": event.reason}
    elif isinstance(event, Ping):
        d = {"op": "ping"}
    elif isinstance(event, Pong):
        d = {"op": "pong"}
    else:
        raise LocalProtocolError(f"{type(event).__name__} is not a wire operation")
    return d


def encode(event: Event) -> bytes:
    """The msgpack body of ``event`` (without the length prefix)."""
    if isinstance(event, Ping):
        return bytes(_PING_BODY)
    if isinstance(event, Pong):
        return bytes(_PONG_BODY)
    body: bytes = msgpack.packb(_to_map(event), use_bin_type=True)
    return body


def encode_frame(event: Event) -> bytes:
    """The whole frame for ``event``: length prefix and body."""
    return _prefix(encode(event))


def encode_message_frame(
    topic: str,
    payload: bytes,
    headers: Mapping[str, str] | None = None,
    *,
    sender: str | None = None,
    seq: int | None = None,
    epoch: str | None = None,
) -> bytes:
    """The delivery frame for one publish: encoded once, sent byte-identical to every subscriber.

    Without ``sender``/``seq``/``epoch`` its body is never longer than the ``pub`` body it came
    from (``"msg"`` and ``"pub"`` have the same length and a delivery drops ``ack`` and
    ``retain``), so it always fits the announced frame limit. Those per-publish fields add at
    most :data:`~client_sdk.protocol.limits.DELIVERY_OVERHEAD_BYTES`.
    """
    d: dict[str, Any] = {"op": "msg", "topic": topic, "payload": payload}
    if headers is not None:  # as encode(Message(...)): an empty map stays an empty map
        d["headers"] = dict(headers)
    if sender is not None:
        d["sender"] = sender
    if seq is not None:
        d["seq"] = seq
    if epoch is not None:
        d["epoch"] = epoch
    return _prefix(msgpack.packb(d, use_bin_type=True))


# --- decoding -----------------------------------------------------------------------------


def _fail(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message)


def _req(d: Mapping[str, Any], key: str, op: str) -> Any:
    try:
        return d[key]
    except KeyError:
        raise _fail(f"'{op}' frame lacks '{key}'") from None


def _uint(value: object, key: str, op: str, maximum: int = MAX_ID) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        raise _fail(f"'{op}.{key}' must be an integer from 0 to {maximum}")
    return value


def _opt_uint(d: Mapping[str, Any], key: str, op: str) -> int | None:
    value = d.get(key)
    return None if value is None else _uint(value, key, op)


def _opt_bool(d: Mapping[str, Any], key: str, op: str) -> bool:
    value = d.get(key)
    if value is None:
        return False
    if type(value) is not bool:
        raise _fail(f"'{op}.{key}' must be a boolean")
    return value


def _opt_text(d: Mapping[str, Any], key: str, op: str, max_chars: int) -> str | None:
    value = d.get(key)
    return None if value is None else _text(value, key, op, max_chars)


def _text(value: object, key: str, op: str, max_bytes: int = MAX_REASON_BYTES) -> str:
    if not isinstance(value, str):
        raise _fail(f"'{op}.{key}' must be a string")
    if len(value) > max_bytes:
        raise _fail(f"'{op}.{key}' is longer than {max_bytes} characters")
    return value


def _topic_str(value: object, key: str, op: str) -> str:
    # Topic *rules* are checked by the connection (a bad topic is answered, not fatal); here
    # only the type and a generous size bound, so a huge string is never validated char by char.
    return _text(value, key, op, MAX_FRAME_BYTES_CEILING)


def _payload(value: object, op: str) -> bytes:
    if not isinstance(value, bytes):
        raise _fail(f"'{op}.payload' must be msgpack bin")
    return value


def _headers(value: object, op: str) -> dict[str, str] | None:
    if value is None:
        return None
    problem = header_problem(value)
    if problem is not None or not isinstance(value, dict):
        raise _fail(f"'{op}.headers' {problem or 'must be a map of string to string'}")
    return value


def _d_hello(d: Mapping[str, Any]) -> Event:
    hb = d.get("heartbeat_ms")
    return Hello(
        version=_uint(_req(d, "version", "hello"), "version", "hello"),
        client=_text(d.get("client", ""), "client", "hello"),
        heartbeat_ms=None if hb is None else _uint(hb, "heartbeat_ms", "hello"),
    )


def _features(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_FEATURES:
        raise _fail(f"'welcome.features' must be an array of at most {MAX_FEATURES} strings")
    return tuple(_text(f, "features", "welcome", MAX_FEATURE_CHARS) for f in value)


def _d_welcome(d: Mapping[str, Any]) -> Event:
    ident = d.get("identity", {})
    if not isinstance(ident, dict):
        raise _fail("'welcome.identity' must be a map")
    return Welcome(
        features=_features(d.get("features")),
        version=_uint(_req(d, "version", "welcome"), "version", "welcome"),
        server=_text(d.get("server", ""), "server", "welcome"),
        mechanism=_text(ident.get("mechanism", ""), "identity.mechanism", "welcome"),
        identity=_text(ident.get("name", ""), "identity.name", "welcome", 4096),
        max_frame=_uint(
            _req(d, "max_frame", "welcome"), "max_frame", "welcome", MAX_FRAME_BYTES_CEILING
        ),
        heartbeat_ms=_uint(_req(d, "heartbeat_ms", "welcome"), "heartbeat_ms", "welcome"),
    )


def _d_sub(d: Mapping[str, Any]) -> Event:
    since = d.get("since")
    epoch = _opt_text(d, "epoch", "sub", MAX_EPOCH_CHARS)
    if epoch is not None and since is None:
        raise _fail("'sub.epoch' needs 'sub.since'")
    return Subscribe(
        sid=_uint(_req(d, "sid", "sub"), "sid", "sub"),
        pattern=_topic_str(_req(d, "pattern", "sub"), "pattern", "sub"),
        group=_opt_text(d, "group", "sub", MAX_GROUP_BYTES),
        serve=_opt_bool(d, "serve", "sub"),
        since=None if since is None else _uint(since, "since", "sub", MAX_SEQ),
        epoch=epoch,
    )


def _d_unsub(d: Mapping[str, Any]) -> Event:
    return Unsubscribe(sid=_uint(_req(d, "sid", "unsub"), "sid", "unsub"))


def _d_pub(d: Mapping[str, Any]) -> Event:
    return Publish(
        topic=_topic_str(_req(d, "topic", "pub"), "topic", "pub"),
        payload=_payload(_req(d, "payload", "pub"), "pub"),
        headers=_headers(d.get("headers"), "pub"),
        ack=_opt_uint(d, "ack", "pub"),
        retain=_opt_bool(d, "retain", "pub"),
    )


def _opt_seq(d: Mapping[str, Any], op: str) -> int | None:
    value = d.get("seq")
    return None if value is None else _uint(value, "seq", op, MAX_SEQ)


def _d_msg(d: Mapping[str, Any]) -> Event:
    return Message(
        topic=_topic_str(_req(d, "topic", "msg"), "topic", "msg"),
        payload=_payload(_req(d, "payload", "msg"), "msg"),
        headers=_headers(d.get("headers"), "msg"),
        sid=_opt_uint(d, "sid", "msg"),
        retained=_opt_bool(d, "retained", "msg"),
        sender=_opt_text(d, "sender", "msg", MAX_SENDER_CHARS),
        seq=_opt_seq(d, "msg"),
        epoch=_opt_text(d, "epoch", "msg", MAX_EPOCH_CHARS),
        reply=_opt_uint(d, "reply", "msg"),
    )


def _d_ok(d: Mapping[str, Any]) -> Event:
    recovered = d.get("recovered")
    if recovered is not None and type(recovered) is not bool:
        raise _fail("'ok.recovered' must be a boolean")
    return Ok(
        sid=_opt_uint(d, "sid", "ok"),
        ack=_opt_uint(d, "ack", "ok"),
        epoch=_opt_text(d, "epoch", "ok", MAX_EPOCH_CHARS),
        seq=_opt_seq(d, "ok"),
        recovered=recovered,
    )


def _d_req(d: Mapping[str, Any]) -> Event:
    timeout = d.get("timeout_ms")
    if timeout is not None:
        timeout = _uint(timeout, "timeout_ms", "req", MAX_REQUEST_TIMEOUT_MS)
        if timeout == 0:
            raise _fail("'req.timeout_ms' must be at least 1")
    return Request(
        rid=_uint(_req(d, "rid", "req"), "rid", "req"),
        topic=_topic_str(_req(d, "topic", "req"), "topic", "req"),
        payload=_payload(_req(d, "payload", "req"), "req"),
        headers=_headers(d.get("headers"), "req"),
        timeout_ms=timeout,
    )


def _d_reply(d: Mapping[str, Any]) -> Event:
    return Reply(
        token=_uint(_req(d, "token", "reply"), "token", "reply"),
        payload=_payload(_req(d, "payload", "reply"), "reply"),
        headers=_headers(d.get("headers"), "reply"),
        ack=_opt_uint(d, "ack", "reply"),
    )


def _d_res(d: Mapping[str, Any]) -> Event:
    return Response(
        rid=_uint(_req(d, "rid", "res"), "rid", "res"),
        payload=_payload(_req(d, "payload", "res"), "res"),
        headers=_headers(d.get("headers"), "res"),
        sender=_opt_text(d, "sender", "res", MAX_SENDER_CHARS),
    )


def _d_error(d: Mapping[str, Any]) -> Event:
    topic = d.get("topic")
    return Error(
        code=_uint(_req(d, "code", "error"), "code", "error", 0xFFFF),
        message=_text(d.get("message", ""), "message", "error", 4096),
        sid=_opt_uint(d, "sid", "error"),
        ack=_opt_uint(d, "ack", "error"),
        topic=None if topic is None else _topic_str(topic, "topic", "error"),
        dropped=_opt_uint(d, "dropped", "error"),
        rid=_opt_uint(d, "rid", "error"),
    )


def _d_close(d: Mapping[str, Any]) -> Event:
    return Close(
        code=_uint(d.get("code", 0), "code", "close", 0xFFFF),
        reason=_text(d.get("reason", ""), "reason", "close", 4096),
    )


_DECODERS: dict[str, Callable[[Mapping[str, Any]], Event]] = {
    "hello": _d_hello,
    "welcome": _d_welcome,
    "sub": _d_sub,
    "unsub": _d_unsub,
    "pub": _d_pub,
    "msg": _d_msg,
    "ok": _d_ok,
    "error": _d_error,
    "ping": lambda _d: Ping(),
    "pong": lambda _d: Pong(),
    "close": _d_close,
    "req": _d_req,
    "reply": _d_reply,
    "res": _d_res,
}


def _msgpack_problem(exc: BaseException) -> str:
    """What was wrong with a body msgpack refused, in words (no Python class names)."""
    if isinstance(exc, UnicodeDecodeError):
        return "a string is not valid UTF-8"
    if isinstance(exc, msgpack.ExtraData):
        return "bytes after the map"
    if isinstance(exc, msgpack.StackError):
        return "nested too deeply"
    if isinstance(exc, msgpack.FormatError):
        return "not msgpack"
    if isinstance(exc, msgpack.OutOfData):
        return "truncated"
    return "malformed"


def decode(body: bytes | memoryview) -> Event:
    """Decode and validate one frame body.

    Raises :class:`RemoteProtocolError` (code ``PROTOCOL_ERROR``) for anything malformed and
    :class:`UnknownOperation` for a well-formed frame with an ``op`` we do not know. Nothing else.
    """
    try:
        d = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # UnicodeDecodeError, ExtraData, FormatError, StackError are all ValueErrors.
        raise _fail(f"frame body is not valid msgpack ({_msgpack_problem(exc)})") from None
    if not isinstance(d, dict):
        raise _fail("frame body must be a msgpack map")
    op = d.get("op")
    if not isinstance(op, str):
        raise _fail("frame lacks a string 'op'")
    decoder = _DECODERS.get(op)
    if decoder is None:
        raise UnknownOperation(f"unknown operation {op[:32]!r}")
    return decoder(d)
