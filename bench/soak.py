"""Bounded soak of a real broker: is its memory, fd and task use flat under churn?

    python bench/soak.py                        # 3 minutes, 1000 concurrent clients
    python bench/soak.py --duration 600 --clients 3000 --procs 2 --plot soak.png
    python bench/soak.py --cycles 100000        # sequential connect/disconnect cycles

Not part of CI (bench/SOAK.md). The soak starts
``python -m tessera_mq.broker.cli serve --config ...`` on
127.0.0.1:0 with certificates from ``certs.pki`` and an allow-all ACL, and parses its
``listening tls://HOST:PORT`` line. It samples the broker every ``--interval`` seconds by sending
SIGUSR1: the broker logs ``stats {json}`` (connections, subscriptions, tasks, open_fds,
rss_bytes, counters; broker/server.py ``Broker.info``), which the soak reads from the broker's
log file.

Load mode (default): ``--clients`` concurrent client slots, spread over ``--procs`` worker
processes, each slot looping until the end: connect with the SDK (``client_sdk.connect``,
mutual TLS, reconnect off), maybe subscribe to one or two patterns, publish (with and without
ack) and read deliveries at random for a random lifetime, then disconnect, cleanly or abruptly
(the transport aborted without a close frame). Everything is bounded: slots, lifetimes, payload
sizes, the duration. The verdict compares the first and last thirds of the samples after the
warm-up: RSS, fds beyond one per connection, and tasks; then, once every client is gone, the
idle broker against its own idle baseline from before the load.

Cycles mode (``--cycles N``): N sequential connect (TLS handshake, hello/welcome) and
disconnect cycles from one client, the broker sampled every ``--sample-every`` cycles; reports
the rate and the fd, task, connection and RSS deltas between the idle broker before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import queue
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tessera_mq.certs import pki  # noqa: E402

_LISTENING = re.compile(r"^listening tls://(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d+)$")
_STATS = re.compile(r" stats (\{.*\})$")
#: Log lines that mean something went wrong inside the broker.
_BAD = ("Traceback (most recent call last)", "Exception in callback", "never retrieved")

ACL = """\
[[allow]]
principals = ["*"]
publish = [">"]
subscribe = [">"]
"""

#: Client identities: connections are spread over these (the broker limits per identity).
IDENTITIES = 8
#: Subjects the load uses: soak.<n>.<leaf>.
TOPICS = 64
LEAVES = ("status", "metrics", "events")


def log(msg: str) -> None:
    print(f"soak: {msg}", file=sys.stderr, flush=True)


# --- set-up ----------------------------------------------------------------------------------


def provision(d: Path, *, limits: dict[str, object]) -> Path:
    pki.init_ca(d, common_name="Tessera soak CA")
    pki.issue(d, "server", "localhost", dns=["localhost"], ip=["127.0.0.1"], file_stem="server")
    for i in range(IDENTITIES):
        pki.issue(d, "client", f"soak-{i}")
    (d / "acl.toml").write_text(ACL, encoding="utf-8")
    lines = [
        "shutdown_timeout = 10",
        "",
        "[[listeners]]",
        'bind = "127.0.0.1:0"',
        'security = "tls"',
        'cert = "server.pem"',
        'key = "server-key.pem"',
        'client_ca = "ca.pem"',
        "",
        "[acl]",
        'file = "acl.toml"',
        "",
        "[log]",
        'level = "info"',  # the stats line is logged at INFO
    ]
    if limits:
        lines += ["", "[limits]", *(f"{k} = {json.dumps(v)}" for k, v in limits.items())]
    config = d / "broker.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


class Broker:
    """The broker child process: started, sampled with SIGUSR1, stopped with SIGTERM."""

    def __init__(self, config: Path, python: str) -> None:
        self.log_path = config.parent / "broker.log"
        self._log = self.log_path.open("wb")
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        prefix = []
        setpriv = shutil.which("setpriv")
        if setpriv:  # the broker dies with the soak, whatever happens
            prefix = [setpriv, "--pdeathsig", "KILL", "--"]
        argv = [*prefix, python, "-m", "tessera_mq.broker.cli", "serve", "--config", str(config)]
        self.proc = subprocess.Popen(
            argv, cwd=config.parent, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True
        )
        self._offset = 0
        self._partial = b""
        self.stats: list[dict[str, Any]] = []
        self.bad_lines: list[str] = []
        self.log_lines = 0
        self.url = self._wait_listening()

    def _wait_listening(self, timeout: float = 30.0) -> str:
        assert self.proc.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.put(line.rstrip("\n"))
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            m = _LISTENING.match(line)
            if m:
                return f"tls://{m['host']}:{m['port']}"
        self.proc.kill()
        raise SystemExit(f"soak: the broker did not start:\n{self.log_path.read_text()[-3000:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_log(self) -> list[dict[str, Any]]:
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        data = self._partial + chunk
        *complete, self._partial = data.split(b"\n")
        found = []
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.log_lines += 1
            m = _STATS.search(line)
            if m:
                found.append(json.loads(m[1]))
            elif any(b in line for b in _BAD) and len(self.bad_lines) < 50:
                self.bad_lines.append(line)
        return found

    def sample(self, timeout: float = 10.0) -> dict[str, Any]:
        """Ask for a stats line and wait for it."""
        self._read_log()  # skip anything older
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self._read_log()
            if found:
                self.stats.append(found[-1])
                return found[-1]
            time.sleep(0.01)
        raise SystemExit("soak: the broker logged no stats line within 10 s of SIGUSR1")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = -9
        self._read_log()
        self._log.close()
        return code


def wait_idle(broker: Broker, timeout: float = 30.0) -> dict[str, Any]:
    """Sample until the broker holds no connection and its numbers stop moving."""
    deadline = time.monotonic() + timeout
    last = broker.sample()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        s = broker.sample()
        same = all(s[k] == last[k] for k in ("connections", "subscriptions", "tasks", "open_fds"))
        if s["connections"] == 0 and same:
            return s
        last = s
    return last


# --- the load (worker processes) -------------------------------------------------------------


@dataclass
class Counters:
    connects: int = 0
    connect_errors: int = 0
    clean_closes: int = 0
    aborts: int = 0
    lost: int = 0  #: connections the broker ended (slow consumer, timeouts...)
    subscribes: int = 0
    publishes: int = 0
    acked: int = 0
    deliveries: int = 0
    errors: int = 0
    live: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        name = type(exc).__name__
        self.error_kinds[name] = self.error_kinds.get(name, 0) + 1


@dataclass(frozen=True)
class LoadPlan:
    url: str
    certs: str
    slots: int
    seconds: float
    ramp: float
    lifetime: float
    think: float
    abrupt: float
    seed: int
    worker: int


async def _consume(sub: Any, counters: Counters) -> None:
    with contextlib.suppress(Exception):
        async for _ in sub:
            counters.deliveries += 1


async def _session(plan: LoadPlan, rng: random.Random, counters: Counters, end: float) -> None:
    from tessera_mq import client as client_sdk  # noqa: PLC0415 - workers import the SDK after fork/spawn

    who = rng.randrange(IDENTITIES)
    d = Path(plan.certs)
    try:
        client = await client_sdk.connect(
            plan.url,
            ca=d / "ca.pem",
            cert=d / f"soak-{who}.pem",
            key=d / f"soak-{who}-key.pem",
            reconnect=False,
            timeout=20,
        )
    except Exception as exc:
        counters.connect_errors += 1
        counters.error(exc)
        await asyncio.sleep(rng.uniform(0.5, 2.0))
        return
    counters.connects += 1
    counters.live += 1
    readers: list[asyncio.Task[None]] = []
    try:
        for _ in range(rng.choice((0, 1, 1, 2))):
            n = rng.randrange(TOPICS)
            pattern = rng.choice((f"soak.{n}.>", f"soak.{n}.*", f"soak.*.{rng.choice(LEAVES)}"))
            if pattern.startswith("soak.*") and rng.random() < 0.8:
                pattern = f"soak.{n}.status"  # wide patterns stay rare: fan-out is bounded
            sub = await client.subscribe(pattern, max_pending=256)
            counters.subscribes += 1
            readers.append(asyncio.create_task(_consume(sub, counters)))
        stop = min(end, time.monotonic() + rng.expovariate(1 / plan.lifetime))
        while time.monotonic() < stop and client.is_open:
            topic = f"soak.{rng.randrange(TOPICS)}.{rng.choice(LEAVES)}"
            payload = rng.randbytes(rng.choice((0, 16, 200, 2000)))
            ack = rng.random() < 0.5
            await client.publish(topic, payload, ack=ack)
            counters.publishes += 1
            counters.acked += ack
            pause = rng.expovariate(1 / plan.think)
            await asyncio.sleep(max(0.0, min(pause, stop - time.monotonic())))
    except Exception as exc:
        counters.error(exc)
    finally:
        if not client.is_open:
            counters.lost += 1
        if rng.random() < plan.abrupt and client._link is not None:
            client._link.abort()  # no close frame, no TLS close_notify: a vanished client
            counters.aborts += 1
        else:
            counters.clean_closes += 1
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 10)
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        counters.live -= 1


async def _slot(i: int, plan: LoadPlan, counters: Counters, start: float) -> None:
    rng = random.Random(plan.seed * 1_000_003 + i)
    await asyncio.sleep(plan.ramp * i / max(1, plan.slots))
    end = start + plan.seconds
    while time.monotonic() < end:
        await _session(plan, rng, counters, end)


async def _run_load(plan: LoadPlan, report: Any) -> None:
    counters = Counters()
    start = time.monotonic()

    async def reporter() -> None:
        while True:
            report.put({**counters.__dict__, "worker": plan.worker})
            await asyncio.sleep(1.0)

    rep = asyncio.create_task(reporter())
    await asyncio.gather(*(_slot(i, plan, counters, start) for i in range(plan.slots)))
    rep.cancel()
    report.put({**counters.__dict__, "worker": plan.worker})


def load_worker(plan: LoadPlan, report: Any) -> None:
    asyncio.run(_run_load(plan, report))


# --- the report ------------------------------------------------------------------------------

COLUMNS = ("t", "conns", "subs", "tasks", "fds", "fds-conns", "rss_MB", "sessions", "pubs", "dlvr")


def row(t: float, s: dict[str, Any], c: dict[str, int]) -> str:
    values = (
        f"{t:5.0f}",
        s["connections"],
        s["subscriptions"],
        s["tasks"],
        s["open_fds"],
        s["open_fds"] - s["connections"],
        f"{s['rss_bytes'] / 2**20:.1f}",
        c.get("connects", 0),
        c.get("publishes", 0),
        c.get("deliveries", 0),
    )
    return "  ".join(f"{v!s:>9}" for v in values)


def header() -> str:
    return "  ".join(f"{h:>9}" for h in COLUMNS)


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    ts = [p[0] for p in points]
    vs = [p[1] for p in points]
    mt, mv = statistics.fmean(ts), statistics.fmean(vs)
    den = sum((t - mt) ** 2 for t in ts)
    return 60 * sum((t - mt) * (v - mv) for t, v in zip(ts, vs, strict=True)) / den if den else 0.0


def verdict(samples: list[tuple[float, dict[str, Any]]], warmup: float) -> tuple[bool, list[str]]:
    window = [(t, s) for t, s in samples if t >= warmup]
    if len(window) < 6:
        return False, ["too few samples after the warm-up for a verdict (run longer)"]
    third = len(window) // 3
    first, last = window[:third], window[-third:]

    def mean(part: list[tuple[float, dict[str, Any]]], key: str) -> float:
        if key == "fd_overhead":
            return statistics.fmean(s["open_fds"] - s["connections"] for _, s in part)
        return statistics.fmean(float(s[key]) for _, s in part)

    lines = []
    flat = True
    checks = (
        # metric, allowed growth (absolute), allowed growth (fraction of the first third)
        ("rss_bytes", 8 * 2**20, 0.05),
        ("fd_overhead", 2, 0.0),
        ("tasks", 2, 0.05),
    )
    for key, absolute, fraction in checks:
        a, b = mean(first, key), mean(last, key)
        allowed = max(absolute, fraction * a)
        ok = b - a <= allowed
        flat &= ok
        unit = "MB" if key == "rss_bytes" else ""
        scale = 2**20 if key == "rss_bytes" else 1
        lines.append(
            f"{key:12} first third {a / scale:9.1f}{unit}  last third {b / scale:9.1f}{unit}  "
            f"growth {(b - a) / scale:+8.1f}{unit} (allowed {allowed / scale:.1f}{unit}): "
            f"{'flat' if ok else 'GROWING'}"
        )
    rss_slope = slope_per_minute([(t, s["rss_bytes"] / 2**20) for t, s in window])
    conns = statistics.fmean(s["connections"] for _, s in window)
    lines.append(
        f"RSS trend over the window: {rss_slope:+.2f} MB/min; mean connections {conns:.0f}"
    )
    return flat, lines


def plot(samples: list[tuple[float, dict[str, Any]]], path: Path) -> None:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    ts = [t for t, _ in samples]
    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(9, 9))
    series = (
        ("connections", [s["connections"] for _, s in samples]),
        ("RSS (MB)", [s["rss_bytes"] / 2**20 for _, s in samples]),
        ("open fds - connections", [s["open_fds"] - s["connections"] for _, s in samples]),
        ("asyncio tasks", [s["tasks"] for _, s in samples]),
    )
    for ax, (label, values) in zip(axes, series, strict=True):
        ax.plot(ts, values)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds")
    fig.suptitle("Tessera broker soak")
    fig.tight_layout()
    fig.savefig(path)
    log(f"plot written to {path}")


# --- the two modes ---------------------------------------------------------------------------


def run_load(args: argparse.Namespace, broker: Broker, certs: Path) -> int:
    baseline = wait_idle(broker)
    print(f"idle broker before the load: {json.dumps(baseline, sort_keys=True)}")
    flat = True
    idles = [baseline]
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        if args.rounds > 1:
            print(f"\n--- round {r + 1} of {args.rounds}")
        samples, counters = _load_round(args, broker, certs, r)
        ok, idle, summary = _finish_round(args, broker, baseline, samples, counters)
        flat &= ok
        idles.append(idle)
        rounds.append({"samples": [{"t": t, **s} for t, s in samples], **summary})
    if args.rounds > 1:
        # A leak grows with every round; memory the allocator keeps after the first peak does not.
        first, last = idles[1]["rss_bytes"], idles[-1]["rss_bytes"]
        allowed = max(8 * 2**20, 0.05 * first)
        ok = last - first <= allowed
        flat &= ok
        print(
            "\nidle RSS before and after each round: "
            + " -> ".join(f"{i['rss_bytes'] / 2**20:.1f}" for i in idles)
            + f" MB; after the last vs after the first round {(last - first) / 2**20:+.1f} MB "
            f"(allowed {allowed / 2**20:.1f}): {'flat' if ok else 'GROWING'}"
        )
    print(f"VERDICT: {'FLAT' if flat else 'GROWING / LEAKING'}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "baseline": baseline,
                    "idle_after_each_round": idles[1:],
                    "rounds": rounds,
                    "flat": flat,
                },
                indent=1,
            )
        )
    if args.plot:
        offset = 0.0
        joined: list[tuple[float, dict[str, Any]]] = []
        for rnd in rounds:
            points = [(offset + x["t"], x) for x in rnd["samples"]]
            joined += points
            offset = points[-1][0] + args.interval if points else offset
        plot(joined, args.plot)
    return 0 if flat else 1


def _load_round(
    args: argparse.Namespace, broker: Broker, certs: Path, rnd: int
) -> tuple[list[tuple[float, dict[str, Any]]], dict[int, dict[str, Any]]]:
    per_proc = [
        args.clients // args.procs + (i < args.clients % args.procs) for i in range(args.procs)
    ]
    ctx = mp.get_context("spawn")
    report = ctx.Queue()
    workers = []
    for i, slots in enumerate(per_proc):
        plan = LoadPlan(
            url=broker.url,
            certs=str(certs),
            slots=slots,
            seconds=args.duration,
            ramp=args.ramp,
            lifetime=args.lifetime,
            think=args.think,
            abrupt=args.abrupt,
            seed=args.seed + 1000 * rnd + i,
            worker=i,
        )
        p = ctx.Process(target=load_worker, args=(plan, report), daemon=True)
        p.start()
        workers.append(p)
    counters: dict[int, dict[str, Any]] = {}
    samples: list[tuple[float, dict[str, Any]]] = []
    start = time.monotonic()
    print(header())
    next_print = 0.0
    done = 0
    while done < len(workers):
        time.sleep(max(0.0, args.interval - (time.monotonic() - start) % args.interval))
        while True:
            try:
                item = report.get_nowait()
            except queue.Empty:
                break
            counters[item["worker"]] = item
        t = time.monotonic() - start
        s = broker.sample()
        samples.append((t, s))
        if t >= next_print:
            next_print += args.print_every
            print(row(t, s, _total(counters)), flush=True)
        done = sum(1 for w in workers if not w.is_alive())
        if t > args.duration + 120:
            log("workers did not finish 120 s after the end: stopping them")
            for w in workers:
                w.terminate()
            break
    for w in workers:
        w.join(timeout=10)
    while True:  # the last reports
        try:
            item = report.get_nowait()
        except queue.Empty:
            break
        counters[item["worker"]] = item
    return samples, counters


def _total(counters: dict[int, dict[str, Any]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counters.values():
        for k, v in c.items():
            if isinstance(v, int) and not isinstance(v, bool) and k != "worker":
                total[k] = total.get(k, 0) + v
    return total


def _finish_round(
    args: argparse.Namespace,
    broker: Broker,
    baseline: dict[str, Any],
    samples: list[tuple[float, dict[str, Any]]],
    counters: dict[int, dict[str, Any]],
) -> tuple[bool, dict[str, Any], dict[str, Any]]:
    load = [(t, s) for t, s in samples if t <= args.duration]
    idle = wait_idle(broker)
    total = _total(counters)
    kinds: dict[str, int] = {}
    for c in counters.values():
        for k, v in c.get("error_kinds", {}).items():
            kinds[k] = kinds.get(k, 0) + v
    print()
    print(
        f"clients: {total.get('connects', 0)} sessions ({total.get('connect_errors', 0)} "
        f"failed connects), {total.get('clean_closes', 0)} clean closes, "
        f"{total.get('aborts', 0)} aborts, {total.get('lost', 0)} ended by the broker; "
        f"{total.get('subscribes', 0)} subscribes, {total.get('publishes', 0)} publishes "
        f"({total.get('acked', 0)} acked), {total.get('deliveries', 0)} deliveries; "
        f"errors: {kinds or 'none'}"
    )
    peak = max((s["connections"] for _, s in load), default=0)
    print(
        f"broker: peak {peak} connections, "
        f"RSS {baseline['rss_bytes'] / 2**20:.1f} MB idle before -> "
        f"{max(s['rss_bytes'] for _, s in load) / 2**20:.1f} MB peak -> "
        f"{idle['rss_bytes'] / 2**20:.1f} MB idle after"
    )
    flat, lines = verdict(load, args.warmup)
    print(f"verdict over t >= {args.warmup:.0f} s (first vs last third of the samples):")
    for line in lines:
        print(f"  {line}")
    leaks = []
    for key in ("connections", "subscriptions", "tasks", "open_fds"):
        delta = idle[key] - baseline[key]
        leaks.append(f"{key} {baseline[key]} -> {idle[key]} ({delta:+d})")
        if delta > 0:
            flat = False
    print(
        "idle after vs idle before: "
        + ", ".join(leaks)
        + f", rss {(idle['rss_bytes'] - baseline['rss_bytes']) / 2**20:+.1f} MB"
    )
    if broker.bad_lines:
        flat = False
        print(f"broker log shows {len(broker.bad_lines)} exception line(s), first:")
        for line in broker.bad_lines[:5]:
            print(f"  {line}")
    print(f"round: {'flat' if flat else 'GROWING / LEAKING'}")
    summary = {"idle_after": idle, "clients": total, "errors": kinds, "flat": flat}
    return flat, idle, summary


async def _cycles(args: argparse.Namespace, broker: Broker, certs: Path) -> int:
    from tessera_mq import client as client_sdk  # noqa: PLC0415
    from tessera_mq.auth.tls import client_context  # noqa: PLC0415

    baseline = await asyncio.to_thread(wait_idle, broker)
    print(f"idle broker before: {json.dumps(baseline, sort_keys=True)}")
    rng = random.Random(args.seed)
    ssl_ctx = client_context(certs / "ca.pem", certs / "soak-0.pem", certs / "soak-0-key.pem")
    print(f"{'cycles':>9}  {'rate/s':>9}  {'conns':>9}  {'tasks':>9}  {'fds':>9}  {'rss_MB':>9}")
    start = time.monotonic()
    aborts = failures = 0
    for i in range(1, args.cycles + 1):
        try:
            client = await client_sdk.connect(broker.url, ssl_context=ssl_ctx, reconnect=False)
        except Exception as exc:
            failures += 1
            log(f"cycle {i}: connect failed: {exc!r}")
            await asyncio.sleep(0.1)
            continue
        if rng.random() < args.abrupt and client._link is not None:
            client._link.abort()
            aborts += 1
        await client.close()
        if i % args.sample_every == 0 or i == args.cycles:
            s = await asyncio.to_thread(broker.sample)
            rate = i / (time.monotonic() - start)
            print(
                f"{i:>9}  {rate:>9.0f}  {s['connections']:>9}  {s['tasks']:>9}  "
                f"{s['open_fds']:>9}  {s['rss_bytes'] / 2**20:>9.1f}",
                flush=True,
            )
    elapsed = time.monotonic() - start
    idle = await asyncio.to_thread(wait_idle, broker)
    rate = args.cycles / elapsed
    print()
    print(
        f"{args.cycles} cycles ({aborts} aborted without a close, {failures} failed) in "
        f"{elapsed:.1f} s: {rate:.0f} cycles/s; "
        f"100k cycles would take {100_000 / rate / 60:.1f} min"
    )
    ok = failures == 0
    deltas = []
    for key in ("connections", "subscriptions", "tasks", "open_fds"):
        delta = idle[key] - baseline[key]
        deltas.append(f"{key} {baseline[key]} -> {idle[key]} ({delta:+d})")
        ok &= delta <= 0
    rss = (idle["rss_bytes"] - baseline["rss_bytes"]) / 2**20
    print("idle after vs idle before: " + ", ".join(deltas) + f", rss {rss:+.1f} MB")
    if broker.bad_lines:
        ok = False
        print(f"broker log shows {len(broker.bad_lines)} exception line(s): {broker.bad_lines[:3]}")
    print(f"VERDICT: {'NO LEAK' if ok else 'LEAK OR FAILURES'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180)")
    p.add_argument("--clients", type=int, default=1000, help="concurrent client slots")
    p.add_argument("--procs", type=int, default=1, help="load worker processes (default 1)")
    p.add_argument("--ramp", type=float, default=10.0, help="seconds to start all slots")
    p.add_argument("--lifetime", type=float, default=8.0, help="mean session seconds")
    p.add_argument("--think", type=float, default=2.0, help="mean seconds between publishes")
    p.add_argument("--abrupt", type=float, default=0.2, help="fraction of abrupt disconnects")
    p.add_argument("--warmup", type=float, default=None, help="seconds ignored by the verdict")
    p.add_argument("--rounds", type=int, default=1, help="load phases, idle in between")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    p.add_argument("--print-every", type=float, default=5.0, help="seconds between table rows")
    p.add_argument("--cycles", type=int, default=0, help="sequential connect/close cycles mode")
    p.add_argument("--sample-every", type=int, default=1000, help="cycles between samples")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--plot", type=Path, default=None, help="write a PNG (needs matplotlib)")
    p.add_argument("--json", type=Path, default=None, help="write every sample as JSON")
    p.add_argument("--python", default=sys.executable, help="interpreter for the broker")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(30.0, args.duration / 5)
    args.procs = max(1, min(args.procs, args.clients))
    work = Path(tempfile.mkdtemp(prefix="tessera-soak-"))
    config = provision(work, limits={"max_connections_per_identity": 100_000})
    broker = Broker(config, args.python)
    log(f"broker pid {broker.pid} at {broker.url}; work directory {work}")
    try:
        if args.cycles:
            code = asyncio.run(_cycles(args, broker, work))
        else:
            code = run_load(args, broker, work)
    finally:
        rc = broker.stop()
        log(f"broker exited with {rc} ({broker.log_lines} log lines)")
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return code if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
