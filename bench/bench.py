"""Benchmark orchestrator: Tessera against Mosquitto and NATS, same workloads, same run.

Run it through ``bench/run`` (which installs what is missing). For each repetition and each broker
it starts the broker pinned to core 0, runs ``bench/loadgen.py`` pinned to core 1 for each
workload, stops the broker, and finally prints medians with min-max and ratios, appends the run to
``bench/results/history.jsonl`` and draws ``bench/results/<stamp>.png``.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
LOADGEN = HERE / "loadgen.py"

BROKER_CORE = "0"
LOADGEN_CORE = "1"

#: ``null`` is bench/nullbroker.py: it forwards bytes and nothing else, so what a workload
#: reaches against it is the load generator's own ceiling for that workload (calibration).
PEERS = ("tessera", "mosquitto", "nats", "null")
SMOKE = False
PROTO = {"tessera": "tessera", "mosquitto": "mqtt", "nats": "nats", "null": "tessera"}
NULLBROKER = HERE / "nullbroker.py"
#: A cell whose load generator used at least this share of its core is flagged: the figure is
#: then (partly) the generator's, a lower bound for the broker.
GEN_BUSY = 0.9
#: Seconds to wait for the machine to go quiet before each workload (``--quiet-wait``).
QUIET_WAIT = 30.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# setup


def provision(directory: Path) -> None:
    """CA, an ECDSA P-256 server certificate for localhost/127.0.0.1, one client certificate."""
    sys.path.insert(0, str(REPO))
    from tessera_mq.certs import pki  # noqa: PLC0415 - the repo is put on sys.path first

    pki.init_ca(directory, common_name="Tessera bench CA")
    pki.issue(
        directory, "server", "localhost", dns=["localhost"], ip=["127.0.0.1"], file_stem="server"
    )
    pki.issue(directory, "client", "bench")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tessera_limits() -> str:
    """All bench connections share one client certificate: lift a per-identity connection cap
    if this version of the broker has one (it would refuse the 10,000 idle connections)."""
    sys.path.insert(0, str(REPO))
    try:
        from dataclasses import fields  # noqa: PLC0415

        from tessera_mq.broker.config import LimitsConfig  # noqa: PLC0415
    except ImportError:
        return ""
    names = {f.name for f in fields(LimitsConfig)}
    lines = []
    if "max_connections_per_identity" in names:
        lines.append("max_connections_per_identity = 1000000")
    if "max_connections" in names:  # the 100,000-connection run needs one more (warm-up)
        lines.append("max_connections = 1000000")
    return "\n[limits]\n" + "\n".join(lines) + "\n" if lines else ""


def write_configs(d: Path, port: int, peer: str, mutual: bool = True) -> Path:
    """One peer's configuration: mutual TLS 1.3 (the client certificate required and verified),
    or with ``mutual=False`` server-authenticated TLS only (the idle workload's TLS row)."""
    if peer == "tessera":
        # without client certificates every client is "anonymous": let the ACL admit it
        who = '["*"]' if mutual else '["*", "anonymous"]'
        (d / "acl.toml").write_text(
            f'[[allow]]\nprincipals = {who}\npublish = ["bench.>"]\nsubscribe = ["bench.>"]\n'
        )
        cfg = d / "tessera.toml"
        client_ca = 'client_ca = "ca.pem"\n' if mutual else ""
        cfg.write_text(
            f"""[[listeners]]
bind = "127.0.0.1:{port}"
security = "tls"
cert = "server.pem"
key = "server-key.pem"
{client_ca}
[acl]
file = "acl.toml"

[log]
level = "warning"
{_tessera_limits()}"""
        )
        return cfg
    if peer == "mosquitto":
        cfg = d / "mosquitto.conf"
        cfg.write_text(
            f"""# Mosquitto 2.0: mutual TLS 1.3 on one listener, no persistence, no connection logs.
user root
per_listener_settings false
allow_anonymous true
persistence false
log_dest stderr
log_type error
log_type warning
connection_messages false
max_connections -1
set_tcp_nodelay true
# QoS 0 messages to a connected client are dropped beyond max_queued_messages (default 1000);
# the fan-out window keeps up to 10,000 per subscriber in flight, as NATS (64 MB max_pending)
# and Tessera (65,536 messages / 8 MiB) buffer without dropping.
max_queued_messages 100000
listener {port} 127.0.0.1
{f"cafile {d / 'ca.pem'}" if mutual else ""}
certfile {d / "server.pem"}
keyfile {d / "server-key.pem"}
require_certificate {"true" if mutual else "false"}
tls_version tlsv1.3
"""
        )
        return cfg
    if peer == "nats":
        cfg = d / "nats.conf"
        cfg.write_text(
            f"""# nats-server 2.9: mutual TLS (client certificates verified), defaults otherwise.
listen: "127.0.0.1:{port}"
max_connections: 100000
tls {{
  cert_file: "{d / "server.pem"}"
  key_file: "{d / "server-key.pem"}"
  {f'ca_file: "{d / "ca.pem"}"' if mutual else ""}
  verify: {"true" if mutual else "false"}
  timeout: 10
}}
"""
        )
        return cfg
    raise ValueError(peer)


#: Where the Tessera broker is imported from: the work tree, or a snapshot made by --rev.
SOURCE = REPO


def snapshot(rev: str, into: Path) -> Path:
    """Export ``rev`` (read-only: git archive) so the broker under test cannot change mid-run."""
    into.mkdir()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev], cwd=REPO, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def tessera_command(python: str, source: Path, env: dict[str, str]) -> list[str]:
    """How to run the broker of ``source``. The work tree: as installed (``tessera_mq.*``).
    A snapshot (``--rev``): its folders under their installed names on ``PYTHONPATH`` ahead of
    the installed copy (docs/deploy.md, "Installed modules"); a snapshot from before the rename
    (no ``client_sdk/_compat``): the folder names, from its own directory."""
    if source == REPO:
        return [python, "-m", "tessera_mq.broker.cli"]
    if not (source / "client_sdk" / "_compat").is_dir():
        return [python, "-m", "broker.cli"]  # cwd=source puts its folders on sys.path
    tree = source / ".bench-path" / "tessera_mq"
    tree.mkdir(parents=True, exist_ok=True)
    for name, folder in (("broker", "broker"), ("client", "client_sdk"), ("auth", "auth"),
                         ("certs", "certs")):  # fmt: skip
        link = tree / name
        if not link.exists():
            link.symlink_to(source / folder, target_is_directory=True)
    env["PYTHONPATH"] = str(tree.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return [python, "-m", "tessera_mq.broker.cli"]


class BrokerProc:
    def __init__(self, peer: str, certs: Path, python: str, *, mutual: bool = True) -> None:
        self.peer = peer
        self.port = free_port()
        cfg = write_configs(certs, self.port, peer, mutual) if peer != "null" else certs
        env = dict(os.environ)
        if peer == "tessera":
            cmd = [*tessera_command(python, SOURCE, env), "serve", "--config", str(cfg)]
        elif peer == "null":
            cmd = [python, str(NULLBROKER), "--port", str(self.port), "--certs", str(certs)]
        elif peer == "mosquitto":
            cmd = [shutil.which("mosquitto") or "mosquitto", "-c", str(cfg)]
        else:
            cmd = [shutil.which("nats-server") or "nats-server", "-c", str(cfg)]
            env["GOMAXPROCS"] = "1"
        self.log_path = certs / f"{peer}.log"
        self.logf = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["taskset", "-c", BROKER_CORE, *cmd],
            cwd=SOURCE,  # a snapshot's broker is imported from there (tessera_command)
            env=env,
            stdout=self.logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        # taskset execs the broker, so the pid is the broker's
        self.pid = self.proc.pid
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{peer} exited: {self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"{peer} did not listen on {self.port}: {self.tail()}")
        time.sleep(0.2)

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-800:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.logf.close()


def version_of(peer: str, rev: str | None = None) -> str:
    try:
        if peer == "null":
            return "(generator ceiling)"
        if peer == "mosquitto":
            out = subprocess.run(
                ["mosquitto", "-h"], capture_output=True, text=True, timeout=5, check=False
            )
            return (out.stdout or out.stderr).splitlines()[0].replace("mosquitto version ", "")
        if peer == "nats":
            out = subprocess.run(
                ["nats-server", "--version"], capture_output=True, text=True, timeout=5, check=False
            )
            return out.stdout.strip().replace("nats-server: v", "")
        cmd = ["git", "describe", "--always", *([rev] if rev else ["--dirty"])]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
        return "0.1.0@" + out.stdout.strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def wait_quiet(broker_pid: int, max_wait: float = 120.0, threshold: float = 0.15) -> float:
    """Wait (bounded) until the machine is idle but for our broker: other jobs skew every
    number. Returns the busy fraction of a core seen last."""
    sys.path.insert(0, str(HERE))
    from loadgen import _cpu_s, machine_busy_s  # noqa: PLC0415

    deadline = time.monotonic() + max_wait
    warned = False
    while True:
        b0, p0, t0 = machine_busy_s(), _cpu_s(broker_pid), time.monotonic()
        time.sleep(0.5)
        busy = (machine_busy_s() - b0 - (_cpu_s(broker_pid) - p0)) / (time.monotonic() - t0)
        if busy < threshold or time.monotonic() > deadline:
            if busy >= threshold:
                log(f"machine still busy ({busy:.0%} of a core used by other processes): going on")
            return busy
        if not warned:
            log(f"waiting for other processes to go quiet ({busy:.0%} of a core busy)")
            warned = True


def add_derived(res: dict[str, Any]) -> None:
    """Deliveries per second of broker CPU: what one fully busy core would do, which other
    jobs on the machine skew far less than the wall-clock rate."""
    if res.get("workload") == "fanout" and res.get("ok") and res.get("broker_cpu"):
        res["per_core_s"] = res["deliveries_per_s"] / max(res["broker_cpu"], 1e-9)


def run_loadgen(
    python: str, workload: str, broker: BrokerProc, certs: Path, extra: list[str], timeout: float
) -> dict[str, Any]:
    if not SMOKE and QUIET_WAIT > 0:
        wait_quiet(broker.pid, max_wait=QUIET_WAIT)
    cmd = [
        "taskset", "-c", LOADGEN_CORE, python, str(LOADGEN), workload,
        "--proto", PROTO[broker.peer], "--port", str(broker.port), "--certs", str(certs),
        "--broker-pid", str(broker.pid), *extra,
    ]  # fmt: skip
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False
        )
    except subprocess.TimeoutExpired:
        return {"workload": workload, "ok": False, "error": f"loadgen timed out after {timeout}s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"workload": workload, "ok": False, "error": out.stderr.strip()[-600:]}
    res: dict[str, Any] = json.loads(lines[-1])
    add_derived(res)
    if broker.proc.poll() is not None:
        res["ok"] = False
        res["error"] = f"broker died: {broker.tail()}"
    return res


# --------------------------------------------------------------------------------------------
# the run


def plan(args: argparse.Namespace) -> list[tuple[str, str, list[str], float]]:
    """(key, workload, loadgen args, timeout) in the order run against one broker start."""
    d, w = str(args.duration), str(args.warmup)
    steps: list[tuple[str, str, list[str], float]] = []
    for s in args.subs if "fanout" in args.workloads else []:
        steps.append(
            (f"fanout_{s}", "fanout", ["--subs", str(s), "--duration", d, "--warmup", w], 180)
        )
    if "latency" not in args.workloads:
        return steps
    steps.append(
        (
            "latency",
            "latency",
            ["--subs", str(args.lat_subs), "--rate", str(args.rate), "--duration", d,
             "--warmup", w],
            120,
        )
    )  # fmt: skip
    return steps


def run_all(args: argparse.Namespace, certs: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {
        p: collections.defaultdict(list) for p in args.peers
    }
    for rep in range(args.runs):
        for peer in args.peers:
            conn_counts = list(args.conns) if "idle" in args.workloads else []
            if peer == "tessera" and "idle" in args.workloads:
                conn_counts += [n for n in args.tessera_conns if n not in conn_counts]
            if peer == "null":
                conn_counts = []  # its memory and handshakes say nothing about the generator
            # idle connections: a fresh broker for each N and mode, so RSS is not inflated by
            # earlier work; mutual TLS (key idle_N) and server-authenticated TLS (idle_tls_N)
            for n, mode in [(n, m) for n in conn_counts for m in args.idle_modes]:
                key = idle_key(n, mode)
                broker = BrokerProc(peer, certs, args.python, mutual=mode == "mtls")
                try:
                    log(f"run {rep + 1}/{args.runs} {peer}: idle {n} connections ({mode})")
                    res = run_loadgen(
                        args.python, "idle", broker, certs,
                        ["--conns", str(n), "--concurrency", str(args.concurrency),
                         "--settle", str(args.settle), "--rest", str(args.rest),
                         "--source-addrs", args.source_addrs],
                        max(600.0, n / 50 + args.rest + 60),
                    )  # fmt: skip
                    raw[peer][key].append(res)
                    report_one(peer, key, res)
                finally:
                    broker.stop()
            broker = BrokerProc(peer, certs, args.python)
            try:
                for key, workload, extra, timeout in plan(args):
                    log(f"run {rep + 1}/{args.runs} {peer}: {key}")
                    res = run_loadgen(args.python, workload, broker, certs, extra, timeout)
                    raw[peer][key].append(res)
                    report_one(peer, key, res)
                    if broker.proc.poll() is not None:
                        broker.stop()
                        broker = BrokerProc(peer, certs, args.python)
            finally:
                broker.stop()
    return raw


def report_one(peer: str, key: str, r: dict[str, Any]) -> None:
    if not r.get("ok"):
        log(f"  {peer} {key}: FAILED: {r.get('error')}")
        return
    if r["workload"] == "fanout":
        log(
            f"  {peer} {key}: {r['deliveries_per_s'] / 1e3:,.0f}k deliveries/s, lost {r['lost']}, "
            f"broker cpu {r.get('broker_cpu', 0):.0%}, loadgen cpu {r['gen_cpu']:.0%}, "
            f"foreign cpu {r.get('foreign_cpu', 0):.0%}"
        )
    elif r["workload"] == "latency":
        log(
            f"  {peer} {key}: p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms max "
            f"{r['max_ms']:.1f} ms, lost {r['lost']}, loadgen cpu {r['gen_cpu']:.0%}, "
            f"foreign cpu {r.get('foreign_cpu', 0):.0%}"
        )
    else:
        log(
            f"  {peer} {key}: {r['establish_s']:.2f} s to establish, "
            f"{r['rss_per_conn_kb']:.1f} KB RSS/conn, loadgen cpu {r['gen_cpu']:.0%}, "
            f"broker cpu {r['broker_cpu']:.0%}, foreign cpu {r.get('foreign_cpu', 0):.0%}"
            + (f"; at rest broker cpu {r['rest_broker_cpu']:.1%}" if r.get("rest_s") else "")
        )


# --------------------------------------------------------------------------------------------
# summary


#: (row label, result key, metric, unit, higher is better)
def metrics(args: argparse.Namespace) -> list[tuple[str, str, str, str, bool]]:
    """Every figure is followed by the CPU of its load generator and of foreign processes (the
    rest of the machine) during the same measurement: a figure is only as good as those two."""
    rows: list[tuple[str, str, str, str, bool]] = []

    def cpu_rows(key: str, broker: bool = True) -> None:
        if broker:
            rows.append(("  broker CPU", key, "broker_cpu", "%", True))
        rows.append(("  generator CPU", key, "gen_cpu", "%", False))
        rows.append(("  foreign CPU", key, "foreign_cpu", "%", False))

    for s in args.subs if "fanout" in args.workloads else []:
        label = "1 publisher -> 1 subscriber" if s == 1 else f"fan-out S={s}"
        rows.append((f"{label}, deliveries/s", f"fanout_{s}", "deliveries_per_s", "k/s", True))
        rows.append(("  per broker CPU-second", f"fanout_{s}", "per_core_s", "k/s", True))
        cpu_rows(f"fanout_{s}")
    if "latency" in args.workloads:
        lat = f"{args.rate:g} msg/s to S={args.lat_subs}"
        rows.append((f"latency p50 ({lat})", "latency", "p50_ms", "ms", False))
        rows.append((f"latency p99 ({lat})", "latency", "p99_ms", "ms", False))
        rows.append((f"latency p99.9 ({lat})", "latency", "p999_ms", "ms", False))
        cpu_rows("latency")
    conns = sorted(set(args.conns) | set(args.tessera_conns))
    idle = [(n, m) for n in conns for m in args.idle_modes] if "idle" in args.workloads else []
    for n, mode in idle:
        key = idle_key(n, mode)
        what = "mutual TLS" if mode == "mtls" else "TLS"
        rows.append((f"RSS per idle {what} conn, N={n}", key, "rss_per_conn_kb", "KB", False))
        rows.append((f"time to establish N={n} ({what})", key, "establish_s", "s", False))
        cpu_rows(key)
        if args.rest > 0:
            rows.append((f"  broker CPU at rest ({args.rest:g} s), N={n}", key,
                         "rest_broker_cpu", "%", False))  # fmt: skip
    return rows


#: Idle workload modes: mutual TLS (client certificates) and server-authenticated TLS.
IDLE_MODES = ("mtls", "tls")


def idle_key(n: int, mode: str) -> str:
    """Result key of an idle run (``idle_N`` for mutual TLS, as in earlier history records)."""
    return f"idle_{n}" if mode == "mtls" else f"idle_tls_{n}"


def summarize(
    args: argparse.Namespace, raw: dict[str, dict[str, list[dict[str, Any]]]]
) -> dict[str, dict[str, dict[str, float]]]:
    """peer -> key.metric -> {median, min, max, n}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for peer, by_key in raw.items():
        out[peer] = {}
        for _label, key, metric, _unit, _hib in metrics(args):
            vals = [r[metric] for r in by_key.get(key, []) if r.get("ok") and metric in r]
            if vals:
                out[peer][f"{key}.{metric}"] = {
                    "median": statistics.median(vals),
                    "min": min(vals),
                    "max": max(vals),
                    "n": len(vals),
                }
    return out


def fmt(v: float, unit: str) -> str:
    if unit == "k/s":
        return f"{v / 1e3:,.0f}k"
    if unit == "%":
        return f"{v * 100:.0f}%"
    if unit == "ms":
        return f"{v:.2f}"
    if unit == "KB":
        return f"{v:.1f}"
    return f"{v:.2f}"


def table(
    args: argparse.Namespace,
    summary: dict[str, dict[str, dict[str, float]]],
    versions: dict[str, str],
) -> str:
    peers = list(args.peers)
    head = ["metric"] + [f"{p} {versions.get(p, '')}".strip() for p in peers]
    others = [p for p in peers if p != "tessera"]
    if "tessera" in peers:
        head += [f"tessera/{p}" for p in others]
    rows = [head]
    for label, key, metric, unit, _hib in metrics(args):
        row = [f"{label} [{unit}]"]
        for p in peers:
            s = summary.get(p, {}).get(f"{key}.{metric}")
            gen = summary.get(p, {}).get(f"{key}.gen_cpu")
            # generator at >= 90% of its core in some run: the figure is (partly) the
            # generator's; "!" marks it (CPU rows excepted)
            mark = " !" if gen and gen["max"] >= GEN_BUSY and unit != "%" else ""
            if s is None:
                row.append("-")
            elif s["n"] > 1:
                lo, hi = fmt(s["min"], unit), fmt(s["max"], unit)
                row.append(f"{fmt(s['median'], unit)} ({lo}-{hi}){mark}")
            else:
                row.append(fmt(s["median"], unit) + mark)
        if "tessera" in peers:
            t = summary.get("tessera", {}).get(f"{key}.{metric}")
            for p in others:
                o = summary.get(p, {}).get(f"{key}.{metric}")
                if t and o and o["median"] and unit != "%":
                    row.append(f"{t['median'] / o['median']:.2f}x")
                else:
                    row.append("")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    legend = (
        f"\n(median (min-max) of the runs; ! = the load generator used >= {GEN_BUSY:.0%} of its "
        "core in at least one run: a lower bound for that broker; null = bench/nullbroker.py, "
        "which only forwards bytes: the generator's own ceiling for that workload)"
    )
    lines = []
    for i, r in enumerate(rows):
        lines.append(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines) + legend


def losses(raw: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    notes = []
    for peer, by_key in raw.items():
        for key, results in by_key.items():
            for i, r in enumerate(results):
                if not r.get("ok"):
                    notes.append(f"{peer} {key} run {i + 1}: FAILED ({r.get('error')})")
                    continue
                if r.get("foreign_cpu", 0) > 0.15:
                    notes.append(
                        f"{peer} {key} run {i + 1}: other processes used {r['foreign_cpu']:.0%} "
                        "of a core during the measurement (numbers suspect)"
                    )
                elif r.get("lost"):
                    notes.append(f"{peer} {key} run {i + 1}: LOST {r['lost']} deliveries")
                elif r.get("gen_cpu", 0) >= GEN_BUSY:
                    notes.append(
                        f"{peer} {key} run {i + 1}: load generator at {r['gen_cpu']:.0%} of its "
                        f"core (broker {r.get('broker_cpu', 0):.0%}): the figure is partly the "
                        "generator's (a lower bound for throughput, an upper one for latency)"
                    )
    return notes


# --------------------------------------------------------------------------------------------
# profiling


def profile(args: argparse.Namespace, certs: Path) -> None:
    """py-spy records the Tessera broker under fan-out to each S, then while N connections are
    established; prints the top functions and keeps the collapsed stacks in bench/results/."""
    pyspy = shutil.which("py-spy", path=str(HERE / ".venv" / "bin")) or shutil.which("py-spy")
    if not pyspy:
        raise SystemExit("py-spy not found (bench/run installs it into bench/.venv)")
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    jobs: list[tuple[str, str, list[str], float]] = [
        (f"fanout_S{s}", "fanout",
         ["--subs", str(s), "--duration", str(args.duration), "--warmup", str(args.warmup)],
         args.duration + args.warmup + 3)
        for s in args.subs
    ]  # fmt: skip
    n = args.conns[0]
    jobs.append(
        (f"establish_N{n}", "idle", ["--conns", str(n), "--concurrency", str(args.concurrency)],
         0.0)
    )  # fmt: skip
    for name, workload, extra, _dur in jobs:
        broker = BrokerProc("tessera", certs, args.python)
        try:
            raw = RESULTS / f"profile-{stamp}-{name}.txt"
            cmd = [pyspy, "record", "--pid", str(broker.pid), "--rate", "500", "--format", "raw",
                   "--output", str(raw), "--nonblocking"]  # fmt: skip
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
            res = run_loadgen(args.python, workload, broker, certs, extra, 600)
            report_one("tessera", f"{name} (profiled)", res)
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
            if raw.exists():
                print(f"\n== py-spy: Tessera broker, {name} ({raw}) ==")
                print(top_functions(raw))
            else:
                err = spy.stderr.read().decode() if spy.stderr else ""
                print(f"py-spy produced nothing for {name}: {err[-300:]}")
        finally:
            broker.stop()


def top_functions(raw: Path, n: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_s)
        total += count
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 2)[-1]
                  if " (" in f else f for f in stack.split(";")]  # fmt: skip
        self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    lines = [f"{total} samples", "self%  incl%  function"]
    for f, c in self_c.most_common(n):
        lines.append(f"{100 * c / total:5.1f}  {100 * incl[f] / total:5.1f}  {f}")
    lines.append("-- inclusive --")
    for f, c in incl.most_common(n):
        lines.append(f"{100 * self_c[f] / total:5.1f}  {100 * c / total:5.1f}  {f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Tessera vs Mosquitto vs NATS over TLS 1.3")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--peers",
        default=None,
        help="comma list: tessera,mosquitto,nats,null (smoke: tessera,null)",
    )
    p.add_argument(
        "--subs", default="1,100,1000", help="fan-out subscriber counts (1: one publisher -> one)"
    )
    p.add_argument(
        "--workloads", default="fanout,latency,idle", help="comma list: fanout,latency,idle"
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="seconds to wait for the machine to go quiet before each workload (0: never)",
    )
    p.add_argument("--conns", default="5000", help="idle connections held (all peers)")
    p.add_argument("--tessera-conns", default="10000", help="extra idle counts, Tessera only")
    p.add_argument(
        "--idle-modes",
        default=",".join(IDLE_MODES),
        help="idle: comma list of mtls (client certificates) and tls (server certificate only)",
    )
    p.add_argument("--lat-subs", type=int, default=100)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per workload")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=64, help="handshakes in flight")
    p.add_argument(
        "--source-addrs",
        default="",
        help="idle: client source addresses, e.g. 127.0.0.2-127.0.0.9 (past ~28,000 conns)",
    )
    p.add_argument("--rest", type=float, default=0.0, help="idle: seconds of broker CPU at rest")
    p.add_argument("--python", default=sys.executable, help="interpreter for broker and loadgen")
    p.add_argument("--smoke", action="store_true", help="a seconds-long check of the machinery")
    p.add_argument("--profile", action="store_true", help="py-spy the Tessera fan-out instead")
    p.add_argument(
        "--rev", default=None, help="benchmark the broker of this git revision (a snapshot)"
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="print the table and redraw the chart of the last history.jsonl record",
    )
    p.add_argument("--no-chart", action="store_true")
    p.add_argument("--no-history", action="store_true")
    args = p.parse_args(argv)

    args.python = os.path.abspath(args.python)  # not resolved: a venv's python is a symlink
    if args.peers is None:
        args.peers = "tessera,null" if args.smoke else ",".join(PEERS)
    args.peers = [x for x in args.peers.split(",") if x]
    args.workloads = [x for x in str(args.workloads).split(",") if x]
    args.idle_modes = [x for x in str(args.idle_modes).split(",") if x]
    for m in args.idle_modes:
        if m not in IDLE_MODES:
            raise SystemExit(f"unknown idle mode {m!r} (known: {', '.join(IDLE_MODES)})")
    for w in args.workloads:
        if w not in ("fanout", "latency", "idle"):
            raise SystemExit(f"unknown workload {w!r}")
    global QUIET_WAIT  # noqa: PLW0603
    QUIET_WAIT = args.quiet_wait
    if args.smoke:
        global SMOKE  # noqa: PLW0603
        SMOKE = True
        args.runs = 1
        args.subs = "1,10"
        args.conns = "50"
        args.tessera_conns = ""
        args.lat_subs = 10
        args.duration = 1.0
        args.warmup = 0.3
        args.settle = 0.2
        args.rate = 200.0
        args.no_history = True
    for peer in args.peers:
        if peer not in PEERS:
            raise SystemExit(f"unknown peer {peer!r}")
    missing = [p for p in args.peers if p in ("mosquitto", "nats") and not shutil.which(
        "mosquitto" if p == "mosquitto" else "nats-server")]  # fmt: skip
    for m in missing:
        log(f"{m} is not installed: skipped")
    args.peers = [p for p in args.peers if p not in missing]
    args.subs = [int(x) for x in str(args.subs).split(",") if x]
    args.conns = [int(x) for x in str(args.conns).split(",") if x]
    args.tessera_conns = [int(x) for x in str(args.tessera_conns).split(",") if x]

    if args.report:
        return report_last()
    if os.cpu_count() and os.cpu_count() < 2:  # type: ignore[operator]
        log("fewer than 2 cores: broker and load generator will share one")
    os.sched_setaffinity(0, {int(LOADGEN_CORE)})
    sys.path.insert(0, str(HERE))
    from loadgen import raise_fd_limit  # noqa: PLC0415

    most = max([*args.conns, *args.tessera_conns, 0])
    raise_fd_limit(most + 16)  # brokers inherit it
    fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if most + 64 > fds:
        log(
            f"{most} connections need about {most + 64} descriptors per process; this one may "
            f"open {fds} (raising the hard limit needs CAP_SYS_RESOURCE): expect failures"
        )
    certs = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    try:
        provision(certs)
        if args.rev:
            global SOURCE  # noqa: PLW0603
            SOURCE = snapshot(args.rev, certs / "src")
            log(f"broker from {args.rev} ({SOURCE})")
        if args.profile:
            profile(args, certs)
            return 0
        versions = {p: version_of(p, args.rev) for p in args.peers}
        t0 = time.time()
        raw = run_all(args, certs)
        summary = summarize(args, raw)
        print()
        print(
            f"Tessera benchmark: TLS 1.3, mutual auth, ECDSA P-256, {256}-byte payloads; "
            f"broker on core {BROKER_CORE}, load generator on core {LOADGEN_CORE}; "
            f"medians of {args.runs} run(s) (min-max); {time.time() - t0:.0f} s"
        )
        print(table(args, summary, versions))
        tls = {
            p: next((r.get("tls") for rs in raw[p].values() for r in rs if r.get("tls")), None)
            for p in args.peers
        }
        shown = [f"{p}: {t['version']} {t['cipher']}" for p, t in tls.items() if t]
        print("negotiated:", ", ".join(shown))
        notes = losses(raw)
        for n in notes:
            print("NOTE:", n)
        record = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "openssl": __import__("ssl").OPENSSL_VERSION,
            "versions": versions,
            "args": {k: v for k, v in vars(args).items() if k != "python"},
            "tls": tls,
            "summary": summary,
            "raw": raw,
        }
        if not args.no_history:
            RESULTS.mkdir(exist_ok=True)
            with open(RESULTS / "history.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            log(f"appended to {RESULTS / 'history.jsonl'}")
        if not args.no_chart and not args.smoke:
            RESULTS.mkdir(exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            js = certs / "record.json"
            js.write_text(json.dumps(record))
            png = RESULTS / f"bench-{stamp}.png"
            chart_py = HERE / ".venv" / "bin" / "python"
            cmd = [str(chart_py if chart_py.exists() else sys.executable), str(HERE / "chart.py"),
                   str(js), str(png)]  # fmt: skip
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            if r.returncode == 0:
                shutil.copyfile(png, RESULTS / "latest.png")
                log(f"chart: {png} (and {RESULTS / 'latest.png'})")
            else:
                log(f"chart failed: {r.stderr.strip()[-300:]}")
        failed = any(not r.get("ok") for by in raw.values() for rs in by.values() for r in rs)
        if args.smoke:
            lost = any(r.get("lost") for by in raw.values() for rs in by.values() for r in rs)
            print("smoke:", "FAILED" if failed or lost else "OK")
            return 1 if failed or lost else 0
        return 0
    finally:
        shutil.rmtree(certs, ignore_errors=True)


def report_last() -> int:
    lines = (RESULTS / "history.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    a = argparse.Namespace(**rec["args"])
    if not hasattr(a, "workloads"):  # records from before --workloads
        a.workloads = ["fanout", "latency", "idle"]
    for by in rec["raw"].values():
        for rs in by.values():
            for r in rs:
                add_derived(r)
    rec["summary"] = summarize(a, rec["raw"])
    print(f"{rec['time']} {rec['cpu']} {rec['versions']}")
    print(table(a, rec["summary"], rec["versions"]))
    for n in losses(rec["raw"]):
        print("NOTE:", n)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(rec, f)
    png = RESULTS / "latest.png"
    chart_py = HERE / ".venv" / "bin" / "python"
    cmd = [str(chart_py if chart_py.exists() else sys.executable), str(HERE / "chart.py"), f.name,
           str(png)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    os.unlink(f.name)
    print(f"chart: {png}" if r.returncode == 0 else f"chart failed: {r.stderr[-300:]}")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
