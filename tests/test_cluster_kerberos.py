"""A captured Kerberos AP-REQ replayed to another broker process (REAL KDC, REAL brokers).

MIT's ``file2`` replay cache is safe for concurrent processes: processes that use the same file
refuse an authenticator any of them has seen. ``serve --workers N`` points every worker at one
such file (``KRB5RCACHENAME``), so a replay to a second worker is refused. Processes with
separate caches (another node: MIT has no network replay cache) accept the replay once: the
last test pins that down, as docs/scaling.md states it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from brokerproc import BrokerProcess
from kdc import KDC
from redisproc import RedisProcess

from tessera_mq.auth.negotiate import Kerberos, NegotiateClientLayer

pytestmark = pytest.mark.kdc

HOST = "localhost"
SERVICE = "replaytest"
PASSWORD = "Replay-krb-7Gh2w!"
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def keytab(kdc: KDC, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("replay-realm")
    kdc.add_principal(f"{SERVICE}/{HOST}")
    kdc.add_principal("replayer", PASSWORD)
    return kdc.export_keytab(directory / "broker.keytab", [f"{SERVICE}/{HOST}"])


def write_config(directory: Path, kdc: KDC, keytab: Path, redis: RedisProcess | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    acl = directory / "acl.toml"
    acl.write_text('[[allow]]\nprincipals = ["*"]\npublish = [">"]\nsubscribe = [">"]\n')
    lines = [
        "[[listeners]]",
        'bind = "127.0.0.1:0"',
        'security = "negotiate"',
        f"service_principal = {json.dumps(f'{SERVICE}/{HOST}@{kdc.realm}')}",
        f"keytab = {json.dumps(str(keytab))}",
        "",
        "[acl]",
        f"file = {json.dumps(str(acl))}",
    ]
    if redis is not None:
        lines += ["", "[cluster]", f"redis = {json.dumps(redis.url)}"]
    path = directory / "broker.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def captured_ap_req() -> bytes:
    """The bytes a client sends first: the SPNEGO token with the AP-REQ in its record."""
    layer = NegotiateClientLayer(HOST, SERVICE, credential=Kerberos("replayer", password=PASSWORD))
    layer.start()
    return layer.data_to_send()


def send(port: int, data: bytes) -> None:
    """Send the captured bytes and wait for the broker's verdict (its reply token, or an error
    record and the close) before hanging up."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        with contextlib.suppress(ConnectionResetError):
            sock.recv(65536)


def verdicts(procs: list[BrokerProcess], marks: list[int], n: int) -> list[str]:
    """The first ``n`` handshake outcomes (``auth_success``/``auth_failure``) across ``procs``."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        seen = [
            e["event"]
            for p, m in zip(procs, marks, strict=True)
            for e in p.audit_events(m)
            if e["event"] in ("auth_success", "auth_failure")
        ]
        if len(seen) >= n or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def test_replay_to_another_worker_is_refused(
    kdc: KDC,
    keytab: Path,
    redis_server: RedisProcess,
    broker_factory: Any,
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "workers", kdc, keytab, redis_server)
    # The operator's environment names no replay cache: the supervisor picks one file for all.
    env = {k: v for k, v in kdc.env().items() if k != "KRB5RCACHENAME"}
    proc = broker_factory.track(
        BrokerProcess(
            ["serve", "--config", str(config), "--workers", "2"], workdir=config.parent, env=env
        )
    ).start()
    mark = proc.log_mark()
    token = captured_ap_req()
    # The kernel spreads connections over the workers by a hash of the address pair: send the
    # token in rounds of 8 until both workers have seen it (8 in a row on one worker happen
    # once in 128 rounds), at most 8 rounds.
    sent = 0
    workers_seen: set[str] = set()
    while workers_seen != {"0", "1"} and sent < 64:
        for _ in range(8):
            send(proc.port, token)
        sent += 8
        verdicts([proc], [mark], sent)
        workers_seen = {
            line.split("[worker ")[1][0]
            for line in proc.log_lines()[mark:]
            if "tessera.audit" in line and "auth_" in line
        }
    outcomes = verdicts([proc], [mark], sent)
    assert outcomes.count("auth_success") == 1, outcomes
    assert outcomes.count("auth_failure") == sent - 1, outcomes
    assert workers_seen == {"0", "1"}  # both workers saw the token: the cache is shared
    assert (Path(env["KRB5RCACHEDIR"]) / f"tessera_krb5_{os.geteuid()}.rcache2").is_file()


def test_replay_to_a_process_with_its_own_replay_cache_is_accepted_once(
    kdc: KDC, keytab: Path, broker_factory: Any, tmp_path: Path
) -> None:
    """Two nodes never share an MIT replay cache: the documented limit (docs/scaling.md)."""
    procs = []
    for name in ("node-a", "node-b"):
        rcache = tmp_path / name / "rcache"
        rcache.mkdir(parents=True)
        config = write_config(tmp_path / name, kdc, keytab, None)
        procs.append(
            broker_factory.track(
                BrokerProcess(
                    ["serve", "--config", str(config)],
                    workdir=config.parent,
                    env=kdc.env(KRB5RCACHEDIR=str(rcache)),
                )
            ).start()
        )
    marks = [p.log_mark() for p in procs]
    token = captured_ap_req()
    send(procs[0].port, token)
    send(procs[0].port, token)  # the same process: refused
    send(procs[1].port, token)  # another node's cache never saw it: accepted
    a = verdicts([procs[0]], [marks[0]], 2)
    b = verdicts([procs[1]], [marks[1]], 1)
    assert a == ["auth_success", "auth_failure"]
    assert b == ["auth_success"]
