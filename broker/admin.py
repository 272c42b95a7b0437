"""The broker's local admin endpoint: ``tessera-broker reload`` and ``connections`` (issue #10).

A Unix stream socket, by default ``tessera-admin.sock`` beside the configuration file (the
``admin_socket`` key), mode 0600. A client is authenticated by the kernel: the peer's uid
(``SO_PEERCRED``) must be the broker's own or root; anyone else gets an error and an
``admin_denied`` audit record. Nothing on it is a secret, but ``reload`` changes what the broker
enforces, so the file mode and the uid check both hold.

The protocol is one JSON object per line each way: a request ``{"op": "reload"}`` or
``{"op": "connections"}`` and its answer ``{"ok": true, ...}`` / ``{"ok": false, "error": ...}``.
A request is at most :data:`MAX_REQUEST_BYTES` and must arrive within
:data:`REQUEST_TIMEOUT_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

__all__ = [
    "MAX_REQUEST_BYTES",
    "REQUEST_TIMEOUT_SECONDS",
    "AdminError",
    "AdminServer",
    "request",
]

log = logging.getLogger("tessera.broker")

#: Largest request line (an op and a few fields; like the wire's pre-hello frame limit, small).
MAX_REQUEST_BYTES = 64 * 1024
#: Seconds a client has to send its request line (a hello_timeout of the admin endpoint).
REQUEST_TIMEOUT_SECONDS = 5.0
#: Seconds the command-line client waits for an answer (a reload reads files and builds contexts).
RESPONSE_TIMEOUT_SECONDS = 60.0

_SOCKET_MODE = 0o600
_PEERCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}

Op = Callable[[Mapping[str, object]], Awaitable[dict[str, object]]]


class AdminError(Exception):
    """The admin endpoint cannot be set up or reached; the message says why."""


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    option = getattr(socket, "SO_PEERCRED", None)
    if sock is None or option is None:
        return None
    try:
        _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, option, _PEERCRED.size))
    except OSError:
        return None
    return int(uid)


class AdminServer:
    """Serves ``ops`` (name -> coroutine taking the request) on a Unix socket."""

    def __init__(
        self,
        path: Path,
        ops: Mapping[str, Op],
        *,
        audit: Callable[..., None] | None = None,
    ) -> None:
        self.path = path
        self.ops = dict(ops)
        self._audit = audit
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        path = self.path
        self._clear_stale()
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(path), limit=MAX_REQUEST_BYTES
            )
            # Connecting needs write permission on the socket file: with the usual umask nobody
            # else has it even before this chmod, and the uid check below holds regardless.
            os.chmod(path, _SOCKET_MODE)
        except OSError as exc:
            raise AdminError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        log.info("admin endpoint on %s", path)

    def _clear_stale(self) -> None:
        """Remove a socket file left by a broker that died; refuse one still answering."""
        path = self.path
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise AdminError(f"cannot use {path}: {exc.strerror or exc}") from None
        if not stat.S_ISSOCK(mode):
            raise AdminError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        finally:
            probe.close()
        raise AdminError(f"{path} is in use: is another broker running with this configuration?")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer = await self._answer(reader, writer)
            writer.write(json.dumps(answer, default=str).encode() + b"\n")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> dict[str, object]:
        uid = _peer_uid(writer)
        if uid is None or uid not in (os.geteuid(), 0):
            log.warning("admin endpoint: refused a client with uid %s", uid)
            if self._audit is not None:
                self._audit("admin_denied", None, level=logging.WARNING, uid=uid)
            return {"ok": False, "error": "permission denied"}
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
                line = await reader.readline()
        except TimeoutError:
            return {"ok": False, "error": "no request within the deadline"}
        except ValueError:  # over the StreamReader limit
            return {"ok": False, "error": f"request longer than {MAX_REQUEST_BYTES} bytes"}
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "the request must be one JSON object on one line"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "the request must be a JSON object"}
        op = request.get("op")
        handler = self.ops.get(op) if isinstance(op, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown op; expected one of: {', '.join(self.ops)}"}
        return await handler(request)


def request(path: Path, op: str, *, timeout: float = RESPONSE_TIMEOUT_SECONDS) -> dict[str, object]:
    """Send one request to a broker's admin socket and return its answer (blocking)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise AdminError(f"no admin socket at {path}: is the broker running?") from None
        except ConnectionRefusedError:
            raise AdminError(f"nothing listens on {path}: is the broker running?") from None
        except OSError as exc:
            raise AdminError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(json.dumps({"op": op}).encode() + b"\n")
            data = bytearray()
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > 64 * 1024 * 1024:
                    raise AdminError("the broker's answer is too large")
        except TimeoutError:
            raise AdminError(f"no answer from {path} within {timeout:g} s") from None
        except OSError as exc:
            raise AdminError(f"lost the connection to {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise AdminError(f"{path} gave no valid answer") from None
    if not isinstance(answer, dict):
        raise AdminError(f"{path} gave no valid answer")
    return answer
