"""Many idle mutually authenticated connections on one machine (issue #14).

Measures, for ``--conns`` subscriber connections held at once by a ``--workers N`` broker (the
deployment of docs/scaling.md: N ``serve`` processes sharing the port with ``SO_REUSEPORT``,
topics shared through a local ``redis-server``):

* **establishment**: time (and rate) until every connection is authenticated (mutual TLS 1.3
  with a client certificate, or ``negotiate``: a real Kerberos AP-REQ per connection against a
  throwaway MIT KDC), greeted (``hello``/``welcome``) and subscribed (``sub``/``ok``);
* **memory**: the broker's RSS, summed over the workers, minus the idle workers' RSS, per
  connection;
* **CPU at rest**: broker CPU over ``--rest`` seconds of idle connections (heartbeats only: the
  broker pings each connection after ``heartbeat_interval`` of silence and it answers), in % of
  one core per worker and in total;
* **fan-out**: one publication to every subscriber (time from the publish until each subscriber
  has it: p50, p99, max = the time until every subscriber got it), then a burst of ``--burst``
  publications (deliveries/s from the first publish to the last delivery).

Next to every figure: the CPU of the generator processes, of Redis, and of everything else on
the machine ("foreign"), all from ``/proc``. The client side is spread over several generator
processes (each below ``--per-generator`` sockets) and over loopback source addresses
(``--sources``, bound before connect) so that neither the per-process descriptor limit nor the
ephemeral ports of one source address are in the way. The benchmark raises the soft
``RLIMIT_NOFILE`` of its own processes (the broker and generators it starts) to the hard limit,
never anything else.

Example (the figures in docs/performance.md, "100,000 connections")::

    .venv/bin/python bench/scale.py --conns 100000 --workers 6
    .venv/bin/python bench/scale.py --mode negotiate --conns 10000 --workers 2

Exit codes: 0 the run completed and every connection got every publication; 1 a step failed
(connections refused, a broker process died, a fan-out incomplete); 2 usage. Progress goes to
stderr, the result to stdout (a table, or one JSON object with ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import queue
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (HERE, REPO, REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import loadgen  # noqa: E402 - bench/loadgen.py: the epoll TLS client

TOPIC = loadgen.TOPIC
PAYLOAD_BYTES = loadgen.PAYLOAD_BYTES
HOST = "localhost"  # the SPN is tessera/localhost, the certificate is for localhost
CLK_TCK = os.sysconf("SC_CLK_TCK")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: Seconds the whole establishment may take before the run is declared failed.
ESTABLISH_TIMEOUT_S = 900.0
#: Seconds a fan-out may take until every subscriber has every publication.
FANOUT_TIMEOUT_S = 60.0
_TS = struct.Struct("<q")
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def raise_nofile() -> int:
    """The soft descriptor limit of this process (and so of its children) to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ---------------------------------------------------------------------------------------------
# /proc


def cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


class CPUMeter:
    """CPU of named process groups and of the rest of the machine over one interval."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.t0 = time.perf_counter()
        self.c0 = {g: [cpu_s(p) for p in pids] for g, pids in groups.items()}
        self.m0 = loadgen.machine_busy_s()

    def done(self, span: float | None = None) -> dict[str, Any]:
        """CPU per group in cores (1.0 = one core busy) over the interval, or, with ``span``,
        the CPU seconds of the interval divided by ``span`` (the part of it that was busy: a
        fan-out); ``foreign`` is always over the whole interval."""
        wall = time.perf_counter() - self.t0
        div = span or wall
        out: dict[str, Any] = {"wall_s": round(wall, 3)}
        total = 0.0
        for g, pids in self.groups.items():
            secs = [cpu_s(p) - c for p, c in zip(pids, self.c0[g], strict=True)]
            out[f"{g}_cpu"] = round(sum(secs) / div, 4)
            if g == "worker":
                out["worker_cpu_each"] = [round(x / div, 4) for x in secs]
            total += sum(secs)
        busy = loadgen.machine_busy_s() - self.m0
        out["foreign_cpu"] = round(max(0.0, busy - total) / wall, 4)
        return out


# ---------------------------------------------------------------------------------------------
# generator processes (``--gen``): one epoll loop each, commands on stdin, JSON lines on stdout


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class TesseraProbe(loadgen.TesseraProto):
    """loadgen's protocol, plus: a delivery of an unexpected shape still yields a latency sample
    and teaches the connection the shape, so the fast path applies to the next ones."""

    def control(self, conn: Any, frame: bytes) -> None:
        d = msgpack.unpackb(frame[4:], raw=False)
        if d.get("op") == "msg":
            conn.count += 1
            conn.gen.received += 1
            payload = d.get("payload", b"")
            if conn.lat and len(payload) >= 8:
                conn.gen.samples.append(time.monotonic_ns() - _TS.unpack_from(payload)[0])
            if isinstance(conn, loadgen.Conn) and len(payload) == PAYLOAD_BYTES:
                off = frame.find(payload)
                conn.L = len(frame)
                conn.delivery_hdr = frame[:off]
                conn.span_hdr = off
                conn.chk = tuple((i, frame[i]) for i in (0, 1, 2, 3, len(frame) - 1))
            return
        if d.get("op") == "ping":
            conn.gen.pings = getattr(conn.gen, "pings", 0) + 1
        super().control(conn, frame)


class NegConn:
    """One ``negotiate`` connection: the SDK's ``NegotiateClientLayer`` over a raw socket."""

    __slots__ = (
        "acks",
        "buf",
        "count",
        "fd",
        "gen",
        "lat",
        "layer",
        "sock",
        "state",
        "subscriber",
        "wbuf",
    )

    def __init__(self, gen: NegGen, sock: socket.socket, subscriber: bool) -> None:
        from tessera_mq.auth.credentials import Kerberos  # noqa: PLC0415 - only in negotiate generators
        from tessera_mq.auth.negotiate import NegotiateClientLayer  # noqa: PLC0415

        self.gen = gen
        self.sock = sock
        self.fd = sock.fileno()
        self.subscriber = subscriber
        self.layer = NegotiateClientLayer(HOST, "tessera", credential=Kerberos(ccache=gen.ccache))
        self.state = "connecting"
        self.buf = b""
        self.wbuf = b""
        self.acks = 0
        self.count = 0
        self.lat = False

    def flush(self) -> None:
        data = self.layer.data_to_send()
        if data:
            self.wbuf += data
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
        self.layer.send(data)
        self.flush()

    def on_event(self, ev: int) -> None:
        if self.state == "connecting":
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.gen.fail(self, f"connect: {os.strerror(err)}")
                return
            self.gen.ep.modify(self.fd, _IN)
            self.state = "handshake"
            try:
                self.layer.start()  # gss_init_sec_context: the AP-REQ (ticket from the ccache)
            except Exception as exc:
                self.gen.fail(self, f"start: {exc!r}")
                return
            self.flush()
            return
        if ev & _OUT:
            self.flush()
            if not self.wbuf and self.state != "closed":
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
            gen.fail(self, f"closed by the broker in state {self.state}")
            return
        try:
            self.layer.receive_data(bytes(gen.rmv[:n]))
        except Exception as exc:
            gen.fail(self, f"negotiate: {exc!r}")
            return
        if self.state == "handshake":
            self.flush()
            if not self.layer.established:
                return
            self.state = "control"
            self.layer.send(gen.proto.greeting(0, TOPIC if self.subscriber else None, 1))
        plain = self.layer.read()
        if plain:
            self.frames(plain)
        self.flush()

    def frames(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            end = pos + 4 + int.from_bytes(buf[pos : pos + 4], "big")
            if end > n:
                break
            d = msgpack.unpackb(buf[pos + 4 : end], raw=False)
            pos = end
            op = d.get("op")
            if op == "msg":
                self.count += 1
                self.gen.received += 1
                p = d.get("payload", b"")
                if self.lat and len(p) >= 8:
                    self.gen.samples.append(time.monotonic_ns() - _TS.unpack_from(p)[0])
            elif op in ("welcome", "ok"):
                self.acks += 1
            elif op == "ping":
                self.gen.pings += 1
                self.layer.send(loadgen.TesseraProto._frame({"op": "pong"}))
            elif op in ("error", "close"):
                self.gen.fail(self, f"tessera {op}: code={d.get('code')}")
                return
        self.buf = buf[pos:]
        if self.state == "control" and self.acks >= (2 if self.subscriber else 1):
            self.state = "data"
            self.gen.on_ready(self)

    def close(self) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        with contextlib.suppress(OSError, ValueError):
            self.gen.ep.unregister(self.fd)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class NegGen:
    """The same surface as ``loadgen.Gen`` (open, poll, ready, pending, failures, samples) for
    ``negotiate`` connections."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.proto = TesseraProbe()
        self.ccache = args.ccache
        self.addr = ("127.0.0.1", args.port)
        self.ep = select.epoll()
        self.conns: dict[int, NegConn] = {}
        self.rbuf = bytearray(loadgen.RECV_BYTES)
        self.rmv = memoryview(self.rbuf)
        self.ready = 0
        self.pending = 0
        self.received = 0
        self.failures: list[str] = []
        self.samples: list[int] = []
        self.pings = 0
        self.sources = loadgen._source_addrs(args.sources or "")
        self._next = 0

    def open(self, subscriber: bool) -> NegConn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.sources:
            sock.bind((self.sources[self._next % len(self.sources)], 0))
            self._next += 1
        conn = NegConn(self, sock, subscriber)
        err = sock.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            raise loadgen.BenchError(f"connect: {os.strerror(err)}")
        self.conns[conn.fd] = conn
        self.ep.register(conn.fd, _OUT)
        self.pending += 1
        return conn

    def on_ready(self, conn: NegConn) -> None:
        self.ready += 1
        self.pending -= 1

    def fail(self, conn: NegConn, why: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(why)
        if conn.state == "data":
            self.ready -= 1
        else:
            self.pending -= 1
        self.conns.pop(conn.fd, None)
        conn.close()

    def close_all(self) -> None:
        for c in list(self.conns.values()):
            c.close()
        self.conns.clear()


def gen_main(args: argparse.Namespace) -> int:
    """A generator process: open ``--conns`` subscribers (and a publisher with ``--publisher``),
    report progress, then obey the orchestrator's commands until ``quit``."""
    raise_nofile()
    gen: Any
    if args.mode == "mtls":
        ns = argparse.Namespace(
            proto="tessera",
            certs=args.certs,
            port=args.port,
            tolerate_failures=True,
            source_addrs=args.sources,
        )
        gen = loadgen.Gen(ns)
        gen.proto = TesseraProbe()
    else:
        gen = NegGen(args)
    ep = gen.ep
    ep.register(0, _IN)
    emit(ev="hello", pid=os.getpid())
    inbuf = b""
    commands: list[str] = []

    def pump(timeout: float) -> None:
        nonlocal inbuf
        conns = gen.conns
        for fd, ev in ep.poll(timeout):
            if fd == 0:
                chunk = os.read(0, 65536)
                if not chunk:
                    commands.append("quit")
                    continue
                inbuf += chunk
                *lines, inbuf = inbuf.split(b"\n")
                commands.extend(x.decode() for x in lines if x.strip())
                continue
            c = conns.get(fd)
            if c is not None:
                c.on_event(ev)

    def wait_command() -> str:
        while not commands:
            pump(0.05)
        return commands.pop(0)

    if wait_command() != "go":
        return EXIT_FAILED
    # establishment: at most --concurrency connections in their handshakes at once
    subs: list[Any] = []
    t0 = time.monotonic()
    last = t0
    while len(subs) < args.conns or gen.pending > 0:
        while len(subs) < args.conns and gen.pending < args.concurrency:
            try:
                subs.append(gen.open(True))
            except (loadgen.BenchError, OSError) as exc:
                gen.failures.append(f"open: {exc}")
                break
        pump(0.02)
        now = time.monotonic()
        if now - last >= 1.0:
            last = now
            emit(ev="progress", ready=gen.ready, failed=len(gen.failures))
        if len(gen.failures) > args.max_failures or now - t0 > ESTABLISH_TIMEOUT_S:
            break
        if "quit" in commands:
            break
    establish_s = time.monotonic() - t0
    pub = None
    if args.publisher and len(gen.failures) <= args.max_failures:
        pub = gen.open(False)
        deadline = time.monotonic() + 30
        while gen.pending > 0 and time.monotonic() < deadline:
            pump(0.02)
    live = [c for c in subs if c.state in ("data", loadgen._DATA)]
    emit(
        ev="established",
        ready=len(live),
        failed=len(gen.failures),
        failures=gen.failures[:5],
        establish_s=round(establish_s, 3),
        publisher=pub is not None and pub.state in ("data", loadgen._DATA),
    )
    expect = 0
    base = 0
    armed = False
    cpu_arm = 0.0
    while True:
        while not commands:
            pump(0.01 if armed else 0.2)
            if armed and gen.received - base >= expect * len(live):
                armed = False
                emit(
                    ev="got",
                    complete=True,
                    done_ns=time.monotonic_ns(),
                    cpu_s=loadgen._self_cpu() - cpu_arm,
                    received=gen.received - base,
                    samples_us=[s // 1000 for s in gen.samples],
                    failed=len(gen.failures),
                )
        cmd, *rest = commands.pop(0).split()
        if cmd == "quit":
            break
        if cmd == "arm":  # the next `expect` publications are measured
            expect = int(rest[0])
            live = [c for c in live if c.state in ("data", loadgen._DATA)]
            for c in live:
                c.lat = True
            gen.samples.clear()
            base = gen.received
            armed = True
            cpu_arm = loadgen._self_cpu()
            emit(ev="armed", subscribers=len(live))
        elif cmd == "pub" and pub is not None:
            k = int(rest[0])
            filler = b"x" * (PAYLOAD_BYTES - 8)
            t = time.monotonic_ns()
            pub.send_plain(
                b"".join(gen.proto.publish(TOPIC, _TS.pack(t) + filler) for _ in range(k))
            )
            emit(ev="published", t_ns=t, n=k)
        elif cmd == "stats":
            emit(ev="stats", pings=getattr(gen, "pings", 0), live=len(live))
        elif cmd == "report":  # the orchestrator's timeout: what arrived so far
            armed = False
            emit(
                ev="got",
                complete=gen.received - base >= expect * len(live),
                done_ns=time.monotonic_ns(),
                cpu_s=loadgen._self_cpu() - cpu_arm,
                received=gen.received - base,
                samples_us=[s // 1000 for s in gen.samples],
                failed=len(gen.failures),
            )
    gen.close_all()
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# orchestrator


class Generator:
    """A generator process and a thread reading its JSON lines."""

    def __init__(self, index: int, argv: list[str], env: dict[str, str]) -> None:
        self.index = index
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.last: dict[str, Any] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.put(json.loads(line))
        self.lines.put({"ev": "exit", "rc": self.proc.wait()})

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()

    def expect(self, ev: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"generator {self.index}: no {ev!r} within {timeout:.0f} s")
            try:
                msg = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if msg.get("ev") == "progress":
                self.last = msg
                continue
            if msg.get("ev") == "exit":
                raise RuntimeError(f"generator {self.index} exited with {msg.get('rc')}")
            if msg.get("ev") == ev:
                return msg
            # any other event out of order is a bug of this script
            raise RuntimeError(f"generator {self.index}: expected {ev!r}, got {msg}")

    def drain_progress(self) -> dict[str, Any] | None:
        """The newest progress line, or the ``established`` line if it came (left in place)."""
        while True:
            try:
                msg = self.lines.get_nowait()
            except queue.Empty:
                return None
            if msg.get("ev") == "progress":
                self.last = msg
            else:
                return msg

    def stop(self) -> None:
        self.send("quit")
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def pct(sorted_values: list[int], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))] / 1000


class Run:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.redis: Any = None
        self.kdc: Any = None
        self.broker: subprocess.Popen[str] | None = None
        self.gens: list[Generator] = []
        self.workers: list[int] = []
        self.env = dict(os.environ)
        self.result: dict[str, Any] = {}

    # -- setup
    def start_services(self) -> None:
        from redisproc import RedisProcess  # noqa: PLC0415 - tests/redisproc.py

        a = self.args
        self.redis = RedisProcess(self.work / "redis").start()
        log(f"redis-server pid {self.redis._process.pid} at {self.redis.url} (no persistence)")
        acl = '[[allow]]\nprincipals = ["*"]\npublish = ["bench.>"]\nsubscribe = ["bench.>"]\n'
        (self.work / "acl.toml").write_text(acl)
        q = json.dumps
        if a.mode == "mtls":
            import bench as suite  # noqa: PLC0415 - bench/bench.py: the bench PKI

            certs = self.work / "certs"
            certs.mkdir()
            suite.provision(certs)
            self.certs = certs
            listener = (
                'security = "tls"\n'
                f"cert = {q(str(certs / 'server.pem'))}\n"
                f"key = {q(str(certs / 'server-key.pem'))}\n"
                f"client_ca = {q(str(certs / 'ca.pem'))}\n"
            )
        else:
            from kdc import KDC  # noqa: PLC0415 - tests/kdc.py: a real MIT KDC

            (self.work / "kdc").mkdir()
            self.kdc = KDC.start(self.work / "kdc")
            svc = self.kdc.add_principal(f"tessera/{HOST}")
            self.kdc.add_principal("alice", "Scale-alice-5Rt!")
            keytab = self.kdc.export_keytab(self.work / "broker.keytab", [svc])
            self.ccache = self.kdc.kinit("alice", "Scale-alice-5Rt!", self.work / "alice.ccache")
            self.env.update(self.kdc.env())
            # KRB5RCACHEDIR is the KDC's directory: the workers' shared MIT file2 replay cache
            # (broker/workers.py) is this run's own, not the machine's
            listener = (
                f'security = "negotiate"\nservice_principal = {q(svc)}\nkeytab = {q(str(keytab))}\n'
            )
            log(f"MIT KDC up, service {svc}, client alice (ticket in {self.ccache})")
        (self.work / "broker.toml").write_text(
            f"""[[listeners]]
bind = "127.0.0.1:0"
{listener}
[acl]
file = {q(str(self.work / "acl.toml"))}

[cluster]
redis = {q(self.redis.url)}

[limits]
max_connections = 1000000
max_connections_per_identity = 1000000

[log]
level = "warning"
"""
        )

    def start_broker(self) -> None:
        a = self.args
        argv = [
            a.python,
            "-m",
            "tessera_mq.broker.cli",
            "serve",
            "--config",
            str(self.work / "broker.toml"),
        ]
        argv += ["--workers", str(a.workers)]
        self.broker_log = (self.work / "broker.log").open("w")
        self.broker = subprocess.Popen(
            argv,
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=self.broker_log,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self.broker.stdout is not None
        line = self.broker.stdout.readline()
        if not line.startswith("listening "):
            raise RuntimeError(f"broker did not start: {line!r} {self.broker_tail()}")
        self.port = int(line.split()[1].rsplit(":", 1)[1])
        out = self.broker.stdout
        self.broker_lines: list[str] = []
        threading.Thread(
            target=lambda: [self.broker_lines.append(x) for x in out], daemon=True
        ).start()
        deadline = time.monotonic() + 10
        while len(children(self.broker.pid)) < a.workers and time.monotonic() < deadline:
            time.sleep(0.1)
        # with --workers 1 there is no supervisor: the serve process is the worker
        self.workers = children(self.broker.pid) if a.workers > 1 else [self.broker.pid]
        log(
            f"broker: supervisor pid {self.broker.pid}, {len(self.workers)} workers "
            f"(pids {self.workers}) on 127.0.0.1:{self.port}"
        )

    def broker_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.work / "broker.log").read_text(errors="replace")[-3000:]
        return ""

    def check_broker(self) -> None:
        assert self.broker is not None
        if self.broker.poll() is not None:
            raise RuntimeError(f"broker exited with {self.broker.returncode}: {self.broker_tail()}")
        now = children(self.broker.pid) if self.args.workers > 1 else [self.broker.pid]
        if sorted(now) != sorted(self.workers):
            raise RuntimeError(
                f"a worker died and was replaced ({self.workers} -> {now}): {self.broker_tail()}"
            )

    def start_generators(self) -> None:
        a = self.args
        n = a.generators
        counts = [a.conns // n + (1 if i < a.conns % n else 0) for i in range(n)]
        for i, count in enumerate(counts):
            argv = [a.python, str(Path(__file__).resolve()), "--gen", "--mode", a.mode]
            argv += ["--port", str(self.port), "--conns", str(count)]
            argv += ["--concurrency", str(a.concurrency), "--sources", a.sources]
            argv += ["--max-failures", str(a.max_failures)]
            if a.mode == "mtls":
                argv += ["--certs", str(self.certs)]
            else:
                argv += ["--ccache", self.ccache]
            if i == 0:
                argv.append("--publisher")
            self.gens.append(Generator(i, argv, self.env))
        for g in self.gens:
            g.expect("hello", 30)
        log(f"{n} generator processes: {counts} connections each, sources {a.sources}")

    def groups(self) -> dict[str, list[int]]:
        assert self.broker is not None
        out = {
            "worker": self.workers,
            "supervisor": [self.broker.pid] if self.args.workers > 1 else [],
            "generator": [g.proc.pid for g in self.gens],
            "redis": [self.redis._process.pid],
        }
        if self.kdc is not None and getattr(self.kdc, "_process", None) is not None:
            out["kdc"] = [self.kdc._process.pid]
        return out

    # -- measurements
    def baseline(self) -> None:
        """The workers' CPU with no connection at all: what they cost at rest regardless of N."""
        a = self.args
        log(f"idle workers, no connection: {a.baseline:.0f} s")
        meter = CPUMeter(self.groups())
        time.sleep(a.baseline)
        self.result["baseline"] = cpu = meter.done()
        log(f"idle workers: {100 * cpu['worker_cpu']:.2f}% of a core in total")

    def establish(self) -> None:
        a = self.args
        rss0 = [rss_kb(p) for p in self.workers]
        self.result["broker_rss_idle_kb"] = rss0
        meter = CPUMeter(self.groups())
        t0 = time.monotonic()
        for g in self.gens:
            g.send("go")
        done: dict[int, dict[str, Any]] = {}
        last_print = t0
        last_ready = 0
        while len(done) < len(self.gens):
            time.sleep(0.2)
            for g in self.gens:
                if g.index in done:
                    continue
                msg = g.drain_progress()
                if msg is None:
                    continue
                if msg.get("ev") != "established":
                    raise RuntimeError(f"generator {g.index}: {msg}")
                done[g.index] = msg
            self.check_broker()
            now = time.monotonic()
            if now - last_print >= a.progress:
                ready = sum(
                    done[g.index]["ready"] if g.index in done else g.last.get("ready", 0)
                    for g in self.gens
                )
                failed = sum(
                    done[g.index]["failed"] if g.index in done else g.last.get("failed", 0)
                    for g in self.gens
                )
                rate = (ready - last_ready) / (now - last_print)
                fds = [open_fds(p) for p in self.workers]
                log(
                    f"established {ready:,}/{a.conns:,} ({rate:,.0f}/s now, "
                    f"{ready / (now - t0):,.0f}/s overall), failed {failed}, "
                    f"worker fds {fds}, load {os.getloadavg()[0]:.1f}"
                )
                last_print, last_ready = now, ready
        wall = time.monotonic() - t0
        cpu = meter.done()
        ready = sum(m["ready"] for m in done.values())
        failed = sum(m["failed"] for m in done.values())
        failures = [f for m in done.values() for f in m.get("failures", [])][:5]
        time.sleep(a.settle)
        rss1 = [rss_kb(p) for p in self.workers]
        gen_rss = sum(rss_kb(g.proc.pid) for g in self.gens)
        fds = [open_fds(p) for p in self.workers]
        self.result["establish"] = {
            "connections": ready,
            "failed": failed,
            "failures": failures,
            "seconds": round(wall, 2),
            "per_s": round(ready / wall, 1),
            "publisher": bool(done[0].get("publisher")),
            **cpu,
        }
        self.result["memory"] = {
            "broker_rss_idle_kb_total": sum(rss0),
            "broker_rss_held_kb_total": sum(rss1),
            "broker_rss_held_kb_each": rss1,
            "kb_per_connection": round((sum(rss1) - sum(rss0)) / max(1, ready), 2),
            "worker_fds": fds,
            "generator_rss_kb_total": gen_rss,
        }
        log(
            f"all established: {ready:,} in {wall:.1f} s ({ready / wall:,.0f}/s), failed "
            f"{failed}; broker RSS {sum(rss0) / 1024:.0f} -> {sum(rss1) / 1024:.0f} MiB "
            f"({self.result['memory']['kb_per_connection']:.1f} KB/conn); worker fds {fds}"
        )
        if self.kdc is not None:  # evidence that every AP-REQ went through the replay cache
            self.result["memory"]["rcache_bytes"] = sum(
                f.stat().st_size for f in Path(self.kdc.rcache_dir).glob("*") if f.is_file()
            )
        if failed or ready != a.conns:
            raise RuntimeError(f"{a.conns - ready} connections not established: {failures}")

    def rest(self) -> None:
        a = self.args
        log(f"at rest for {a.rest:.0f} s (heartbeat_interval 30 s: each connection is pinged)")
        meter = CPUMeter(self.groups())
        end = time.monotonic() + a.rest
        while time.monotonic() < end:
            time.sleep(min(5.0, max(0.0, end - time.monotonic())))
            self.check_broker()
        cpu = meter.done()
        self.result["rest"] = cpu
        for g in self.gens:
            g.send("stats")
        cpu["pings_answered"] = sum(g.expect("stats", 30)["pings"] for g in self.gens)
        each = ", ".join(f"{100 * x:.2f}%" for x in cpu["worker_cpu_each"])
        log(
            f"at rest: broker {100 * cpu['worker_cpu']:.2f}% of a core in total ({each}), "
            f"generators {100 * cpu['generator_cpu']:.2f}%, foreign {100 * cpu['foreign_cpu']:.0f}%"
            f"; {cpu['pings_answered']:,} heartbeat pings answered since the start"
        )

    def fanout(self, k: int, name: str) -> None:
        for g in self.gens:
            g.send(f"arm {k}")
        subscribers = sum(g.expect("armed", 30)["subscribers"] for g in self.gens)
        meter = CPUMeter(self.groups())
        self.gens[0].send(f"pub {k}")
        t_pub = self.gens[0].expect("published", 30)["t_ns"]
        got: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + FANOUT_TIMEOUT_S
        while len(got) < len(self.gens):
            for g in self.gens:
                if g.index in got:
                    continue
                msg = g.drain_progress()
                if msg is not None:
                    if msg.get("ev") != "got":
                        raise RuntimeError(f"generator {g.index}: {msg}")
                    got[g.index] = msg
            if time.monotonic() > deadline:
                for g in self.gens:
                    if g.index not in got:
                        g.send("report")
                        got[g.index] = g.expect("got", 30)
            time.sleep(0.005)
        received = sum(m["received"] for m in got.values())
        last_ns = max(m["done_ns"] for m in got.values())
        span = (last_ns - t_pub) / 1e9
        # broker and Redis CPU seconds from the publish until all reports came (they are idle
        # after the last delivery), the generators' own from arm to their last delivery: all
        # divided by the time from the publish to the last delivery
        cpu = meter.done(span=span)
        cpu["generator_cpu"] = round(sum(m["cpu_s"] for m in got.values()) / span, 4)
        samples = sorted(s for m in got.values() for s in m["samples_us"])
        res = {
            "publications": k,
            "subscribers": subscribers,
            "expected": k * subscribers,
            "received": received,
            "complete": all(m["complete"] for m in got.values()),
            "p50_ms": round(pct(samples, 50), 2),
            "p99_ms": round(pct(samples, 99), 2),
            "max_ms": round(samples[-1] / 1000, 2) if samples else None,
            "last_delivery_s": round(span, 3),
            "deliveries_per_s": round(received / span) if span > 0 else None,
            **cpu,
        }
        self.result[name] = res
        log(
            f"fan-out of {k} to {subscribers:,}: {received:,}/{k * subscribers:,} delivered, "
            f"p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, max {res['max_ms']} ms, "
            f"{res['deliveries_per_s'] or 0:,} deliveries/s; broker "
            f"{100 * cpu['worker_cpu']:.0f}%, generators {100 * cpu['generator_cpu']:.0f}%, "
            f"redis {100 * cpu['redis_cpu']:.0f}%, foreign {100 * cpu['foreign_cpu']:.0f}%"
        )
        if not res["complete"] or received != k * subscribers:
            raise RuntimeError(f"fan-out incomplete: {received} of {k * subscribers}")

    def stop(self) -> None:
        for g in self.gens:
            with contextlib.suppress(Exception):
                g.stop()
        if self.broker is not None and self.broker.poll() is None:
            self.broker.send_signal(signal.SIGTERM)
            try:
                self.broker.wait(60)
            except subprocess.TimeoutExpired:
                self.broker.kill()
                self.broker.wait(10)
            self.broker_log.close()
        if self.redis is not None:
            self.redis.kill()
        if self.kdc is not None:
            self.kdc.stop()


def print_table(r: dict[str, Any]) -> None:
    def c(x: float) -> str:
        return f"{100 * x:.1f}%"

    print(f"\n== {r['conns']:,} idle {r['mode']} connections, {r['workers']} worker processes, "
          f"{r['generators']} generator processes, {r['cores']} cores ==")  # fmt: skip
    e = r.get("establish")
    if e:
        print(f"establish      {e['connections']:,} in {e['seconds']} s ({e['per_s']:,.0f}/s); "
              f"broker {c(e['worker_cpu'])}, generators {c(e['generator_cpu'])}, "
              f"redis {c(e['redis_cpu'])}, foreign {c(e['foreign_cpu'])}")  # fmt: skip
    m = r.get("memory")
    if m:
        print(f"broker RSS     {m['broker_rss_idle_kb_total'] / 1024:.0f} MiB idle -> "
              f"{m['broker_rss_held_kb_total'] / 1024:.0f} MiB held: {m['kb_per_connection']} KB "
              f"per connection; worker fds {m['worker_fds']}; generators "
              f"{m['generator_rss_kb_total'] / 1024:.0f} MiB")  # fmt: skip
    b = r.get("baseline")
    if b:
        print(f"no connection  broker {c(b['worker_cpu'])} in total over {b['wall_s']:.0f} s "
              f"(the workers' own timers and Redis keepalives)")  # fmt: skip
    s = r.get("rest")
    if s:
        each = ", ".join(c(x) for x in s["worker_cpu_each"])
        print(f"at rest {s['wall_s']:.0f} s  broker {c(s['worker_cpu'])} in total ({each}); "
              f"generators {c(s['generator_cpu'])}, foreign {c(s['foreign_cpu'])}; "
              f"{s['pings_answered']:,} pings answered")  # fmt: skip
    for key, label in (("fanout_one", "fan-out 1"), ("fanout_burst", "fan-out burst")):
        f = r.get(key)
        if f:
            print(f"{label:<14} {f['publications']} x {f['subscribers']:,}: {f['received']:,} "
                  f"delivered; p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms, max {f['max_ms']} ms; "
                  f"{f['deliveries_per_s'] or 0:,}/s; broker {c(f['worker_cpu'])}, generators "
                  f"{c(f['generator_cpu'])}, redis {c(f['redis_cpu'])}, foreign "
                  f"{c(f['foreign_cpu'])}")  # fmt: skip
    if r.get("error"):
        print(f"FAILED: {r['error']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Exit codes: 0 complete, 1 a step failed, 2 usage.",
    )
    p.add_argument("--mode", choices=("mtls", "negotiate"), default="mtls")
    p.add_argument(
        "--conns", type=int, help="subscriber connections (100000 mtls, 10000 negotiate)"
    )
    p.add_argument("--workers", type=int, help="broker processes (default: one per 17,000 conns)")
    p.add_argument("--generators", type=int, help="client processes (default: one per 17,000)")
    p.add_argument("--sources", default="127.0.0.2-127.0.0.9", help="client source addresses")
    p.add_argument("--concurrency", type=int, default=48, help="handshakes in flight per generator")
    p.add_argument("--rest", type=float, default=60.0, help="seconds of CPU at rest")
    p.add_argument("--baseline", type=float, default=10.0, help="seconds of idle-worker CPU")
    p.add_argument("--settle", type=float, default=3.0, help="seconds held before reading RSS")
    p.add_argument("--burst", type=int, default=10, help="publications in the fan-out burst")
    p.add_argument("--progress", type=float, default=5.0, help="seconds between progress lines")
    p.add_argument("--max-failures", type=int, default=0, help="connection failures tolerated")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--python", default=sys.executable, help=argparse.SUPPRESS)
    # internal: a generator process
    p.add_argument("--gen", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--publisher", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--certs", help=argparse.SUPPRESS)
    p.add_argument("--ccache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.gen:
        return gen_main(args)
    if args.conns is None:
        args.conns = 100_000 if args.mode == "mtls" else 10_000
    hard = raise_nofile()
    per_process = min(17_000, hard - 2_000)
    if args.workers is None:
        args.workers = max(1, math.ceil(args.conns / per_process))
    if args.generators is None:
        args.generators = max(1, math.ceil(args.conns / per_process))
    if args.conns < 1 or args.workers < 1 or args.generators < 1:
        p.error("--conns, --workers and --generators must be positive")
    if args.conns / args.workers > hard * 0.92:
        p.error(f"{args.conns / args.workers:.0f} connections per worker will not fit the hard "
                f"descriptor limit of {hard}: raise --workers")  # fmt: skip
    if args.conns / args.generators > hard - 1_000:
        p.error(f"raise --generators: the hard descriptor limit is {hard} per process")
    if args.workers > 1 and shutil.which("redis-server") is None:
        p.error("redis-server is needed (apt-get install redis-server)")
    result: dict[str, Any] = {
        "mode": args.mode,
        "conns": args.conns,
        "workers": args.workers,
        "generators": args.generators,
        "cores": os.cpu_count(),
        "nofile_hard": hard,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_before": os.getloadavg(),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
    }
    work = Path(tempfile.mkdtemp(prefix="tessera-scale-"))
    run = Run(args, work)
    run.result = result
    rc = EXIT_OK
    t0 = time.monotonic()
    try:
        run.start_services()
        run.start_broker()
        run.start_generators()
        if args.baseline > 0:
            run.baseline()
        run.establish()
        if args.rest > 0:
            run.rest()
        run.fanout(1, "fanout_warmup")  # first publication: Redis subscriptions, caches
        run.fanout(1, "fanout_one")
        if args.burst > 0:
            run.fanout(args.burst, "fanout_burst")
        run.check_broker()
    except (RuntimeError, OSError, loadgen.BenchError) as exc:
        result["error"] = str(exc)
        log(f"FAILED: {exc}")
        rc = EXIT_FAILED
    finally:
        log("stopping")
        run.stop()
        result["total_s"] = round(time.monotonic() - t0, 1)
        if rc == EXIT_OK:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work directory kept: {work}")
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return rc


if __name__ == "__main__":
    sys.exit(main())
