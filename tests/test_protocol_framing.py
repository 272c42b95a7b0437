"""Length-prefixed framing: any chunking gives the same frames, and the limit is enforced on the
4-byte prefix, before a byte of the body is buffered."""

from __future__ import annotations

import pytest
from helpers_protocol import bytewise
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera_mq.client.protocol import ErrorCode, FrameDecoder, FrameTooLarge, RemoteProtocolError
from tessera_mq.client.protocol.limits import FRAME_HEADER_BYTES, MAX_FRAME_BYTES


def prefixed(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def stream(bodies: list[bytes]) -> bytes:
    return b"".join(prefixed(b) for b in bodies)


def feed_chunks(decoder: FrameDecoder, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
        # Only one incomplete frame is ever held: its prefix and part of a body within the limit.
        assert decoder.buffered < FRAME_HEADER_BYTES + decoder.max_frame
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    chunks, start = [], 0
    for p in points:
        chunks.append(data[start:p])
        start = p
    chunks.append(data[start:])
    return chunks


BODIES = [b"", b"\x80", b"x" * 300, bytes(range(256)), b"", b"last"]


def test_whole_input() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(stream(BODIES)) == BODIES
    assert decoder.buffered == 0


def test_byte_by_byte() -> None:
    decoder = FrameDecoder()
    assert feed_chunks(decoder, list(bytewise(stream(BODIES)))) == BODIES
    assert decoder.buffered == 0


def test_empty_feed_is_harmless() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\x00\x00") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\x00\x01a") == [b"a"]


def test_zero_length_body() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00\x00\x00\x00") == [b""]
    assert decoder.feed(b"\x00\x00\x00\x00" * 3) == [b"", b"", b""]
    assert decoder.buffered == 0


def test_partial_frame_is_kept_until_complete() -> None:
    decoder = FrameDecoder()
    data = prefixed(b"hello")
    assert decoder.feed(data[:3]) == []
    assert decoder.buffered == 3
    assert decoder.feed(data[3:6]) == []
    assert decoder.buffered == 6
    assert decoder.feed(data[6:] + data[:2]) == [b"hello"]
    assert decoder.buffered == 2


@given(
    bodies=st.lists(st.binary(max_size=64), max_size=12),
    cuts=st.lists(st.integers(0, 2000), max_size=30),
)
@settings(deadline=None)
def test_random_chunking_gives_the_same_frames(bodies: list[bytes], cuts: list[int]) -> None:
    data = stream(bodies)
    decoder = FrameDecoder(max_frame=64)
    assert feed_chunks(decoder, split_at(data, cuts)) == bodies
    assert decoder.buffered == 0


@given(bodies=st.lists(st.binary(max_size=64), max_size=8), cut=st.integers(0, 63))
@settings(deadline=None)
def test_buffer_holds_only_the_incomplete_tail(bodies: list[bytes], cut: int) -> None:
    complete = stream(bodies)
    partial = prefixed(b"y" * 60)[:cut]
    decoder = FrameDecoder(max_frame=64)
    assert decoder.feed(complete + partial) == bodies
    assert decoder.buffered == len(partial)


def test_input_types_and_no_aliasing() -> None:
    data = bytearray(prefixed(b"abc") + prefixed(b"de")[:3])
    decoder = FrameDecoder()
    frames = decoder.feed(data)
    data[4:7] = b"XXX"  # the caller may reuse its read buffer
    assert frames == [b"abc"]
    assert all(type(f) is bytes for f in frames)
    assert decoder.feed(memoryview(b"\x02de")) == [b"de"]


# --- the limit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [0, 1, 64, 65536, MAX_FRAME_BYTES])
def test_exactly_the_limit_is_accepted(limit: int) -> None:
    decoder = FrameDecoder(max_frame=limit)
    assert decoder.feed(prefixed(b"z" * limit)) == [b"z" * limit]


@pytest.mark.parametrize("limit", [0, 1, 64, 65536, MAX_FRAME_BYTES])
def test_oversize_prefix_alone_raises(limit: int) -> None:
    # Only the 4-byte prefix of an oversize frame: no body byte has arrived yet.
    decoder = FrameDecoder(max_frame=limit)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed((limit + 1).to_bytes(4, "big"))
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert isinstance(info.value, RemoteProtocolError)
    assert decoder.buffered <= FRAME_HEADER_BYTES


def test_oversize_prefix_split_across_feeds() -> None:
    decoder = FrameDecoder(max_frame=100)
    assert decoder.feed(b"\xff") == []
    assert decoder.feed(b"\xff\xff") == []
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"\xff")
    assert decoder.buffered <= FRAME_HEADER_BYTES


def test_largest_prefix_never_allocates_the_body() -> None:
    # A 4 GiB claim fails at once; nothing of that size is ever buffered.
    decoder = FrameDecoder()
    with pytest.raises(FrameTooLarge, match="4294967295"):
        decoder.feed(b"\xff\xff\xff\xff" + b"x" * 1000)


def test_oversize_after_good_frames_in_the_same_chunk() -> None:
    # The frames before the oversize prefix are not lost: they travel with the exception, so
    # the caller sees the same frames however the stream was cut into reads.
    decoder = FrameDecoder(max_frame=10)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(prefixed(b"ok") + prefixed(b"") + (11).to_bytes(4, "big") + b"body")
    assert info.value.frames == [b"ok", b""]
    assert info.value.length == 11
    assert "11" in str(info.value)
    assert "10" in str(info.value)


@given(
    bodies=st.lists(st.binary(max_size=20), max_size=5),
    cuts=st.lists(st.integers(0, 200), max_size=10),
)
@settings(deadline=None)
def test_frames_before_an_oversize_prefix_do_not_depend_on_chunking(
    bodies: list[bytes], cuts: list[int]
) -> None:
    data = stream(bodies) + (21).to_bytes(4, "big") + b"x" * 30
    decoder = FrameDecoder(max_frame=20)
    got: list[bytes] = []
    for chunk in split_at(data, cuts):
        try:
            got += decoder.feed(chunk)
        except FrameTooLarge as exc:
            got += exc.frames
            break
    else:
        pytest.fail("the oversize prefix was not noticed")
    assert got == bodies


def test_resume_after_raising_the_limit() -> None:
    # The oversize prefix stays buffered: a caller whose limit grew with the frames it just
    # decoded (hello, welcome) raises max_frame and resumes with feed(b"").
    decoder = FrameDecoder(max_frame=4)
    data = prefixed(b"1234") + prefixed(b"12345678") + prefixed(b"abc")
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(data)
    assert info.value.frames == [b"1234"]
    decoder.max_frame = 8
    assert decoder.feed(b"") == [b"12345678", b"abc"]
    assert decoder.buffered == 0


def test_oversize_prefix_checked_before_its_body_byte_by_byte() -> None:
    decoder = FrameDecoder(max_frame=1000)
    data = prefixed(b"a" * 10) + (1001).to_bytes(4, "big")
    chunks = list(bytewise(data))
    got: list[bytes] = []
    for chunk in chunks[:-1]:
        got += decoder.feed(chunk)
    assert got == [b"a" * 10]
    with pytest.raises(FrameTooLarge):
        decoder.feed(chunks[-1])  # the last byte of the prefix, before any body byte


def test_limit_can_change_between_calls() -> None:
    decoder = FrameDecoder(max_frame=4)
    assert decoder.feed(prefixed(b"1234")) == [b"1234"]
    decoder.max_frame = 8  # e.g. after hello
    assert decoder.feed(prefixed(b"12345678")) == [b"12345678"]
    decoder.max_frame = 2
    with pytest.raises(FrameTooLarge):
        decoder.feed(prefixed(b"123"))


def test_big_frame_byte_by_byte() -> None:
    # 128 KiB fed one byte at a time: quick (no re-scan or re-copy of the buffer per byte), and
    # the buffer never holds more than the one frame.
    body = bytes(range(256)) * 512
    decoder = FrameDecoder()
    got = []
    for chunk in bytewise(prefixed(body)):
        got += decoder.feed(chunk)
        assert decoder.buffered <= FRAME_HEADER_BYTES + len(body)
    assert got == [body]
