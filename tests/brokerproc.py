"""Run a REAL broker process for integration tests, and talk to it with a hand-made raw client.

:class:`BrokerProcess` writes nothing itself: it runs
``python -m tessera_mq.broker.cli serve --config F``
(or any other ``tessera-broker`` argument list) as a child process, reads the
``listening tls://HOST:PORT`` lines from its stdout with a timeout, sends its stderr (the log) to a
file that tests can search, stops it with SIGTERM and reports the exit code. The child gets
SIGKILL if the test process dies (``setpriv --pdeathsig``), and :meth:`BrokerProcess.kill` is
always safe to call on teardown.

:func:`write_config` writes a broker configuration (TOML) for one TLS listener on
``127.0.0.1:0`` with an ACL file and ``[limits]`` overrides.

:class:`RawClient` is a blocking TLS client that builds frames by hand with msgpack, for what
the SDK would never send (bad msgpack, an oversize length prefix, a frame before hello) and for
a subscriber that never reads. Call its methods from a worker thread (``asyncio.to_thread``) when
an SDK client shares the test's event loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgpack
from timing import scaled

__all__ = [
    "REPO_ROOT",
    "BrokerError",
    "BrokerProcess",
    "RawClient",
    "write_config",
]

#: The repository under test: the broker child process imports *this* tree.
REPO_ROOT = Path(__file__).resolve().parent.parent

#: Seconds a broker may take from exec to its last ``listening`` line (imports included).
START_TIMEOUT_SECONDS = scaled(20.0)
#: Seconds a broker may take to exit after SIGTERM (its own shutdown_timeout is shorter).
STOP_TIMEOUT_SECONDS = scaled(15.0)

_LISTENING_RE = re.compile(
    r"^listening (?P<scheme>[a-z+]+)://(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d+)$"
)

#: An audit record in the main log: ``... tessera.audit: {json}`` (broker/audit.py).
_AUDIT_RE = re.compile(r"tessera\.audit: (\{.*\})$")

#: Lines that must never appear in a broker's log: an exception escaped into the event loop.
UNEXPECTED_LOG_MARKERS = (
    "Traceback (most recent call last)",
    "Exception in callback",
    "exception was never retrieved",
)


class BrokerError(Exception):
    """The broker process did not start, or did not stop, as expected."""


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(
    directory: Path,
    *,
    cert: Path,
    key: Path,
    client_ca: Path | None,
    acl: str | None = "",
    limits: Mapping[str, object] | None = None,
    identity_fields: Sequence[str] | None = None,
    bind: str = "127.0.0.1:0",
    log_level: str = "info",
    shutdown_timeout: float | None = None,
) -> Path:
    """Write ``broker.toml`` (and ``acl.toml`` unless ``acl`` is None) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "[[listeners]]",
        f"bind = {_toml_value(bind)}",
        'security = "tls"',
        f"cert = {_toml_value(cert)}",
        f"key = {_toml_value(key)}",
    ]
    if client_ca is not None:
        lines.append(f"client_ca = {_toml_value(client_ca)}")
    if identity_fields is not None:
        lines.append(f"identity_fields = {_toml_value(list(identity_fields))}")
    if shutdown_timeout is not None:
        lines.insert(0, f"shutdown_timeout = {_toml_value(shutdown_timeout)}")
    if acl is not None:
        acl_path = directory / "acl.toml"
        acl_path.write_text(acl, encoding="utf-8")
        lines += ["", "[acl]", f"file = {_toml_value(acl_path)}"]
    if limits:
        lines += ["", "[limits]"] + [f"{k} = {_toml_value(v)}" for k, v in limits.items()]
    lines += ["", "[log]", f"level = {_toml_value(log_level)}", ""]
    path = directory / "broker.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def _pdeathsig_prefix() -> list[str]:
    # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only from the main thread.
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"]


class BrokerProcess:
    """A ``tessera-broker`` child process. Use :meth:`start`, then :meth:`stop` or :meth:`kill`."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        workdir: Path,
        env: Mapping[str, str] | None = None,
        listeners: int = 1,
    ) -> None:
        self.args = list(args)
        self.workdir = workdir
        self.stderr_path = workdir / "broker.stderr"
        self.listeners_expected = listeners
        self.addresses: list[tuple[str, str, int]] = []  #: (scheme, host, port) per listener
        self.stdout_lines: list[str] = []
        self.returncode: int | None = None
        self._env = _child_env(env)
        self._process: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------

    @classmethod
    def serve(cls, config: Path, **kwargs: Any) -> BrokerProcess:
        """Start ``serve --config config`` and wait until it listens."""
        return cls(["serve", "--config", str(config)], workdir=config.parent, **kwargs).start()

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> BrokerProcess:
        argv = [*_pdeathsig_prefix(), sys.executable, "-m", "tessera_mq.broker.cli", *self.args]
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.stderr_path.open("w", encoding="utf-8") as err:
            self._process = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                encoding="utf-8",
                errors="replace",
            )
        self._reader = threading.Thread(
            target=self._read_stdout, name=f"broker-stdout-{self._process.pid}", daemon=True
        )
        self._reader.start()
        deadline = time.monotonic() + timeout
        try:
            while len(self.addresses) < self.listeners_expected:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerError(
                        f"broker printed no 'listening' line within {timeout} s\n{self.describe()}"
                    )
                try:
                    line = self._lines.get(timeout=remaining)
                except queue.Empty:
                    continue
                if line is None:
                    self._process.wait(timeout=5)
                    self.returncode = self._process.returncode
                    raise BrokerError(
                        f"broker exited with {self.returncode} before listening\n{self.describe()}"
                    )
                m = _LISTENING_RE.match(line)
                if m:
                    host = m["host"].strip("[]")
                    self.addresses.append((m["scheme"], host, int(m["port"])))
        except BaseException:
            self.kill()
            raise
        return self

    def _read_stdout(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        with self._process.stdout as out:
            for raw in out:
                line = raw.rstrip("\n")
                self.stdout_lines.append(line)
                self._lines.put(line)
        self._lines.put(None)

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def send_signal(self, sig: int) -> None:
        assert self._process is not None
        self._process.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """Wait for the process to exit; returns its exit code (kills it after ``timeout``)."""
        assert self._process is not None
        try:
            self.returncode = self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BrokerError(
                f"broker did not exit within {timeout} s\n{self.describe()}"
            ) from None
        if self._reader is not None:
            self._reader.join(timeout=5)
        return self.returncode

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        """SIGTERM, wait, return the exit code (the caller asserts it)."""
        if self.running:
            self.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL if still running; always safe."""
        proc = self._process
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if self.returncode is None:
            self.returncode = proc.returncode
        if self._reader is not None:
            self._reader.join(timeout=5)

    # --- addresses ------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.addresses[0][1]

    @property
    def port(self) -> int:
        return self.addresses[0][2]

    @property
    def url(self) -> str:
        scheme, host, port = self.addresses[0]
        return f"{scheme}://{host}:{port}"

    def wait_for_stdout(self, pattern: str, *, timeout: float = 5.0) -> str:
        """Wait for a stdout line matching ``pattern`` (a regex); return all of stdout so far."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while not any(rx.search(line) for line in list(self.stdout_lines)):
            if time.monotonic() >= deadline:
                raise AssertionError(f"no stdout line matching {pattern!r}\n{self.describe()}")
            time.sleep(0.02)
        return "\n".join(self.stdout_lines)

    # --- the log --------------------------------------------------------------------------

    def log(self) -> str:
        """Everything the broker wrote to stderr so far."""
        try:
            return self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self) -> list[str]:
        return self.log().splitlines()

    def log_mark(self) -> int:
        """A position in the log: pass it to :meth:`wait_for_log` to search only newer lines."""
        return len(self.log_lines())

    def wait_for_log(
        self,
        pattern: str | re.Pattern[str],
        *,
        since: int = 0,
        timeout: float = 5.0,
        count: int = 1,
    ) -> list[str]:
        """Wait until ``count`` log lines after line ``since`` match ``pattern`` (a regex);
        return them. Raises AssertionError with the log tail on timeout."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.log_lines()[since:] if rx.search(line)]
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                tail = "\n".join(self.log_lines()[since:][-30:])
                raise AssertionError(
                    f"no{'' if count == 1 else f' {count}'} broker log line matching "
                    f"{rx.pattern!r} within {timeout} s; log since mark:\n{tail}"
                )
            time.sleep(0.02)

    def audit_events(self, since: int = 0) -> list[dict[str, Any]]:
        """The audit records (JSON, see broker/audit.py) logged after log line ``since``."""
        events: list[dict[str, Any]] = []
        for line in self.log_lines()[since:]:
            m = _AUDIT_RE.search(line)
            if m:
                with contextlib.suppress(ValueError):
                    events.append(json.loads(m[1]))
        return events

    def wait_for_audit(
        self, event: str, *, since: int = 0, timeout: float = 5.0, **fields: object
    ) -> dict[str, Any]:
        """Wait for an audit record of ``event`` whose fields include ``fields``; return it."""
        deadline = time.monotonic() + timeout
        while True:
            for record in self.audit_events(since):
                if record.get("event") == event and all(
                    record.get(k) == v for k, v in fields.items()
                ):
                    return record
            if time.monotonic() >= deadline:
                seen = "\n".join(json.dumps(r) for r in self.audit_events(since)[-20:])
                raise AssertionError(
                    f"no audit record {event!r} with {fields} within {timeout} s; "
                    f"audit records since mark:\n{seen}"
                )
            time.sleep(0.02)

    def unexpected_log_lines(self) -> list[str]:
        """Log lines showing an exception that escaped into the broker's event loop."""
        return [
            line
            for line in self.log_lines()
            if any(marker in line for marker in UNEXPECTED_LOG_MARKERS)
        ]

    def describe(self) -> str:
        return (
            f"argv: {self.args}\nstdout:\n"
            + "\n".join(self.stdout_lines[-20:])
            + "\nstderr:\n"
            + "\n".join(self.log_lines()[-40:])
        )


# --- a raw client ---------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    """Length-prefix ``body`` (4-byte big-endian), as the wire wants."""
    return len(body).to_bytes(4, "big") + body


def pack(obj: Mapping[str, Any]) -> bytes:
    """A whole frame whose body is the msgpack of ``obj``."""
    return frame(msgpack.packb(dict(obj), use_bin_type=True))


class RawClient:
    """A blocking TLS client speaking the wire protocol by hand (msgpack maps, length prefix).

    ``recv_buffer_bytes`` shrinks the socket's receive buffer before connecting (it turns off
    the kernel's receive-window autotuning), so a client that stops reading pushes back fast.
    """

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext | None,
        *,
        server_hostname: str = "localhost",
        timeout: float = 5.0,
        recv_buffer_bytes: int | None = None,
    ) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if recv_buffer_bytes is not None:
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer_bytes)
            raw.settimeout(timeout)
            raw.connect((host, port))
            if context is not None:
                self.sock: socket.socket = context.wrap_socket(raw, server_hostname=server_hostname)
            else:
                self.sock = raw
        except BaseException:
            raw.close()
            raise
        self._buf = bytearray()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, **fields: Any) -> None:
        self.send_raw(pack(fields))

    def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self._buf += chunk
        return True

    def recv(self) -> dict[str, Any] | None:
        """The next frame as a dict, or None at end of stream."""
        if not self._fill(4):
            return None
        n = int.from_bytes(self._buf[:4], "big")
        if not self._fill(4 + n):
            return None
        body = bytes(self._buf[4 : 4 + n])
        del self._buf[: 4 + n]
        obj = msgpack.unpackb(body, raw=False)
        assert isinstance(obj, dict), obj
        return obj

    def frames(self) -> Iterator[dict[str, Any]]:
        """Every frame until end of stream (or a connection reset)."""
        while True:
            try:
                obj = self.recv()
            except (ConnectionResetError, ssl.SSLEOFError):
                return
            if obj is None:
                return
            yield obj

    def recv_until(self, op: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Read until a frame with ``op``; returns it and the frames read before it."""
        before: list[dict[str, Any]] = []
        while True:
            obj = self.recv()
            if obj is None:
                raise AssertionError(f"end of stream before {op!r}; got {before}")
            if obj.get("op") == op:
                return obj, before
            before.append(obj)

    def hello(self) -> dict[str, Any]:
        """Send hello; return the broker's welcome."""
        self.send(op="hello", version=1, client="raw-test-client/1")
        welcome = self.recv()
        assert welcome is not None and welcome.get("op") == "welcome", welcome
        return welcome

    def read_to_close(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """Read until end of stream; return the close frame (if any) and the frames before it."""
        close: dict[str, Any] | None = None
        others: list[dict[str, Any]] = []
        for obj in self.frames():
            if obj.get("op") == "close":
                close = obj
            else:
                others.append(obj)
        return close, others
