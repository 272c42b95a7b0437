"""``tessera pub --retain``, ``sub --group``, ``req`` and ``reply`` as real processes against a
real broker over mutual TLS: what they print, and their distinct exit codes (8 no responders,
7 no reply in time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from brokerproc import REPO_ROOT, BrokerProcess, RawClient

from tessera_mq.auth.tls import client_context

ALLOW_ALL = '[[allow]]\nprincipals = ["*"]\npublish = [">"]\nsubscribe = [">"]\n'


def tessera(broker: BrokerProcess, pki: Any, *args: str) -> list[str]:
    creds = pki.client("alice")
    return [
        sys.executable,
        "-m",
        "tessera_mq.client.cli",
        *args,
        "--url",
        broker.url,
        "--ca",
        str(creds["ca"]),
        "--cert",
        str(creds["cert"]),
        "--key",
        str(creds["key"]),
    ]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def run(broker: BrokerProcess, pki: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tessera(broker, pki, *args),
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
        check=False,
    )


def start(factory: Any, tmp_path: Path) -> BrokerProcess:
    cfg: Path = factory.config(acl=ALLOW_ALL)
    store = json.dumps(str(tmp_path / "store"))
    cfg.write_text(f"data_dir = {store}\n" + cfg.read_text(encoding="utf-8"), encoding="utf-8")
    return factory.serve(cfg)


def test_pub_retain_then_sub_sees_it_marked(broker_factory: Any, pki: Any, tmp_path: Path) -> None:
    broker = start(broker_factory, tmp_path)
    out = run(broker, pki, "pub", "--retain", "--json", "status.d1", "on")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["retained"] is True
    sub = run(broker, pki, "sub", "status.>", "-n", "1", "--json")
    assert sub.returncode == 0, sub.stderr
    assert json.loads(sub.stdout) == {"topic": "status.d1", "payload": "on", "retained": True}


def test_req_without_responders_exits_8(broker_factory: Any, pki: Any, tmp_path: Path) -> None:
    broker = start(broker_factory, tmp_path)
    out = run(broker, pki, "req", "cmd.x", "hi")
    assert out.returncode == 8
    assert "no responders" in out.stderr
    as_json = run(broker, pki, "req", "cmd.x", "hi", "--json")
    assert as_json.returncode == 8
    assert json.loads(as_json.stderr)["error"]["kind"] == "no_responders"


def test_reply_echo_and_static_answer_req(broker_factory: Any, pki: Any, tmp_path: Path) -> None:
    broker = start(broker_factory, tmp_path)
    for mode, expected in ((["--echo"], "hello"), (["--data", "fixed"], "fixed")):
        server = subprocess.Popen(
            tessera(broker, pki, "reply", "cmd.>", *mode, "-n", "1", "--json"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
        )
        try:
            deadline = time.monotonic() + 20
            while True:  # until the responder is subscribed
                out = run(broker, pki, "req", "cmd.x", "hello", "--json")
                if out.returncode != 8 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert out.returncode == 0, out.stderr
            answer = json.loads(out.stdout)
            assert (answer["payload"], answer["sender"]) == (expected, "x509:alice")
            served, _ = server.communicate(timeout=20)
            assert json.loads(served) == {
                "topic": "cmd.x",
                "sender": "x509:alice",
                "payload": "hello",
            }
            assert server.returncode == 0
        finally:
            if server.poll() is None:
                server.kill()
                server.communicate()


def test_req_timeout_exits_7(broker_factory: Any, pki: Any, tmp_path: Path) -> None:
    broker = start(broker_factory, tmp_path)
    # A responder that never answers: a raw serving subscription that reads nothing.
    cred = pki.clients["bob"]
    with RawClient(broker.host, broker.port, client_context(pki.ca, cred.cert, cred.key)) as raw:
        raw.hello()
        raw.send(op="sub", sid=1, pattern="cmd.>", serve=True)
        assert raw.recv() == {"op": "ok", "sid": 1}
        out = run(broker, pki, "req", "cmd.x", "hi", "--wait", "0.5")
        assert out.returncode == 7, out.stderr
        assert "no reply" in out.stderr


def test_sub_group_members_share(broker_factory: Any, pki: Any, tmp_path: Path) -> None:
    broker = start(broker_factory, tmp_path)
    members = [
        subprocess.Popen(
            tessera(broker, pki, "sub", "jobs.>", "--group", "w", "-n", "2", "--raw"),
            stdout=subprocess.PIPE,
            text=True,
            env=env(),
        )
        for _ in range(2)
    ]
    try:
        time.sleep(3.0)  # both subscribed (each exits after its 2 messages)
        for i in range(4):
            assert run(broker, pki, "pub", f"jobs.j{i}", str(i)).returncode == 0
        outs = [m.communicate(timeout=20)[0].split() for m in members]
        assert sorted(outs[0] + outs[1]) == ["0", "1", "2", "3"]
        assert all(m.returncode == 0 for m in members)
    finally:
        for m in members:
            if m.poll() is None:
                m.kill()
                m.communicate()
