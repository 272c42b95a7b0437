"""Cluster benchmark: fan-out deliveries/s and p99 latency, one process vs workers vs nodes.

Scenarios, all in one run so they can be read as ratios (docs/scaling.md):

* ``single``: one broker process, no ``[cluster]`` (today's default);
* ``single+redis``: the same with the Redis backplane on (each publish also goes to Redis and
  comes back to the node, which drops its own echo): the backplane's cost on one node;
* ``workers2``: ``serve --workers 2`` on one port; subscribers spread by the kernel over both,
  the publisher on one of them: half the deliveries cross Redis;
* ``nodes2``: two broker processes on two ports, the publisher on one, every subscriber on the
  other: every publication crosses Redis once.

The load generator is ``bench/loadgen.py``'s, run in this process (its ``Gen`` with the
publisher's connection pointed at another port for ``nodes2``). Broker CPU is summed over every
broker process and reported with Redis' own CPU. Nothing is pinned: with 2 workers, Redis and
the load generator on a 2-core machine, the processes compete for cores, which is part of
what this measures. Short runs by default; the numbers of a shared machine are indicative.

    .venv/bin/python bench/cluster.py                 # S=100, 3 s per measurement
    .venv/bin/python bench/cluster.py --subs 200 --duration 5 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import loadgen  # noqa: E402

import bench as orchestrator  # noqa: E402

SCENARIOS = ("single", "single+redis", "workers2", "nodes2")


def log(msg: str) -> None:
    print(f"[cluster-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


class Redis:
    def __init__(self, d: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.port = orchestrator.free_port()
        self.proc = subprocess.Popen(
            [
                *(binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--dir", str(d), "--logfile", str(d / "redis.log")),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, self.proc, "redis-server")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


class Broker:
    """One ``tessera-broker serve`` (maybe a ``--workers`` supervisor) on its own port."""

    def __init__(self, d: Path, name: str, redis: Redis | None, workers: int = 1) -> None:
        self.port = orchestrator.free_port()
        cfg = orchestrator.write_configs(d, self.port, "tessera")
        text = cfg.read_text()
        if redis is not None:
            text += f'\n[cluster]\nredis = "{redis.url}"\nmax_queue_messages = 100000\n'
        cfg = d / f"{name}.toml"
        cfg.write_text(text)
        self.log_path = d / f"{name}.log"
        self.logf = self.log_path.open("ab")
        argv = [sys.executable, "-m", "tessera_mq.broker.cli", "serve", "--config", str(cfg)]
        if workers > 1:
            argv += ["--workers", str(workers)]
        self.proc = subprocess.Popen(
            argv, cwd=REPO, stdout=self.logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        wait_port(self.port, self.proc, name)
        self.pids = [self.proc.pid]
        if workers > 1:
            deadline = time.monotonic() + 30
            while len(self.children()) < workers and time.monotonic() < deadline:
                time.sleep(0.05)
            self.pids = self.children()
            time.sleep(1.0)  # every worker listening (the supervisor prints once all are)
        time.sleep(0.2)

    def children(self) -> list[int]:
        path = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        try:
            with open(path) as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.logf.close()


class SplitGen(loadgen.Gen):
    """loadgen's generator with the publisher on another port (another node)."""

    def __init__(self, args: argparse.Namespace, pub_port: int) -> None:
        super().__init__(args)
        self.sub_addr = self.addr
        self.pub_addr = ("127.0.0.1", pub_port)

    def open(self, subscriber: bool) -> loadgen.Conn:
        self.addr = self.sub_addr if subscriber else self.pub_addr
        return super().open(subscriber)


class PidsMeter(loadgen.Meter):
    """loadgen's Meter over the measured interval only, for every broker process and Redis:
    ``broker_cpu`` is their sum (cores), ``redis_cpu`` Redis' own."""

    brokers: ClassVar[list[int]] = []
    redis: ClassVar[int | None] = None

    def __init__(self, broker_pid: int) -> None:
        super().__init__(0)
        self.b0 = cpu(self.brokers)
        self.r0 = cpu([self.redis]) if self.redis else 0.0

    def done(self) -> dict[str, float]:
        out = super().done()
        wall = out["wall_s"]
        out["broker_cpu"] = (cpu(self.brokers) - self.b0) / wall
        redis = (cpu([self.redis]) - self.r0) / wall if self.redis else 0.0
        out["redis_cpu"] = redis
        out["foreign_cpu"] = max(0.0, out["foreign_cpu"] - out["broker_cpu"] - redis)
        return out


loadgen.Meter = PidsMeter  # type: ignore[misc]  # the workloads look it up at call time


def cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += loadgen._cpu_s(pid)
    return total


def measure(
    workload: str,
    args: argparse.Namespace,
    certs: Path,
    sub_port: int,
    pub_port: int,
    brokers: list[int],
    redis_pid: int | None,
) -> dict[str, Any]:
    ns = argparse.Namespace(
        proto="tessera",
        port=sub_port,
        certs=str(certs),
        broker_pid=0,
        subs=args.subs,
        conns=0,
        concurrency=32,
        duration=args.duration,
        warmup=args.warmup,
        settle=0.0,
        rate=args.rate,
        window=args.window,
        tolerate_failures=False,
    )
    gen = SplitGen(ns, pub_port)
    PidsMeter.brokers, PidsMeter.redis = brokers, redis_pid
    b0, r0, t0 = cpu(brokers), cpu([redis_pid] if redis_pid else []), time.perf_counter()
    try:
        res = loadgen.WORKLOADS[workload](gen, ns)
        res["ok"] = True
    except loadgen.BenchError as exc:
        res = {"workload": workload, "ok": False, "error": str(exc)}
    finally:
        gen.close_all()
    wall = time.perf_counter() - t0
    # CPU over the whole call (connect + warm-up + measure + drain), per unit of work done in it
    broker_s = cpu(brokers) - b0
    res["broker_cpu_all"] = broker_s / wall
    delivered = res.get("received_deliveries") or (res.get("sent", 0) * args.subs)
    if delivered:
        res["broker_us_per_delivery_all"] = broker_s / delivered * 1e6
    if redis_pid:
        redis_s = cpu([redis_pid]) - r0
        res["redis_cpu_all"] = redis_s / wall
        published = res.get("published") or res.get("sent")
        if published:
            res["redis_us_per_publication"] = redis_s / published * 1e6
    if res.get("ok") and workload == "fanout" and res.get("broker_cpu"):
        # over the measured interval only: deliveries per second of broker CPU
        res["broker_us_per_delivery"] = res["broker_cpu"] / res["deliveries_per_s"] * 1e6
    return res


async def _backplane_run(url: str, seconds: float, payload_bytes: int) -> dict[str, Any]:
    """Two RedisBackplanes in this process: A publishes as fast as its queue takes, B counts."""
    import asyncio  # noqa: PLC0415

    from tessera_mq.broker.backplane import Publication  # noqa: PLC0415
    from tessera_mq.broker.cluster import RedisBackplane  # noqa: PLC0415

    got = 0

    def inject(pub: Publication) -> None:
        nonlocal got
        got += 1

    a = RedisBackplane(url, max_queue_messages=20_000)
    b = RedisBackplane(url)
    await a.start(lambda pub: None)
    await b.start(inject)
    b.interest("bench.>", True)
    await asyncio.sleep(0.2)
    pub = Publication("bench.fanout", b"x" * payload_bytes, sender="x509:bench")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    c0 = loadgen._self_cpu()
    sent = 0
    while loop.time() - t0 < seconds:
        full = False
        for _ in range(256):
            if not a.publish(pub):
                full = True  # the queue is at its bound: let the writer catch up
                break
            sent += 1
        await asyncio.sleep(0.001 if full else 0)
    while got < sent and loop.time() - t0 < seconds + 10:  # noqa: ASYNC110 - bounded drain
        await asyncio.sleep(0.01)
    wall = loop.time() - t0
    cpu_s = loadgen._self_cpu() - c0
    await a.stop()
    await b.stop()
    return {
        "published": sent,
        "received": got,
        "publications_per_s": got / wall,
        "node_cpu_us_per_publication": cpu_s / max(got, 1) * 1e6,
        "refused_queue_full": a.health()["refused_queue_full"],
        "redis_messages": a.health()["redis_messages"],
    }


async def _pattern_cost(url: str, patterns: int, publishes: int, *, glob: bool = True) -> float:
    """Redis CPU (us) per PUBLISH while one client holds ``patterns`` PSUBSCRIBE globs that
    never match (``glob``), or as many plain SUBSCRIBE channels: what one PSUBSCRIBE per
    Tessera pattern would cost Redis on every publish, against first-token channels."""
    import redis.asyncio as aioredis  # noqa: PLC0415

    client = aioredis.Redis.from_url(url)
    pubsub = client.pubsub()
    try:
        if patterns:
            for start in range(0, patterns, 1000):
                names = range(start, min(patterns, start + 1000))
                if glob:
                    await pubsub.psubscribe(*[f"tessera:t{i}.*" for i in names])
                else:
                    await pubsub.subscribe(*[f"tessera:t{i}" for i in names])
        info = await client.info("server")
        pid = int(info["process_id"])
        r0 = cpu([pid])
        for _ in range(publishes // 1000):
            pipe = client.pipeline(transaction=False)
            for _ in range(1000):
                pipe.publish("tessera:bench", b"x" * 256)
            await pipe.execute()
        return (cpu([pid]) - r0) / publishes * 1e6
    finally:
        await pubsub.aclose()
        await client.aclose()


def pattern_scenario(d: Path) -> dict[str, float]:
    import asyncio  # noqa: PLC0415

    out = {}
    runs = [
        ("none", 0, 50_000, True),
        ("100 globs", 100, 50_000, True),
        ("1000 globs", 1000, 20_000, True),
        ("10000 globs", 10_000, 2_000, True),
        ("10000 channels", 10_000, 50_000, False),
    ]
    for name, n, publishes, glob in runs:
        redis = Redis(d)
        try:
            out[name] = asyncio.run(_pattern_cost(redis.url, n, publishes, glob=glob))
        finally:
            redis.stop()
    return out


def backplane_scenario(args: argparse.Namespace, d: Path) -> dict[str, Any]:
    import asyncio  # noqa: PLC0415

    redis = Redis(d)
    try:
        r0 = cpu([redis.proc.pid])
        res = asyncio.run(_backplane_run(redis.url, args.duration, loadgen.PAYLOAD_BYTES))
        res["redis_us_per_publication"] = (
            (cpu([redis.proc.pid]) - r0) / max(res["received"], 1) * 1e6
        )
        res["ok"] = res["received"] == res["published"]
        return res
    finally:
        redis.stop()


def run_scenario(name: str, args: argparse.Namespace, certs: Path, d: Path) -> dict[str, Any]:
    redis = Redis(d) if name != "single" else None
    brokers: list[Broker] = []
    try:
        if name in ("single", "single+redis"):
            brokers.append(Broker(d, name.replace("+", "_"), redis))
            sub_port = pub_port = brokers[0].port
        elif name == "workers2":
            brokers.append(Broker(d, "workers2", redis, workers=2))
            sub_port = pub_port = brokers[0].port
        else:
            brokers.append(Broker(d, "node_a", redis))
            brokers.append(Broker(d, "node_b", redis))
            pub_port, sub_port = brokers[0].port, brokers[1].port
        pids = [p for b in brokers for p in b.pids]
        rpid = redis.proc.pid if redis else None
        out: dict[str, Any] = {"scenario": name, "broker_processes": len(pids)}
        for workload in ("fanout", "latency"):
            log(f"{name}: {workload}")
            out[workload] = measure(workload, args, certs, sub_port, pub_port, pids, rpid)
        return out
    finally:
        for b in brokers:
            b.stop()
        if redis is not None:
            redis.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subs", type=int, default=100, help="subscribers (fan-out degree)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rate", type=float, default=500.0, help="latency: publications/s")
    p.add_argument("--window", type=int, default=100_000, help="fanout: deliveries in flight")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="tessera-cluster-bench-") as tmp:
        certs = Path(tmp)
        orchestrator.provision(certs)
        for name in args.scenarios.split(","):
            results.append(run_scenario(name, args, certs, certs))
        log("backplane alone: RedisBackplane to RedisBackplane")
        backplane = backplane_scenario(args, certs)
        log("Redis CPU per PUBLISH against the number of PSUBSCRIBE patterns held")
        patterns = pattern_scenario(certs)
    base = next((r for r in results if r["scenario"] == "single"), None)
    print(f"{'scenario':<14}{'deliveries/s':>14}{'ratio':>8}{'p99 ms':>9}{'broker cores':>13}"
          f"{'redis cores':>12}  lost/dup")  # fmt: skip
    for r in results:
        f, lat = r["fanout"], r["latency"]
        rate = f.get("deliveries_per_s", float("nan"))
        ratio = (
            rate / base["fanout"]["deliveries_per_s"] if base and base["fanout"].get("ok") else 1
        )
        print(
            f"{r['scenario']:<14}{rate:>14,.0f}{ratio:>8.2f}{lat.get('p99_ms', float('nan')):>9.2f}"
            f"{f.get('broker_cpu', 0):>13.2f}{f.get('redis_cpu', 0):>12.2f}"
            f"  {f.get('lost', '?')}/{f.get('duplicated', '?')}"
            + (
                ""
                if f.get("ok") and lat.get("ok")
                else f"  ERROR {f.get('error') or lat.get('error')}"
            )
        )
    print(
        f"backplane alone: {backplane['publications_per_s']:,.0f} publications/s node to node "
        f"({loadgen.PAYLOAD_BYTES}-byte payload); node CPU "
        f"{backplane['node_cpu_us_per_publication']:.1f} us and Redis CPU "
        f"{backplane['redis_us_per_publication']:.1f} us per publication (both ends in one "
        "process)"
    )
    print(
        "Redis CPU per PUBLISH (256 B, no subscriber matching) while other clients hold: "
        + ", ".join(f"{k}: {v:.2f} us" for k, v in patterns.items())
    )
    for r in results:
        f, lat = r["fanout"], r["latency"]
        print(
            f"{r['scenario']}: broker {f.get('broker_us_per_delivery', float('nan')):.2f} "
            f"us/delivery (fan-out, measured interval; "
            f"{f.get('broker_us_per_delivery_all', float('nan')):.2f} with set-up); Redis "
            f"{f.get('redis_us_per_publication', float('nan')):.1f} us/publication"
        )
    meta = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cores": os.cpu_count(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "note": "shared 2-core machine, nothing pinned; indicative",
        "results": results,
        "backplane": backplane,
        "redis_us_per_publish_by_patterns": patterns,
    }
    if args.json:
        args.json.write_text(json.dumps(meta, indent=1))
    return 0 if all(r["fanout"].get("ok") and r["latency"].get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
