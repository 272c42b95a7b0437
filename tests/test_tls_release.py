"""The broker's post-handshake TLS memory release (auth/tls.py ``_Native``) in each mode keeps
connections fully working: identity, small and large messages both ways, after bursts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from brokerproc import BrokerProcess, write_config

import client_sdk
from auth import tls

ALLOW_ALL = '[[allow]]\nprincipals = ["*"]\npublish = [">"]\nsubscribe = [">"]\n'


def test_release_is_available_here() -> None:
    # CI runs on CPython with the system OpenSSL 3: the default mode must be active there, or
    # the memory figures in docs/performance.md do not describe what runs.
    assert tls._native is not None
    assert tls._native.free_peer_certificates is False  # "all" is opt-in


@pytest.mark.parametrize("mode", ["bios", "all", "0"])
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
