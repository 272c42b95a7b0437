"""History and recovery against REAL broker processes: a subscriber whose connection is cut
(a real TCP proxy drops it) resumes automatically and receives exactly what was published
meanwhile, in order, with no duplicate; after a broker restart (history is in memory: a new
epoch) it is told explicitly that it has a gap; topics without history are unaffected."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from pathlib import Path
from typing import Any

from brokerproc import BrokerProcess, write_config

from tessera_mq import client as client_sdk
from tessera_mq.client import HistoryGap, Reconnect

TIMEOUT = 10.0
FAST = Reconnect(initial_delay=0.05, max_delay=0.3)
ALLOW_ALL = '[[allow]]\nprincipals = ["*"]\npublish = [">"]\nsubscribe = [">"]\n'
HISTORY = '\n[messaging]\nhistory = [{pattern = "events.>", max_messages = 100}]\n'


class Proxy:
    """A TCP forwarder on 127.0.0.1 whose connections the test can cut at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_w]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    def cut(self) -> None:
        for w in self.writers:
            with contextlib.suppress(OSError):
                w.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(directory: Path, pki: Any, port: int) -> Path:
    cfg = write_config(
        directory,
        cert=pki.server.cert,
        key=pki.server.key,
        client_ca=pki.ca,
        acl=ALLOW_ALL,
        bind=f"127.0.0.1:{port}",
    )
    cfg.write_text(cfg.read_text(encoding="utf-8") + HISTORY, encoding="utf-8")
    return cfg


def connect(url: str, pki: Any, name: str, **kw: Any) -> client_sdk.connect:
    return client_sdk.connect(
        url, **pki.client(name), timeout=TIMEOUT, server_hostname="localhost", **kw
    )


async def test_resume_after_a_cut_connection_gets_exactly_what_was_missed(
    broker_factory: Any, pki: Any, tmp_path: Path
) -> None:
    port = _free_port()
    broker = broker_factory.serve(_config(tmp_path / "b", pki, port))
    proxy = Proxy(port)
    proxy_port = await proxy.start()
    gaps: list[HistoryGap] = []
    try:
        async with (
            connect(broker.url, pki, "alice") as pub,
            connect(f"tls://127.0.0.1:{proxy_port}", pki, "bob", reconnect=FAST) as sub_client,
        ):
            assert "history" in (sub_client.welcome.features or ())
            sub = await sub_client.subscribe("events.>", on_gap=gaps.append)
            for i in range(10):
                await pub.publish(f"events.e{i % 3}", str(i).encode())
            got = [int((await sub.get(timeout=TIMEOUT)).payload) for _ in range(10)]
            assert got == list(range(10))
            proxy.cut()
            for i in range(10, 60):  # published while bob is disconnected
                await pub.publish(f"events.e{i % 3}", str(i).encode())
            for i in range(60, 70):  # and some after, racing the resumption
                await pub.publish(f"events.e{i % 3}", str(i).encode())
                await asyncio.sleep(0.01)
            rest = []
            while len(rest) < 60:
                m = await sub.get(timeout=TIMEOUT)
                rest.append(int(m.payload))
            assert rest == list(range(10, 70))  # all, in order, no duplicate
            assert sub_client.reconnects >= 1
            assert gaps == []
            with contextlib.suppress(TimeoutError):
                extra = await sub.get(timeout=0.3)
                raise AssertionError(f"duplicate or stray delivery {extra}")
    finally:
        await proxy.close()


async def test_a_broker_restart_is_an_explicit_gap(
    broker_factory: Any, pki: Any, tmp_path: Path
) -> None:
    port = _free_port()
    cfg = _config(tmp_path / "b", pki, port)
    broker: BrokerProcess = broker_factory.serve(cfg)
    gaps: list[HistoryGap] = []
    errors: list[Exception] = []
    url = f"tls://127.0.0.1:{port}"
    async with connect(url, pki, "bob", reconnect=FAST, on_error=errors.append) as client:
        sub = await client.subscribe("events.>", on_gap=gaps.append)
        async with connect(url, pki, "alice", reconnect=False) as pub:
            await pub.publish("events.a", b"1")
        first = await sub.get(timeout=TIMEOUT)
        old_epoch = first.epoch
        assert first.seq == 1 and old_epoch
        assert broker.stop() == 0
        broker = broker_factory.serve(cfg)
        for _ in range(200):
            if gaps:
                break
            await asyncio.sleep(0.05)
        assert len(gaps) == 1, gaps
        assert gaps[0].epoch != old_epoch
        assert sub.gaps == 1
        assert any(isinstance(e, HistoryGap) for e in errors)
        async with connect(url, pki, "alice", reconnect=False) as pub:
            await pub.publish("events.a", b"2")
        after = await sub.get(timeout=TIMEOUT)
        assert (after.payload, after.seq, after.epoch) == (b"2", 1, gaps[0].epoch)


async def test_since_on_the_command_line_replays_the_history(
    broker_factory: Any, pki: Any, tmp_path: Path
) -> None:
    port = _free_port()
    broker = broker_factory.serve(_config(tmp_path / "b", pki, port))
    async with connect(broker.url, pki, "alice") as pub:
        for i in range(5):
            await pub.publish("events.x", str(i).encode())
    creds = pki.client("bob")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tessera_mq.client.cli",
        "sub",
        "events.>",
        "--since",
        "2",
        "-n",
        "3",
        "--json",
        "--url",
        broker.url,
        "--server-name",
        "localhost",
        "--ca",
        str(creds["ca"]),
        "--cert",
        str(creds["cert"]),
        "--key",
        str(creds["key"]),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT * 2)
    assert proc.returncode == 0
    lines = [json.loads(x) for x in out.decode().splitlines()]
    assert [(x["payload"], x["seq"]) for x in lines] == [("2", 3), ("3", 4), ("4", 5)]
