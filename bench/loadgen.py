"""The benchmark's load generator: many TLS clients in one process, one epoll loop, no asyncio.

It speaks just enough of three protocols to publish and count deliveries:

* ``tessera``: 4-byte big-endian length + msgpack map (hello / sub / pub; counts ``msg`` frames);
* ``mqtt``: MQTT 3.1.1 (CONNECT, SUBSCRIBE, PUBLISH QoS 0);
* ``nats``: the NATS text protocol (INFO in clear, then TLS; CONNECT / SUB / PUB / MSG / PING).

Every connection is a non-blocking socket driving an ``ssl.SSLObject`` over two ``MemoryBIO``s,
so one ``recv`` of up to 256 KiB feeds many TLS records. Deliveries are not decoded: a delivery
frame of a fixed topic and payload size has a fixed length ``L`` and a fixed header, so the hot
path counts ``len(buffer) // L`` frames and checks frame boundaries with C-speed strided slices
(``buf[i::L].count(byte)``); anything that does not line up (a ping, an error) falls back to a
frame-by-frame parser. Latency mode reads the 8-byte send timestamp at the start of each payload.

Workloads (each prints one JSON object on stdout):

* ``fanout``: S subscribers on one topic, one publisher kept at most ``window`` deliveries ahead of
  what the subscribers have received (closed loop, so nothing is dropped by design); reports
  deliveries/s over the measured interval and checks that every subscriber got every message.
* ``latency``: S subscribers, the publisher sends at a fixed rate (open loop; each payload carries
  its *scheduled* send time, so a stall is not hidden by coordinated omission).
* ``idle``: establish N subscriber connections (TLS + protocol handshake + subscribe), time it,
  hold them, and read the broker's RSS from /proc.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import resource
import select
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, ClassVar

import msgpack

PAYLOAD_BYTES = 256
TOPIC = "bench.fanout"
RECV_BYTES = 256 * 1024
TLS_RECORD_BYTES = 16384
_TS = struct.Struct("<q")

# epoll flags
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------------------------
# protocols


class Proto:
    """What differs between the brokers: the bytes of each operation and how to split a stream."""

    name = ""
    alpn: list[str] | None = None
    plain_info_first = False  # NATS sends INFO in clear before the TLS handshake

    def greeting(self, cid: int, sub: str | None, sid: int) -> bytes:
        raise NotImplementedError

    def ready_acks(self, subscriber: bool) -> int:
        """How many control replies mean 'connected (and subscribed)'."""
        raise NotImplementedError

    def publish(self, topic: str, payload: bytes) -> bytes:
        raise NotImplementedError

    def delivery(self, topic: str, sid: int, payload: bytes) -> bytes:
        raise NotImplementedError

    def frame_end(self, buf: bytes, pos: int) -> int:
        """End of the frame starting at ``pos``, or -1 if it is not complete yet."""
        raise NotImplementedError

    def control(self, conn: Conn, frame: bytes) -> None:
        """A non-delivery frame: count acks, answer pings, fail on errors."""
        raise NotImplementedError


class TesseraProto(Proto):
    name = "tessera"
    alpn: ClassVar[list[str]] = ["tessera/1"]

    @staticmethod
    def _frame(d: dict[str, Any]) -> bytes:
        body = msgpack.packb(d, use_bin_type=True)
        return len(body).to_bytes(4, "big") + body

    def greeting(self, cid: int, sub: str | None, sid: int) -> bytes:
        out = self._frame({"op": "hello", "version": 1, "client": f"bench-{cid}"})
        if sub is not None:
            out += self._frame({"op": "sub", "sid": sid, "pattern": sub})
        return out

    def ready_acks(self, subscriber: bool) -> int:
        return 2 if subscriber else 1  # welcome (+ ok)

    def publish(self, topic: str, payload: bytes) -> bytes:
        return self._frame({"op": "pub", "topic": topic, "payload": payload})

    def delivery(self, topic: str, sid: int, payload: bytes) -> bytes:
        # The broker's delivery frame, as client_sdk/protocol/codec.encode_message_frame builds it.
        return self._frame({"op": "msg", "topic": topic, "payload": payload})

    def frame_end(self, buf: bytes, pos: int) -> int:
        if len(buf) - pos < 4:
            return -1
        end = pos + 4 + int.from_bytes(buf[pos : pos + 4], "big")
        return end if end <= len(buf) else -1

    def control(self, conn: Conn, frame: bytes) -> None:
        d = msgpack.unpackb(frame[4:], raw=False)
        op = d.get("op")
        if op in ("welcome", "ok"):
            conn.acks += 1
        elif op == "ping":
            conn.send_plain(self._frame({"op": "pong"}))
        elif op in ("error", "close"):
            raise BenchError(
                f"tessera {op}: code={d.get('code')} {d.get('message') or d.get('reason')}"
            )
        elif op == "msg":
            conn.count += 1  # a delivery of another size: count it, but it is unexpected
            conn.odd += 1


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _mqtt_str(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


class MQTTProto(Proto):
    name = "mqtt"

    def greeting(self, cid: int, sub: str | None, sid: int) -> bytes:
        # CONNECT: protocol "MQTT" level 4, clean session, keepalive 0 (no client pings needed).
        var = _mqtt_str("MQTT") + bytes([4, 0x02]) + (0).to_bytes(2, "big")
        body = var + _mqtt_str(f"bench-{os.getpid()}-{cid}")
        out = bytes([0x10]) + _varint(len(body)) + body
        if sub is not None:
            sb = (sid & 0xFFFF or 1).to_bytes(2, "big") + _mqtt_str(sub) + b"\x00"
            out += bytes([0x82]) + _varint(len(sb)) + sb
        return out

    def ready_acks(self, subscriber: bool) -> int:
        return 2 if subscriber else 1  # CONNACK (+ SUBACK)

    def publish(self, topic: str, payload: bytes) -> bytes:
        body = _mqtt_str(topic) + payload
        return bytes([0x30]) + _varint(len(body)) + body

    def delivery(self, topic: str, sid: int, payload: bytes) -> bytes:
        return self.publish(topic, payload)

    def frame_end(self, buf: bytes, pos: int) -> int:
        n = len(buf)
        i = pos + 1
        mult = 1
        length = 0
        while True:
            if i >= n:
                return -1
            b = buf[i]
            length += (b & 0x7F) * mult
            mult <<= 7
            i += 1
            if not b & 0x80:
                break
        end = i + length
        return end if end <= n else -1

    def control(self, conn: Conn, frame: bytes) -> None:
        kind = frame[0] >> 4
        if kind == 2:  # CONNACK
            if frame[-1] != 0:
                raise BenchError(f"mqtt CONNACK refused rc={frame[-1]}")
            conn.acks += 1
        elif kind == 9:  # SUBACK
            if frame[-1] == 0x80:
                raise BenchError("mqtt SUBACK failure")
            conn.acks += 1
        elif kind == 13:  # PINGRESP
            pass
        elif kind == 3:
            conn.count += 1
            conn.odd += 1
        else:
            raise BenchError(f"mqtt unexpected packet type {kind}")


class NATSProto(Proto):
    name = "nats"
    plain_info_first = True

    def greeting(self, cid: int, sub: str | None, sid: int) -> bytes:
        opts = {
            "verbose": False,
            "pedantic": False,
            "tls_required": True,
            "name": f"bench-{cid}",
            "lang": "python-bench",
            "version": "0",
            "protocol": 1,
        }
        out = b"CONNECT " + json.dumps(opts, separators=(",", ":")).encode() + b"\r\n"
        if sub is not None:
            out += f"SUB {sub} {sid}\r\n".encode()
        return out + b"PING\r\n"

    def ready_acks(self, subscriber: bool) -> int:
        return 1  # PONG to our PING: CONNECT (and SUB) were processed

    def publish(self, topic: str, payload: bytes) -> bytes:
        return f"PUB {topic} {len(payload)}\r\n".encode() + payload + b"\r\n"

    def delivery(self, topic: str, sid: int, payload: bytes) -> bytes:
        return f"MSG {topic} {sid} {len(payload)}\r\n".encode() + payload + b"\r\n"

    def frame_end(self, buf: bytes, pos: int) -> int:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return -1
        if buf.startswith(b"MSG ", pos):
            size = int(buf[pos:eol].rsplit(b" ", 1)[1])
            end = eol + 2 + size + 2
            return end if end <= len(buf) else -1
        return eol + 2

    def control(self, conn: Conn, frame: bytes) -> None:
        if frame.startswith(b"PONG"):
            conn.acks += 1
        elif frame.startswith(b"PING"):
            conn.send_plain(b"PONG\r\n")
        elif frame.startswith((b"+OK", b"INFO")):
            pass
        elif frame.startswith(b"-ERR"):
            raise BenchError(f"nats {frame.strip().decode(errors='replace')}")
        elif frame.startswith(b"MSG "):
            conn.count += 1
            conn.odd += 1
        else:
            raise BenchError(f"nats unexpected {frame[:40]!r}")


PROTOS: dict[str, Callable[[], Proto]] = {
    "tessera": TesseraProto,
    "mqtt": MQTTProto,
    "nats": NATSProto,
}


# --------------------------------------------------------------------------------------------
# connections


_CONNECTING, _INFO, _TLS, _CONTROL, _DATA, _CLOSED = range(6)


class Conn:
    __slots__ = (
        "L",
        "acks",
        "carry",
        "chk",
        "count",
        "delivery_hdr",
        "fd",
        "gen",
        "inc",
        "lat",
        "need_acks",
        "obj",
        "odd",
        "out",
        "plain",
        "sid",
        "sock",
        "span_hdr",
        "state",
        "subscriber",
        "wbuf",
    )

    def __init__(self, gen: Gen, sock: socket.socket, sid: int, subscriber: bool) -> None:
        self.gen = gen
        self.sock = sock
        self.fd = sock.fileno()
        self.sid = sid
        self.subscriber = subscriber
        self.state = _CONNECTING
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = gen.ctx.wrap_bio(self.inc, self.out, server_hostname=gen.server_name)
        self.acks = 0
        self.need_acks = gen.proto.ready_acks(subscriber)
        self.count = 0
        self.odd = 0
        self.carry = b""
        self.plain = b""  # cleartext before TLS (NATS INFO)
        self.wbuf = b""
        self.lat = False
        frame = gen.proto.delivery(TOPIC, sid, gen.payload_template)
        self.L = len(frame)
        self.delivery_hdr = frame[: gen.payload_offset(frame)]
        # positions checked at stride L in the fast path: the first 4 bytes and the last byte
        L = self.L
        self.chk = tuple((i, frame[i]) for i in (0, 1, 2, 3, L - 1))
        self.span_hdr = len(self.delivery_hdr)

    # -- writing
    def flush(self) -> None:
        out = self.out
        if out.pending:
            self.wbuf += out.read()
        if not self.wbuf:
            return
        try:
            n = self.sock.send(self.wbuf)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.gen.fail(self, f"send: {exc}")
            return
        self.wbuf = self.wbuf[n:]
        if self.wbuf:
            self.gen.ep.modify(self.fd, _IN | _OUT)

    def send_plain(self, data: bytes) -> None:
        self.obj.write(data)
        self.flush()

    # -- events
    def on_event(self, ev: int) -> None:
        if self.state == _CONNECTING:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.gen.fail(self, f"connect: {os.strerror(err)}")
                return
            self.gen.ep.modify(self.fd, _IN)
            if self.gen.proto.plain_info_first:
                self.state = _INFO
            else:
                self.state = _TLS
                self._handshake()
            return
        if ev & _OUT:
            self.flush()
            if not self.wbuf:
                self.gen.ep.modify(self.fd, _IN)
        if ev & (_IN | select.EPOLLHUP | select.EPOLLERR):
            self.on_readable()

    def on_readable(self) -> None:
        gen = self.gen
        try:
            n = self.sock.recv_into(gen.rbuf)
        except BlockingIOError:
            return
        except OSError as exc:
            gen.fail(self, f"recv: {exc}")
            return
        if n == 0:
            gen.fail(self, "closed by the broker")
            return
        if self.state == _INFO:
            self.plain += gen.rmv[:n]
            eol = self.plain.find(b"\r\n")
            if eol < 0:
                return
            if not self.plain.startswith(b"INFO "):
                gen.fail(self, f"expected INFO, got {self.plain[:40]!r}")
                return
            rest = self.plain[eol + 2 :]
            self.plain = b""
            self.state = _TLS
            if rest:
                self.inc.write(rest)
            self._handshake()
            return
        self.inc.write(gen.rmv[:n])
        if self.state == _TLS:
            self._handshake()
            if self.state == _TLS:
                return
        self._read_plain()

    def _handshake(self) -> None:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            self.flush()
            return
        except ssl.SSLError as exc:
            self.gen.fail(self, f"TLS handshake: {exc}")
            return
        self.state = _CONTROL
        gen = self.gen
        if gen.tls_info is None:
            gen.tls_info = {"version": self.obj.version(), "cipher": self.obj.cipher()[0]}
        self.obj.write(gen.proto.greeting(self.sid, TOPIC if self.subscriber else None, self.sid))
        self.flush()
        self._read_plain()

    def _read_plain(self) -> None:
        obj = self.obj
        parts = []
        while True:
            try:
                d = obj.read(TLS_RECORD_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.gen.fail(self, "TLS close_notify from the broker")
                return
            except ssl.SSLError as exc:
                self.gen.fail(self, f"TLS: {exc}")
                return
            if not d:
                break
            parts.append(d)
        if not parts:
            return
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if self.state == _DATA:
            self._data(data)
        else:
            self._slow(data)

    def _data(self, data: bytes) -> None:
        """Hot path: count whole delivery frames, check their boundaries at C speed."""
        buf = self.carry + data if self.carry else data
        L = self.L
        k = len(buf) // L
        if k:
            span = k * L
            for i, b in self.chk:
                if buf[i:span:L].count(b) != k:
                    break
            else:
                self.count += k
                self.gen.received += k
                if self.lat:
                    now = time.monotonic_ns()
                    off = self.span_hdr
                    unpack = _TS.unpack_from
                    self.gen.samples.extend(
                        [now - unpack(buf, j + off)[0] for j in range(0, span, L)]
                    )
                self.carry = buf[span:]
                return
        self._slow(buf, carried=True)

    def _slow(self, data: bytes, carried: bool = False) -> None:
        """Frame-by-frame: control frames during setup, or anything that broke the fast path."""
        buf = data if carried else (self.carry + data if self.carry else data)
        proto = self.gen.proto
        pos = 0
        n = len(buf)
        L = self.L
        hdr = self.delivery_hdr
        lat = self.lat
        while pos < n:
            end = proto.frame_end(buf, pos)
            if end < 0:
                break
            if end - pos == L and buf.startswith(hdr, pos):
                self.count += 1
                self.gen.received += 1
                if lat:
                    ts = _TS.unpack_from(buf, pos + self.span_hdr)[0]
                    self.gen.samples.append(time.monotonic_ns() - ts)
            else:
                try:
                    proto.control(self, buf[pos:end])
                except BenchError as exc:
                    self.gen.fail(self, str(exc))
                    return
            pos = end
        self.carry = buf[pos:]
        if self.state == _CONTROL and self.acks >= self.need_acks:
            self.state = _DATA
            self.gen.on_ready(self)

    def close(self) -> None:
        if self.state == _CLOSED:
            return
        self.state = _CLOSED
        with contextlib.suppress(OSError, ValueError):
            self.gen.ep.unregister(self.fd)
        with contextlib.suppress(OSError):
            # Abortive close (RST): no TIME_WAIT on this side, so thousands of connections per
            # run do not exhaust the ephemeral ports of 127.0.0.1.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# --------------------------------------------------------------------------------------------
# the generator


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    """utime + stime of a process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine_busy_s() -> float:
    """CPU seconds spent busy by the whole machine (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Wall time and CPU (this process, the broker, everything else) over an interval."""

    def __init__(self, broker_pid: int) -> None:
        self.pid = broker_pid
        self.t0 = time.perf_counter()
        self.c0 = _self_cpu()
        self.b0 = _cpu_s(broker_pid) if broker_pid else 0.0
        self.m0 = machine_busy_s()

    def done(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        gen = (_self_cpu() - self.c0) / wall
        out = {"wall_s": wall, "gen_cpu": gen}
        broker = 0.0
        if self.pid:
            broker = out["broker_cpu"] = (_cpu_s(self.pid) - self.b0) / wall
        # CPU used by anything else on the machine (another job would skew every number)
        out["foreign_cpu"] = max(0.0, (machine_busy_s() - self.m0) / wall - gen - broker)
        return out


def _source_addrs(spec: str) -> list[str]:
    """``127.0.0.2-127.0.0.9`` or a comma list -> the addresses (loopback only)."""
    out: list[str] = []
    for part in (p for p in spec.split(",") if p):
        if "-" in part:
            lo, hi = part.split("-")
            base = lo.rsplit(".", 1)[0]
            out += [
                f"{base}.{i}"
                for i in range(int(lo.rsplit(".", 1)[1]), int(hi.rsplit(".", 1)[1]) + 1)
            ]
        else:
            out.append(part)
    for a in out:
        if not a.startswith("127."):
            raise SystemExit(f"--source-addrs: {a} is not a loopback address")
    return out


def raise_fd_limit(need: int) -> None:
    """The benchmark's own descriptor limit (never the project's): enough for ``need``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need + 1024
    if soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Gen:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.proto = PROTOS[args.proto]()
        ctx = ssl.create_default_context(cafile=os.path.join(args.certs, "ca.pem"))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(
            os.path.join(args.certs, "bench.pem"), os.path.join(args.certs, "bench-key.pem")
        )
        if self.proto.alpn:
            ctx.set_alpn_protocols(self.proto.alpn)
        self.ctx = ctx
        self.server_name = "localhost"
        self.addr = ("127.0.0.1", args.port)
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.rbuf = bytearray(RECV_BYTES)
        self.rmv = memoryview(self.rbuf)
        self.payload_template = b"\0" * 8 + b"x" * (PAYLOAD_BYTES - 8)
        self.ready = 0
        self.received = 0  # deliveries counted on all connections
        self.pending = 0  # connections started and not yet ready
        self.failures: list[str] = []
        self.samples: list[int] = []
        self.tls_info: dict[str, str] | None = None
        self.next_sid = 1
        #: Source addresses to spread client sockets over (``--source-addrs``): one address
        #: has ~28,000 ephemeral ports towards one server port.
        self.sources = _source_addrs(getattr(args, "source_addrs", "") or "")
        self._next_source = 0

    def payload_offset(self, frame: bytes) -> int:
        off = frame.rfind(self.payload_template)
        assert off > 0
        return off

    # -- connection management
    def open(self, subscriber: bool) -> Conn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.sources:
            sock.bind((self.sources[self._next_source % len(self.sources)], 0))
            self._next_source += 1
        sid = self.next_sid if subscriber else 0
        self.next_sid += 1
        conn = Conn(self, sock, sid, subscriber)
        err = sock.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            raise BenchError(f"connect: {os.strerror(err)}")
        self.conns[conn.fd] = conn
        self.ep.register(conn.fd, _OUT)
        self.pending += 1
        return conn

    def on_ready(self, conn: Conn) -> None:
        self.ready += 1
        self.pending -= 1

    def fail(self, conn: Conn, why: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(why)
        if conn.state in (_CONNECTING, _INFO, _TLS, _CONTROL):
            self.pending -= 1
        else:
            self.ready -= 1
        self.conns.pop(conn.fd, None)
        conn.close()

    def poll(self, timeout: float) -> None:
        conns = self.conns
        for fd, ev in self.ep.poll(timeout):
            conn = conns.get(fd)
            if conn is not None:
                conn.on_event(ev)

    def connect_many(
        self, n: int, *, subscriber: bool, concurrency: int, timeout: float
    ) -> list[Conn]:
        """Open ``n`` connections, at most ``concurrency`` in their handshakes at once."""
        out: list[Conn] = []
        deadline = time.monotonic() + timeout
        while True:
            while len(out) < n and self.pending < concurrency:
                out.append(self.open(subscriber))
            if len(out) >= n and self.pending <= 0:
                break
            if time.monotonic() > deadline:
                raise BenchError(
                    f"timeout: {self.ready} of {n} connections ready after {timeout:.0f} s; "
                    f"failures: {self.failures[:3]}"
                )
            if len(self.failures) > 0 and not self.args.tolerate_failures:
                raise BenchError(f"connection failed: {self.failures[0]}")
            self.poll(0.05)
        live = [c for c in out if c.state == _DATA]
        if len(live) != n:
            raise BenchError(f"only {len(live)} of {n} connections ready: {self.failures[:3]}")
        return live

    def close_all(self) -> None:
        for conn in list(self.conns.values()):
            conn.close()
        self.conns.clear()

    def run_for(self, seconds: float, until: Callable[[], bool] | None = None) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if until is not None and until():
                return
            self.poll(0.01)


# --------------------------------------------------------------------------------------------
# workloads


def wl_fanout(gen: Gen, args: argparse.Namespace) -> dict[str, Any]:
    S = args.subs
    subs = gen.connect_many(S, subscriber=True, concurrency=args.concurrency, timeout=60)
    pub = gen.connect_many(1, subscriber=False, concurrency=1, timeout=10)[0]
    payload = b"\0" * 8 + b"x" * (PAYLOAD_BYTES - 8)
    frame = gen.proto.publish(TOPIC, payload)
    # Keep at most `window` deliveries in flight (published * S - received), in batches.
    per_sub = max(64, args.window // S)
    window = per_sub * S
    batch_msgs = max(1, min(64, per_sub // 4))
    batch = frame * batch_msgs
    published = 0
    received = 0

    def total() -> int:
        return gen.received

    ep_poll = gen.ep.poll
    conns = gen.conns
    obj = pub.obj

    stalls = {"window_full": 0, "pub_socket_full": 0, "idle_polls": 0}

    def pump(seconds: float) -> None:
        nonlocal published, received
        deadline = time.monotonic() + seconds
        i = 0
        while True:
            i += 1
            if not i & 63 and time.monotonic() >= deadline:
                return
            if gen.failures:
                raise BenchError(f"during fan-out: {gen.failures[0]}")
            received = gen.received
            if (published + batch_msgs) * S - received <= window and len(pub.wbuf) < 1 << 20:
                obj.write(batch)
                published += batch_msgs
                pub.flush()
                timeout = 0.0
            else:
                timeout = 0.001
                if len(pub.wbuf) >= 1 << 20:
                    stalls["pub_socket_full"] += 1
                else:
                    stalls["window_full"] += 1
            events = ep_poll(timeout)
            if not events:
                stalls["idle_polls"] += 1
            for fd, ev in events:
                c = conns.get(fd)
                if c is not None:
                    c.on_event(ev)

    pump(args.warmup)
    r0 = total()
    m = Meter(args.broker_pid)
    pump(args.duration)
    r1 = total()
    res = m.done()
    rate = (r1 - r0) / res["wall_s"]
    # drain: every subscriber must get every message (zero loss)
    expected = published
    gen.run_for(30, until=lambda: all(c.count >= expected for c in subs) or bool(gen.failures))
    got = [c.count for c in subs]
    lost = sum(max(0, expected - g) for g in got)
    extra = sum(max(0, g - expected) for g in got)
    return {
        "workload": "fanout",
        "subs": S,
        "deliveries_per_s": rate,
        "published": published,
        "expected_deliveries": expected * S,
        "received_deliveries": sum(got),
        "lost": lost,
        "duplicated": extra,
        "odd_frames": sum(c.odd for c in subs),
        "window_per_sub": per_sub,
        "batch": batch_msgs,
        "disconnects": len(gen.failures),
        "stalls": stalls,
        **res,
    }


def wl_latency(gen: Gen, args: argparse.Namespace) -> dict[str, Any]:
    S = args.subs
    subs = gen.connect_many(S, subscriber=True, concurrency=args.concurrency, timeout=60)
    pub = gen.connect_many(1, subscriber=False, concurrency=1, timeout=10)[0]
    filler = b"x" * (PAYLOAD_BYTES - 8)
    interval_ns = int(1e9 / args.rate)
    proto = gen.proto

    def run(seconds: float, record: bool) -> int:
        for c in subs:
            c.lat = record
        n = int(seconds * args.rate)
        t0 = time.monotonic_ns() + 2_000_000
        sent = 0
        while sent < n:
            now = time.monotonic_ns()
            due = t0 + sent * interval_ns
            if now >= due:
                # open loop: stamp the *scheduled* time, send everything that is due
                out = []
                while sent < n and t0 + sent * interval_ns <= now:
                    out.append(proto.publish(TOPIC, _TS.pack(t0 + sent * interval_ns) + filler))
                    sent += 1
                pub.obj.write(b"".join(out))
                pub.flush()
                continue
            # epoll's timeout has 1 ms resolution (rounded up): sleep in poll until 1 ms before
            # the send is due, then spin, so sends are not late by up to a millisecond
            wait = (due - now) / 1e9 - 0.001
            gen.poll(wait if wait > 0.001 else 0.0)
            if gen.failures:
                raise BenchError(f"during latency run: {gen.failures[0]}")
        return n

    base = [c.count for c in subs]
    warm = run(args.warmup, record=False)
    gen.run_for(2, until=lambda: all(c.count - b >= warm for c, b in zip(subs, base, strict=True)))
    gen.samples.clear()
    base = [c.count for c in subs]
    m = Meter(args.broker_pid)
    sent = run(args.duration, record=True)
    gen.run_for(5, until=lambda: all(c.count - b >= sent for c, b in zip(subs, base, strict=True)))
    res = m.done()
    got = sum(c.count - b for c, b in zip(subs, base, strict=True))
    samples = sorted(gen.samples)

    def pct(p: float) -> float:
        if not samples:
            return float("nan")
        return samples[min(len(samples) - 1, int(p / 100 * len(samples)))] / 1e6

    return {
        "workload": "latency",
        "subs": S,
        "rate": args.rate,
        "sent": sent,
        "samples": len(samples),
        "lost": sent * S - got,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "p999_ms": pct(99.9),
        "max_ms": samples[-1] / 1e6 if samples else float("nan"),
        "disconnects": len(gen.failures),
        **res,
    }


def wl_idle(gen: Gen, args: argparse.Namespace) -> dict[str, Any]:
    N = args.conns
    pid = args.broker_pid
    # one connection first, so one-time allocations (contexts, pools) are not charged to N
    first = gen.connect_many(1, subscriber=True, concurrency=1, timeout=10)
    time.sleep(0.5)
    rss0 = _rss_kb(pid)
    m = Meter(pid)
    gen.connect_many(N, subscriber=True, concurrency=args.concurrency, timeout=max(300.0, N / 100))
    res = m.done()
    gen.run_for(args.settle)
    rss1 = _rss_kb(pid)
    rest: dict[str, float] = {}
    if args.rest > 0:  # CPU at rest: heartbeats and timers only
        mr = Meter(pid)
        gen.run_for(args.rest)
        rest = mr.done()
    del first
    return {
        "rest_s": args.rest,
        "rest_broker_cpu": rest.get("broker_cpu", 0.0),
        "rest_gen_cpu": rest.get("gen_cpu", 0.0),
        "rest_foreign_cpu": rest.get("foreign_cpu", 0.0),
        "workload": "idle",
        "conns": N,
        "establish_s": res["wall_s"],
        "conns_per_s": N / res["wall_s"],
        "rss_base_kb": rss0,
        "rss_held_kb": rss1,
        "rss_per_conn_kb": (rss1 - rss0) / N,
        "gen_cpu": res["gen_cpu"],
        "broker_cpu": res.get("broker_cpu", 0.0),
        "foreign_cpu": res["foreign_cpu"],
        "concurrency": args.concurrency,
    }


WORKLOADS = {"fanout": wl_fanout, "latency": wl_latency, "idle": wl_idle}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workload", choices=sorted(WORKLOADS))
    p.add_argument("--proto", choices=sorted(PROTOS), required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--certs", required=True, help="dir with ca.pem, bench.pem, bench-key.pem")
    p.add_argument("--broker-pid", type=int, default=0)
    p.add_argument("--subs", type=int, default=100)
    p.add_argument("--conns", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=64, help="handshakes in flight at once")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--settle", type=float, default=1.0, help="idle: seconds held before RSS")
    p.add_argument("--rate", type=float, default=1000.0, help="latency: messages/s")
    p.add_argument("--window", type=int, default=200_000, help="fanout: deliveries in flight")
    p.add_argument("--tolerate-failures", action="store_true")
    p.add_argument(
        "--source-addrs",
        default="",
        help="idle: spread client sockets over these loopback addresses (127.0.0.2-127.0.0.9)",
    )
    p.add_argument("--rest", type=float, default=0.0, help="idle: seconds of CPU at rest")
    args = p.parse_args(argv)
    raise_fd_limit(args.conns + args.subs + 16)
    gen = Gen(args)
    try:
        result = WORKLOADS[args.workload](gen, args)
        result["ok"] = True
    except BenchError as exc:
        result = {"workload": args.workload, "ok": False, "error": str(exc)}
    finally:
        gen.close_all()
    result["proto"] = args.proto
    result["tls"] = gen.tls_info
    result["failures"] = gen.failures[:5]
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
