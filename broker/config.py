"""Broker configuration: frozen dataclasses loaded from TOML, validated with errors naming
the field.

See docs/configuration.md for every key. Relative paths are resolved against the directory of the
configuration file.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from auth.identity import DEFAULT_X509_NAME_FIELDS, validate_x509_name_fields
from broker.history import HistoryConfig, overlaps
from client_sdk.protocol import limits as wire
from client_sdk.protocol.errors import InvalidTopic
from client_sdk.protocol.topics import validate_pattern

__all__ = [
    "SECURITY_MODES",
    "BrokerConfig",
    "ConfigError",
    "LimitsConfig",
    "ListenerConfig",
    "MessagingConfig",
    "load_config",
    "parse_bind",
]

SECURITY_MODES = ("tls", "negotiate", "tls+negotiate")
SLOW_CONSUMER_POLICIES = ("disconnect", "drop")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file and the field."""


@dataclass(frozen=True)
class ListenerConfig:
    """One ``[[listeners]]`` table: where to listen and how connections are secured."""

    bind: str
    """``host:port`` to listen on (``[::1]:7443`` for IPv6); port 0 picks a free port."""
    security: str = "tls"
    """``tls`` (``negotiate`` and ``tls+negotiate`` are the Kerberos/NTLM modes)."""
    cert: Path | None = None
    """PEM certificate chain presented by the broker (required for ``tls``)."""
    key: Path | None = None
    """PEM private key of ``cert``."""
    client_ca: Path | None = None
    """PEM CA bundle; when present every client must present a certificate issued by it."""
    identity_fields: tuple[str, ...] = DEFAULT_X509_NAME_FIELDS
    """Certificate fields tried in order for the client's name: san_email, san_uri, san_dns,
    cn, dn (see docs/identity.md)."""
    mechanisms: tuple[str, ...] = ("kerberos",)
    """``negotiate`` modes: the SPNEGO mechanisms allowed; NTLM only when listed."""
    service_principal: str | None = None
    """``negotiate`` modes: the only service principal whose tickets are accepted
    (``tessera/host@REALM``; a bare host name means ``tessera/<host>@<default realm>``)."""
    keytab: Path | None = None
    """``negotiate`` modes: the keytab (default: ``KRB5_KTNAME`` / krb5.conf)."""
    ntlm_user_file: Path | None = None
    """``negotiate`` modes with NTLM: the account file pyspnego verifies NTLM against."""
    max_handshake_token_bytes: int = 65_536
    """``negotiate`` modes: largest SPNEGO token accepted."""
    max_handshake_legs: int = 4
    """``negotiate`` modes: most tokens accepted from a client in one handshake."""

    @property
    def host(self) -> str:
        return parse_bind(self.bind)[0]

    @property
    def port(self) -> int:
        return parse_bind(self.bind)[1]


@dataclass(frozen=True)
class LimitsConfig:
    """``[limits]``: bounds on what one connection may use (see docs/operations.md)."""

    max_frame_bytes: int = wire.MAX_FRAME_BYTES
    """Largest frame body after hello (announced in welcome)."""
    max_frame_bytes_before_hello: int = wire.MAX_FRAME_BYTES_BEFORE_HELLO
    """Largest frame body before hello."""
    handshake_timeout: float = 10.0
    """Seconds from accept until the security handshake must be complete."""
    hello_timeout: float = 5.0
    """Seconds from the end of the security handshake until hello must have arrived."""
    heartbeat_interval: float = wire.DEFAULT_HEARTBEAT_MS / 1000
    """Seconds of silence after which the broker pings; two intervals close the connection."""
    max_pending_bytes: int = 8 * 1024 * 1024
    """Bytes queued for one subscriber before the slow-consumer policy applies (NATS
    ``max_pending`` defaults to 64 MB; we are stricter per connection because we hold more)."""
    max_pending_messages: int = 65_536
    """Messages queued for one subscriber before the slow-consumer policy applies."""
    slow_consumer: str = "disconnect"
    """What happens to a subscriber over its pending limits: ``disconnect`` (close code 11) or
    ``drop`` (new deliveries are discarded and counted; the client is told how many in an
    ``error`` frame with code 11 and ``dropped`` once its outbox has drained)."""
    max_subscriptions: int = 1024
    """Live subscriptions per connection."""
    max_connections: int = 100_000
    """Connections held at once across all listeners; further ones are closed at accept."""
    max_connections_per_identity: int = 10_000
    """Connections one authenticated identity may hold at once (closed with LIMIT_EXCEEDED)."""
    max_topic_bytes: int = wire.MAX_TOPIC_BYTES
    """Longest topic or pattern, in UTF-8 bytes."""
    max_topic_tokens: int = wire.MAX_TOPIC_TOKENS
    """Most tokens (levels) in a topic or pattern."""
    close_timeout: float = 5.0
    """Seconds a closing connection may take to flush before it is aborted."""


@dataclass(frozen=True)
class MessagingConfig:
    """``[messaging]``: retained values, requests and verified sender (docs/messaging.md)."""

    retain_max_value_bytes: int = 64 * 1024
    """Largest retained value (payload plus headers), in bytes (RETAINED_TOO_LARGE past it)."""
    retain_max_topics: int = 100_000
    """Topics holding a retained value at once (RETAINED_LIMIT past it)."""
    retain_max_total_bytes: int = 256 * 1024 * 1024
    """Bytes of all retained values together (RETAINED_LIMIT past it)."""
    request_timeout_max: float = 60.0
    """Longest request timeout granted, in seconds (a client asking more gets this)."""
    max_pending_requests: int = 1024
    """Requests one connection may have waiting for an answer (LIMIT_EXCEEDED past it)."""
    sender: tuple[str, ...] = ()
    """Topic patterns whose plain deliveries carry the publisher's verified identity
    (``msg.sender``); ``[">"]`` for all. Requests and replies always carry it."""
    history: tuple[HistoryConfig, ...] = ()
    """``[[messaging.history]]`` streams (pattern, max_messages, max_age); off by default.
    Patterns may not overlap."""


@dataclass(frozen=True)
class BrokerConfig:
    """The whole broker configuration."""

    listeners: tuple[ListenerConfig, ...]
    acl_file: Path | None = None
    """TOML ACL policy (docs/acl.md). Without one, every publish and subscribe is denied."""
    audit_file: Path | None = None
    """JSON-lines audit trail (docs/operations.md); also logged through ``tessera.audit``."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log_level: str = "info"
    """``debug``, ``info``, ``warning`` or ``error``."""
    shutdown_timeout: float = 10.0
    """Seconds to flush clients on SIGTERM before exiting."""
    data_dir: Path | None = None
    """Directory for the embedded store (``tessera.sqlite3``: retained values). Without it the
    broker keeps no retained values and does not offer the ``retain`` feature."""
    messaging: MessagingConfig = field(default_factory=MessagingConfig)
    source: Path | None = None
    """The file this was loaded from, if any."""


def parse_bind(bind: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port``; raises ValueError."""
    host, sep, port_s = bind.rpartition(":")
    if not sep or not host:
        raise ValueError(f"bind must be host:port, not {bind!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return host, port


def _err(source: str, where: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {where}: {message}")


def _check_keys(table: Mapping[str, Any], allowed: set[str], source: str, where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _err(
            source, where, f"unknown key(s) {', '.join(unknown)}; allowed: {sorted(allowed)}"
        )


def _path(value: object, base: Path, source: str, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise _err(source, where, "must be a non-empty path string")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _listener(raw: object, i: int, base: Path, source: str) -> ListenerConfig:
    where = f"listeners[{i}]"
    if not isinstance(raw, dict):
        raise _err(source, where, "must be a table")
    allowed = {f.name for f in fields(ListenerConfig)}
    _check_keys(raw, allowed, source, where)
    bind = raw.get("bind")
    if not isinstance(bind, str):
        raise _err(source, f"{where}.bind", 'required, as "host:port"')
    try:
        parse_bind(bind)
    except ValueError as exc:
        raise _err(source, f"{where}.bind", str(exc)) from None
    security = raw.get("security", "tls")
    if security not in SECURITY_MODES:
        raise _err(source, f"{where}.security", f"must be one of {', '.join(SECURITY_MODES)}")
    paths: dict[str, Path | None] = {}
    for key in ("cert", "key", "client_ca", "keytab", "ntlm_user_file"):
        paths[key] = _path(raw[key], base, source, f"{where}.{key}") if key in raw else None
    uses_tls = security in ("tls", "tls+negotiate")
    uses_gss = security in ("negotiate", "tls+negotiate")
    if uses_tls and (paths["cert"] is None or paths["key"] is None):
        raise _err(source, where, f"security = {security!r} needs both 'cert' and 'key'")
    if not uses_tls:
        for key in ("cert", "key", "client_ca"):
            if paths[key] is not None:
                raise _err(source, f"{where}.{key}", "only for security = tls or tls+negotiate")
    if not uses_gss:
        for key in (
            "mechanisms",
            "service_principal",
            "keytab",
            "ntlm_user_file",
            "max_handshake_token_bytes",
            "max_handshake_legs",
        ):
            if key in raw:
                raise _err(source, f"{where}.{key}", "only for the negotiate security modes")
    mechanisms = raw.get("mechanisms", ["kerberos"])
    if (
        not isinstance(mechanisms, list)
        or not mechanisms
        or any(m not in ("kerberos", "ntlm") for m in mechanisms)
        or len(set(mechanisms)) != len(mechanisms)
    ):
        raise _err(source, f"{where}.mechanisms", 'a non-empty list of "kerberos", "ntlm"')
    service = raw.get("service_principal")
    if service is not None and (not isinstance(service, str) or not service.strip()):
        raise _err(source, f"{where}.service_principal", "must be a non-empty string")
    if uses_gss and "kerberos" in mechanisms and service is None:
        raise _err(
            source,
            f"{where}.service_principal",
            'required when "kerberos" is allowed (e.g. "tessera/broker.example.com@REALM")',
        )
    if uses_gss and "ntlm" in mechanisms and paths["ntlm_user_file"] is None:
        raise _err(source, f"{where}.ntlm_user_file", 'required when "ntlm" is allowed')
    bounds: dict[str, int] = {}
    for key, default in (("max_handshake_token_bytes", 65_536), ("max_handshake_legs", 4)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise _err(source, f"{where}.{key}", "must be a positive integer")
        bounds[key] = value
    id_fields = raw.get("identity_fields", list(DEFAULT_X509_NAME_FIELDS))
    if not isinstance(id_fields, list) or not all(isinstance(x, str) for x in id_fields):
        raise _err(source, f"{where}.identity_fields", "must be a list of strings")
    try:
        id_tuple = validate_x509_name_fields(id_fields)
    except ValueError as exc:
        raise _err(source, f"{where}.identity_fields", str(exc)) from None
    return ListenerConfig(
        bind=bind,
        security=security,
        cert=paths["cert"],
        key=paths["key"],
        client_ca=paths["client_ca"],
        identity_fields=id_tuple,
        mechanisms=tuple(mechanisms),
        service_principal=service,
        keytab=paths["keytab"],
        ntlm_user_file=paths["ntlm_user_file"],
        **bounds,
    )


def _limits(raw: object, source: str) -> LimitsConfig:
    if raw is None:
        return LimitsConfig()
    if not isinstance(raw, dict):
        raise _err(source, "limits", "must be a table")
    defaults = LimitsConfig()
    _check_keys(raw, {f.name for f in fields(LimitsConfig)}, source, "limits")
    values: dict[str, Any] = {}
    for f in fields(LimitsConfig):
        if f.name not in raw:
            continue
        value = raw[f.name]
        default = getattr(defaults, f.name)
        where = f"limits.{f.name}"
        if isinstance(default, str):
            if value not in SLOW_CONSUMER_POLICIES:
                raise _err(source, where, f"must be one of {', '.join(SLOW_CONSUMER_POLICIES)}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise _err(source, where, "must be a positive number of seconds")
            value = float(value)
        elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise _err(source, where, "must be a positive integer")
        values[f.name] = value
    result = LimitsConfig(**values)
    if result.max_frame_bytes > wire.MAX_FRAME_BYTES_CEILING:
        raise _err(source, "limits.max_frame_bytes", "may not exceed 64 MiB")
    if result.max_frame_bytes_before_hello > result.max_frame_bytes:
        raise _err(source, "limits.max_frame_bytes_before_hello", "may not exceed max_frame_bytes")
    if result.max_frame_bytes < wire.MAX_FRAME_BYTES_BEFORE_HELLO:
        raise _err(
            source,
            "limits.max_frame_bytes",
            f"must be at least {wire.MAX_FRAME_BYTES_BEFORE_HELLO} "
            "(clients refuse a smaller limit)",
        )
    if result.max_frame_bytes_before_hello < 1024:
        raise _err(source, "limits.max_frame_bytes_before_hello", "must be at least 1024")
    if (
        result.max_topic_bytes > wire.MAX_TOPIC_BYTES
        or result.max_topic_tokens > wire.MAX_TOPIC_TOKENS
    ):
        raise _err(
            source,
            "limits.max_topic_bytes",
            f"topic limits may be lowered, not raised above {wire.MAX_TOPIC_BYTES} bytes / "
            f"{wire.MAX_TOPIC_TOKENS} tokens (clients validate against those)",
        )
    if result.heartbeat_interval < wire.MIN_HEARTBEAT_MS / 1000:
        raise _err(source, "limits.heartbeat_interval", "must be at least 1 second")
    return result


def _messaging(raw: object, source: str) -> MessagingConfig:
    if raw is None:
        return MessagingConfig()
    if not isinstance(raw, dict):
        raise _err(source, "messaging", "must be a table")
    _check_keys(raw, {f.name for f in fields(MessagingConfig)}, source, "messaging")
    values: dict[str, Any] = {}
    for name in (
        "retain_max_value_bytes",
        "retain_max_topics",
        "retain_max_total_bytes",
        "max_pending_requests",
    ):
        if name in raw:
            v = raw[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _err(source, f"messaging.{name}", "must be a positive integer")
            values[name] = v
    if "request_timeout_max" in raw:
        v = raw["request_timeout_max"]
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 3600:
            raise _err(source, "messaging.request_timeout_max", "must be 0 < seconds <= 3600")
        values["request_timeout_max"] = float(v)
    if "sender" in raw:
        v = raw["sender"]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise _err(source, "messaging.sender", "must be a list of topic patterns")
        for pattern in v:
            try:
                validate_pattern(pattern)
            except InvalidTopic as exc:
                raise _err(source, "messaging.sender", exc.message) from None
        values["sender"] = tuple(v)
    if "history" in raw:
        values["history"] = _history(raw["history"], source)
    return MessagingConfig(**values)


def _history(raw: object, source: str) -> tuple[HistoryConfig, ...]:
    if not isinstance(raw, list):
        raise _err(source, "messaging.history", "must be an array of tables")
    out: list[HistoryConfig] = []
    for i, t in enumerate(raw):
        where = f"messaging.history[{i}]"
        if not isinstance(t, dict):
            raise _err(source, where, "must be a table")
        _check_keys(t, {"pattern", "max_messages", "max_age"}, source, where)
        pattern = t.get("pattern")
        if not isinstance(pattern, str):
            raise _err(source, f"{where}.pattern", "is required (a topic pattern)")
        try:
            validate_pattern(pattern)
        except InvalidTopic as exc:
            raise _err(source, f"{where}.pattern", exc.message) from None
        n = t.get("max_messages", 1000)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10_000_000:
            raise _err(source, f"{where}.max_messages", "must be an integer from 1 to 10000000")
        age = t.get("max_age")
        if age is not None and (
            isinstance(age, bool) or not isinstance(age, int | float) or age <= 0
        ):
            raise _err(source, f"{where}.max_age", "must be a positive number of seconds")
        for j, other in enumerate(out):
            if overlaps(pattern.split("."), other.pattern.split(".")):
                raise _err(source, f"{where}.pattern", f"overlaps messaging.history[{j}]")
        out.append(HistoryConfig(pattern, n, None if age is None else float(age)))
    return tuple(out)


def config_from_dict(data: Mapping[str, Any], *, base: Path, source: str) -> BrokerConfig:
    """Build and validate a :class:`BrokerConfig` from parsed TOML."""
    _check_keys(
        data,
        {"listeners", "acl", "audit", "limits", "log", "shutdown_timeout", "data_dir", "messaging"},
        source,
        "top level",
    )
    raw_listeners = data.get("listeners")
    if not isinstance(raw_listeners, list) or not raw_listeners:
        raise _err(source, "listeners", "at least one [[listeners]] table is required")
    listeners = tuple(_listener(r, i, base, source) for i, r in enumerate(raw_listeners))
    ntlm_files = {lst.ntlm_user_file for lst in listeners if lst.ntlm_user_file is not None}
    if len(ntlm_files) > 1:
        raise _err(
            source,
            "listeners",
            "every listener that allows NTLM must name the same ntlm_user_file "
            "(pyspnego reads one process-wide file)",
        )
    acl = data.get("acl", {})
    if not isinstance(acl, dict):
        raise _err(source, "acl", "must be a table")
    _check_keys(acl, {"file"}, source, "acl")
    acl_file = _path(acl["file"], base, source, "acl.file") if "file" in acl else None
    audit = data.get("audit", {})
    if not isinstance(audit, dict):
        raise _err(source, "audit", "must be a table")
    _check_keys(audit, {"file"}, source, "audit")
    audit_file = _path(audit["file"], base, source, "audit.file") if "file" in audit else None
    log = data.get("log", {})
    if not isinstance(log, dict):
        raise _err(source, "log", "must be a table")
    _check_keys(log, {"level"}, source, "log")
    level = log.get("level", "info")
    if level not in ("debug", "info", "warning", "error"):
        raise _err(source, "log.level", "must be debug, info, warning or error")
    shutdown = data.get("shutdown_timeout", 10.0)
    if isinstance(shutdown, bool) or not isinstance(shutdown, int | float) or shutdown <= 0:
        raise _err(source, "shutdown_timeout", "must be a positive number of seconds")
    return BrokerConfig(
        listeners=listeners,
        acl_file=acl_file,
        audit_file=audit_file,
        limits=_limits(data.get("limits"), source),
        log_level=level,
        shutdown_timeout=float(shutdown),
        data_dir=_path(data["data_dir"], base, source, "data_dir") if "data_dir" in data else None,
        messaging=_messaging(data.get("messaging"), source),
    )


def load_config(path: str | Path) -> BrokerConfig:
    """Read, parse and validate a broker configuration file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    cfg = config_from_dict(data, base=p.resolve().parent, source=str(p))
    return BrokerConfig(
        listeners=cfg.listeners,
        acl_file=cfg.acl_file,
        audit_file=cfg.audit_file,
        limits=cfg.limits,
        log_level=cfg.log_level,
        shutdown_timeout=cfg.shutdown_timeout,
        data_dir=cfg.data_dir,
        messaging=cfg.messaging,
        source=p,
    )


def check_files(cfg: BrokerConfig) -> list[str]:
    """Problems with the files a valid configuration names (missing, unreadable, keys too open)."""
    problems: list[str] = []
    for i, lst in enumerate(cfg.listeners):
        for key in ("cert", "key", "client_ca", "keytab", "ntlm_user_file"):
            p: Path | None = getattr(lst, key)
            if p is not None and not p.is_file():
                problems.append(f"listeners[{i}].{key}: {p} does not exist")
        if lst.key is not None and lst.key.is_file() and lst.key.stat().st_mode & 0o077:
            problems.append(
                f"listeners[{i}].key: {lst.key} is readable by group/others (chmod 600)"
            )
    if cfg.acl_file is not None and not cfg.acl_file.is_file():
        problems.append(f"acl.file: {cfg.acl_file} does not exist")
    return problems
