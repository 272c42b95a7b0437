"""The pre-authentication flood of issue 13 against a REAL broker and the REAL test KDC.

100 connections from another loopback address (127.0.0.2) send the worst-case first token (krb5
and ~5,400 dummy OIDs in 64 KiB) as fast as the broker answers them, while a good Kerberos client
connects and an open session publishes to itself. The harness is bench/negotiate_flood.py (its
``run``), with small counts; the broker runs on CPU 0 and the flood (niced) and this process on
CPU 1, so what is measured is the broker, not this process starved by the flood.

What is asserted, and why (the machine is a shared 2-core VM):

* the flood really ran (hundreds of worst-case tokens answered);
* a good client connects in under 100 ms (median of 10), and none takes a second (before the
  fix: timeouts after 12 s);
* the open session's publish-to-delivery latency under flood: median under 25 ms and p99 under
  250 ms (before: 36-1325 ms, and heartbeats lost; unloaded here: p50 ~0.3 ms, p99 3-18 ms,
  loaded p50 0.5-11 ms, p99 24-56 ms in the runs behind docs/performance.md). The strict
  "loaded p99 within 2x of unloaded p99" is what bench/negotiate_flood.py reports
  (docs/performance.md); on this VM it holds in some runs only: the flood's closed loop keeps
  the broker's single event loop busy with accept/read/close and audit lines, so a p99 sample
  waits for a loop turn of flood events (a few ms), and unloaded p99 itself swings 3-18 ms;
* right after the flood stops a good client connects in under 100 ms: no queued work for
  connections that are gone;
* the handshake pool refused excess steps of the flooding address early, and counted them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from kdc import KDC

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import negotiate_flood

pytestmark = [pytest.mark.kdc, pytest.mark.slow]


def test_flood_of_worst_case_tokens_does_not_deny_service(kdc: KDC, tmp_path: Path) -> None:
    result = negotiate_flood.run(
        kdc, tmp_path, connections=100, connects=10, messages=150, interval=0.005, pin=True
    )
    report = f"flood report: {result}"
    assert result["unexpected_log_lines"] == [], report
    assert result["token_bytes"] > 60_000 and result["token_mechanisms"] > 4999, report
    assert result["flood"]["connections"] >= 300, report
    loaded, unloaded = result["loaded"], result["unloaded"]
    assert loaded["connect_median_ms"] < 100, report
    assert loaded["connect_max_ms"] < 1000, report
    assert loaded["latency_p50_ms"] < 25, report
    assert unloaded["latency_p50_ms"] < 25, report
    assert loaded["latency_p99_ms"] < 250, report
    assert result["first_connect_after_flood_ms"] < 100, report
    broker = result["broker"]
    assert broker["handshake_pool_submitted"] >= result["flood"]["connections"] // 2, report
    assert broker.get("handshake_pool_refused_source", 0) == broker.get(
        "handshakes_refused_busy", 0
    ), report
