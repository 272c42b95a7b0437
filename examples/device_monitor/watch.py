"""Command 2 of the device-monitor example: watch device status and send a command.

    python examples/device_monitor/watch.py --command d2 off

Shows the retained status of every device at once (marked ``retained``), then live changes
with the verified identity of their publisher, sends the command as a request and prints the
reply together with the identity of the service that answered it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent.parent)]

from common import DEFAULT_DIR, DEFAULT_PORT, OPERATOR, credentials  # noqa: E402

import tessera_mq.client as tessera  # noqa: E402


async def run(args: argparse.Namespace) -> int:
    url = f"tls://127.0.0.1:{args.port}"
    async with tessera.connect(url, **credentials(args.dir, OPERATOR)) as client:
        status = await client.subscribe("status.device.*")

        async def show() -> None:
            async for msg in status:
                line = {
                    "topic": msg.topic,
                    "status": json.loads(msg.payload),
                    "retained": msg.retained,
                    "from": msg.sender,
                }
                print(json.dumps(line) if args.json else _text(line), flush=True)

        watcher = asyncio.create_task(show())
        await asyncio.sleep(0.5)  # the retained snapshot arrives first
        code = 0
        if args.command:
            device, action = args.command
            try:
                reply = await client.request(f"cmd.device.{device}", action, timeout=5)
            except tessera.NoResponders:
                print("no device service is running", file=sys.stderr)
                code = 3
            else:
                answer = {"reply": json.loads(reply.payload), "answered_by": reply.sender}
                print(json.dumps(answer) if args.json else _text(answer), flush=True)
        await asyncio.sleep(args.watch)
        watcher.cancel()
        return code


def _text(d: dict[str, object]) -> str:
    return "  ".join(f"{k}={v}" for k, v in d.items())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--command", nargs=2, metavar=("DEVICE", "ACTION"), help="e.g. d2 off")
    p.add_argument("--watch", type=float, default=3.0, help="seconds to keep showing status")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
