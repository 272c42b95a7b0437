"""``tessera-broker``: run the broker, check a configuration."""

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
from broker.config import BrokerConfig, ConfigError, check_files, load_config
from broker.dev import DEFAULT_DEV_BIND, DEFAULT_DEV_DIR, DEV_CLIENT, ensure_dev_setup
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


async def _serve(
    cfg: BrokerConfig, policy: Policy | None, dev_hint: Callable[[str], str] | None
) -> None:
    broker = Broker(cfg, policy=policy)
    await broker.start()
    # Handle SIGTERM/SIGINT before announcing readiness: a supervisor (or a test) that signals
    # right after the "listening" line must get a graceful shutdown, not the default action.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, broker.request_stop)
    loop.add_signal_handler(signal.SIGUSR1, broker.log_info)
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.file, args.json)

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
    except OSError as exc:
        print(f"tessera-broker: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
