"""The workers supervisor's crash-loop guard (docs/scaling.md, "Workers": exit code 3).

A worker that dies is restarted; more than 5 worker exits within 60 s and the supervisor stops
every worker and exits 3, so that systemd (or whoever runs it) sees a failed service instead of
a machine that restarts broker processes forever. The workers are killed for real (SIGKILL),
as a crash or the OOM killer would.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from brokerproc import BrokerProcess
from redisproc import RedisProcess
from timing import scaled

TIMEOUT = scaled(20.0)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> set[int]:
    """Live child processes of ``pid`` (from /proc: no psutil needed)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces and parentheses
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry.name))
    return out


def wait_for_new_worker(supervisor: int, known: set[int]) -> int:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        new = children(supervisor) - known
        if new:
            return min(new)
        time.sleep(0.05)
    raise AssertionError(f"no replacement worker appeared (known {sorted(known)})")


def test_a_crash_loop_stops_every_worker_and_exits_3(
    broker_factory: Any, redis_server: RedisProcess
) -> None:
    cfg: Path = broker_factory.config()
    with cfg.open("a", encoding="utf-8") as f:
        f.write(f'\n[cluster]\nredis = "{redis_server.url}"\n')
    proc = broker_factory.track(
        BrokerProcess(["serve", "--config", str(cfg), "--workers", "2"], workdir=cfg.parent)
    ).start()
    proc.wait_for_log(r"2 workers listening \(pids")
    supervisor = proc.pid
    seen = children(supervisor)
    assert len(seen) == 2, seen
    victim = min(seen)
    # Five exits are tolerated: each is logged and the worker comes back.
    for n in range(1, 6):
        os.kill(victim, signal.SIGKILL)
        proc.wait_for_log(rf"worker \d \(pid {victim}\) exited with -9; restarting it")
        assert proc.running, f"the supervisor gave up after {n} exit(s)"
        victim = wait_for_new_worker(supervisor, seen)
        seen.add(victim)
    # The sixth within the window trips the guard.
    healthy = children(supervisor) - {victim}
    assert len(healthy) == 1, healthy
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=TIMEOUT) == 3
    assert "6 worker exits within 60 s: giving up" in proc.log()
    (other,) = healthy  # stopped with the supervisor, not left running as an orphan
    assert not alive(other), other
