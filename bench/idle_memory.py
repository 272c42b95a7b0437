"""Broker memory per idle mutual-TLS connection, for several broker variants side by side.

For each variant and each N this starts a fresh broker process (pinned to core 0, as
``bench/bench.py`` does), opens one warm-up connection, reads the broker's RSS from
``/proc/PID/status``, then has a separate load process (pinned to core 1, ``bench/loadgen.py``'s
epoll client) open N subscriber connections (TLS 1.3 with a client certificate, hello,
subscribe). Once they are all acknowledged and have been held ``--settle`` seconds it reads the
RSS again, sends ``SIGUSR1`` so the broker logs its ``stats {...}`` line (connections, open
descriptors, RSS, and for this script also glibc's in-use/free heap bytes), and reports::

    KB/conn = (RSS(N) - RSS(warm-up)) / N

plus the establishment time of the N connections.

Variants (combine with ``+``, e.g. ``head+arena1``):

* ``base``      the work tree as it is;
* ``head``      the broker from ``git archive HEAD`` (``--rev`` picks another commit): before/after;
* ``nocert``    the listener does not ask for client certificates (what mutual TLS costs);
* ``arena1``, ``arena2``  ``MALLOC_ARENA_MAX=1`` / ``2``;
* ``thresholds`` fixed ``MALLOC_TRIM_THRESHOLD_``/``MALLOC_MMAP_THRESHOLD_`` of 64 KiB;
* ``trim``      ``malloc_trim(0)`` in the broker just before the RSS is read;
* ``p256``      ECDHE on P-256 only (the default prefers X25519);
* ``noticket``  ``OP_NO_TICKET`` on the listener (``num_tickets = 0`` is already set);
* ``nocache``   the listener's server-side session cache switched off (ctypes);
* ``untrimmed`` the work tree with the post-handshake release in ``auth/tls.py`` turned off;
* ``tracemalloc`` the broker runs under ``tracemalloc``: the Python share per connection, by
  allocation site (printed below the row; tracing makes the process larger and slower, so
  compare its KB/conn only with other ``tracemalloc`` rows);
* ``releaseall`` ``TESSERA_TLS_RELEASE=all``: also free the stored client certificates
  (experimental; the default ``bios`` only swaps the memory BIOs).

Example::

    .venv/bin/python bench/idle_memory.py --conns 5000,10000 --variants base,head,nocert

This is a measurement tool, not a test. Memory figures are robust to other load on the machine;
establishment times are not (other processes' CPU is not subtracted here).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import bench as suite  # noqa: E402 - bench/bench.py: certificates, configs, snapshots

#: Code run in the broker process before ``broker.cli.main`` (instrumentation and variants).
_PREAMBLE = r"""
import ctypes, ctypes.util, json, logging, ssl, sys
if TRACEMALLOC:
    import tracemalloc
    tracemalloc.start(1)
from tessera_mq.broker import server as _srv

_libc = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    class _MI2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    _libc.mallinfo2.restype = _MI2
except (OSError, AttributeError):
    _libc = None

_info = _srv.Broker.info
def _info_plus(self):
    if TRIM and _libc is not None:
        _libc.malloc_trim(0)
    out = _info(self)
    if _libc is not None:
        m = _libc.mallinfo2()
        out["heap_inuse_bytes"] = m.uordblks + m.hblkhd
        out["heap_free_bytes"] = m.fordblks
        out["heap_arena_bytes"] = m.arena
    if TRACEMALLOC:
        snap = tracemalloc.take_snapshot()
        out["traced"] = {
            "/".join(s.traceback[0].filename.rsplit("/", 2)[-2:]) + f":{s.traceback[0].lineno}":
                [s.size, s.count]
            for s in snap.statistics("lineno")
        }
        out["traced_bytes"] = sum(v[0] for v in out["traced"].values())
    return out
_srv.Broker.info = _info_plus

def _log_info(self):  # the bench logs at warning: emit the stats line regardless
    print("stats " + json.dumps(self.info(), sort_keys=True), file=sys.stderr, flush=True)
_srv.Broker.log_info = _log_info

_ctx = _srv.server_context
def _server_context(*a, **k):
    ctx = _ctx(*a, **k)
    if P256:
        ctx.set_ecdh_curve("prime256v1")
    if NOTICKET:
        ctx.options |= ssl.OP_NO_TICKET
    if NOCACHE:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("ssl") or "libssl.so.3")
            lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long,
                                         ctypes.c_void_p]
            p = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
            lib.SSL_CTX_ctrl(p, 44, 0, None)  # SSL_CTRL_SET_SESS_CACHE_MODE, OFF
        except OSError:
            pass
    return ctx
_srv.server_context = _server_context

if UNTRIMMED:
    import tessera_mq.auth.tls
    tessera_mq.auth.tls._native = None

from tessera_mq.broker.cli import main
sys.exit(main(sys.argv[1:]))
"""

VARIANT_ENV: dict[str, dict[str, str]] = {
    "arena1": {"MALLOC_ARENA_MAX": "1"},
    "arena2": {"MALLOC_ARENA_MAX": "2"},
    "thresholds": {"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "65536"},
    "releaseall": {"TESSERA_TLS_RELEASE": "all"},
}
FLAGS = ("trim", "p256", "noticket", "nocache", "untrimmed", "tracemalloc")
KNOWN = {"base", "head", "nocert", *VARIANT_ENV, *FLAGS}


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Broker:
    """One broker process for one variant, started fresh."""

    def __init__(self, variant: str, certs: Path, python: str, source: Path) -> None:
        parts = set(variant.split("+"))
        self.port = suite.free_port()
        cfg = suite.write_configs(certs, self.port, "tessera")
        if "nocert" in parts:
            text = cfg.read_text().replace('client_ca = "ca.pem"\n', "")
            cfg = certs / "tessera-nocert.toml"
            cfg.write_text(text)
            # clients are "anonymous" then: let the ACL admit them
            acl = (certs / "acl.toml").read_text().replace('["*"]', '["*", "anonymous"]')
            (certs / "acl.toml").write_text(acl)
        env = dict(os.environ)
        for p in parts:
            env.update(VARIANT_ENV.get(p, {}))
        flags = "".join(f"{f.upper()} = {f in parts}\n" for f in FLAGS)
        self.log_path = certs / f"broker-{variant}.log"
        self.logf = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # a snapshot's own broker, under its installed names (bench.tessera_command)
        if suite.tessera_command(python, source, env)[-1] != "tessera_mq.broker.cli":
            raise SystemExit(f"{source}: a revision from before the tessera_mq rename")
        cmd = [python, "-c", flags + _PREAMBLE, "serve", "--config", str(cfg)]
        self.proc = subprocess.Popen(
            ["taskset", "-c", suite.BROKER_CORE, *cmd],
            cwd=source,
            env=env,
            stdout=self.logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.pid = self.proc.pid
        deadline = time.monotonic() + 15
        while "listening" not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"broker {variant} did not start: {self.log()[-800:]}")
            time.sleep(0.05)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        before = self.log().count("stats {")
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.findall(r"stats (\{.*\})", self.log())
            if len(found) > before:
                return dict(json.loads(found[-1]))
            time.sleep(0.05)
        return {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.logf.close()


class Load:
    """A load process holding connections (``--hold`` mode of this script)."""

    def __init__(self, python: str, port: int, certs: Path, n: int, concurrency: int) -> None:
        cmd = [
            "taskset", "-c", suite.LOADGEN_CORE, python, str(Path(__file__).resolve()), "--hold",
            "--port", str(port), "--certs", str(certs), "--conns", str(n),
            "--concurrency", str(concurrency),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
        )

    def ready(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("{"):
            raise RuntimeError(f"load process failed: {line!r}")
        return dict(json.loads(line))

    def release(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def hold(args: argparse.Namespace) -> int:
    """The load side: open ``--conns`` subscribers, report, hold them until stdin closes."""
    import loadgen  # noqa: PLC0415 - bench/loadgen.py, only in the load process

    ns = argparse.Namespace(proto="tessera", certs=str(args.certs), port=args.port,
                            tolerate_failures=False)  # fmt: skip
    gen = loadgen.Gen(ns)
    try:
        t0 = time.monotonic()
        gen.connect_many(args.conns, subscriber=True, concurrency=args.concurrency, timeout=600)
        wall = time.monotonic() - t0
    except loadgen.BenchError as exc:
        print(json.dumps({"ok": False, "error": str(exc)}), flush=True)
        return 1
    print(json.dumps({"ok": True, "establish_s": wall, "tls": gen.tls_info}), flush=True)
    sys.stdin.read()  # hold until the orchestrator closes our stdin
    gen.close_all()
    return 0


def measure(
    variant: str, n: int, certs: Path, args: argparse.Namespace, sources: dict[str, Path]
) -> dict[str, Any]:
    source = sources["head"] if "head" in variant.split("+") else REPO
    broker = Broker(variant, certs, args.python, source)
    try:
        warm = Load(args.python, broker.port, certs, 1, 1)
        warm.ready()
        time.sleep(0.5)
        rss0 = rss_kb(broker.pid)
        s0 = broker.stats()
        load = Load(args.python, broker.port, certs, n, args.concurrency)
        res = load.ready()
        if not res.get("ok"):
            raise RuntimeError(res.get("error"))
        time.sleep(args.settle)
        rss1 = rss_kb(broker.pid)
        s1 = broker.stats()
        rss_after_stats = rss_kb(broker.pid)  # after malloc_trim for the "trim" variant
        load.release()
        warm.release()
    finally:
        broker.stop()
    out: dict[str, Any] = {
        "variant": variant,
        "conns": n,
        "kb_per_conn": (rss1 - rss0) / n,
        "establish_s": res["establish_s"],
        "rss0_kb": rss0,
        "rss_kb": rss1,
        "connections": s1.get("connections"),
        "open_fds": s1.get("open_fds"),
        "tls": res.get("tls"),
    }
    if "trim" in variant.split("+"):
        out["kb_per_conn"] = (rss_after_stats - rss0) / n
    if "heap_inuse_bytes" in s1 and "heap_inuse_bytes" in s0:
        out["heap_inuse_kb_per_conn"] = (s1["heap_inuse_bytes"] - s0["heap_inuse_bytes"]) / n / 1024
        out["heap_free_kb"] = s1["heap_free_bytes"] // 1024
    if "traced" in s1 and "traced" in s0:
        before = s0["traced"]
        per_site = {
            site: (size - before.get(site, [0, 0])[0]) / n
            for site, (size, _count) in s1["traced"].items()
        }
        out["python_bytes_per_conn"] = (s1["traced_bytes"] - s0["traced_bytes"]) / n
        out["python_sites"] = sorted(per_site.items(), key=lambda kv: -kv[1])[:40]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conns", default="5000,10000", help="comma-separated connection counts")
    p.add_argument("--variants", default="base", help="comma-separated; see the module doc")
    p.add_argument("--runs", type=int, default=1, help="repetitions (a fresh broker each)")
    p.add_argument("--concurrency", type=int, default=64, help="handshakes in flight")
    p.add_argument("--settle", type=float, default=1.0, help="seconds held before reading RSS")
    p.add_argument("--rev", default="HEAD", help="commit the 'head' variant runs")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--json", action="store_true", help="print one JSON object per result")
    p.add_argument("--hold", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hold:
        args.conns = int(args.conns)
        return hold(args)
    counts = [int(c) for c in args.conns.split(",") if c]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        unknown = set(v.split("+")) - KNOWN
        if unknown:
            p.error(f"unknown variant part(s) {sorted(unknown)}; known: {sorted(KNOWN)}")
    if not shutil.which("taskset"):
        p.error("taskset (util-linux) is needed")
    with tempfile.TemporaryDirectory(prefix="tessera-idle-") as tmp:
        certs = Path(tmp) / "certs"
        certs.mkdir()
        suite.provision(certs)
        sources: dict[str, Path] = {}
        if any("head" in v.split("+") for v in variants):
            sources["head"] = suite.snapshot(args.rev, Path(tmp) / "head")
        print(f"{'variant':<22} {'N':>6} {'KB/conn':>8} {'heap KB/conn':>12} "
              f"{'establish s':>11} {'fds':>6}", flush=True)  # fmt: skip
        for _ in range(args.runs):
            for n in counts:
                for v in variants:
                    r = measure(v, n, certs, args, sources)
                    if args.json:
                        print(json.dumps(r), flush=True)
                    heap = r.get("heap_inuse_kb_per_conn")
                    print(
                        f"{v:<22} {n:>6} {r['kb_per_conn']:>8.2f} "
                        f"{heap if heap is None else format(heap, '.2f'):>12} "
                        f"{r['establish_s']:>11.2f} {r['open_fds']!s:>6}",
                        flush=True,
                    )
                    if "python_bytes_per_conn" in r:
                        print(f"    Python (tracemalloc): {r['python_bytes_per_conn']:.0f} B/conn")
                        for site, b in r["python_sites"]:
                            print(f"      {b:8.0f} B  {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
