"""bench/scale.py, the many-connections benchmark, at a small size against the REAL deployment
it measures: ``tessera-broker serve --workers 2`` with a real ``redis-server``, mutual TLS with
the bench PKI or Kerberos through the real MIT KDC, several generator processes.

What is asserted is what the figures in docs/performance.md rest on: every connection is
established on the workers (both get some: ``SO_REUSEPORT``), memory and CPU are read from the
worker processes, and every subscriber gets every publication of the fan-out, over Redis for the
subscribers of the other worker. No timing is asserted.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SCALE = REPO / "bench" / "scale.py"

pytestmark = [pytest.mark.slow]


def run_scale(*argv: str, nofile: int | None = None) -> tuple[int, dict[str, Any], str]:
    def limit() -> None:  # lowering one's own hard limit needs no privilege
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = subprocess.run(
        [sys.executable, str(SCALE), *argv, "--json"],
        preexec_fn=limit,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    out = proc.stdout.strip().splitlines()
    return proc.returncode, json.loads(out[-1]) if out else {}, proc.stderr[-3000:]


def check(result: dict[str, Any], n: int, burst: int, log: str) -> None:
    report = f"{result}\n{log}"
    assert result.get("error") is None, report
    e = result["establish"]
    assert e["connections"] == n and e["failed"] == 0, report
    assert len(e["worker_cpu_each"]) == 2, report
    assert all(cpu > 0 for cpu in e["worker_cpu_each"]), report  # both workers did handshakes
    m = result["memory"]
    assert m["broker_rss_held_kb_total"] > m["broker_rss_idle_kb_total"] > 0, report
    assert len(m["worker_fds"]) == 2, report
    assert sum(m["worker_fds"]) >= n, report
    for key, k in (("fanout_one", 1), ("fanout_burst", burst)):
        f = result[key]
        assert f["complete"] and f["received"] == f["expected"] == k * n, report
        assert f["max_ms"] is not None and f["max_ms"] >= f["p99_ms"] >= f["p50_ms"] >= 0, report


def test_mutual_tls_connections_over_two_workers_all_get_every_publication() -> None:
    n, burst = 60, 3
    rc, result, log = run_scale(
        "--conns", str(n), "--workers", "2", "--generators", "2", "--rest", "1",
        "--baseline", "0", "--settle", "0.5", "--burst", str(burst),
    )  # fmt: skip
    assert rc == 0, f"{result}\n{log}"
    check(result, n, burst, log)
    assert result["rest"]["wall_s"] >= 1, result


@pytest.mark.kdc
def test_negotiate_connections_each_authenticate_through_the_kdc() -> None:
    n, burst = 30, 2
    rc, result, log = run_scale(
        "--mode", "negotiate", "--conns", str(n), "--workers", "2", "--rest", "0",
        "--baseline", "0", "--settle", "0.5", "--burst", str(burst),
    )  # fmt: skip
    assert rc == 0, f"{result}\n{log}"
    check(result, n, burst, log)
    # every AP-REQ went through the workers' shared replay cache
    assert result["memory"]["rcache_bytes"] > 0, result


def test_more_connections_than_the_descriptor_limit_allows_is_a_usage_error() -> None:
    rc, result, log = run_scale("--conns", "10000", "--workers", "1", nofile=4096)
    assert rc == 2, log
    assert "hard descriptor limit of 4096: raise --workers" in log
    assert result == {}
    rc, result, log = run_scale(
        "--conns", "10000", "--workers", "3", "--generators", "1", nofile=4096
    )  # fmt: skip
    assert rc == 2, log
    assert "raise --generators" in log
