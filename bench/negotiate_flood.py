"""Pre-authentication flood against a real ``negotiate`` broker and a real MIT KDC (issue 13).

The attack: ~100 connections send, as fast as they can, one TOKEN record of ~64 KiB holding a
NegTokenInit whose mechTypes are krb5 followed by thousands of dummy OIDs (inside every
documented limit; it used to cost ~145 ms of broker CPU each). Meanwhile:

* a good Kerberos client connects (SDK ``client_sdk.connect``, ticket already cached) again and
  again: connect time = TCP connect to ``welcome``;
* an open session publishes to itself: publish-to-delivery latency (p50, p99).

Both are measured unloaded first, then under the flood. The flood comes from another loopback
address (``127.0.0.2``), as an attacker is another host than the good clients: the broker's
handshake pool is fair per peer address (broker/handshake_pool.py). After the flood stops, the
time until a good connect is fast again is measured too (queued steps of dead connections must
not run).

* ``python bench/negotiate_flood.py`` starts a throwaway KDC and broker, prints a JSON report.
* ``python bench/negotiate_flood.py --flood --port P --connections N --seconds S`` is the flood
  process (used by the report run and by tests/test_negotiate_flood.py); it prints one JSON line
  with what it sent.

The measuring functions (:func:`run`) are imported by tests/test_negotiate_flood.py with small
counts. Numbers in docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

HOST = "localhost"
SERVICE = "flood"  # the SPN is flood/localhost: apart from the test suite's tessera/localhost
FLOOD_SOURCE = "127.0.0.2"  # the attacker's address (any 127/8 address is loopback on Linux)
TOKEN_LIMIT_BYTES = 64 * 1024  # the default max_handshake_token_bytes
KRB5_OID = bytes.fromhex("2a864886f712010202")
SPNEGO_OID = bytes.fromhex("2b0601050502")
PASSWORD = "Flood-alice-7Yq!"
ACL = '[[allow]]\nprincipals = ["*"]\npublish = [">"]\nsubscribe = [">"]\n'


# -- the worst-case token -------------------------------------------------------------------------


def _der(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes((tag, n)) + value
    size = (n.bit_length() + 7) // 8
    return bytes((tag, 0x80 | size)) + n.to_bytes(size, "big") + value


def worst_case_token(limit: int = TOKEN_LIMIT_BYTES) -> tuple[bytes, int]:
    """A NegTokenInit: krb5, then as many 10-byte dummy OIDs as fit in *limit* bytes, then a
    small optimistic token. Returns the token and its mechanism count."""

    def build(count: int) -> bytes:
        oids = [_der(0x06, KRB5_OID)] + [
            _der(0x06, bytes((0x2B, 6, 1, 4, 1, 0x82, 0x37, 0x7F, 0x80 | i >> 7, i & 0x7F)))
            for i in range(count - 1)
        ]
        init = _der(
            0x30, _der(0xA0, _der(0x30, b"".join(oids))) + _der(0xA2, _der(0x04, b"\x60" * 64))
        )
        return _der(0x60, _der(0x06, SPNEGO_OID) + _der(0xA0, init))

    count = (limit - 200) // 12
    token = build(count)
    while len(token) > limit:
        count -= 1
        token = build(count)
    return token, count


def token_record(token: bytes) -> bytes:
    return (len(token) + 1).to_bytes(4, "big") + b"\x01" + token


# -- the flood process ----------------------------------------------------------------------------


async def flood(port: int, connections: int, seconds: float, source: str) -> dict[str, Any]:
    """*connections* tasks, each connecting, sending the worst-case record and reading until
    the broker closes, in a loop, for *seconds*."""
    record = token_record(worst_case_token()[0])
    stop = time.monotonic() + seconds
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    counts = {"connections": 0, "refused_at_once": 0, "errors": 0, "bytes_sent": 0}
    began = time.monotonic()

    async def one() -> None:
        while time.monotonic() < stop and not stopped.is_set():
            writer: asyncio.StreamWriter | None = None
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(source, 0)
                )
                writer.write(record)
                await writer.drain()
                counts["bytes_sent"] += len(record)
                counts["connections"] += 1
                reply = await asyncio.wait_for(reader.read(64), timeout=30)
                if not reply:
                    counts["refused_at_once"] += 1
            except (OSError, TimeoutError):
                counts["errors"] += 1
                await asyncio.sleep(0.01)
            finally:
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()

    print(json.dumps({"flooding": True}), flush=True)
    await asyncio.gather(*(one() for _ in range(connections)))
    counts["seconds"] = round(time.monotonic() - began, 3)
    counts["connections_per_second"] = round(counts["connections"] / counts["seconds"])
    return counts


def _flood_main(args: argparse.Namespace) -> None:
    result = asyncio.run(flood(args.port, args.connections, args.seconds, args.source))
    print(json.dumps(result), flush=True)


@contextlib.contextmanager
def flooding(
    port: int, connections: int, seconds: float, *, cpu: int | None = None
) -> Iterator[dict[str, Any]]:
    """Run the flood process for the duration of the block; the dict gets its report."""
    argv = [sys.executable, __file__, "--flood", "--port", str(port)]
    argv += ["--connections", str(connections), "--seconds", str(seconds)]
    if cpu is not None and shutil.which("taskset"):
        argv = ["taskset", "-c", str(cpu), *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    report: dict[str, Any] = {}
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        if '"flooding"' not in first:
            raise RuntimeError(f"flood process did not start: {first!r}")
        time.sleep(0.5)  # let the flood reach its steady state
        yield report
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=seconds + 60)
        lines = [line for line in out.splitlines() if line.strip()]
        if lines:
            report.update(json.loads(lines[-1]))


# -- measuring ------------------------------------------------------------------------------------


@dataclass
class Measurement:
    connect_seconds: list[float]
    latency_seconds: list[float]

    def summary(self) -> dict[str, float]:
        c = sorted(self.connect_seconds)
        lat = sorted(self.latency_seconds)
        return {
            "connect_median_ms": statistics.median(c) * 1000,
            "connect_max_ms": c[-1] * 1000,
            "latency_p50_ms": percentile(lat, 50) * 1000,
            "latency_p99_ms": percentile(lat, 99) * 1000,
        }


def percentile(sorted_values: list[float], pct: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(pct / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


async def measure(
    url: str, credential: Any, *, connects: int, messages: int, interval: float
) -> Measurement:
    """Sequential good connects, then publish-to-self latency on one open session."""
    from tessera_mq import client as client_sdk  # noqa: PLC0415

    times = []
    for _ in range(connects):
        began = time.perf_counter()
        async with client_sdk.connect(url, auth=credential, service=SERVICE, timeout=30) as c:
            times.append(time.perf_counter() - began)
            assert str(c.identity).startswith("kerberos:flood-alice@")
    latencies: list[float] = []
    async with client_sdk.connect(url, auth=credential, service=SERVICE, timeout=30) as c:
        sub = await c.subscribe("lat.>")
        for i in range(messages):
            sent = time.perf_counter()
            await c.publish("lat.x", str(i).encode())
            async for msg in sub:
                assert msg.payload == str(i).encode()
                latencies.append(time.perf_counter() - sent)
                break
            await asyncio.sleep(interval)
    return Measurement(times, latencies)


def write_broker_config(directory: Path, keytab: Path, realm: str) -> Path:
    (directory / "acl.toml").write_text(ACL, encoding="utf-8")
    config = directory / "broker.toml"
    config.write_text(
        "\n".join(
            [
                "[[listeners]]",
                'bind = "127.0.0.1:0"',
                'security = "negotiate"',
                f'service_principal = "{SERVICE}/{HOST}@{realm}"',
                f'keytab = "{keytab}"',
                "",
                "[acl]",
                f'file = "{directory / "acl.toml"}"',
                "",
                "[log]",
                'level = "info"',
                "",
            ]
        ),
        encoding="utf-8",
    )
    return config


def prepare_realm(kdc: Any, directory: Path) -> tuple[Path, Any]:
    """The broker keytab and a client credential (a ccache with a TGT)."""
    from tessera_mq.auth.negotiate import Kerberos  # noqa: PLC0415

    kdc.add_principal(f"{SERVICE}/{HOST}")
    alice = kdc.add_principal("flood-alice", PASSWORD)
    keytab = kdc.export_keytab(directory / "broker.keytab", [f"{SERVICE}/{HOST}"])
    ccache = kdc.kinit(alice, PASSWORD, directory / "alice.ccache")
    return keytab, Kerberos(ccache=ccache)


def broker_info(proc: Any) -> dict[str, Any]:
    """The broker's counters (SIGUSR1 logs them as ``stats {json}``)."""
    mark = proc.log_mark()
    proc.send_signal(signal.SIGUSR1)
    line = proc.wait_for_log(r"stats \{", since=mark, timeout=10)[-1]
    return dict(json.loads(line[line.index("stats {") + 6 :]))


def run(
    kdc: Any,
    directory: Path,
    *,
    connections: int = 100,
    flood_seconds: float = 120.0,
    connects: int = 10,
    messages: int = 200,
    interval: float = 0.005,
    pin: bool = False,
) -> dict[str, Any]:
    """Start a broker, measure unloaded and under the flood; *pin* puts the broker on CPU 0 and
    this process and the (niced) flood on CPU 1."""
    from brokerproc import BrokerProcess  # noqa: PLC0415

    keytab, credential = prepare_realm(kdc, directory)
    config = write_broker_config(directory, keytab, kdc.realm)
    proc = BrokerProcess(["serve", "--config", str(config)], workdir=directory, env=kdc.env())
    proc.start()
    affinity = os.sched_getaffinity(0)
    if pin and shutil.which("taskset") and len(os.sched_getaffinity(0)) >= 2:
        # broker (all threads) on CPU 0; this measuring process and the (niced) flood on CPU 1
        subprocess.run(
            ["taskset", "-a", "-p", "-c", "0", str(proc.pid)], check=True, capture_output=True
        )
        os.sched_setaffinity(0, {1})
    try:
        url = f"negotiate://{HOST}:{proc.port}"
        asyncio.run(measure(url, credential, connects=3, messages=20, interval=interval))  # warm
        unloaded = asyncio.run(
            measure(url, credential, connects=connects, messages=messages, interval=interval)
        )
        with flooding(proc.port, connections, flood_seconds, cpu=1 if pin else None) as report:
            loaded = asyncio.run(
                measure(url, credential, connects=connects, messages=messages, interval=interval)
            )
            during = broker_info(proc)
        began = time.perf_counter()
        asyncio.run(measure(url, credential, connects=1, messages=1, interval=0))
        recovery = time.perf_counter() - began
        result = {
            "connections": connections,
            "token_bytes": len(worst_case_token()[0]),
            "token_mechanisms": worst_case_token()[1],
            "unloaded": unloaded.summary(),
            "loaded": loaded.summary(),
            "flood": report,
            "first_connect_after_flood_ms": recovery * 1000,
            "broker": {
                k: v for k, v in during.items() if k.startswith(("handshake", "connections"))
            },
        }
        result["p99_ratio"] = result["loaded"]["latency_p99_ms"] / max(
            result["unloaded"]["latency_p99_ms"], 1e-6
        )
        result["unexpected_log_lines"] = proc.unexpected_log_lines()
        return result
    except BaseException:
        lines = [x for x in proc.log_lines() if "127.0.0.2" not in x]
        print("\n".join(lines[-30:]), file=sys.stderr)
        raise
    finally:
        os.sched_setaffinity(0, affinity)
        proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flood", action="store_true", help="run as the flood process")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--source", default=FLOOD_SOURCE)
    parser.add_argument("--connects", type=int, default=20)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--pin", action="store_true", help="broker on CPU 0, flood on CPU 1")
    args = parser.parse_args()
    if args.flood:
        _flood_main(args)
        return
    from kdc import KDC  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="tessera-flood-") as tmp:
        directory = Path(tmp)
        (directory / "kdc").mkdir()
        kdc = KDC.start(directory / "kdc")
        kdc.apply_env()
        try:
            result = run(
                kdc,
                directory,
                connections=args.connections,
                flood_seconds=args.seconds,
                connects=args.connects,
                messages=args.messages,
                pin=args.pin,
            )
        finally:
            kdc.stop()
    result["cpus"] = os.cpu_count()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
