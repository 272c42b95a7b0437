"""msgpack encoding and validating decoding of frame bodies.

Each frame body is a msgpack map with string keys; ``op`` names the operation. Unknown keys are
ignored (so a later protocol version can add fields); missing required keys, wrong types, or
values out of range raise :class:`RemoteProtocolError`. Payloads are msgpack ``bin``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgpack

from client_sdk.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from client_sdk.protocol.events import (
    Close,
    Error,
    Event,
    Hello,
    Message,
    Ok,
    Ping,
    Pong,
    Publish,
    Subscribe,
    Unsubscribe,
    Welcome,
)
from client_sdk.protocol.grammar import header_problem
from client_sdk.protocol.limits import (
    FRAME_HEADER_BYTES,
    MAX_FRAME_BYTES_CEILING,
    MAX_ID,
    MAX_REASON_BYTES,
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
    elif isinstance(event, Message):
        d = {"op": "msg", "topic": event.topic, "payload": event.payload}
        _put_optional(d, "headers", event.headers)
    elif isinstance(event, Subscribe):
        d = {"op": "sub", "sid": event.sid, "pattern": event.pattern}
    elif isinstance(event, Unsubscribe):
        d = {"op": "unsub", "sid": event.sid}
    elif isinstance(event, Ok):
        d = {"op": "ok"}
        _put_optional(d, "sid", event.sid)
        _put_optional(d, "ack", event.ack)
    elif isinstance(event, Error):
        d = {"op": "error", "code": int(event.code), "message": event.message}
        _put_optional(d, "sid", event.sid)
        _put_optional(d, "ack", event.ack)
        _put_optional(d, "topic", event.topic)
        _put_optional(d, "dropped", event.dropped)
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
    topic: str, payload: bytes, headers: Mapping[str, str] | None = None
) -> bytes:
    """The delivery frame for one publish: encoded once, sent byte-identical to every subscriber.

    Its body is never longer than the ``pub`` body it came from (``"msg"`` and ``"pub"`` have the
    same length and a delivery drops ``ack``), so it always fits the announced frame limit.
    """
    d: dict[str, Any] = {"op": "msg", "topic": topic, "payload": payload}
    if headers is not None:  # as encode(Message(...)): an empty map stays an empty map
        d["headers"] = dict(headers)
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


def _d_welcome(d: Mapping[str, Any]) -> Event:
    ident = d.get("identity", {})
    if not isinstance(ident, dict):
        raise _fail("'welcome.identity' must be a map")
    return Welcome(
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
    return Subscribe(
        sid=_uint(_req(d, "sid", "sub"), "sid", "sub"),
        pattern=_topic_str(_req(d, "pattern", "sub"), "pattern", "sub"),
    )


def _d_unsub(d: Mapping[str, Any]) -> Event:
    return Unsubscribe(sid=_uint(_req(d, "sid", "unsub"), "sid", "unsub"))


def _d_pub(d: Mapping[str, Any]) -> Event:
    return Publish(
        topic=_topic_str(_req(d, "topic", "pub"), "topic", "pub"),
        payload=_payload(_req(d, "payload", "pub"), "pub"),
        headers=_headers(d.get("headers"), "pub"),
        ack=_opt_uint(d, "ack", "pub"),
    )


def _d_msg(d: Mapping[str, Any]) -> Event:
    return Message(
        topic=_topic_str(_req(d, "topic", "msg"), "topic", "msg"),
        payload=_payload(_req(d, "payload", "msg"), "msg"),
        headers=_headers(d.get("headers"), "msg"),
    )


def _d_ok(d: Mapping[str, Any]) -> Event:
    return Ok(sid=_opt_uint(d, "sid", "ok"), ack=_opt_uint(d, "ack", "ok"))


def _d_error(d: Mapping[str, Any]) -> Event:
    topic = d.get("topic")
    return Error(
        code=_uint(_req(d, "code", "error"), "code", "error", 0xFFFF),
        message=_text(d.get("message", ""), "message", "error", 4096),
        sid=_opt_uint(d, "sid", "error"),
        ack=_opt_uint(d, "ack", "error"),
        topic=None if topic is None else _topic_str(topic, "topic", "error"),
        dropped=_opt_uint(d, "dropped", "error"),
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
}


def decode(body: bytes | memoryview) -> Event:
    """Decode and validate one frame body.

    Raises :class:`RemoteProtocolError` (code ``PROTOCOL_ERROR``) for anything malformed and
    :class:`UnknownOperation` for a well-formed frame with an ``op`` we do not know. Nothing else.
    """
    try:
        d = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # UnicodeDecodeError, ExtraData, FormatError, StackError are all ValueErrors.
        raise _fail(f"frame body is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(d, dict):
        raise _fail("frame body must be a msgpack map")
    op = d.get("op")
    if not isinstance(op, str):
        raise _fail("frame lacks a string 'op'")
    decoder = _DECODERS.get(op)
    if decoder is None:
        raise UnknownOperation(f"unknown operation {op[:32]!r}")
    return decoder(d)
