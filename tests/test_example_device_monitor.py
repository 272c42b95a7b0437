"""examples/device_monitor run as a user would (two commands, real processes, real TLS): the
operator sees every device's retained status first, sends a command answered by the service
with verified identities on both sides, sees the resulting live status; the ACL keeps each role
to its own side."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tessera_mq import client as client_sdk
from tessera_mq.client import PermissionDenied

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "device_monitor"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(EXAMPLE / "service.py"),
            "--dir",
            str(tmp_path),
            "--port",
            str(port),
            "--period",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        for line in proc.stdout:
            if line.startswith("ready"):
                break
            assert time.monotonic() < deadline
        else:
            pytest.fail("the example service did not start")
        yield tmp_path, port
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_watch_and_command(service: tuple[Path, int]) -> None:
    directory, port = service
    out = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE / "watch.py"),
            "--dir",
            str(directory),
            "--port",
            str(port),
            "--command",
            "d2",
            "off",
            "--watch",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    lines = [json.loads(x) for x in out.splitlines()]
    retained = [x for x in lines if x.get("retained")]
    assert {x["topic"] for x in retained[:3]} == {
        "status.device.d1",
        "status.device.d2",
        "status.device.d3",
    }
    assert all(x["from"] == "x509:device-service" for x in retained)
    (answer,) = [x for x in lines if "reply" in x]
    assert answer["reply"] == {"ok": True, "device": "d2", "power": "off", "by": "x509:operator"}
    assert answer["answered_by"] == "x509:device-service"
    after = lines[lines.index(answer) + 1 :]
    assert any(
        x["topic"] == "status.device.d2" and x["status"]["power"] == "off" and not x["retained"]
        for x in after
    )


async def test_each_role_is_kept_to_its_side(service: tuple[Path, int]) -> None:
    directory, port = service
    sys.path.insert(0, str(EXAMPLE))
    try:
        from common import OPERATOR, SERVICE, credentials  # noqa: PLC0415
    finally:
        sys.path.remove(str(EXAMPLE))
    url = f"tls://127.0.0.1:{port}"
    async with client_sdk.connect(url, **credentials(directory, OPERATOR)) as op:
        with pytest.raises(PermissionDenied):
            await op.publish("status.device.d1", b"{}", retain=True)
        with pytest.raises(PermissionDenied):
            await op.serve("cmd.device.*").start()
    async with client_sdk.connect(url, **credentials(directory, SERVICE)) as svc:
        with pytest.raises(PermissionDenied):
            await svc.request("cmd.device.d1", b"off")
        with pytest.raises(PermissionDenied):
            await svc.subscribe("status.device.*")
