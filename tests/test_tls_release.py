"""The experimental post-handshake TLS memory release (auth/tls_release.py) is off by default
(the default path imports no ctypes and touches no private memory), and in each opt-in mode
keeps connections fully working: identity, small and large messages both ways, after bursts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from brokerproc import BrokerProcess, write_config

from tessera_mq import client as client_sdk
from tessera_mq.auth import tls

ALLOW_ALL = '[[allow]]\nprincipals = ["*"]\npublish = [">"]\nsubscribe = [">"]\n'


def _probe(env: dict[str, str]) -> dict[str, object]:
    code = (
        "import json, sys, broker.cli, broker.server, auth.tls as t; "
        "print(json.dumps({'ctypes': 'ctypes' in sys.modules, "
        "'release': 'tessera_mq.auth.tls_release' in sys.modules, "
        "'active': t._native is not None, "
        "'all': bool(t._native and t._native.free_peer_certificates)}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TESSERA_TLS_RELEASE"} | env
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_default_path_uses_public_apis_only() -> None:
    assert _probe({}) == {"ctypes": False, "release": False, "active": False, "all": False}
    assert tls._native is None or os.environ.get("TESSERA_TLS_RELEASE")


def test_release_is_available_here_when_asked_for() -> None:
    # CI runs on CPython with the system OpenSSL 3: the opt-in must work there, or the memory
    # figures in docs/performance.md for it do not describe what runs.
    assert _probe({"TESSERA_TLS_RELEASE": "bios"})["active"] is True
    assert _probe({"TESSERA_TLS_RELEASE": "bios"})["all"] is False
    assert _probe({"TESSERA_TLS_RELEASE": "all"})["all"] is True


@pytest.mark.parametrize("mode", ["bios", "all", "off"])
async def test_connections_work_in_every_release_mode(mode: str, tmp_path: Path, pki: Any) -> None:
    config = write_config(
        tmp_path / mode,
        cert=pki.server.cert,
        key=pki.server.key,
        client_ca=pki.ca,
        acl=ALLOW_ALL,
        limits={"max_frame_bytes": 2 * 1024 * 1024},
    )
    broker = BrokerProcess.serve(config, env={"TESSERA_TLS_RELEASE": mode})
    try:
        async with (
            client_sdk.connect(broker.url, **pki.client("alice"), timeout=10) as alice,
            client_sdk.connect(broker.url, **pki.client("bob"), timeout=10) as bob,
        ):
            assert alice.identity == "x509:alice" and bob.identity == "x509:bob"
            sub = await bob.subscribe("r.>")
            big = bytes(range(256)) * 4096  # 1 MiB: grows the BIOs past the swap threshold
            for payload in (b"small", big, b"after the burst", big, b"end"):
                await alice.publish("r.x", payload)
                got = await sub.get(timeout=10)
                assert got.payload == payload
            back = await alice.subscribe("back")
            await bob.publish("back", big)
            assert (await back.get(timeout=10)).payload == big
    finally:
        assert broker.stop() == 0
