"""Length-prefixed framing: a 4-byte big-endian body length, then the body.

The length is compared with the limit as soon as its 4 bytes are in, before any of the body is
buffered (websockets ``Frame.parse``); the buffer only ever holds one incomplete frame, so it is
bounded by the limit plus one read.
"""

from __future__ import annotations

import struct

from tessera_mq.client.protocol.errors import ErrorCode, RemoteProtocolError
from tessera_mq.client.protocol.limits import FRAME_HEADER_BYTES, MAX_FRAME_BYTES

__all__ = ["FrameDecoder", "FrameTooLarge"]

_unpack_length = struct.Struct(">I").unpack_from


class FrameTooLarge(RemoteProtocolError):
    """The peer announced a frame longer than the limit in force.

    ``length`` is the announced body length; ``frames`` holds the bodies completed before the
    oversize prefix in the same :meth:`FrameDecoder.feed` call, so that the result does not
    depend on how the stream was cut into reads.
    """

    code = ErrorCode.FRAME_TOO_LARGE

    def __init__(self, length: int, limit: int, frames: list[bytes]) -> None:
        super().__init__(f"frame of {length} bytes exceeds the limit of {limit} bytes")
        self.length = length
        self.frames = frames


class FrameDecoder:
    """Turns a byte stream into frame bodies. Feed it any chunking of the stream."""

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        #: Largest body accepted; may be changed between calls (e.g. after ``hello``).
        self.max_frame = max_frame

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)

    def needed(self) -> int:
        """Bytes still missing from the frame being buffered (0: nothing is buffered); while
        its length prefix is incomplete, the bytes missing from the prefix."""
        buf = self._buf
        have = len(buf)
        if have == 0:
            return 0
        if have < FRAME_HEADER_BYTES:
            return FRAME_HEADER_BYTES - have
        return FRAME_HEADER_BYTES + int(_unpack_length(buf, 0)[0]) - have

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add ``data`` and return the bodies of all frames now complete, in order.

        Raises :class:`FrameTooLarge` as soon as a length prefix above ``max_frame`` is seen,
        before any of that body is buffered. The frames completed before it in the same call are
        in the exception's ``frames``; the bytes from the prefix on stay buffered, so a caller
        that raises ``max_frame`` meanwhile (a limit that changes with the frames just decoded)
        resumes with ``feed(b"")``.
        """
        buf = self._buf
        if not buf and type(data) is bytes:
            return self._feed_bytes(data)
        buffered = bool(buf)
        if buffered:
            buf += data
            view = memoryview(buf)
        else:
            view = memoryview(data)
        frames: list[bytes] = []
        pos = 0
        end = len(view)
        limit = self.max_frame
        too_large = None
        try:
            while end - pos >= FRAME_HEADER_BYTES:
                n = int.from_bytes(view[pos : pos + FRAME_HEADER_BYTES], "big")
                if n > limit:
                    too_large = FrameTooLarge(n, limit, frames)
                    break
                start = pos + FRAME_HEADER_BYTES
                if end - start < n:
                    break
                frames.append(bytes(view[start : start + n]))
                pos = start + n
            if not buffered and pos < end:
                buf += view[pos:]  # keep only the incomplete tail
        finally:
            view.release()
        if buffered:
            del buf[:pos]
        if too_large is not None:
            raise too_large
        return frames

    def _feed_bytes(self, data: bytes) -> list[bytes]:
        """:meth:`feed` with nothing buffered and ``bytes`` in (the common case: a read that
        holds whole frames): the bodies are sliced straight out of ``data``, no view, no copy
        of the stream."""
        frames: list[bytes] = []
        pos = 0
        end = len(data)
        limit = self.max_frame
        unpack = _unpack_length
        while end - pos >= FRAME_HEADER_BYTES:
            (n,) = unpack(data, pos)
            if n > limit:
                self._buf += data[pos:]
                raise FrameTooLarge(n, limit, frames)
            start = pos + FRAME_HEADER_BYTES
            stop = start + n
            if stop > end:
                break
            frames.append(data[start:stop])
            pos = stop
        if pos < end:
            self._buf += data[pos:]  # keep only the incomplete tail
        return frames
