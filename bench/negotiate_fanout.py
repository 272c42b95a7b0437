"""Fan-out over ``tls`` vs ``negotiate`` (GSS-sealed) listeners, against a real broker and KDC.

Issue 4: GSS wrap is per connection, so the negotiate fan-out ceiling is lower than TLS; this
measures both on the same broker process.

* Starts a throwaway MIT KDC (``tests/kdc.py``), a PKI (``certs.pki``) and ONE real broker process
  (``python -m tessera_mq.broker.cli serve``, pinned to CPU 0 with ``taskset -c 0``) with two
  listeners:
  ``negotiate`` (Kerberos, every record sealed) and ``tls`` (mutual, client certificates).
* For each S in ``--subs``, runs ONE load process (this file with ``--load``, pinned to CPU 1)
  that, for each mode in turn, opens S subscribers (``fan.>``) and one publisher, using the SDK's
  security layers (``NegotiateClientLayer`` / ``TLSLayer``) under a lean ``asyncio.Protocol``.
  Subscribers count deliveries by length prefix only (no msgpack decode on the hot path). The
  publisher sends 256-byte ``pub`` frames (no ack), closed loop: at most ``--window`` deliveries
  ahead of the slowest subscriber, so the run must be loss-free (checked at the end).
* After ``--warmup`` seconds it measures ``--seconds`` seconds: deliveries/s, broker CPU % (from
  ``/proc/PID/stat``), load-process CPU %, broker CPU time per delivery; then drains and checks
  that every subscriber got every message.

Usage: ``.venv/bin/python bench/negotiate_fanout.py --subs 100,1000``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack

REPO = Path(__file__).resolve().parent.parent
PAYLOAD_BYTES = 256
TOPIC = "fan.x"
PATTERN = "fan.>"
HOST = "localhost"  # the SPN is tessera/localhost
BATCH = 64  # pub frames per layer.send()
SETUP_CONCURRENCY = 50
SETUP_TIMEOUT = 120.0
DRAIN_TIMEOUT = 20.0
LOAD_TIMEOUT = 600.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def frame(fields: dict[str, Any]) -> bytes:
    body = msgpack.packb(fields, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of *pid* (all threads) in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- load process ---------------------------------------------------------------------------------


class Conn(asyncio.Protocol):
    """One connection: security handshake, hello (and sub), then counting deliveries."""

    def __init__(self, layer: Any, *, subscriber: bool, wake: asyncio.Event) -> None:
        self.layer = layer
        self.subscriber = subscriber
        self.wake = wake
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.phase = "handshake"
        self.buf = b""
        self.count = 0
        self.frame_len = 0  # total length (prefix included) of a delivery frame, once seen
        self.hdr: tuple[bytes, bytes, bytes, bytes] = (b"", b"", b"", b"")
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.error: str | None = None

    # plumbing
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.layer.start()  # negotiate: gss_init_sec_context (blocking; setup only)
        except Exception as exc:
            self._fail(f"start: {exc!r}")
            return
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(f"connection lost in phase {self.phase}: {exc!r}")
        self.wake.set()

    def flush(self) -> None:
        out = self.layer.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    def send(self, plaintext: bytes) -> None:
        self.layer.send(plaintext)
        self.flush()

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(why))

    def data_received(self, data: bytes) -> None:
        layer = self.layer
        try:
            layer.receive_data(data)
        except Exception as exc:
            self._fail(f"receive_data: {exc!r}")
            if self.transport is not None:
                self.transport.abort()
            return
        if self.phase == "count":
            plain = layer.read()
            if plain:
                self._count(plain)
            if not self.wake.is_set():
                self.wake.set()
            return
        self.flush()
        if not layer.established:
            return
        if self.phase == "handshake":
            self.phase = "hello"
            self.send(frame({"op": "hello", "version": 1, "client": "bench"}))
        self.buf += layer.read()
        self._setup_frames()

    def _setup_frames(self) -> None:
        while len(self.buf) >= 4 and self.phase in ("hello", "sub"):
            n = int.from_bytes(self.buf[:4], "big")
            if len(self.buf) < 4 + n:
                return
            msg = msgpack.unpackb(self.buf[4 : 4 + n], raw=False)
            self.buf = self.buf[4 + n :]
            op = msg.get("op")
            if op == "error":
                self._fail(f"broker error in phase {self.phase}: {msg}")
                return
            if self.phase == "hello" and op == "welcome":
                if self.subscriber:
                    self.phase = "sub"
                    self.send(frame({"op": "sub", "sid": 1, "pattern": PATTERN}))
                else:
                    self.phase = "pub"
                    self.ready.set_result(None)
            elif self.phase == "sub" and op == "ok":
                self.phase = "count"
                self.ready.set_result(None)
                rest, self.buf = self.buf, b""
                if rest:
                    self._count(rest)

    def _count(self, plain: bytes) -> None:
        buf = self.buf + plain if self.buf else plain
        size = self.frame_len
        if size:
            k = len(buf) // size
            end = k * size
            h = self.hdr
            if (
                k
                and buf[0:end:size] == h[0] * k
                and buf[1:end:size] == h[1] * k
                and buf[2:end:size] == h[2] * k
                and buf[3:end:size] == h[3] * k
            ):
                self.count += k
                self.buf = buf[end:]
                return
        i = 0
        total = len(buf)
        while total - i >= 4:
            n = int.from_bytes(buf[i : i + 4], "big")
            if total - i - 4 < n:
                break
            if n >= PAYLOAD_BYTES:  # a delivery (anything else: ping, error: not counted)
                self.count += 1
                if not self.frame_len:
                    self.frame_len = n + 4
                    p = buf[i : i + 4]
                    self.hdr = (p[0:1], p[1:2], p[2:3], p[3:4])
            i += 4 + n
        self.buf = buf[i:]


def make_layer(mode: str, args: argparse.Namespace) -> Any:
    if mode == "negotiate":
        from tessera_mq.auth.credentials import Kerberos  # noqa: PLC0415 - repo on sys.path
        from tessera_mq.auth.negotiate import NegotiateClientLayer  # noqa: PLC0415 - repo on sys.path

        return NegotiateClientLayer(HOST, "tessera", credential=Kerberos(ccache=args.ccache))
    from tessera_mq.auth.tls import TLSLayer  # noqa: PLC0415 - repo on sys.path

    return TLSLayer(args.tls_ctx, server_side=False, server_hostname=HOST)


async def open_conn(mode: str, port: int, args: argparse.Namespace, **kw: Any) -> Conn:
    loop = asyncio.get_running_loop()
    layer = make_layer(mode, args)
    _, conn = await loop.create_connection(lambda: Conn(layer, **kw), "127.0.0.1", port)
    await asyncio.wait_for(conn.ready, SETUP_TIMEOUT)
    return conn


async def run_mode(mode: str, port: int, subs: int, args: argparse.Namespace) -> dict[str, Any]:
    wake = asyncio.Event()
    t_setup = time.perf_counter()
    conns: list[Conn] = []
    pub: Conn | None = None
    try:
        for start in range(0, subs, SETUP_CONCURRENCY):
            n = min(SETUP_CONCURRENCY, subs - start)
            conns += await asyncio.gather(
                *(open_conn(mode, port, args, subscriber=True, wake=wake) for _ in range(n))
            )
        pub = await open_conn(mode, port, args, subscriber=False, wake=wake)
        setup_s = time.perf_counter() - t_setup
        assert pub.transport is not None
        pub_frame = frame({"op": "pub", "topic": TOPIC, "payload": os.urandom(PAYLOAD_BYTES)})
        batch = pub_frame * BATCH
        flen = len(pub_frame)
        per_sub = max(1, args.window // subs)
        published = 0
        stop = False
        broken = False

        async def publisher() -> None:
            nonlocal published, broken
            assert pub is not None and pub.transport is not None
            while not stop:
                if any(c.lost for c in conns) or pub.lost:
                    broken = True
                    return
                slowest = min(c.count for c in conns)
                allowed = per_sub - (published - slowest)
                if allowed <= 0 or pub.transport.get_write_buffer_size() > 512 * 1024:
                    wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), 0.05)
                    continue
                n = min(allowed, BATCH)
                pub.send(batch if n == BATCH else batch[: n * flen])
                published += n
                await asyncio.sleep(0)

        task = asyncio.create_task(publisher())
        await asyncio.sleep(args.warmup)
        t0 = time.perf_counter()
        d0 = sum(c.count for c in conns)
        b0 = proc_cpu_seconds(args.broker_pid)
        l0 = time.process_time()
        await asyncio.sleep(args.seconds)
        t1 = time.perf_counter()
        d1 = sum(c.count for c in conns)
        b1 = proc_cpu_seconds(args.broker_pid)
        l1 = time.process_time()
        stop = True
        await task
        deadline = time.perf_counter() + DRAIN_TIMEOUT
        while time.perf_counter() < deadline and not all(
            c.count >= published or c.lost for c in conns
        ):
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), 0.1)
        dt = t1 - t0
        deliveries = d1 - d0
        got = [c.count for c in conns]
        return {
            "mode": mode,
            "subs": subs,
            "setup_s": round(setup_s, 3),
            "seconds": round(dt, 3),
            "deliveries": deliveries,
            "deliveries_per_s": deliveries / dt,
            "msgs_per_s": deliveries / dt / subs,
            "broker_cpu_pct": 100 * (b1 - b0) / dt,
            "load_cpu_pct": 100 * (l1 - l0) / dt,
            "broker_cpu_us_per_delivery": 1e6 * (b1 - b0) / deliveries if deliveries else None,
            "published": published,
            "expected_deliveries": published * subs,
            "lost": published * subs - sum(got),
            "subs_short": sum(1 for g in got if g != published),
            "connections_lost": sum(1 for c in conns if c.lost) + int(pub.lost),
            "errors": sorted({c.error for c in conns if c.error})[:3],
            "broken": broken,
        }
    finally:
        for c in [*conns, *([pub] if pub else [])]:
            if c.transport is not None:
                c.transport.abort()
        await asyncio.sleep(0.5)


async def load_main(args: argparse.Namespace) -> None:
    from tessera_mq.auth.tls import client_context  # noqa: PLC0415 - the repo is put on sys.path first

    args.tls_ctx = client_context(args.ca, args.cert, args.key)
    for mode in args.modes.split(","):
        port = args.tls_port if mode == "tls" else args.negotiate_port
        try:
            result = await asyncio.wait_for(run_mode(mode, port, args.subs, args), LOAD_TIMEOUT)
        except Exception as exc:
            result = {"mode": mode, "subs": args.subs, "failed": repr(exc)}
        print(json.dumps(result), flush=True)
        await asyncio.sleep(1.0)  # let the broker clean up between modes


# -- orchestrator ---------------------------------------------------------------------------------


def start_broker(cfg: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[str], dict]:
    argv = [sys.executable, "-m", "tessera_mq.broker.cli", "serve", "--config", str(cfg)]
    if shutil.which("taskset"):
        argv = ["taskset", "-c", "0", *argv]
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    stdout = proc.stdout
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    ports: dict[str, int] = {}
    other: list[str] = []
    deadline = time.monotonic() + 20
    while len(ports) < 2:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            stop_process(proc)
            raise RuntimeError(
                f"broker did not start (rc {proc.poll()}): {other} {log.read_text()[-2000:]}"
            )
        try:
            line = lines.get(timeout=min(left, 0.5))
        except queue.Empty:
            continue
        if line.startswith("listening "):
            scheme, _, rest = line.split()[1].partition("://")
            ports[scheme] = int(rest.rsplit(":", 1)[1])
        else:
            other.append(line)
    return proc, ports


def stop_process(proc: subprocess.Popen[Any] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def print_table(subs: int, rows: dict[str, dict[str, Any]]) -> None:
    tls, neg = rows.get("tls", {}), rows.get("negotiate", {})
    print(f"\n== fan-out, S = {subs} subscribers, 1 publisher, {PAYLOAD_BYTES} B payload ==")
    if "failed" in tls or "failed" in neg:
        print("FAILED:", tls.get("failed"), neg.get("failed"))
    metrics = [
        ("deliveries/s", "deliveries_per_s", "{:,.0f}"),
        ("msgs/s published", "msgs_per_s", "{:,.0f}"),
        ("broker CPU %", "broker_cpu_pct", "{:.0f}"),
        ("load CPU %", "load_cpu_pct", "{:.0f}"),
        ("broker CPU us/delivery", "broker_cpu_us_per_delivery", "{:.2f}"),
        ("setup s (S+1 conns)", "setup_s", "{:.2f}"),
        ("lost deliveries", "lost", "{}"),
        ("conns lost", "connections_lost", "{}"),
    ]
    print(f"{'metric':<26}{'tls':>14}{'negotiate':>14}{'neg/tls':>10}")
    for label, key, fmt in metrics:
        a, b = tls.get(key), neg.get(key)
        sa = fmt.format(a) if a is not None else "-"
        sb = fmt.format(b) if b is not None else "-"
        ratio = f"{b / a:.2f}" if isinstance(a, int | float) and a and b is not None else ""
        print(f"{label:<26}{sa:>14}{sb:>14}{ratio:>10}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subs", default="100", help="comma-separated S values (default 100)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--window", type=int, default=200_000, help="max deliveries in flight")
    ap.add_argument("--modes", default="tls,negotiate")
    ap.add_argument("--json", type=Path, help="also append the raw results here (JSON lines)")
    # internal: the load process
    ap.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    for name in ("ccache", "ca", "cert", "key"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS)
    for name in ("tls-port", "negotiate-port", "broker-pid"):
        ap.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    if args.load:
        args.subs = int(args.subs)
        raise_nofile()
        asyncio.run(load_main(args))
        return

    raise_nofile()  # inherited by the broker
    sys.path.insert(0, str(REPO / "tests"))
    from kdc import KDC  # noqa: PLC0415 - the repo is put on sys.path first

    from tessera_mq.certs import pki  # noqa: PLC0415 - the repo is put on sys.path first

    work = Path(tempfile.mkdtemp(prefix="negotiate-fanout-"))
    kdc = None
    broker = None
    try:
        (work / "kdc").mkdir()
        kdc = KDC.start(work / "kdc")
        svc = kdc.add_principal(f"tessera/{HOST}")
        kdc.add_principal("alice", "pw")
        keytab = kdc.export_keytab(work / "broker.keytab", [svc])
        ccache = kdc.kinit("alice", "pw", work / "alice.ccache")
        pki.init_ca(work / "pki")
        server = pki.issue(work / "pki", "server", HOST, dns=[HOST], ip=["127.0.0.1"])
        client = pki.issue(work / "pki", "client", "alice")
        ca = work / "pki" / "ca.pem"
        (work / "acl.toml").write_text(
            '[[allow]]\nprincipals = ["*"]\npublish = [">"]\nsubscribe = [">"]\n'
        )
        q = json.dumps  # JSON strings are valid TOML basic strings
        (work / "broker.toml").write_text(
            f"""
[[listeners]]
bind = "127.0.0.1:0"
security = "negotiate"
service_principal = {q(svc)}
keytab = {q(str(keytab))}

[[listeners]]
bind = "127.0.0.1:0"
security = "tls"
cert = {q(str(server.cert))}
key = {q(str(server.key))}
client_ca = {q(str(ca))}

[acl]
file = {q(str(work / "acl.toml"))}

[limits]
max_connections_per_identity = 100000

[log]
level = "warning"
"""
        )
        env = {**os.environ, **kdc.env()}
        broker, ports = start_broker(work / "broker.toml", env, work / "broker.log")
        print(f"broker pid {broker.pid} ports {ports} workdir {work}", flush=True)
        for subs in [int(s) for s in args.subs.split(",")]:
            argv = [sys.executable, str(Path(__file__).resolve()), "--load", "--subs", str(subs)]
            argv += ["--seconds", str(args.seconds), "--warmup", str(args.warmup)]
            argv += ["--window", str(args.window), "--modes", args.modes]
            argv += ["--ccache", ccache, "--ca", str(ca)]
            argv += ["--cert", str(client.cert), "--key", str(client.key)]
            argv += ["--tls-port", str(ports["tls"]), "--negotiate-port", str(ports["negotiate"])]
            argv += ["--broker-pid", str(broker.pid)]
            if shutil.which("taskset"):
                argv = ["taskset", "-c", "1", *argv]
            rows: dict[str, dict[str, Any]] = {}
            try:
                out = subprocess.run(
                    argv,
                    cwd=REPO,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=LOAD_TIMEOUT,
                    check=False,
                )
                if out.returncode != 0:
                    print(f"load process exited {out.returncode}:\n{out.stderr[-3000:]}")
                for line in out.stdout.splitlines():
                    row = json.loads(line)
                    rows[row["mode"]] = row
                    print(line, flush=True)
            except subprocess.TimeoutExpired:
                print(f"load process for S={subs} timed out")
            if broker.poll() is not None:
                print("broker died; log tail:\n" + (work / "broker.log").read_text()[-2000:])
                break
            print_table(subs, rows)
            if args.json:
                with args.json.open("a") as fh:
                    for row in rows.values():
                        fh.write(json.dumps(row) + "\n")
    finally:
        stop_process(broker)
        if kdc is not None:
            kdc.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
