"""Command 1 of the device-monitor example: the broker and the device service.

    python examples/device_monitor/service.py

Starts a broker (a child process, with SQLite-backed retained values in ``data/store``) and a
service that keeps a retained ``status.device.<id>`` per device and serves commands on
``cmd.device.<id>`` (``on``, ``off``, ``reboot``) in the queue group ``device-service``, so
several copies of this service share the commands. Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent)]  # run from a checkout without installing

from common import DEFAULT_DIR, DEFAULT_PORT, SERVICE, credentials, ensure_setup  # noqa: E402

import tessera_mq.client as tessera  # noqa: E402

log = logging.getLogger("device-service")

DEVICES = ("d1", "d2", "d3")


class Devices:
    def __init__(self) -> None:
        self.state = {d: {"power": "on", "temp": 21.0, "boots": 1} for d in DEVICES}

    def status(self, device: str) -> bytes:
        return json.dumps({"device": device, **self.state[device]}).encode()

    def command(self, device: str, action: str) -> dict[str, object]:
        if device not in self.state:
            return {"ok": False, "error": f"unknown device {device!r}"}
        s = self.state[device]
        if action in ("on", "off"):
            s["power"] = action
        elif action == "reboot":
            s["boots"] = int(s["boots"]) + 1  # type: ignore[call-overload]
            s["power"] = "on"
        else:
            return {"ok": False, "error": f"unknown action {action!r}"}
        return {"ok": True, "device": device, "power": s["power"]}


async def run_service(url: str, directory: Path, period: float) -> None:
    devices = Devices()
    async with tessera.connect(url, **credentials(directory, SERVICE)) as client:
        for d in DEVICES:
            await client.publish(f"status.device.{d}", devices.status(d), retain=True)

        async def telemetry() -> None:
            while True:
                await asyncio.sleep(period)
                d = random.choice(DEVICES)  # noqa: S311 - demo data
                devices.state[d]["temp"] = round(20 + random.random() * 5, 1)  # noqa: S311
                await client.publish(f"status.device.{d}", devices.status(d), retain=True)

        task = asyncio.create_task(telemetry())
        print("ready: serving cmd.device.* as", client.identity, flush=True)
        try:
            async for req in client.serve("cmd.device.*", group="device-service"):
                device = req.topic.rsplit(".", 1)[1]
                action = req.payload.decode("utf-8", "replace").strip()
                # req.sender is the requester's identity as the broker authenticated it.
                log.info("command %r for %s from %s", action, device, req.sender)
                result = devices.command(device, action)
                result["by"] = req.sender
                await req.respond(json.dumps(result).encode())
                if result["ok"]:
                    await client.publish(
                        f"status.device.{device}", devices.status(device), retain=True
                    )
        finally:
            task.cancel()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="certificates, config, store")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--period", type=float, default=2.0, help="seconds between status updates")
    p.add_argument("--join", metavar="URL", help="serve on a running broker, start none")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.join:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_service(args.join, args.dir, args.period))
        return 0
    config = ensure_setup(args.dir, args.port)
    broker = subprocess.Popen(  # noqa: S603 - our own interpreter and config
        [sys.executable, "-m", "tessera_mq.broker.cli", "serve", "--config", str(config)],
        cwd=HERE.parent.parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert broker.stdout is not None
        for line in broker.stdout:
            if line.startswith("listening "):
                url = line.split()[1]
                break
        else:
            print("the broker did not start", file=sys.stderr)
            return 1
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_service(url, args.dir, args.period))
        return 0
    finally:
        broker.terminate()
        broker.wait(timeout=15)


if __name__ == "__main__":
    sys.exit(main())
