"""``tessera-broker``: run the broker, check a configuration, reload a running broker and list
its connections (through its admin socket).

Exit status: 0 success; 1 the operation failed (a bad configuration, a reload that changed
nothing); 2 usage error; 3 (``reload``, ``connections``) the broker could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from auth.acl import AclError, Policy
from broker.admin import AdminError, AdminServer, request
from broker.config import DEFAULT_ADMIN_SOCKET, BrokerConfig, ConfigError, check_files, load_config
from broker.dev import DEFAULT_DEV_BIND, DEFAULT_DEV_DIR, DEV_CLIENT, ensure_dev_setup
from broker.reload import Reloader
from broker.server import SERVER_NAME, Broker

__all__ = ["main"]

log = logging.getLogger("tessera.broker")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tessera-broker",
        description="Tessera message broker: authenticated pub/sub over TLS.",
    )
    p.add_argument("--version", action="version", version=SERVER_NAME)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the broker", description="Run the broker.")
    src = serve.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, metavar="FILE", help="broker configuration (TOML)")
    src.add_argument(
        "--dev",
        action="store_true",
        help="development mode: create (once) a local CA, certificates and a permissive ACL",
    )
    serve.add_argument(
        "--dev-dir",
        type=Path,
        default=DEFAULT_DEV_DIR,
        metavar="DIR",
        help=f"where --dev keeps its files (default: ./{DEFAULT_DEV_DIR})",
    )
    serve.add_argument(
        "--bind",
        default=None,
        metavar="HOST:PORT",
        help=f"with --dev: where to listen (default: {DEFAULT_DEV_BIND})",
    )
    serve.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=None,
        help="override the configured log level",
    )

    check = sub.add_parser(
        "check-config",
        help="validate a configuration file",
        description="Validate a configuration file and the files it names; exit 0 if usable.",
    )
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument("--json", action="store_true", help="print the result as JSON")

    # issue #10: the admin endpoint's commands
    for name, summary, description in (
        (
            "reload",
            "reload a running broker's configuration",
            "Ask the running broker to re-read its configuration: server certificate and key, "
            "client CA, CRLs, ACL and limits. A reload that fails validation changes nothing "
            "(exit 1, the reason on stderr). Same as sending SIGHUP, but with the outcome.",
        ),
        (
            "connections",
            "list who is connected",
            "List the running broker's authenticated connections: identity, mechanism, since "
            "when, subscriptions and when the credential expires.",
        ),
    ):
        cmd = sub.add_parser(name, help=summary, description=description)
        where = cmd.add_mutually_exclusive_group(required=True)
        where.add_argument(
            "--config",
            type=Path,
            metavar="FILE",
            help=f"the broker's configuration (its admin socket; default {DEFAULT_ADMIN_SOCKET} "
            "beside it)",
        )
        where.add_argument("--socket", type=Path, metavar="PATH", help="the admin socket")
        cmd.add_argument("--json", action="store_true", help="print the answer as JSON")
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _validate(path: Path) -> tuple[BrokerConfig | None, list[str], list[str]]:
    """Return (config, errors, warnings)."""
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        return None, [str(exc)], []
    errors: list[str] = []
    warnings: list[str] = []
    for problem in check_files(cfg):
        (warnings if "readable by" in problem else errors).append(problem)
    if cfg.acl_file is None:
        warnings.append("no [acl] file: every publish and subscribe will be denied")
    elif cfg.acl_file.is_file():
        try:
            Policy.from_file(cfg.acl_file)
        except AclError as exc:
            errors.append(str(exc))
    return cfg, errors, warnings


def _check_config(path: Path, as_json: bool) -> int:
    cfg, errors, warnings = _validate(path)
    if as_json:
        out: dict[str, object] = {
            "file": str(path),
            "valid": not errors,
            "errors": errors,
            "warnings": warnings,
        }
        if cfg is not None:
            out["listeners"] = [
                {
                    "bind": lst.bind,
                    "security": lst.security,
                    "client_certificate_required": lst.client_ca is not None,
                }
                for lst in cfg.listeners
            ]
        print(json.dumps(out, indent=2))
    else:
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        if not errors:
            assert cfg is not None
            print(f"{path}: OK ({len(cfg.listeners)} listener(s))")
    return 1 if errors else 0


def _admin_server(broker: Broker, reloader: Reloader) -> AdminServer | None:
    """The admin endpoint's ops (issue #10): ``reload`` and ``connections``."""
    path = broker.config.admin_socket
    if path is None:
        return None

    async def reload(_: object) -> dict[str, object]:
        return (await reloader.reload(trigger="admin")).to_json()

    async def connections(_: object) -> dict[str, object]:
        return {"ok": True, "connections": broker.hub.watch.describe()}

    ops = {"reload": reload, "connections": connections}
    return AdminServer(path, ops, audit=broker.audit.record)


async def _serve(
    cfg: BrokerConfig, policy: Policy | None, dev_hint: Callable[[str], str] | None
) -> None:
    broker = Broker(cfg, policy=policy)
    reloader = Reloader(broker)
    admin = _admin_server(broker, reloader)
    if admin is not None:
        await admin.start()
    try:
        await _run(broker, reloader, dev_hint)
    finally:
        if admin is not None:
            await admin.stop()


async def _run(broker: Broker, reloader: Reloader, dev_hint: Callable[[str], str] | None) -> None:
    await broker.start()
    # Handle SIGTERM/SIGINT before announcing readiness: a supervisor (or a test) that signals
    # right after the "listening" line must get a graceful shutdown, not the default action.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, broker.request_stop)
    loop.add_signal_handler(signal.SIGUSR1, broker.log_info)
    loop.add_signal_handler(signal.SIGHUP, reloader.on_signal)
    reloader.watch_crls()
    addresses = []
    for lst in broker.listeners:
        host, port = lst.address
        shown = f"[{host}]" if ":" in host else host
        addresses.append(f"{shown}:{port}")
        print(f"listening {lst.config.security}://{shown}:{port}", flush=True)
    if dev_hint:
        # The address actually bound (with --bind HOST:0 the port is only known now).
        print(dev_hint(addresses[0]), flush=True)
    await broker.serve_until_stopped(install_signal_handlers=False)


def _dev_hint(directory: Path, address: str) -> str:
    d = directory
    flags = ""
    if address != DEFAULT_DEV_BIND:
        flags += f" --url tls://{address}"
    if d != DEFAULT_DEV_DIR:
        flags += f" --dev-dir {shlex.quote(str(d))}"
    return (
        "\nTessera development broker (dev CA and permissive ACL in "
        f"{d}/; not for production)\n"
        f"  subscribe:  tessera sub --dev{flags} 'status.>'\n"
        f"  publish:    tessera pub --dev{flags} status.hello 'hello world'\n"
        f'  python:     client_sdk.connect("tls://{address}", ca="{d}/ca.pem",\n'
        f'                  cert="{d}/{DEV_CLIENT}.pem", key="{d}/{DEV_CLIENT}-key.pem")\n'
        "  stop:       Ctrl-C"
    )


_EXIT_UNREACHABLE = 3


def _admin_command(args: argparse.Namespace) -> int:
    """``reload`` / ``connections``: one request to the running broker's admin socket."""
    path: Path | None = args.socket
    if path is None:
        try:
            path = load_config(args.config).admin_socket
        except ConfigError as exc:
            print(f"tessera-broker: error: {exc}", file=sys.stderr)
            return 1
        if path is None:
            print(
                f"tessera-broker: error: {args.config} turns the admin socket off"
                ' (admin_socket = "")',
                file=sys.stderr,
            )
            return 1
    try:
        answer = request(path, args.command)
    except AdminError as exc:
        print(f"tessera-broker: error: {exc}", file=sys.stderr)
        return _EXIT_UNREACHABLE
    ok = answer.get("ok") is True
    if args.json:
        print(json.dumps(answer, indent=2))
    elif not ok:
        print(f"tessera-broker: error: {answer.get('error')}", file=sys.stderr)
    elif args.command == "reload":
        _print_reload(answer)
    else:
        _print_connections(answer)
    return 0 if ok else 1


def _print_reload(answer: dict[str, object]) -> None:
    print(
        f"reloaded {answer.get('config')}: policy {answer.get('policy')},"
        f" {answer.get('subscriptions_removed')} subscription(s) removed,"
        f" {answer.get('sessions_revoked')} revoked session(s) closed"
    )
    for key, label in (("warnings", "warning"), ("restart_needed", "restart needed for")):
        items = answer.get(key)
        if isinstance(items, list):
            for item in items:
                print(f"{label}: {item}", file=sys.stderr)


def _print_connections(answer: dict[str, object]) -> None:
    rows = answer.get("connections")
    if not isinstance(rows, list) or not rows:
        print("no connections")
        return
    print(f"{'CONN':>6}  {'IDENTITY':<32} {'SINCE':<25} {'EXPIRES':<25} SUBSCRIPTIONS")
    for row in rows:
        if not isinstance(row, dict):
            continue
        subs = row.get("subscriptions")
        patterns = ", ".join(subs.values()) if isinstance(subs, dict) else ""
        print(
            f"{row.get('conn')!s:>6}  {row.get('identity')!s:<32} {row.get('since')!s:<25}"
            f" {row.get('credential_expires_at') or 'never'!s:<25} {patterns}"
        )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.file, args.json)
    if args.command in ("reload", "connections"):
        return _admin_command(args)

    hint: Callable[[str], str] | None = None
    if args.dev:
        bind = args.bind or DEFAULT_DEV_BIND
        try:
            config_path = ensure_dev_setup(args.dev_dir, bind)
        except Exception as exc:  # report any provisioning failure plainly
            print(f"tessera-broker: error: cannot prepare {args.dev_dir}: {exc}", file=sys.stderr)
            return 1
        hint = functools.partial(_dev_hint, args.dev_dir)
    else:
        if args.bind:
            print("tessera-broker: error: --bind goes with --dev", file=sys.stderr)
            return 2
        config_path = args.config
    cfg, errors, warnings = _validate(config_path)
    _setup_logging(args.log_level or (cfg.log_level if cfg else "info"))
    for w in warnings:
        log.warning("config: %s", w)
    if errors or cfg is None:
        for e in errors:
            print(f"tessera-broker: error: {e}", file=sys.stderr)
        return 1
    try:
        asyncio.run(_serve(cfg, None, hint))
    except AdminError as exc:
        print(f"tessera-broker: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"tessera-broker: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
