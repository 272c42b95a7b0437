"""``tessera``: publish and subscribe from the command line (like ``mosquitto_pub``/``nats sub``),
and keep named connection contexts (``tessera context add/use/list/show/remove``).

Exit codes (docs/sdk.md): 0 success; 1 other error (a local file missing or unreadable); 2 usage
(bad arguments, an invalid topic or header); 3 broker unreachable (refused, no route, lost);
4 authentication failed; 5 permission denied; 6 protocol error (the peer broke the protocol or
closed the connection with an error); 7 timeout (also: ``req`` got no reply in time); 8 ``req``:
no responders; 130 interrupted (Ctrl-C).

``req`` and ``reply`` send and serve requests (like ``nats req``/``nats reply``); ``pub --retain``
keeps a topic's last value; ``sub --group`` joins a queue group, ``sub --since`` replays history.

Connection settings, first found wins: the flags, then ``TESSERA_URL``/``TESSERA_CA``/
``TESSERA_CERT``/``TESSERA_KEY``, then the context (``--context``, ``TESSERA_CONTEXT`` or the
current one), then ``--dev`` (the running dev broker's directory and URL), then the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import errno
import json
import logging
import os
import socket
import ssl
import sys
from pathlib import Path
from typing import Any

from tessera_mq.auth.credentials import NTLM, Kerberos
from tessera_mq.client.client import Client, Delivery, connect
from tessera_mq.client.contexts import Context, ContextError, ContextStore, read_dev_record
from tessera_mq.client.protocol.errors import (
    AuthenticationError,
    ConnectionClosed,
    ErrorCode,
    InvalidTopic,
    NoResponders,
    PermissionDenied,
    RequestTimeout,
    TesseraError,
)

__all__ = [
    "EXIT_AUTHENTICATION",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NO_RESPONDERS",
    "EXIT_PERMISSION",
    "EXIT_PROTOCOL",
    "EXIT_TIMEOUT",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "main",
]

EXIT_ERROR = 1  #: anything else: a local file missing or unreadable, a context that does not exist
EXIT_USAGE = 2  #: bad arguments (argparse's code), an invalid topic, pattern or header
EXIT_UNREACHABLE = 3  #: no broker there: refused, no route, name not found, connection lost
EXIT_AUTHENTICATION = 4  #: the security handshake failed (either side refused the other)
EXIT_PERMISSION = 5  #: the broker's ACL refused a publish or subscribe
EXIT_PROTOCOL = 6  #: the peer broke the protocol, or closed the connection with an error code
EXIT_TIMEOUT = 7  #: nothing (or no welcome) within --timeout; ``req``: no reply within --wait
EXIT_NO_RESPONDERS = 8  #: ``req``: nobody serves the topic
EXIT_INTERRUPTED = 130  #: Ctrl-C

_KIND = {
    EXIT_ERROR: "error",
    EXIT_USAGE: "usage",
    EXIT_UNREACHABLE: "unreachable",
    EXIT_AUTHENTICATION: "authentication",
    EXIT_PERMISSION: "permission",
    EXIT_PROTOCOL: "protocol",
    EXIT_TIMEOUT: "timeout",
    EXIT_NO_RESPONDERS: "no_responders",
}

DEFAULT_URL = "tls://127.0.0.1:7443"
DEFAULT_DEV_DIR = Path("tessera-dev")
DEV_CLIENT = "dev"


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--url", help=f"broker URL (default: $TESSERA_URL, the context, {DEFAULT_URL})")
    g.add_argument(
        "--ca",
        type=Path,
        help="CA certificate (PEM) that signed the broker's certificate (default: $TESSERA_CA)",
    )
    g.add_argument("--cert", type=Path, help="client certificate (PEM) (default: $TESSERA_CERT)")
    g.add_argument("--key", type=Path, help="client private key (PEM) (default: $TESSERA_KEY)")
    g.add_argument(
        "--server-name", help="name to verify in the broker's certificate (default: URL host)"
    )
    g.add_argument(
        "--context",
        metavar="NAME",
        help="use a saved context (default: $TESSERA_CONTEXT, then `tessera context use`)",
    )
    g.add_argument(
        "--dev",
        action="store_true",
        help="use the running `tessera-broker serve --dev` broker and its credentials",
    )
    g.add_argument(
        "--dev-dir",
        type=Path,
        default=None,
        help="where the dev credentials are (default: $TESSERA_DEV_DIR, the running dev "
        "broker's directory, ./tessera-dev)",
    )
    g.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print the SDK's log (reconnects, warnings) on standard error",
    )
    g.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        help="seconds to connect, authenticate and get the broker's welcome (default: 10)",
    )
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
        prog="tessera",
        description="Publish to and subscribe on a Tessera broker.",
        epilog="exit codes: 0 ok, 1 other error, 2 usage, 3 unreachable, 4 authentication, "
        "5 permission denied, 6 protocol error, 7 timeout, 8 no responders, 130 interrupted "
        "(docs/sdk.md). "
        "Environment: TESSERA_URL, TESSERA_CA, TESSERA_CERT, TESSERA_KEY, TESSERA_CONTEXT, "
        "TESSERA_DEV_DIR.",
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
        type=_header,
        metavar="KEY=VALUE",
        help="add a header (repeatable)",
    )
    pb.add_argument("--no-ack", action="store_true", help="do not wait for the broker to confirm")
    pb.add_argument(
        "--retain",
        action="store_true",
        help="keep as the topic's last value for later subscribers (empty DATA clears it)",
    )
    pb.add_argument("--json", action="store_true", help="print the result (or error) as JSON")
    _common(pb)

    rq = sub.add_parser(
        "req",
        help="send a request and print the reply",
        description="Send DATA as a request on TOPIC and print the first reply. Exit code 8: "
        "nobody serves TOPIC; 7: no reply within --wait seconds.",
    )
    rq.add_argument("topic", metavar="TOPIC")
    rq.add_argument("data", metavar="DATA", nargs="?", default="")
    rq.add_argument(
        "--wait",
        type=_positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="reply timeout (default 5)",
    )
    rq.add_argument("--json", action="store_true", help="print the reply (or error) as JSON")
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
    _context_parser(sub)
    return p


def _context_parser(sub: Any) -> None:
    c = sub.add_parser(
        "context",
        help="manage saved connection settings",
        description="Named contexts hold a broker URL and the CA, certificate and key paths "
        "(stored in $XDG_CONFIG_HOME/tessera/contexts.json).",
    )
    csub = c.add_subparsers(dest="context_command", required=True, metavar="ACTION")
    add = csub.add_parser("add", help="save (or replace) a context")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--url", help=f"broker URL (default: {DEFAULT_URL})")
    add.add_argument("--ca", type=Path, help="CA certificate (PEM)")
    add.add_argument("--cert", type=Path, help="client certificate (PEM)")
    add.add_argument("--key", type=Path, help="client private key (PEM)")
    add.add_argument("--server-name", help="name to verify in the broker's certificate")
    add.add_argument("--description", help="free text shown by `context list`")
    add.add_argument("--use", action="store_true", help="also make it the current context")
    use = csub.add_parser("use", help="make a context the current one")
    use.add_argument("name", metavar="NAME")
    ls = csub.add_parser("list", help="list contexts (* = current)")
    ls.add_argument("--json", action="store_true", help="print as JSON")
    show = csub.add_parser("show", help="print a context (default: the current one)")
    show.add_argument("name", metavar="NAME", nargs="?")
    show.add_argument("--json", action="store_true", help="print as JSON")
    rm = csub.add_parser("remove", help="delete a context")
    rm.add_argument("name", metavar="NAME")


def _header(text: str) -> tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep or not k:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return k, v


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


class _Fail(Exception):
    """A failure with its exit code (raised before or instead of connecting)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _context(args: argparse.Namespace) -> Context | None:
    name = args.context or os.environ.get("TESSERA_CONTEXT") or None
    store = ContextStore()
    if name is None:
        if args.dev:
            return None  # --dev wins over the current context (not over an explicit one)
        name = store.current
        if name is None:
            return None
    elif args.dev:
        raise _Fail(EXIT_USAGE, "--context and --dev do not go together")
    try:
        return store.get(name)
    except ContextError as exc:
        raise _Fail(EXIT_ERROR, str(exc)) from None


def _settings(args: argparse.Namespace) -> None:
    """Fill args.url/ca/cert/key/server_name from flags, environment, context and --dev."""
    ctx = _context(args)
    env = os.environ
    url = args.url or env.get("TESSERA_URL") or (ctx.url if ctx else None)
    ca = args.ca or _env_path("TESSERA_CA") or _ctx_path(ctx, "ca")
    cert = args.cert or _env_path("TESSERA_CERT") or _ctx_path(ctx, "cert")
    key = args.key or _env_path("TESSERA_KEY") or _ctx_path(ctx, "key")
    server_name = args.server_name or (ctx.server_name if ctx else None)
    if args.dev:
        d, dev_url = _dev_dir(args)
        url = url or dev_url
        ca = ca or d / "ca.pem"
        cert = cert or d / f"{DEV_CLIENT}.pem"
        key = key or d / f"{DEV_CLIENT}-key.pem"
    args.url = url or DEFAULT_URL
    args.ca, args.cert, args.key, args.server_name = ca, cert, key, server_name


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _ctx_path(ctx: Context | None, field: str) -> Path | None:
    value = getattr(ctx, field) if ctx is not None else None
    return Path(value) if value else None


def _dev_dir(args: argparse.Namespace) -> tuple[Path, str | None]:
    """The dev credentials' directory and, when a dev broker runs, its URL."""
    explicit = args.dev_dir or _env_path("TESSERA_DEV_DIR")
    if explicit is not None:
        if not (explicit / "ca.pem").is_file():
            raise _Fail(
                EXIT_UNREACHABLE,
                f"no dev credentials in {explicit} (start `tessera-broker serve --dev "
                f"--dev-dir {explicit}` first)",
            )
        record = read_dev_record()
        same = record is not None and Path(record.dir) == explicit.resolve()
        return explicit, record.url if same and record is not None else None
    record = read_dev_record()
    if record is not None:
        return Path(record.dir), record.url
    local = DEFAULT_DEV_DIR
    if (local / "ca.pem").is_file():
        return local, None
    raise _Fail(
        EXIT_UNREACHABLE,
        "no dev broker is running and there is no ./tessera-dev here "
        "(start `tessera-broker serve --dev`, or give --dev-dir)",
    )


def _credentials(args: argparse.Namespace) -> dict[str, Any]:
    ca, cert, key = args.ca, args.cert, args.key
    for flag, path in (("--ca", ca), ("--cert", cert), ("--key", key)):
        if path is not None and not Path(path).is_file():
            hint = " (start `tessera-broker serve --dev` first)" if args.dev else ""
            raise _Fail(EXIT_ERROR, f"{flag}: {path} does not exist{hint}")
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
            raise _Fail(EXIT_USAGE, f"--password-env: ${args.password_env} is not set")
    if args.ntlm_user:
        if password is None:
            raise _Fail(EXIT_USAGE, "--ntlm-user needs --password-env")
        return NTLM(args.ntlm_user, password)
    if password is not None and not args.principal:
        raise _Fail(EXIT_USAGE, "--password-env with Kerberos needs --principal")
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
    headers: dict[str, str] = dict(args.header)
    await client.publish(
        args.topic, data, headers=headers or None, ack=not args.no_ack, retain=args.retain
    )
    if args.json:
        result = {"topic": args.topic, "bytes": len(data), "acknowledged": not args.no_ack}
        if args.retain:
            result["retained"] = True
        print(json.dumps(result))
    return 0


def _payload_json(payload: bytes) -> dict[str, str]:
    try:
        return {"payload": payload.decode("utf-8")}
    except UnicodeDecodeError:
        return {"payload_base64": base64.b64encode(payload).decode("ascii")}


async def _req(client: Client, args: argparse.Namespace) -> int:
    data = sys.stdin.buffer.read() if args.data == "-" else args.data.encode("utf-8")
    reply = await client.request(args.topic, data, timeout=args.wait)
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
    _settings(args)
    creds = _credentials(args)
    async with connect(args.url, timeout=args.timeout, **creds) as client:
        if args.command == "sub":
            return await _sub(client, args)
        if args.command == "req":
            return await _req(client, args)
        if args.command == "reply":
            return await _reply(client, args)
        return await _pub(client, args)


def _context_command(args: argparse.Namespace) -> int:
    store = ContextStore()
    action = args.context_command
    if action == "add":
        paths = {
            k: str(Path(v).expanduser().resolve()) if v is not None else None
            for k, v in (("ca", args.ca), ("cert", args.cert), ("key", args.key))
        }
        store.add(
            args.name,
            Context(
                url=args.url,
                server_name=args.server_name,
                description=args.description,
                **paths,
            ),
        )
        if args.use:
            store.use(args.name)
        print(f"context {args.name!r} saved in {store.path}")
    elif action == "use":
        store.use(args.name)
        print(f"current context: {args.name}")
    elif action == "remove":
        store.remove(args.name)
        print(f"context {args.name!r} removed")
    elif action == "list":
        current = store.current
        names = store.names()
        if args.json:
            print(json.dumps({"current": current, "contexts": names}))
        else:
            for name in names:
                desc = store.get(name).description
                print(f"{'*' if name == current else ' '} {name}" + (f"  {desc}" if desc else ""))
    else:  # show
        shown_name: str | None = args.name or store.current
        if shown_name is None:
            raise ContextError("no current context (tessera context use NAME)")
        shown = {k: v for k, v in vars(store.get(shown_name)).items() if v is not None}
        if args.json:
            print(json.dumps({"name": shown_name, **shown}))
        else:
            print(f"name: {shown_name}")
            for k, v in shown.items():
                print(f"{k}: {v}")
    return 0


def _classify(exc: BaseException) -> tuple[int, str, str | None]:
    """(exit code, message for a human, reason code) of a failure."""
    if isinstance(exc, _Fail):
        return exc.code, str(exc), None
    if isinstance(exc, ContextError):
        return EXIT_ERROR, str(exc), None
    if isinstance(exc, InvalidTopic):
        return EXIT_USAGE, f"invalid topic or pattern: {exc}", None
    if isinstance(exc, AuthenticationError):
        return EXIT_AUTHENTICATION, f"authentication failed: {exc}", exc.reason
    if isinstance(exc, PermissionDenied):
        return EXIT_PERMISSION, f"permission denied: {exc}", None
    if isinstance(exc, NoResponders):
        return EXIT_NO_RESPONDERS, f"no responders: {exc}", "no_responders"
    if isinstance(exc, RequestTimeout):
        return EXIT_TIMEOUT, f"no reply: {exc}", "request_timeout"
    if isinstance(exc, ConnectionClosed):
        by_code = {
            ErrorCode.AUTHENTICATION_FAILED: EXIT_AUTHENTICATION,
            ErrorCode.PERMISSION_DENIED: EXIT_PERMISSION,
            ErrorCode.HANDSHAKE_TIMEOUT: EXIT_TIMEOUT,
            ErrorCode.GOING_AWAY: EXIT_UNREACHABLE,
            ErrorCode.NORMAL: EXIT_UNREACHABLE,
        }
        return by_code.get(exc.code, EXIT_PROTOCOL), str(exc), exc.code.name.lower()
    if isinstance(exc, TesseraError):
        return EXIT_PROTOCOL, f"protocol error: {exc}", exc.code.name.lower()
    if isinstance(exc, TimeoutError):
        return EXIT_TIMEOUT, "timed out (no broker welcome within --timeout)", None
    if isinstance(exc, ssl.SSLError):
        return EXIT_ERROR, f"cannot load the TLS credentials: {exc.reason or exc}", None
    if isinstance(exc, OSError):
        unreachable = (
            exc.errno
            in (
                errno.ECONNREFUSED,
                errno.ECONNRESET,
                errno.EHOSTUNREACH,
                errno.ENETUNREACH,
                errno.EADDRNOTAVAIL,
                errno.ETIMEDOUT,
                errno.EPIPE,
            )
        ) or isinstance(exc, socket.gaierror)
        what = exc.strerror or str(exc)
        if unreachable:
            return EXIT_UNREACHABLE, f"cannot reach the broker: {what}", None
        name = f"{exc.filename}: " if exc.filename else ""
        return EXIT_ERROR, f"{name}{what}", None
    if isinstance(exc, ValueError):
        return EXIT_USAGE, str(exc), None
    raise exc


def _fail(exc: BaseException, as_json: bool, url: str | None) -> int:
    code, message, reason = _classify(exc)
    if as_json:
        err: dict[str, object] = {"kind": _KIND[code], "exit_code": code, "message": message}
        if reason:
            err["reason"] = reason
        if url:
            err["url"] = url
        print(json.dumps({"error": err}), file=sys.stderr)
    else:
        print(f"tessera: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    sdk_log = logging.getLogger("tessera.client")
    if getattr(args, "verbose", False):
        logging.basicConfig(level=logging.DEBUG, format="tessera: %(levelname)s: %(message)s")
    else:  # the one error line says what went wrong; the SDK's own warnings would repeat it
        sdk_log.addHandler(logging.NullHandler())
        sdk_log.propagate = False
    try:
        if args.command == "context":
            return _context_command(args)
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (TesseraError, OSError, ValueError, TimeoutError, ContextError, _Fail) as exc:
        return _fail(exc, as_json, getattr(args, "url", None))


if __name__ == "__main__":
    sys.exit(main())
