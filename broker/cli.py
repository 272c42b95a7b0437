"""``tessera-broker``: run the broker, check a configuration."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import importlib.util
import json
import logging
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from auth.acl import AclError, Policy
from broker.backplane import Backplane
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
        "--workers",
        default="1",
        metavar="N",
        help="broker processes sharing each listening port (default 1; 'auto' = one per CPU); "
        "above 1 needs [cluster] redis (docs/scaling.md)",
    )
    # Internal: how the --workers supervisor (broker/workers.py) starts each worker.
    serve.add_argument("--worker-binds", default=None, help=argparse.SUPPRESS)
    serve.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
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


def _setup_logging(level: str, worker: int | None = None) -> None:
    tag = "" if worker is None else f"[worker {worker}] "
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s %(levelname)-7s {tag}%(name)s: %(message)s",
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
    if cfg.cluster is not None and importlib.util.find_spec("redis") is None:
        errors.append("[cluster] needs the cluster extra: pip install 'tessera[cluster]'")
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


def _backplane(cfg: BrokerConfig) -> Backplane | None:
    """The Redis backplane when ``[cluster]`` is configured (imported only then)."""
    cluster = cfg.cluster
    if cluster is None:
        return None
    try:
        import redis  # noqa: F401, PLC0415

        from broker.cluster import RedisBackplane  # noqa: PLC0415 - the optional extra
    except ImportError:
        raise SystemExit(
            "tessera-broker: error: [cluster] needs the cluster extra: "
            "pip install 'tessera[cluster]'"
        ) from None
    password = None
    if cluster.password_file is not None:
        try:
            lines = cluster.password_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SystemExit(
                f"tessera-broker: error: cluster.password_file: {exc.strerror}"
            ) from None
        password = lines[0] if lines else ""
    return RedisBackplane(
        cluster.redis,
        username=cluster.username,
        password=password,
        tls_ca=str(cluster.tls_ca) if cluster.tls_ca is not None else None,
        channel_prefix=cluster.channel_prefix,
        max_queue_messages=cluster.max_queue_messages,
    )


def _as_worker(cfg: BrokerConfig, binds_json: str) -> BrokerConfig:
    """A worker of ``--workers``: listen on the supervisor's reserved addresses, SO_REUSEPORT."""
    binds = json.loads(binds_json)
    assert isinstance(binds, list) and len(binds) == len(cfg.listeners), binds
    Broker.reuse_port = True
    listeners = tuple(
        dataclasses.replace(lst, bind=str(b)) for lst, b in zip(cfg.listeners, binds, strict=True)
    )
    return dataclasses.replace(cfg, listeners=listeners)


async def _serve(
    cfg: BrokerConfig, policy: Policy | None, dev_hint: Callable[[str], str] | None
) -> None:
    broker = Broker(cfg, policy=policy, backplane=_backplane(cfg))
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

    from broker import workers  # noqa: PLC0415

    try:
        n_workers = workers.parse_workers(args.workers)
    except ValueError as exc:
        print(f"tessera-broker: error: {exc}", file=sys.stderr)
        return workers.EXIT_USAGE
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
    _setup_logging(args.log_level or (cfg.log_level if cfg else "info"), args.worker_index)
    for w in warnings:
        log.warning("config: %s", w)
    if errors or cfg is None:
        for e in errors:
            print(f"tessera-broker: error: {e}", file=sys.stderr)
        return 1
    if n_workers > 1 and args.worker_binds is None:
        argv = ["serve", "--config", str(config_path)]
        if args.log_level:
            argv += ["--log-level", args.log_level]
        return workers.supervise(argv, cfg, n_workers)
    if args.worker_binds is not None:
        cfg = _as_worker(cfg, args.worker_binds)
    from broker.cluster import BackplaneError  # noqa: PLC0415 - no third-party import

    try:
        asyncio.run(_serve(cfg, None, hint))
    except BackplaneError as exc:
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
