"""CI's short fuzzing run: every harness in tests/fuzz/ as a subprocess, for a bounded budget.

Each harness runs for ``-runs`` inputs or ``-max_total_time`` seconds, whichever comes first
(about 25 s in all on a 2-vCPU machine), from its seeds, with a fixed ``-seed`` so a failure
reproduces (``TESSERA_FUZZ_SEED`` overrides it). The coverage-guided engine (atheris) is used when
it is installed, the built-in random driver otherwise; one test runs the random driver anyway so
the fallback keeps working. Never skipped. Long runs: docs/fuzzing.md.

The last test is the regression test for the first bug the fuzzing work found (the state machine
in tests/test_protocol_statemachine.py): requests pipelined with a close in one write made
LocalProtocolError escape the broker session (fixed in broker/session.py).
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from brokerproc import BrokerProcess, RawClient, pack, write_config

from tessera_mq.auth.tls import client_context

if TYPE_CHECKING:
    from conftest import PKI

FUZZ_DIR = Path(__file__).resolve().parent / "fuzz"
SEED = os.environ.get("TESSERA_FUZZ_SEED", "1")

#: (harness, runs, seconds): the run budget of each harness in CI.
BUDGETS = [
    ("framing", 3000, 4),
    ("connection", 3000, 6),
    ("tls", 3000, 5),
    ("negotiate", 1500, 5),
]

#: Wall-clock bound for one harness process: start-up (instrumentation, a KDC, certificates)
#: plus its budget, with room for a loaded CI machine.
PROCESS_TIMEOUT_SECONDS = 120


def run_harness(
    name: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(FUZZ_DIR / f"fuzz_{name}.py"), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_SECONDS,
        check=False,
    )


def explain(result: subprocess.CompletedProcess[str], artifacts: Path) -> str:
    found = [
        f"{p.name} (base64): {base64.b64encode(p.read_bytes()).decode()}"
        for p in sorted(artifacts.glob("*-*"))
        if p.is_file()
    ]
    return (
        f"exit {result.returncode}\n"
        + "\n".join(found)
        + "\n--- stdout (tail; atheris prints the Python traceback here) ---\n"
        + "\n".join(result.stdout.splitlines()[-60:])
        + "\n--- stderr (tail) ---\n"
        + "\n".join(result.stderr.splitlines()[-60:])
    )


@pytest.mark.parametrize(("name", "runs", "seconds"), BUDGETS, ids=[b[0] for b in BUDGETS])
def test_harness_short_run(name: str, runs: int, seconds: int, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    result = run_harness(
        name,
        f"-runs={runs}",
        f"-max_total_time={seconds}",
        f"-seed={SEED}",
        f"-artifact_prefix={artifacts}/",
        str(corpus),
    )
    assert result.returncode == 0, explain(result, artifacts)
    assert "seeds" in result.stderr  # the harness checked its seeds before fuzzing


def test_random_engine_fallback(tmp_path: Path) -> None:
    """Without atheris the harnesses still fuzz (deterministic mutation driver)."""
    result = run_harness(
        "connection",
        "-runs=400",
        "-seed=7",
        f"-artifact_prefix={tmp_path}/",
        env={"TESSERA_FUZZ_ENGINE": "random"},
    )
    assert result.returncode == 0, explain(result, tmp_path)
    assert "engine random" in result.stderr
    assert "Done 400 runs" in result.stderr


BOOM = """\
import sys
sys.path.insert(0, {fuzz_dir!r})
import fuzzlib

def test_one_input(data: bytes) -> None:
    if data.startswith(b"boom"):
        raise ValueError("boom found")

fuzzlib.main("boom", test_one_input, lambda: [b"boo"], argv=sys.argv)
"""


@pytest.mark.parametrize("engine", ["default", "random"])
def test_a_crash_fails_the_run_and_replays(engine: str, tmp_path: Path) -> None:
    """The machinery itself: an exception in the target is a non-zero exit, and replaying the
    input file reproduces it (what docs/fuzzing.md tells you to do with an artifact)."""
    harness = tmp_path / "fuzz_boom.py"
    harness.write_text(BOOM.format(fuzz_dir=str(FUZZ_DIR)), encoding="utf-8")
    crash = tmp_path / "crash-input"
    crash.write_bytes(b"boom!")
    env = {**os.environ}
    if engine == "random":
        env["TESSERA_FUZZ_ENGINE"] = "random"
    for input_file, expect_ok in ((crash, False), (tmp_path / "fine", True)):
        if expect_ok:
            input_file.write_bytes(b"fine")
        result = subprocess.run(
            [sys.executable, str(harness), f"-artifact_prefix={tmp_path}/", str(input_file)],
            env=env,
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT_SECONDS,
            check=False,
        )
        if expect_ok:
            assert result.returncode == 0, result.stderr
        else:
            assert result.returncode != 0
            assert "boom found" in result.stdout + result.stderr  # atheris: stdout


# --- regression: requests pipelined with a close -------------------------------------------------


ALLOW_ALL_ACL = """\
[[allow]]
principals = ["*"]
publish = [">"]
subscribe = [">"]
"""


def test_broker_handles_requests_pipelined_with_close(pki: PKI, tmp_path: Path) -> None:
    """hello+close, and sub+pub(ack)+pub+close, each in ONE write: the broker must not log an
    exception, and the publishes sent before the close are still delivered."""
    config = write_config(
        tmp_path,
        cert=pki.server.cert,
        key=pki.server.key,
        client_ca=pki.ca,
        acl=ALLOW_ALL_ACL,
    )
    broker = BrokerProcess.serve(config)
    try:
        alice = pki.clients["alice"]
        ctx = client_context(pki.ca, alice.cert, alice.key)
        close = pack({"op": "close", "code": 0, "reason": "bye"})
        with RawClient(broker.host, broker.port, ctx) as watcher:
            watcher.hello()
            watcher.send(op="sub", sid=1, pattern="pipelined.>")
            ok, _ = watcher.recv_until("ok")
            assert ok.get("sid") == 1
            with RawClient(broker.host, broker.port, ctx) as raw:
                raw.send_raw(pack({"op": "hello", "version": 1, "client": "t"}) + close)
                list(raw.frames())
            with RawClient(broker.host, broker.port, ctx) as raw:
                raw.hello()
                raw.send_raw(
                    pack({"op": "sub", "sid": 5, "pattern": "x.>"})
                    + pack({"op": "pub", "topic": "pipelined.a", "payload": b"1", "ack": 9})
                    + pack({"op": "pub", "topic": "pipelined.b", "payload": b"2"})
                    + close
                )
                list(raw.frames())
            time.sleep(0.3)  # let the broker log what the closes did
            assert broker.unexpected_log_lines() == [], broker.describe()
            got = [watcher.recv_until("msg")[0]["payload"] for _ in range(2)]
            assert got == [b"1", b"2"]
    finally:
        code = broker.stop()
    assert code == 0, broker.describe()
    assert broker.unexpected_log_lines() == [], broker.describe()
