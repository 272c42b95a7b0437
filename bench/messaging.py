"""Benchmarks for status and commands (issue #9): request/reply against NATS, the retained
snapshot of 10,000 topics, and the recovery of 10,000 missed messages.

    .venv/bin/python bench/messaging.py [--requests 2000] [--topics 10000] [--json FILE]

Both brokers run as child processes on this machine over mutual TLS 1.3 with certificates from
``certs.pki``; nats-server with ``GOMAXPROCS=1`` (the Tessera broker is one process, one core).
The requester and the responder share this process's event loop for both brokers: the Tessera
side uses the SDK (``client.request`` / ``client.serve``), the NATS side a minimal hand-written
client (INFO, TLS upgrade, CONNECT, SUB/PUB with a reply inbox), so the NATS client does less work
per round trip than the SDK does: the ratio is conservative for Tessera.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tessera_mq import client as client_sdk  # noqa: E402
from tessera_mq.auth.tls import client_context  # noqa: E402
from tessera_mq.certs import pki  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


class Setup:
    def __init__(self, d: Path) -> None:
        self.d = d
        pki.init_ca(d, common_name="bench CA")
        pki.issue(d, "server", "localhost", dns=["localhost"], ip=["127.0.0.1"], file_stem="server")
        for name in ("svc", "cli"):
            pki.issue(d, "client", name)

    def creds(self, name: str) -> dict[str, Path]:
        return {
            "ca": self.d / "ca.pem",
            "cert": self.d / f"{name}.pem",
            "key": self.d / f"{name}-key.pem",
        }


def start_tessera(s: Setup, history: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    (s.d / "acl.toml").write_text(
        '[[allow]]\nprincipals = ["*"]\npublish = [">"]\nsubscribe = [">"]\n'
    )
    cfg = s.d / "tessera.toml"
    cfg.write_text(
        f"""data_dir = "store"
[[listeners]]
bind = "127.0.0.1:{port}"
cert = "server.pem"
key = "server-key.pem"
client_ca = "ca.pem"
[acl]
file = "acl.toml"
[limits]
max_pending_messages = 200000
max_pending_bytes = 67108864
[messaging]
retain_max_topics = 1000000
history = [{{pattern = "events.>", max_messages = {history}}}]
[log]
level = "warning"
"""
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tessera_mq.broker.cli", "serve", "--config", str(cfg)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("listening "):
        raise RuntimeError(f"tessera did not start: {line!r}")
    return proc, line.split()[1]


def start_nats(s: Setup) -> tuple[subprocess.Popen[bytes], int] | None:
    exe = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None
    )
    if exe is None:
        return None
    port = free_port()
    cfg = s.d / "nats.conf"
    cfg.write_text(
        f"""listen: "127.0.0.1:{port}"
tls {{
  cert_file: "{s.d / "server.pem"}"
  key_file: "{s.d / "server-key.pem"}"
  ca_file: "{s.d / "ca.pem"}"
  verify: true
}}
"""
    )
    env = {**os.environ, "GOMAXPROCS": "1"}
    proc = subprocess.Popen(
        [exe, "-c", str(cfg)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc, port
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("nats-server did not start")


# --- NATS: a minimal client ------------------------------------------------------------------


class Nats:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext) -> Nats:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await r.readline()  # INFO, in clear
        await w.start_tls(ctx, server_hostname="localhost")
        w.write(
            b'CONNECT {"verbose":false,"pedantic":false,"tls_required":true,"protocol":1}\r\n'
            b"PING\r\n"
        )
        while not (await r.readline()).startswith(b"PONG"):
            pass
        return cls(r, w)

    async def next_msg(self) -> tuple[str, str | None, bytes]:
        while True:
            line = await self.r.readline()
            if line.startswith(b"MSG "):
                parts = line.split()
                size = int(parts[-1])
                reply = parts[3].decode() if len(parts) == 5 else None
                data = await self.r.readexactly(size + 2)
                return parts[1].decode(), reply, data[:-2]
            if line.startswith(b"PING"):
                self.w.write(b"PONG\r\n")
            elif not line:
                raise ConnectionError("nats closed")


async def nats_request_reply(port: int, s: Setup, n: int) -> dict[str, float]:
    ctx_svc = client_context(s.d / "ca.pem", s.d / "svc.pem", s.d / "svc-key.pem")
    ctx_cli = client_context(s.d / "ca.pem", s.d / "cli.pem", s.d / "cli-key.pem")
    ctx_svc.set_alpn_protocols([])
    ctx_cli.set_alpn_protocols([])
    svc = await Nats.connect(port, ctx_svc)
    cli = await Nats.connect(port, ctx_cli)
    svc.w.write(b"SUB cmd.x 1\r\nPING\r\n")
    cli.w.write(b"SUB _INBOX.bench.* 2\r\nPING\r\n")
    await asyncio.sleep(0.2)

    async def responder() -> None:
        while True:
            _topic, reply, data = await svc.next_msg()
            assert reply is not None
            svc.w.write(f"PUB {reply} {len(data)}\r\n".encode() + data + b"\r\n")

    task = asyncio.create_task(responder())
    times = []
    payload = b"x" * 64
    for i in range(n):
        t0 = time.perf_counter()
        cli.w.write(f"PUB cmd.x _INBOX.bench.{i} {len(payload)}\r\n".encode() + payload + b"\r\n")
        while True:
            topic, _, _ = await cli.next_msg()
            if topic == f"_INBOX.bench.{i}":
                break
        times.append(time.perf_counter() - t0)
    task.cancel()
    for c in (svc, cli):
        c.w.close()
    return _rr(times)


def _rr(times: list[float]) -> dict[str, float]:
    total = sum(times)
    return {
        "round_trips_per_s": len(times) / total,
        "p50_ms": statistics.median(times) * 1000,
        "p99_ms": percentile(times, 99) * 1000,
    }


async def tessera_request_reply(url: str, s: Setup, n: int) -> dict[str, float]:
    async with (
        client_sdk.connect(url, **s.creds("svc")) as svc,
        client_sdk.connect(url, **s.creds("cli")) as cli,
    ):
        service = await svc.serve("cmd.x").start()

        async def responder() -> None:
            async for req in service:
                await req.respond(req.payload)

        task = asyncio.create_task(responder())
        times = []
        payload = b"x" * 64
        for _ in range(n):
            t0 = time.perf_counter()
            await cli.request("cmd.x", payload, timeout=10)
            times.append(time.perf_counter() - t0)
        task.cancel()
        return _rr(times)


async def tessera_retained(url: str, s: Setup, pid: int, topics: int) -> dict[str, float]:
    async with client_sdk.connect(url, **s.creds("svc")) as svc:
        for start in range(0, topics, 1000):
            await asyncio.gather(
                *(
                    svc.publish(f"status.d{i}", b"v" * 100, retain=True)
                    for i in range(start, min(start + 1000, topics))
                )
            )
    rss_before = rss_kb(pid)
    async with client_sdk.connect(url, **s.creds("cli")) as cli:
        t0 = time.perf_counter()
        sub = await cli.subscribe("status.>", max_pending=topics + 10)
        for _ in range(topics):
            await sub.get(timeout=30)
        elapsed = time.perf_counter() - t0
    return {
        "topics": topics,
        "snapshot_s": elapsed,
        "topics_per_s": topics / elapsed,
        "broker_rss_kb": rss_kb(pid),
        "broker_rss_growth_kb_during_snapshot": rss_kb(pid) - rss_before,
    }


async def tessera_recovery(url: str, s: Setup, missed: int) -> dict[str, float]:
    async with client_sdk.connect(url, **s.creds("cli")) as cli:
        sub = await cli.subscribe("events.>")
        epoch, start = sub.epoch, sub.last_seq
        await sub.unsubscribe()
        async with client_sdk.connect(url, **s.creds("svc")) as svc:
            for _ in range(0, missed, 1000):
                await asyncio.gather(*(svc.publish("events.e", b"m" * 100) for _j in range(1000)))
        t0 = time.perf_counter()
        again = await cli.subscribe("events.>", since=start, epoch=epoch, max_pending=missed + 10)
        for _ in range(missed):
            await again.get(timeout=30)
        elapsed = time.perf_counter() - t0
        assert again.gaps == 0
    return {"missed": missed, "recovery_s": elapsed, "messages_per_s": missed / elapsed}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        s = Setup(Path(tmp))
        results: dict[str, Any] = {
            "machine": f"{os.cpu_count()} cores, shared",
            "python": sys.version.split()[0],
        }
        tproc, url = start_tessera(s, max(args.topics, 20_000))
        try:
            results["tessera_request_reply"] = await tessera_request_reply(url, s, args.requests)
            results["retained_snapshot"] = await tessera_retained(url, s, tproc.pid, args.topics)
            results["recovery"] = await tessera_recovery(url, s, args.topics)
        finally:
            tproc.terminate()
            tproc.wait(timeout=15)
        nats = start_nats(s)
        if nats is None:
            results["nats_request_reply"] = "nats-server not installed"
        else:
            nproc, port = nats
            try:
                results["nats_request_reply"] = await nats_request_reply(port, s, args.requests)
            finally:
                nproc.terminate()
                nproc.wait(timeout=15)
            t, n = results["tessera_request_reply"], results["nats_request_reply"]
            results["ratio_tessera_over_nats"] = {
                "round_trips_per_s": t["round_trips_per_s"] / n["round_trips_per_s"],
                "p99": t["p99_ms"] / n["p99_ms"],
            }
        results["bench_process_max_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--topics", type=int, default=10_000)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    results = asyncio.run(main_async(args))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
