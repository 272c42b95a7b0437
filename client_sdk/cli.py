"""``tessera``: publish, subscribe, request and reply from the command line (like
``mosquitto_pub``/``nats sub``/``nats req``/``nats reply``).

Exit codes: 0 success; 1 the broker refused (authentication, permission, invalid topic) or the
connection failed; 2 usage error; 3 ``req``: no responders; 4 ``req``: no reply in time;
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

from auth.credentials import NTLM, Kerberos
from client_sdk.client import Client, Delivery, connect
from client_sdk.protocol.errors import NoResponders, RequestTimeout, TesseraError

__all__ = ["main"]

DEFAULT_URL = "tls://127.0.0.1:7443"
DEFAULT_DEV_DIR = Path("tessera-dev")
DEV_CLIENT = "dev"

#: ``tessera req`` exit codes beyond the common ones.
EXIT_NO_RESPONDERS = 3
EXIT_REQUEST_TIMEOUT = 4


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument(
        "--url",
        default=os.environ.get("TESSERA_URL", DEFAULT_URL),
        help=f"broker URL (default: $TESSERA_URL or {DEFAULT_URL})",
    )
    g.add_argument(
        "--ca", type=Path, help="CA certificate (PEM) that signed the broker's certificate"
    )
    g.add_argument("--cert", type=Path, help="client certificate (PEM)")
    g.add_argument("--key", type=Path, help="client private key (PEM)")
    g.add_argument(
        "--server-name", help="name to verify in the broker's certificate (default: URL host)"
    )
    g.add_argument(
        "--dev",
        action="store_true",
        help="use the credentials made by `tessera-broker serve --dev`",
    )
    g.add_argument(
        "--dev-dir",
        type=Path,
        default=Path(os.environ.get("TESSERA_DEV_DIR", DEFAULT_DEV_DIR)),
        help="where the dev credentials are (default: ./tessera-dev)",
    )
    g.add_argument("--timeout", type=float, default=10.0, help="connect timeout in seconds")
    k = p.add_argument_group(
        "Kerberos / NTLM (negotiate:// and tls+negotiate:// URLs)",
        "Without these flags the default Kerberos credential cache is used (kinit).",
    )
    k.add_argument("--principal", help="Kerberos principal, e.g. alice@EXAMPLE.COM")
    k.add_argument("--keytab", type=Path, help="get the Kerberos ticket with this keytab")
    k.add_argument("--ccache", help="Kerberos credential cache (e.g. FILE:/tmp/krb5cc_alice)")
    k.add_argument(
        "--ntlm-user", metavar="DOMAIN\\USER", help="authenticate with NTLM as this user"
    )
    k.add_argument(
        "--password-env",
        metavar="VAR",
        help="read the Kerberos or NTLM password from this environment variable "
        "(never from the command line, where other users could see it)",
    )
    k.add_argument(
        "--service",
        default="tessera",
        help="service name of the broker principal (default: tessera)",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tessera", description="Publish to and subscribe on a Tessera broker."
    )
    p.add_argument("--version", action="version", version="tessera 0.1.0")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "sub",
        help="subscribe and print messages",
        description="Subscribe to PATTERN ('*' = one token, '>' = the rest) and print messages.",
    )
    s.add_argument("pattern", nargs="+", metavar="PATTERN")
    s.add_argument("-n", "--count", type=int, default=0, help="exit after N messages")
    s.add_argument("--json", action="store_true", help="one JSON object per message")
    s.add_argument("--raw", action="store_true", help="print payloads only")
    s.add_argument(
        "--group", metavar="NAME", help="join queue group NAME: each message to one member"
    )
    s.add_argument(
        "--since",
        type=int,
        metavar="SEQ",
        help="start from the broker's history after sequence number SEQ",
    )
    _common(s)

    pb = sub.add_parser(
        "pub",
        help="publish a message",
        description="Publish DATA on TOPIC ('-' reads DATA from standard input).",
    )
    pb.add_argument("topic", metavar="TOPIC")
    pb.add_argument("data", metavar="DATA")
    pb.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="add a header (repeatable)",
    )
    pb.add_argument("--no-ack", action="store_true", help="do not wait for the broker to confirm")
    pb.add_argument(
        "--retain",
        action="store_true",
        help="keep as the topic's last value for later subscribers (empty DATA clears it)",
    )
    pb.add_argument("--json", action="store_true", help="print the result as JSON")
    _common(pb)

    rq = sub.add_parser(
        "req",
        help="send a request and print the reply",
        description="Send DATA as a request on TOPIC and print the first reply. Exit code 3: "
        "nobody serves TOPIC; 4: no reply within --wait seconds.",
    )
    rq.add_argument("topic", metavar="TOPIC")
    rq.add_argument("data", metavar="DATA", nargs="?", default="")
    rq.add_argument(
        "--wait", type=float, default=5.0, metavar="SECONDS", help="reply timeout (default 5)"
    )
    rq.add_argument("--json", action="store_true", help="print the reply as JSON")
    _common(rq)

    rp = sub.add_parser(
        "reply",
        help="answer requests",
        description="Serve requests on PATTERN: answer each with DATA, or echo it (--echo).",
    )
    rp.add_argument("pattern", metavar="PATTERN")
    what = rp.add_mutually_exclusive_group(required=True)
    what.add_argument("--echo", action="store_true", help="answer with the request's payload")
    what.add_argument("--data", metavar="DATA", help="answer every request with DATA")
    rp.add_argument("--group", metavar="NAME", help="share requests with other members of NAME")
    rp.add_argument("-n", "--count", type=int, default=0, help="exit after N requests")
    rp.add_argument("--json", action="store_true", help="one JSON object per request")
    _common(rp)
    return p


def _credentials(args: argparse.Namespace) -> dict[str, Any]:
    ca, cert, key = args.ca, args.cert, args.key
    if args.dev:
        d: Path = args.dev_dir
        ca = ca or d / "ca.pem"
        cert = cert or d / f"{DEV_CLIENT}.pem"
        key = key or d / f"{DEV_CLIENT}-key.pem"
    for flag, path in (("--ca", ca), ("--cert", cert), ("--key", key)):
        if path is not None and not Path(path).is_file():
            hint = " (start `tessera-broker serve --dev` first)" if args.dev else ""
            raise FileNotFoundError(f"{flag}: {path} does not exist{hint}")
    creds: dict[str, Any] = {
        "ca": ca,
        "cert": cert,
        "key": key,
        "server_hostname": args.server_name,
    }
    if "negotiate" in args.url.split("://", 1)[0]:
        creds["auth"] = _negotiate_credential(args)
        creds["service"] = args.service
        creds.pop("cert")
        creds.pop("key")
    return creds


def _negotiate_credential(args: argparse.Namespace) -> Kerberos | NTLM:
    password = None
    if args.password_env:
        password = os.environ.get(args.password_env)
        if password is None:
            raise ValueError(f"--password-env: ${args.password_env} is not set")
    if args.ntlm_user:
        if password is None:
            raise ValueError("--ntlm-user needs --password-env")
        return NTLM(args.ntlm_user, password)
    if password is not None and not args.principal:
        raise ValueError("--password-env with Kerberos needs --principal")
    return Kerberos(
        principal=args.principal,
        password=password,
        keytab=args.keytab,
        ccache=args.ccache,
    )


def _format(msg: Delivery, args: argparse.Namespace) -> str:
    if args.json:
        obj: dict[str, Any] = {"topic": msg.topic}
        try:
            obj["payload"] = msg.payload.decode("utf-8")
        except UnicodeDecodeError:
            obj["payload_base64"] = base64.b64encode(msg.payload).decode("ascii")
        if msg.headers:
            obj["headers"] = dict(msg.headers)
        if msg.retained:
            obj["retained"] = True
        if msg.sender is not None:
            obj["sender"] = msg.sender
        if msg.seq is not None:
            obj["seq"] = msg.seq
            obj["epoch"] = msg.epoch
        return json.dumps(obj, ensure_ascii=False)
    text = msg.payload.decode("utf-8", "backslashreplace")
    return text if args.raw else f"{msg.topic} {text}"


async def _sub(client: Client, args: argparse.Namespace) -> int:
    subs = [await client.subscribe(p, group=args.group, since=args.since) for p in args.pattern]
    queue: asyncio.Queue[Delivery | None] = asyncio.Queue()

    async def pump(sub: Any) -> None:
        async for msg in sub:
            await queue.put(msg)
        await queue.put(None)

    tasks = [asyncio.create_task(pump(s)) for s in subs]
    received = 0
    try:
        while True:
            msg = await queue.get()
            if msg is None:
                break
            print(_format(msg, args), flush=True)
            received += 1
            if args.count and received >= args.count:
                break
    finally:
        for t in tasks:
            t.cancel()
    # A subscription ended by the broker raises from the pump task; surface it.
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    return 0


async def _pub(client: Client, args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if args.data == "-" else args.data.encode("utf-8")
    headers: dict[str, str] = {}
    for h in args.header:
        k, sep, v = h.partition("=")
        if not sep or not k:
            raise ValueError(f"--header {h!r}: expected KEY=VALUE")
        headers[k] = v
    await client.publish(
        args.topic, data, headers=headers or None, ack=not args.no_ack, retain=args.retain
    )
    if args.json:
        print(
            json.dumps(
                {
                    "topic": args.topic,
                    "bytes": len(data),
                    "acknowledged": not args.no_ack,
                    "retained": args.retain,
                }
            )
        )
    return 0


def _payload_json(payload: bytes) -> dict[str, str]:
    try:
        return {"payload": payload.decode("utf-8")}
    except UnicodeDecodeError:
        return {"payload_base64": base64.b64encode(payload).decode("ascii")}


async def _req(client: Client, args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if args.data == "-" else args.data.encode("utf-8")
    try:
        reply = await client.request(args.topic, data, timeout=args.wait)
    except NoResponders as exc:
        print(f"tessera: no responders: {exc}", file=sys.stderr)
        return EXIT_NO_RESPONDERS
    except RequestTimeout as exc:
        print(f"tessera: no reply: {exc}", file=sys.stderr)
        return EXIT_REQUEST_TIMEOUT
    if args.json:
        obj: dict[str, Any] = {"topic": args.topic, **_payload_json(reply.payload)}
        obj["sender"] = reply.sender
        if reply.headers:
            obj["headers"] = dict(reply.headers)
        print(json.dumps(obj, ensure_ascii=False), flush=True)
    else:
        print(reply.payload.decode("utf-8", "backslashreplace"), flush=True)
    return 0


async def _reply(client: Client, args: argparse.Namespace) -> int:
    static = None if args.echo else args.data.encode("utf-8")
    answered = 0
    async for req in client.serve(args.pattern, group=args.group):
        try:
            await req.respond(req.payload if static is None else static)
        except TesseraError as exc:  # the requester gave up or went away: keep serving
            print(f"tessera: could not answer: {exc}", file=sys.stderr)
        if args.json:
            obj = {"topic": req.topic, "sender": req.sender, **_payload_json(req.payload)}
            print(json.dumps(obj, ensure_ascii=False), flush=True)
        else:
            text = req.payload.decode("utf-8", "backslashreplace")
            print(f"{req.topic} {req.sender} {text}", flush=True)
        answered += 1
        if args.count and answered >= args.count:
            break
    return 0


async def _run(args: argparse.Namespace) -> int:
    creds = _credentials(args)
    async with connect(args.url, timeout=args.timeout, **creds) as client:
        if args.command == "sub":
            return await _sub(client, args)
        if args.command == "req":
            return await _req(client, args)
        if args.command == "reply":
            return await _reply(client, args)
        return await _pub(client, args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130
    except (TesseraError, OSError, ValueError, TimeoutError) as exc:
        kind = type(exc).__name__
        print(f"tessera: error: {exc} ({kind})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
