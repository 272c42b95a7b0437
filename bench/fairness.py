"""Fairness: does one client's flood of tiny publishes raise everyone else's latency?

Runs the latency workload of ``loadgen.py`` (open loop, ``--rate`` messages/s to ``--subs``
subscribers) against one Tessera broker twice: unloaded, then while a separate flooder process
(same core as the generator) writes tiny publishes (``bench.flood.<n>``, no subscribers) as fast
as TCP allows. Reports both latency distributions, their ratio, the flood rate the broker
absorbed, and the CPU of broker, generator and flooder (issue #8: a whole 256 KiB read of
~8,700 publishes used to be handled before anyone else was served).

    .venv/bin/python bench/fairness.py                 # the working tree
    .venv/bin/python bench/fairness.py --rev 47d1c79   # a snapshot of another revision
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from loadgen import _cpu_s  # noqa: E402

import bench  # noqa: E402 - the sibling module, after sys.path

#: Tiny publishes per write of the flooder (~30 bytes each: one 64 KiB TCP write).
FLOOD_BATCH = 2000


def flood(port: int, certs: Path, seconds: float) -> None:
    """The flooder: one connection writing batches of tiny publishes until time is up."""
    import msgpack  # noqa: PLC0415

    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    ctx.load_cert_chain(str(certs / "bench.pem"), str(certs / "bench-key.pem"))
    ctx.set_alpn_protocols(["tessera/1"])

    def frame(d: dict[str, Any]) -> bytes:
        body = msgpack.packb(d, use_bin_type=True)
        return len(body).to_bytes(4, "big") + body

    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock = ctx.wrap_socket(raw, server_hostname="localhost")
    sock.sendall(frame({"op": "hello", "version": 1, "client": "flooder"}))
    sock.recv(65536)  # welcome
    batch = b"".join(
        frame({"op": "pub", "topic": f"bench.flood.{i % 16}", "payload": b"x"})
        for i in range(FLOOD_BATCH)
    )
    sent = 0
    t0 = time.monotonic()
    sock.settimeout(1.0)
    while time.monotonic() - t0 < seconds:
        try:
            sock.sendall(batch)
        except TimeoutError:
            continue
        sent += FLOOD_BATCH
    elapsed = time.monotonic() - t0
    print(json.dumps({"flood_sent": sent, "flood_per_s": sent / elapsed}), flush=True)
    sock.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", default=None, help="benchmark the broker of this git revision")
    p.add_argument("--subs", type=int, default=10)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--flood", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--certs", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.flood:
        flood(args.port, Path(args.certs), args.duration)
        return 0

    with tempfile.TemporaryDirectory(prefix="tessera-fair-") as tmp:
        certs = Path(tmp)
        bench.provision(certs)
        if args.rev:
            bench.SOURCE = bench.snapshot(args.rev, certs / "src")
        broker = bench.BrokerProc("tessera", certs, args.python)
        lat = [
            "--subs", str(args.subs), "--rate", str(args.rate),
            "--duration", str(args.duration), "--warmup", "1",
        ]  # fmt: skip
        try:
            unloaded = bench.run_loadgen(args.python, "latency", broker, certs, lat, 120)
            flooder = subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    bench.LOADGEN_CORE,
                    args.python,
                    __file__,
                    "--flood",
                    "--port",
                    str(broker.port),
                    "--certs",
                    str(certs),
                    "--duration",
                    str(args.duration + 8),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(1.0)
            f0 = _cpu_s(flooder.pid)
            loaded = bench.run_loadgen(args.python, "latency", broker, certs, lat, 120)
            flood_cpu = _cpu_s(flooder.pid) - f0
            out, _ = flooder.communicate(timeout=60)
            flood_res = json.loads(out.strip().splitlines()[-1])
        finally:
            broker.stop()
    result = {
        "rev": args.rev or "working tree",
        "unloaded": unloaded,
        "loaded": loaded,
        "flood": flood_res,
        "flood_cpu_s": flood_cpu,
    }
    print(json.dumps(result))
    for name, r in (("unloaded", unloaded), ("with flood", loaded)):
        print(
            f"{name:>11}: p50 {r.get('p50_ms', float('nan')):.3f} ms  "
            f"p99 {r.get('p99_ms', float('nan')):.3f} ms  lost {r.get('lost')}  "
            f"broker cpu {r.get('broker_cpu', float('nan')):.2f}  "
            f"gen cpu {r.get('gen_cpu', float('nan')):.2f}",
            file=sys.stderr,
        )
    if unloaded.get("ok") and loaded.get("ok"):
        print(
            f"      ratio: p50 x{loaded['p50_ms'] / unloaded['p50_ms']:.1f}  "
            f"p99 x{loaded['p99_ms'] / unloaded['p99_ms']:.1f}  "
            f"(flood {flood_res['flood_per_s']:,.0f} publishes/s, flooder cpu {flood_cpu:.1f} s)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
