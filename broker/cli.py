"""``tessera-broker``: run the broker, check a configuration, reload a running broker and list
its connections (through its admin socket).

Exit codes: 0 success (or a clean shutdown); 1 the configuration, a file it names, or a listener
is not usable (every problem is printed, naming the listener and the file), or a reload that
changed nothing; 2 usage error; 3 (``reload``, ``connections``) the broker could not be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import shlex
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tessera_mq.auth.acl import Policy
from tessera_mq.broker.admin import AdminError, AdminServer, request
from tessera_mq.broker.check import preflight
from tessera_mq.broker.cluster import RedisBackplane, RedisSettings
from tessera_mq.broker.config import (
    DEFAULT_ADMIN_SOCKET,
    BrokerConfig,
    ConfigError,
    Problem,
    key_lines,
    load_config,
    parse_bind,
)
from tessera_mq.broker.dev import (
    DEFAULT_DEV_BIND,
    DEFAULT_DEV_DIR,
    DEV_CLIENT,
    ensure_dev_setup,
    forget_dev_broker,
    record_dev_broker,
)
from tessera_mq.broker.history import HistoryEngine
from tessera_mq.broker.logs import setup_logging
from tessera_mq.broker.metrics import MetricsServer, start_metrics
from tessera_mq.broker.reload import Reloader
from tessera_mq.broker.server import SERVER_NAME, Broker
from tessera_mq.broker.store import StoreError

__all__ = ["main"]

if TYPE_CHECKING:
    from tessera_mq.broker.store_redis import RedisStore

log = logging.getLogger("tessera.broker")

#: The configuration or a listener is not usable.
EXIT_INVALID = 1
#: Bad command line (argparse's own code).
EXIT_USAGE = 2
#: ``reload``/``connections``: the running broker could not be reached (issue #10).
EXIT_UNREACHABLE = 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tessera-broker",
        description="Tessera message broker: authenticated pub/sub over TLS.",
        epilog="exit codes: 0 ok (or a clean shutdown), 1 the configuration, a file it names "
        "or a listener is not usable (or a reload changed nothing), 2 usage, 3 the running "
        "broker could not be reached (docs/configuration.md).",
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
    serve.add_argument("--worker-restarted", action="store_true", help=argparse.SUPPRESS)
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
        (
            "stats",
            "print the running broker's counters",
            "Print the running broker's counters and gauges (connections, subscriptions, "
            "publishes, deliveries, bytes, outbox bytes, slow consumers, handshake pool, open "
            "file descriptors, RSS): the same figures the metrics endpoint exports.",
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


def _validate(path: Path, *, serving: bool = False) -> tuple[BrokerConfig | None, list[Problem]]:
    """Load ``path`` and check every file it names, as ``serve`` would; (config, problems)."""
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        return None, list(exc.problems)
    try:
        lines = key_lines(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        lines = {}
    return cfg, preflight(cfg, lines, serving=serving)


def _check_config(path: Path, as_json: bool) -> int:
    cfg, problems = _validate(path)
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity != "error"]
    if as_json:
        out: dict[str, object] = {
            "file": str(path),
            "valid": not errors,
            "errors": [str(p) for p in errors],
            "warnings": [str(p) for p in warnings],
            "problems": [p.as_dict() for p in problems],
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
        if errors:
            print(f"{path}: {len(errors)} error(s)", file=sys.stderr)
        else:
            assert cfg is not None
            print(f"{path}: OK ({len(cfg.listeners)} listener(s))")
    return EXIT_INVALID if errors else 0


def _busy_listener(cfg: BrokerConfig) -> str | None:
    """After a failed start: the first listener whose address cannot be bound now."""
    for i, lst in enumerate(cfg.listeners):
        try:
            infos = socket.getaddrinfo(lst.host, lst.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            return f"listeners[{i}] ({lst.bind}): cannot resolve {lst.host}: {exc.strerror}"
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                return f"listeners[{i}] ({lst.bind}): cannot listen: {exc.strerror}"
    return None


def _admin_server(broker: Broker, reloader: Reloader) -> AdminServer | None:
    """The admin endpoint's ops: ``reload``, ``connections`` (issue #10) and ``stats``."""
    path = broker.config.admin_socket_path
    if path is None:
        return None

    async def reload(_: object) -> dict[str, object]:
        return (await reloader.reload(trigger="admin")).to_json()

    async def connections(_: object) -> dict[str, object]:
        return {"ok": True, "connections": broker.hub.watch.describe()}

    async def stats(_: object) -> dict[str, object]:
        return {"ok": True, "stats": broker.info()}

    ops = {"reload": reload, "connections": connections, "stats": stats}
    return AdminServer(path, ops, audit=broker.audit.record)


def _redis_settings(cfg: BrokerConfig) -> RedisSettings | None:
    """How to reach Redis when ``[cluster]`` is configured (the password file read once, for
    the backplane and the store alike)."""
    cluster = cfg.cluster
    if cluster is None:
        return None
    try:
        import redis  # noqa: F401, PLC0415
    except ImportError:
        raise _StartError(
            "[cluster] needs the cluster extra: pip install 'tessera-mq[cluster]'"
        ) from None
    password = None
    if cluster.password_file is not None:
        try:
            lines = cluster.password_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise _StartError(f"cluster.password_file: {exc.strerror}") from None
        password = lines[0] if lines else ""
    return RedisSettings(
        cluster.redis,
        username=cluster.username,
        password=password,
        tls_ca=str(cluster.tls_ca) if cluster.tls_ca is not None else None,
    )


def _backplane(
    cfg: BrokerConfig, settings: RedisSettings | None, *, fail_fast: bool = True
) -> RedisBackplane | None:
    """The Redis backplane when ``[cluster]`` is configured.
    ``fail_fast=False`` (a restarted worker): start even while Redis is unreachable."""
    if cfg.cluster is None or settings is None:
        return None
    return RedisBackplane(
        settings.url,
        username=settings.username,
        password=settings.password,
        tls_ca=settings.tls_ca,
        channel_prefix=cfg.cluster.channel_prefix,
        max_queue_messages=cfg.cluster.max_queue_messages,
        fail_fast=fail_fast,
    )


def _store(
    cfg: BrokerConfig, settings: RedisSettings | None, *, fail_fast: bool = True
) -> RedisStore | None:
    """Issue #11: with ``[cluster]`` retained values live in Redis (broker/store_redis.py) and
    ``data_dir`` is not used for them; without it ``None``: the Broker builds the embedded
    store from ``data_dir`` exactly as before. ``fail_fast=False`` (a restarted worker): open
    even while Redis is unreachable and catch up when it is back."""
    if cfg.cluster is None or settings is None:
        return None
    from tessera_mq.broker.store_redis import RedisStore  # noqa: PLC0415 - the optional extra
    from tessera_mq.broker.store_sqlite import RetainLimits  # noqa: PLC0415

    m = cfg.messaging
    if cfg.data_dir is not None:
        log.info(
            "[cluster]: retained values are kept in redis; data_dir (%s) is not used for them",
            cfg.data_dir,
        )
    limits = RetainLimits(m.retain_max_value_bytes, m.retain_max_topics, m.retain_max_total_bytes)
    return RedisStore(settings, limits, prefix=cfg.cluster.channel_prefix, fail_fast=fail_fast)


def _history(
    cfg: BrokerConfig, settings: RedisSettings | None, store: RedisStore | None
) -> HistoryEngine | None:
    """Issue #11: with ``[cluster]`` and history streams configured, the streams live in Redis
    (broker/history_redis.py); otherwise ``None``: the hub keeps them in memory as before."""
    if cfg.cluster is None or settings is None or not cfg.messaging.history:
        return None
    from tessera_mq.broker.history_redis import RedisHistory  # noqa: PLC0415 - the optional extra

    history = RedisHistory(settings, cfg.messaging.history, prefix=cfg.cluster.channel_prefix)
    if store is not None:
        history.on_retained = store.observe  # a retained value is visible as the feed routes it
    return history


def _as_worker(cfg: BrokerConfig, binds_json: str, index: int) -> BrokerConfig:
    """Worker ``index`` of ``--workers``: listen on the supervisor's reserved addresses with
    SO_REUSEPORT; its own metrics listener (if any) on the configured port + ``index`` (each
    worker reports its own process; port 0 stays "any free port")."""
    binds = json.loads(binds_json)
    assert isinstance(binds, list) and len(binds) == len(cfg.listeners), binds
    Broker.reuse_port = True
    listeners = tuple(
        dataclasses.replace(lst, bind=str(b)) for lst, b in zip(cfg.listeners, binds, strict=True)
    )
    metrics = cfg.metrics
    if metrics.bind is not None:
        host, port = parse_bind(metrics.bind)
        if port:
            shown = f"[{host}]" if ":" in host else host
            metrics = dataclasses.replace(metrics, bind=f"{shown}:{port + index}")
    return dataclasses.replace(cfg, listeners=listeners, metrics=metrics)


async def _serve(
    cfg: BrokerConfig,
    policy: Policy | None,
    on_listening: Callable[[list[str]], None] | None,
    *,
    fail_fast: bool = True,
) -> None:
    redis = _redis_settings(cfg)  # issue #11: [cluster] shares the backplane and the store
    backplane = _backplane(cfg, redis, fail_fast=fail_fast)
    store = _store(cfg, redis, fail_fast=fail_fast)
    if backplane is not None and store is not None:
        # a remote retained value becomes visible to snapshots as it is routed here
        backplane.on_retained = store.observe
        store.follows = backplane.receives
    history = _history(cfg, redis, store)
    broker = Broker(cfg, policy=policy, backplane=backplane, store=store, history=history)
    reloader = Reloader(broker)
    admin = _admin_server(broker, reloader)
    if admin is not None:
        try:
            await admin.start()  # before the listeners: a second broker on this config stops here
        except AdminError as exc:
            if cfg.admin_socket is not None:
                raise  # configured explicitly: the operator relies on it
            # The default place (beside the configuration) may be read-only, e.g. under
            # systemd's ProtectSystem=strict: serve anyway; SIGHUP still reloads.
            log.warning("admin endpoint off (%s); set admin_socket to enable it", exc)
            admin = None
    try:
        await _run(broker, reloader, on_listening)
    finally:
        if admin is not None:
            await admin.stop()


async def _run(
    broker: Broker, reloader: Reloader, on_listening: Callable[[list[str]], None] | None
) -> None:
    cfg = broker.config
    try:
        await broker.start()
    except OSError as exc:
        await broker.abandon()  # free the ports bound so far, then find the culprit
        raise _StartError(_busy_listener(cfg) or f"cannot listen: {exc}") from None
    metrics: MetricsServer | None = None
    if cfg.metrics.bind is not None:
        try:
            metrics = await start_metrics(broker, cfg.metrics.bind)
        except OSError as exc:
            await broker.stop()
            message = f"metrics.bind ({cfg.metrics.bind}): cannot listen: {exc.strerror}"
            raise _StartError(message) from None
    # Handle SIGTERM/SIGINT before announcing readiness: a supervisor (or a test) that signals
    # right after the "listening" line must get a graceful shutdown, not the default action.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, broker.request_stop)
    loop.add_signal_handler(signal.SIGUSR1, broker.log_info)
    loop.add_signal_handler(signal.SIGHUP, reloader.on_signal)  # issue #10: reload, not exit
    reloader.watch_crls()
    addresses = []
    for lst in broker.listeners:
        host, port = lst.address
        shown = f"[{host}]" if ":" in host else host
        addresses.append(f"{shown}:{port}")
        print(f"listening {lst.config.security}://{shown}:{port}", flush=True)
    if metrics is not None:
        print(f"metrics http://{metrics.label}/metrics", flush=True)
    if on_listening:
        on_listening(addresses)
    try:
        await broker.serve_until_stopped(install_signal_handlers=False)
    finally:
        if metrics is not None:
            await metrics.close()


class _StartError(Exception):
    """The broker could not start; the message names the listener."""


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
        "  python:     import tessera_mq.client as tessera\n"
        f'              tessera.connect("tls://{address}", ca="{d}/ca.pem",\n'
        f'                  cert="{d}/{DEV_CLIENT}.pem", key="{d}/{DEV_CLIENT}-key.pem")\n'
        "  stop:       Ctrl-C"
    )


def _admin_command(args: argparse.Namespace) -> int:
    """``reload`` / ``connections`` / ``stats``: one request to the running broker's admin
    socket."""
    path: Path | None = args.socket
    if path is None:
        try:
            path = load_config(args.config).admin_socket_path
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
        return EXIT_UNREACHABLE
    ok = answer.get("ok") is True
    if args.json:
        print(json.dumps(answer, indent=2))
    elif not ok:
        print(f"tessera-broker: error: {answer.get('error')}", file=sys.stderr)
    elif args.command == "reload":
        _print_reload(answer)
    elif args.command == "stats":
        stats = answer.get("stats")
        for key, value in sorted(stats.items()) if isinstance(stats, dict) else ():
            print(f"{key} {json.dumps(value, sort_keys=True)}")
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
    if args.command in ("reload", "connections", "stats"):
        return _admin_command(args)

    from tessera_mq.broker import workers  # noqa: PLC0415

    try:
        n_workers = workers.parse_workers(args.workers)
    except ValueError as exc:
        print(f"tessera-broker: error: {exc}", file=sys.stderr)
        return workers.EXIT_USAGE
    dev_dir: Path | None = None
    if args.dev:
        bind = args.bind or DEFAULT_DEV_BIND
        try:
            config_path = ensure_dev_setup(args.dev_dir, bind)
        except Exception as exc:  # report any provisioning failure plainly
            print(f"tessera-broker: error: cannot prepare {args.dev_dir}: {exc}", file=sys.stderr)
            return 1
        dev_dir = args.dev_dir
    else:
        if args.bind:
            print("tessera-broker: error: --bind goes with --dev", file=sys.stderr)
            return EXIT_USAGE
        config_path = args.config
    cfg, problems = _validate(config_path, serving=True)
    level = args.log_level or (cfg.log_level if cfg else "info")
    setup_logging(level, cfg.log_format if cfg else "text", worker=args.worker_index)
    errors = [p for p in problems if p.severity == "error"]
    for w in problems:
        if w.severity != "error":
            log.warning("config: %s", w)
    if errors or cfg is None:
        for e in errors:
            print(f"tessera-broker: error: {e}", file=sys.stderr)
        return EXIT_INVALID
    if n_workers > 1 and args.worker_binds is None:
        argv_ = ["serve", "--config", str(config_path)]
        if args.log_level:
            argv_ += ["--log-level", args.log_level]
        return workers.supervise(argv_, cfg, n_workers)
    if args.worker_binds is not None:
        cfg = _as_worker(cfg, args.worker_binds, args.worker_index or 0)
        # issue #10: N workers cannot share one admin socket; the supervisor forwards SIGHUP
        # (reload) to every worker instead.
        cfg = dataclasses.replace(cfg, admin_socket="")
    from tessera_mq.broker.cluster import BackplaneError  # noqa: PLC0415 - no third-party import

    def on_listening(addresses: list[str]) -> None:
        if dev_dir is not None:
            # The address actually bound (with --bind HOST:0 the port is only known now).
            print(_dev_hint(dev_dir, addresses[0]), flush=True)
            record_dev_broker(dev_dir, f"tls://{addresses[0]}")

    try:
        asyncio.run(_serve(cfg, None, on_listening, fail_fast=not args.worker_restarted))
    except (_StartError, AdminError, BackplaneError, StoreError) as exc:
        print(f"tessera-broker: error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except OSError as exc:
        print(f"tessera-broker: error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 0
    finally:
        if dev_dir is not None:
            forget_dev_broker()
    return 0


if __name__ == "__main__":
    sys.exit(main())
