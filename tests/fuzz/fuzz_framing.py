"""Fuzz the frame decoder and the codec with arbitrary bytes.

    python tests/fuzz/fuzz_framing.py [libFuzzer flags] [CORPUS_DIR ...]

Input layout: byte 0 picks the frame limit (top 2 bits) and how the rest is cut into reads
(:func:`fuzzlib.chunks`); bytes 1.. are the stream. Checked on every input:

* ``codec.decode`` of the whole stream, and of every frame body, raises nothing but
  :class:`~client_sdk.protocol.errors.RemoteProtocolError` (and its subclasses);
* :class:`~client_sdk.protocol.framing.FrameDecoder` raises nothing but ``FrameTooLarge``, gives
  the same frames (and the same oversize prefix) however the stream is cut, and never buffers
  more than one incomplete frame (header + limit);
* a decoded event re-encodes to a body that decodes to the same event.
"""

from __future__ import annotations

import sys

import fuzzlib

with fuzzlib.instrumented("client_sdk"):
    from tessera_mq.client.protocol import codec
    from tessera_mq.client.protocol.errors import RemoteProtocolError
    from tessera_mq.client.protocol.events import (
        Close,
        Error,
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
    from tessera_mq.client.protocol.framing import FrameDecoder, FrameTooLarge
    from tessera_mq.client.protocol.limits import FRAME_HEADER_BYTES

#: Frame limits chosen by the top two bits of byte 0: tiny ones make oversize prefixes common.
LIMITS = (16, 300, 64 * 1024, 1024 * 1024)

Outcome = tuple[list[bytes], int | None]  # frames, and the oversize length that stopped them


def _frames(pieces: list[bytes], limit: int) -> Outcome:
    decoder = FrameDecoder(limit)
    frames: list[bytes] = []
    for piece in pieces:
        try:
            frames += decoder.feed(piece)
        except FrameTooLarge as exc:
            too_large = exc
            break
        # Only the incomplete tail stays: less than one header plus one body.
        assert decoder.buffered < FRAME_HEADER_BYTES + limit, (decoder.buffered, limit)
    else:
        return frames, None
    assert too_large.length > limit, (too_large.length, limit)
    return frames + too_large.frames, too_large.length


def _decode(body: bytes) -> None:
    try:
        event = codec.decode(body)
    except RemoteProtocolError:
        return
    again = codec.decode(codec.encode(event))
    assert again == event, (event, again)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    limit = LIMITS[data[0] >> 6]
    stream = data[1:]
    _decode(stream)
    whole = _frames([stream], limit)
    cut = _frames(list(fuzzlib.chunks(stream, data[0] & 0x3F)), limit)
    assert whole == cut, "the frames depend on how the stream was cut"
    for body in whole[0]:
        _decode(body)


SAMPLES = (
    Hello(client="fuzz/1", heartbeat_ms=10_000),
    Welcome(server="fuzz", mechanism="x509", identity="alice"),
    Subscribe(7, "status.>"),
    Unsubscribe(7),
    Publish("status.eu", b"up", headers={"k": "v"}, ack=3),
    Publish("a.b", b""),
    Message("status.eu", b"\x00" * 40, headers={}),
    Ok(sid=7),
    Ok(ack=3),
    Error(5, "bad topic", sid=1, topic="x.y"),
    Ping(),
    Pong(),
    Close(0, "bye"),
)


def seeds() -> list[bytes]:
    frames = [codec.encode_frame(e) for e in SAMPLES]
    frames.append(codec.encode_message_frame("a.b", b"payload", {"h": "1"}))
    out = []
    for selector in (0x00, 0x41, 0x85, 0xC7, 0xFF):
        out += [bytes([selector]) + f for f in frames]
        out.append(bytes([selector]) + b"".join(frames))
    out.append(b"\xc0" + frames[0] + b"\xff\xff\xff\xff" + frames[1])  # oversize prefix
    out.append(b"\x80" + b"\x00\x00\x00\x00")  # empty body
    return out


if __name__ == "__main__":
    fuzzlib.main(
        "framing",
        test_one_input,
        seeds,
        default_args=["-max_len=16384", "-timeout=10"],
        argv=sys.argv,
    )
