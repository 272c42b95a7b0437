"""Helpers for the sans-I/O protocol tests: raw frames, a client/server pair that moves bytes
between two :class:`~client_sdk.protocol.Connection` objects (h11 ``tests/helpers.py`` style),
sample events, and hypothesis strategies for every wire event."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import msgpack
from hypothesis import strategies as st

from tessera_mq.client.protocol import (
    Close,
    Connection,
    Error,
    ErrorCode,
    Event,
    Hello,
    Message,
    Ok,
    Ping,
    Pong,
    Publish,
    Role,
    Subscribe,
    Unsubscribe,
    Welcome,
)
from tessera_mq.client.protocol.codec import decode, encode_frame
from tessera_mq.client.protocol.framing import FrameDecoder
from tessera_mq.client.protocol.limits import (
    MAX_FRAME_BYTES_CEILING,
    MAX_HEADER_FIELD_BYTES,
    MAX_HEADERS,
    MAX_ID,
    MAX_REASON_BYTES,
)

__all__ = [
    "STRATEGIES",
    "WIRE_TYPES",
    "Pair",
    "body",
    "bytewise",
    "decode_stream",
    "events_st",
    "frame",
    "headers_st",
    "open_client",
    "open_server",
    "pattern_st",
    "publish_st",
    "sample",
    "topic_st",
    "whole",
]

#: Every operation that travels on the wire, in the order of docs/protocol.md.
WIRE_TYPES: tuple[type[Any], ...] = (
    Hello,
    Welcome,
    Subscribe,
    Unsubscribe,
    Publish,
    Message,
    Ok,
    Error,
    Ping,
    Pong,
    Close,
)


def body(d: object) -> bytes:
    """A msgpack body for an arbitrary object (to build frames the codec would never encode)."""
    packed: bytes = msgpack.packb(d, use_bin_type=True)
    return packed


def frame(d: object) -> bytes:
    """Length prefix plus :func:`body`, or plus ``d`` itself when it is already bytes."""
    b = d if isinstance(d, bytes) else body(d)
    return len(b).to_bytes(4, "big") + b


def bytewise(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[i : i + 1]


def decode_stream(data: bytes) -> list[Event]:
    """Split ``data`` into frames and decode each: what the peer would see."""
    decoder = FrameDecoder(MAX_FRAME_BYTES_CEILING)
    frames = decoder.feed(data)
    assert decoder.buffered == 0, "a frame was cut short"
    return [decode(b) for b in frames]


def sample(kind: type[Any]) -> Event:
    """One valid instance of each wire event type."""
    samples: dict[type[Any], Event] = {
        Hello: Hello(client="test/1"),
        Welcome: Welcome(server="test", mechanism="x509", identity="alice"),
        Subscribe: Subscribe(7, "status.>"),
        Unsubscribe: Unsubscribe(7),
        Publish: Publish("status.eu", b"up", ack=3),
        Message: Message("status.eu", b"up"),
        Ok: Ok(sid=7),
        Error: Error(ErrorCode.PERMISSION_DENIED, "no", ack=3),
        Ping: Ping(),
        Pong: Pong(),
        Close: Close(ErrorCode.NORMAL, "bye"),
    }
    return samples[kind]


def open_server(**kwargs: Any) -> Connection:
    """A server whose session is open: hello received, welcome sent, output drained."""
    server = Connection(Role.SERVER, **kwargs)
    server.receive_data(frame({"op": "hello", "version": 1, "client": "t"}))
    server.send(Welcome())
    server.data_to_send()
    return server


def open_client(welcome: Welcome | None = None, **kwargs: Any) -> Connection:
    """A client whose session is open: hello sent, welcome received, output drained."""
    client = Connection(Role.CLIENT, **kwargs)
    client.send(Hello())
    client.data_to_send()
    events = client.receive_data(encode_frame(welcome or Welcome()))
    assert events == [welcome or Welcome()], events
    return client


Chunker = Callable[[bytes], Iterable[bytes]]


def whole(data: bytes) -> Iterable[bytes]:
    return [data] if data else []


class Pair:
    """A client and a server connection and the bytes between them.

    ``send(role, *events)`` queues events on that side and delivers its output to the other side
    (whole, or through ``chunker``); it returns the events the other side produced.
    """

    def __init__(self, chunker: Chunker = whole, **server_kwargs: Any) -> None:
        self.client = Connection(Role.CLIENT)
        self.server = Connection(Role.SERVER, **server_kwargs)
        self.chunker = chunker
        self.now = 0.0

    def conn(self, role: Role) -> Connection:
        return self.client if role is Role.CLIENT else self.server

    def peer(self, role: Role) -> Connection:
        return self.server if role is Role.CLIENT else self.client

    def deliver(self, role: Role) -> list[Event]:
        """Move what ``role`` has queued to its peer; return the peer's events."""
        data = self.conn(role).data_to_send()
        events: list[Event] = []
        for chunk in self.chunker(data):
            events += self.peer(role).receive_data(chunk, self.now)
        return events

    def send(self, role: Role, *events: Event) -> list[Event]:
        for event in events:
            self.conn(role).send(event)
        return self.deliver(role)

    def open(self, welcome: Welcome | None = None) -> tuple[list[Event], list[Event]]:
        """hello then welcome; returns (server's events, client's events)."""
        at_server = self.send(Role.CLIENT, Hello(client="pair/1"))
        assert at_server == [Hello(client="pair/1")], at_server
        at_client = self.send(Role.SERVER, welcome or Welcome(server="pair"))
        return at_server, at_client


# --- hypothesis strategies ------------------------------------------------------------------

uint32 = st.integers(0, MAX_ID)
opt_uint32 = st.none() | uint32

#: Any text msgpack can carry (no lone surrogates), including astral characters.
_chars = st.characters(blacklist_categories=("Cs",))


def text(max_size: int) -> st.SearchStrategy[str]:
    return st.text(_chars, max_size=max_size)


#: Text whose UTF-8 form fits in ``n`` bytes even if every character takes four.
def small_text(n: int) -> st.SearchStrategy[str]:
    return text(n // 4)


#: A token character: not a separator or wildcard, not white space, not a control character.
_token_chars = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters=".*>").filter(
    lambda c: not c.isspace()
)
token = st.text(_token_chars, min_size=1, max_size=8)
topic_st = st.lists(token, min_size=1, max_size=6).map(".".join)
pattern_st = st.builds(
    lambda toks, tail: ".".join([*toks, *tail]),
    st.lists(token | st.just("*"), min_size=0, max_size=5),
    st.sampled_from([[], [">"]]),
).filter(bool)

headers_st = st.none() | st.dictionaries(
    small_text(MAX_HEADER_FIELD_BYTES), small_text(MAX_HEADER_FIELD_BYTES), max_size=MAX_HEADERS
)

hello_st = st.builds(Hello, version=uint32, client=text(MAX_REASON_BYTES), heartbeat_ms=opt_uint32)
welcome_st = st.builds(
    Welcome,
    version=uint32,
    server=text(MAX_REASON_BYTES),
    mechanism=text(MAX_REASON_BYTES),
    identity=text(4096),
    max_frame=st.integers(0, MAX_FRAME_BYTES_CEILING),
    heartbeat_ms=uint32,
)
subscribe_st = st.builds(Subscribe, sid=uint32, pattern=pattern_st)
unsubscribe_st = st.builds(Unsubscribe, sid=uint32)
publish_st = st.builds(
    Publish, topic=topic_st, payload=st.binary(max_size=256), headers=headers_st, ack=opt_uint32
)
message_st = st.builds(Message, topic=topic_st, payload=st.binary(max_size=256), headers=headers_st)
ok_st = st.builds(Ok, sid=opt_uint32, ack=opt_uint32)
error_st = st.builds(
    Error,
    code=st.integers(0, 0xFFFF),
    message=text(4096),
    sid=opt_uint32,
    ack=opt_uint32,
    topic=st.none() | topic_st,
)
close_st = st.builds(Close, code=st.integers(0, 0xFFFF), reason=text(4096))

#: A strategy per wire event type.
STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    Hello: hello_st,
    Welcome: welcome_st,
    Subscribe: subscribe_st,
    Unsubscribe: unsubscribe_st,
    Publish: publish_st,
    Message: message_st,
    Ok: ok_st,
    Error: error_st,
    Ping: st.just(Ping()),
    Pong: st.just(Pong()),
    Close: close_st,
}

#: Any wire event.
events_st: st.SearchStrategy[Event] = st.one_of(*STRATEGIES.values())
