"""Broker configuration: frozen dataclasses that validate themselves, loaded from TOML.

One source of truth: each field's type says what a value may be (``Annotated[int, Int(min=1)]``,
``Annotated[str, OneOf("disconnect", "drop")]``, ``Annotated[Path | None, File()]``), and the same
declaration drives both the TOML loader and the dataclass's own ``__post_init__`` check, so
``LimitsConfig(max_frame_bytes=-1)`` raises :class:`ConfigError` just as a file saying so does.

The loader reports every problem of a file at once, each with its line, its key
(``listeners[0].client_ca``) and, for an unknown key, the nearest known one ("did you mean
`client_ca`?"). See docs/configuration.md for every key.

Adding a key is one edit: a field with an ``Annotated`` type, a default and a docstring in the
dataclass of its table. Adding a section is a frozen dataclass for it plus one field in
:class:`BrokerConfig` (``cluster: ClusterConfig = field(default_factory=ClusterConfig)``); a
check that relates several fields goes in that class's ``_relations``. Relative paths are
resolved against the directory of the configuration file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

from tessera_mq.auth.identity import DEFAULT_X509_NAME_FIELDS, validate_x509_name_fields
from tessera_mq.client.protocol import limits as wire
from tessera_mq.client.protocol.errors import InvalidTopic
from tessera_mq.client.protocol.grammar import intersects
from tessera_mq.client.protocol.topics import validate_pattern

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "SECURITY_MODES",
    "SLOW_CONSUMER_POLICIES",
    "CRL_EXPIRED_POLICIES",
    "DEFAULT_ADMIN_SOCKET",
    "BrokerConfig",
    "ClusterConfig",
    "Bind",
    "ConfigError",
    "File",
    "Files",
    "HistoryConfig",
    "Int",
    "LimitsConfig",
    "ListenerConfig",
    "MessagingConfig",
    "MetricsConfig",
    "Names",
    "OneOf",
    "Pattern",
    "Patterns",
    "Problem",
    "Seconds",
    "SocketPath",
    "Text",
    "config_from_dict",
    "load_config",
    "parse_bind",
]

SECURITY_MODES = ("tls", "negotiate", "tls+negotiate")
SLOW_CONSUMER_POLICIES = ("disconnect", "drop")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
_TLS_MODES = ("tls", "tls+negotiate")
#: ``crl_expired`` values (issue #10).
CRL_EXPIRED_POLICIES = ("refuse", "warn")
#: The admin socket's file name beside the configuration file (issue #10).
DEFAULT_ADMIN_SOCKET = "tessera-admin.sock"
_GSS_MODES = ("negotiate", "tls+negotiate")


# --- problems and the error -------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong (or worth a warning) in a configuration."""

    where: str
    """The key, as written in the file: ``listeners[0].cert``, ``limits``; empty for the file."""
    message: str
    line: int | None = None
    """1-based line of the key in the file (or of its table), when known."""
    file: str | None = None
    severity: str = "error"
    """``error`` (the broker would not start, or would not work) or ``warning``."""

    def __str__(self) -> str:
        loc = (self.file or "") + (f":{self.line}" if self.line else "")
        head = f"{loc}: " if loc else ""
        return f"{head}{self.where}: {self.message}" if self.where else f"{head}{self.message}"

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "key": self.where,
            "message": self.message,
            "severity": self.severity,
        }


class ConfigError(ValueError):
    """The configuration is invalid. ``problems`` lists every problem found (file, line, key);
    the message is one line per problem."""

    def __init__(self, problems: str | Sequence[Problem]) -> None:
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class _Invalid(Exception):
    """A value breaks its field's rule (the message says the rule, not the value's type)."""


# --- what a value may be ----------------------------------------------------------------------


class Spec:
    """The rule of one field: :meth:`parse` returns the field's value or raises ``_Invalid``.

    ``base`` is the configuration file's directory (relative paths), ``None`` when a dataclass
    is built directly in Python."""

    def parse(self, value: object, base: Path | None) -> object:
        raise NotImplementedError


@dataclass(frozen=True)
class Int(Spec):
    """An integer (not a boolean) in ``[min, max]``."""

    min: int = 1
    max: int | None = None

    def parse(self, value: object, base: Path | None) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(self._rule())
        if value < self.min or (self.max is not None and value > self.max):
            raise _Invalid(self._rule())
        return value

    def _rule(self) -> str:
        if self.max is not None:
            return f"must be an integer from {self.min} to {self.max}"
        return (
            "must be a positive integer" if self.min == 1 else f"must be an integer >= {self.min}"
        )


@dataclass(frozen=True)
class Seconds(Spec):
    """A duration in seconds, greater than 0 (and at least ``min`` when given)."""

    min: float | None = None

    def parse(self, value: object, base: Path | None) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid("must be a positive number of seconds")
        seconds = float(value)
        if not math.isfinite(seconds) or seconds <= 0:
            raise _Invalid("must be a positive number of seconds")
        if self.min is not None and seconds < self.min:
            raise _Invalid(f"must be at least {self.min:g} second(s)")
        return seconds


@dataclass(frozen=True)
class SecondsBetween(Spec):
    """A duration in seconds in ``[low, high]`` (0 allowed)."""

    low: float
    high: float

    def parse(self, value: object, base: Path | None) -> object:
        rule = f"must be {self.low:g} to {self.high:g} seconds"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid(rule)
        seconds = float(value)
        if not math.isfinite(seconds) or not self.low <= seconds <= self.high:
            raise _Invalid(rule)
        return seconds


@dataclass(frozen=True)
class OneOf(Spec):
    """One of a few strings."""

    choices: tuple[str, ...]

    def parse(self, value: object, base: Path | None) -> object:
        if value not in self.choices:
            raise _Invalid(f"must be one of {', '.join(self.choices)}")
        return value


@dataclass(frozen=True)
class Text(Spec):
    """A non-empty string."""

    def parse(self, value: object, base: Path | None) -> object:
        if not isinstance(value, str) or not value.strip():
            raise _Invalid("must be a non-empty string")
        return value


@dataclass(frozen=True)
class Bind(Spec):
    """``host:port`` (``[v6]:port``); port 0 picks a free port."""

    def parse(self, value: object, base: Path | None) -> object:
        if not isinstance(value, str):
            raise _Invalid('must be "host:port"')
        try:
            parse_bind(value)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
        return value


@dataclass(frozen=True)
class File(Spec):
    """A path; relative ones are resolved against the configuration file's directory."""

    def parse(self, value: object, base: Path | None) -> object:
        if isinstance(value, Path):
            p = value
        elif isinstance(value, str) and value:
            p = Path(value)
        else:
            raise _Invalid("must be a non-empty path string")
        p = p.expanduser()
        return p if p.is_absolute() or base is None else base / p


@dataclass(frozen=True)
class Names(Spec):
    """A non-empty list of distinct strings, each one of ``choices``; stored as a tuple."""

    choices: tuple[str, ...]

    def parse(self, value: object, base: Path | None) -> object:
        rule = f"must be a non-empty list of distinct values from {', '.join(self.choices)}"
        if not isinstance(value, list | tuple) or not value:
            raise _Invalid(rule)
        if any(v not in self.choices for v in value) or len(set(value)) != len(value):
            raise _Invalid(rule)
        return tuple(value)


@dataclass(frozen=True)
class IdentityFields(Spec):
    """Certificate fields tried in order for a client's name (docs/identity.md)."""

    def parse(self, value: object, base: Path | None) -> object:
        if not isinstance(value, list | tuple) or not all(isinstance(x, str) for x in value):
            raise _Invalid("must be a list of strings")
        try:
            return validate_x509_name_fields(value)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None


@dataclass(frozen=True)
class Files(Spec):
    """A path or a list of paths (each as :class:`File`); stored as a tuple."""

    def parse(self, value: object, base: Path | None) -> object:
        items = [value] if isinstance(value, str | Path) else value
        if not isinstance(items, list | tuple):
            raise _Invalid("must be a path or a list of paths")
        try:
            return tuple(File().parse(item, base) for item in items)
        except _Invalid:
            raise _Invalid("must be a path or a list of non-empty paths") from None


@dataclass(frozen=True)
class SocketPath(Spec):
    """A Unix socket path (resolved like :class:`File`), or ``""`` for none; stored as text."""

    def parse(self, value: object, base: Path | None) -> object:
        if value == "":
            return value
        if not isinstance(value, str | Path):
            raise _Invalid('must be a path ("" turns it off)')
        return str(File().parse(value, base))


@dataclass(frozen=True)
class Pattern(Spec):
    """A subscription pattern (docs/protocol.md section 8)."""

    def parse(self, value: object, base: Path | None) -> object:
        if not isinstance(value, str):
            raise _Invalid("must be a topic pattern (a string)")
        try:
            validate_pattern(value)
        except InvalidTopic as exc:
            raise _Invalid(exc.message) from None
        return value


@dataclass(frozen=True)
class Patterns(Spec):
    """A list of subscription patterns (possibly empty); stored as a tuple."""

    def parse(self, value: object, base: Path | None) -> object:
        if not isinstance(value, list | tuple):
            raise _Invalid("must be a list of topic patterns")
        for item in value:
            Pattern().parse(item, base)
        return tuple(value)


def parse_bind(bind: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port``; raises ValueError."""
    host, sep, port_s = bind.rpartition(":")
    if not sep or not host:
        raise ValueError(f"bind must be host:port, not {bind!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"port {port_s!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return host, port


# --- the schema, read from the dataclasses ----------------------------------------------------


def _toml(key: str) -> dict[str, str]:
    """Field metadata: the field is written ``key`` in TOML (``"log.level"`` for a key of a
    sub-table), not under its Python name."""
    return {"toml": key}


@dataclass(frozen=True)
class _Field:
    name: str
    toml: tuple[str, ...]  # () = not in the file
    kind: str  # "value", "table", "tables"
    spec: Spec | None
    cls: type[Any] | None  # the dataclass of a table / of each table of an array
    default: object
    required: bool


_SCHEMAS: dict[type[Any], dict[str, _Field]] = {}


def _optional_table(hint: object) -> type[Any] | None:
    """``X`` for a hint ``X | None`` where ``X`` is a config dataclass, else None."""
    args = typing.get_args(hint)
    if type(None) not in args:
        return None
    rest = [a for a in args if a is not type(None)]
    if len(rest) == 1 and dataclasses.is_dataclass(rest[0]) and isinstance(rest[0], type):
        return rest[0]
    return None


def _schema(cls: type[Any]) -> dict[str, _Field]:
    schema = _SCHEMAS.get(cls)
    if schema is not None:
        return schema
    hints = typing.get_type_hints(cls, include_extras=True)
    schema = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        toml_key = f.metadata.get("toml", f.name)
        toml = tuple(toml_key.split(".")) if toml_key else ()
        spec: Spec | None = None
        sub: type[Any] | None = None
        kind = "value"
        if typing.get_origin(hint) is Annotated:
            spec = next((m for m in hint.__metadata__ if isinstance(m, Spec)), None)
        elif dataclasses.is_dataclass(hint) and isinstance(hint, type):
            kind, sub = "table", hint
        elif _optional_table(hint) is not None:  # ``X | None``: a table that may be absent
            kind, sub = "table", _optional_table(hint)
        elif typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            if dataclasses.is_dataclass(item) and isinstance(item, type):
                kind, sub = "tables", item
        if f.default is not dataclasses.MISSING:
            default: object = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        schema[f.name] = _Field(
            f.name, toml, kind, spec, sub, default, default is dataclasses.MISSING
        )
    _SCHEMAS[cls] = schema
    return schema


def _self_check(obj: Any) -> None:
    """``__post_init__`` of every config dataclass: apply each field's rule (normalising, e.g.
    ``int`` seconds to ``float``, lists to tuples), then the class's cross-field relations."""
    problems: list[Problem] = []
    for f in _schema(type(obj)).values():
        if f.spec is None:
            continue
        value = getattr(obj, f.name)
        if value is None and f.default is None:
            continue
        try:
            parsed = f.spec.parse(value, None)
        except _Invalid as exc:
            problems.append(Problem(f.name, str(exc)))
            continue
        if parsed is not value:
            object.__setattr__(obj, f.name, parsed)
    relations: Callable[[], Iterator[tuple[str, str]]] | None = getattr(obj, "_relations", None)
    if not problems and relations is not None:
        problems += [Problem(where, message) for where, message in relations()]
    if problems:
        raise ConfigError(problems)


# --- the tables -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListenerConfig:
    """One ``[[listeners]]`` table: where to listen and how connections are secured."""

    bind: Annotated[str, Bind()]
    """``host:port`` to listen on (``[::1]:7443`` for IPv6); port 0 picks a free port."""
    security: Annotated[str, OneOf(SECURITY_MODES)] = "tls"
    """``tls`` (``negotiate`` and ``tls+negotiate`` are the Kerberos/NTLM modes)."""
    cert: Annotated[Path | None, File()] = None
    """PEM certificate chain presented by the broker (required for ``tls``)."""
    key: Annotated[Path | None, File()] = None
    """PEM private key of ``cert``."""
    client_ca: Annotated[Path | None, File()] = None
    """PEM CA bundle; when present every client must present a certificate issued by it."""
    identity_fields: Annotated[tuple[str, ...], IdentityFields()] = DEFAULT_X509_NAME_FIELDS
    """Certificate fields tried in order for the client's name: san_email, san_uri, san_dns,
    cn, dn (see docs/identity.md)."""
    mechanisms: Annotated[tuple[str, ...], Names(("kerberos", "ntlm"))] = ("kerberos",)
    """``negotiate`` modes: the SPNEGO mechanisms allowed; NTLM only when listed."""
    service_principal: Annotated[str | None, Text()] = None
    """``negotiate`` modes: the only service principal whose tickets are accepted
    (``tessera/host@REALM``; a bare host name means ``tessera/<host>@<default realm>``)."""
    keytab: Annotated[Path | None, File()] = None
    """``negotiate`` modes: the keytab (default: ``KRB5_KTNAME`` / krb5.conf)."""
    ntlm_user_file: Annotated[Path | None, File()] = None
    """``negotiate`` modes with NTLM: the account file pyspnego verifies NTLM against."""
    max_handshake_token_bytes: Annotated[int, Int(min=1)] = 65_536
    """``negotiate`` modes: largest SPNEGO token accepted."""
    max_handshake_legs: Annotated[int, Int(min=1)] = 4
    """``negotiate`` modes: most tokens accepted from a client in one handshake."""
    max_clock_skew: Annotated[float, SecondsBetween(0, 300)] = 60.0
    """``negotiate`` modes: seconds after its end time a Kerberos ticket is still accepted
    (clock skew tolerated; MIT's own 300 s limit still applies on top; docs/kerberos.md)."""
    crl: Annotated[tuple[Path, ...], Files()] = ()
    """TLS modes with ``client_ca``: PEM CRL files (``tessera-certs crl``); a client certificate
    they list is refused, and a reload closes sessions that used one (docs/operations.md)."""
    crl_expired: Annotated[str, OneOf(CRL_EXPIRED_POLICIES)] = "refuse"
    """What a listener does while a CRL is past its next update: ``refuse`` new client
    handshakes (the default: fail closed) or ``warn`` (log, and keep enforcing the stale list)."""

    #: Keys that only mean something in some security modes (a key set in another mode is an
    #: error: it would silently do nothing).
    ONLY_FOR: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "cert": _TLS_MODES,
        "key": _TLS_MODES,
        "client_ca": _TLS_MODES,
        "mechanisms": _GSS_MODES,
        "service_principal": _GSS_MODES,
        "keytab": _GSS_MODES,
        "ntlm_user_file": _GSS_MODES,
        "max_handshake_token_bytes": _GSS_MODES,
        "max_handshake_legs": _GSS_MODES,
        "max_clock_skew": _GSS_MODES,
        "crl": _TLS_MODES,
        "crl_expired": _TLS_MODES,
    }

    def __post_init__(self) -> None:
        _self_check(self)

    @classmethod
    def _check_given(cls, given: Mapping[str, object]) -> Iterator[tuple[str, str]]:
        """From the loader: keys written in the file that the listener's mode ignores."""
        security = given.get("security", "tls")
        for key in given:
            modes = cls.ONLY_FOR.get(key)
            if modes is not None and security not in modes:
                which = "tls or tls+negotiate" if modes == _TLS_MODES else "the negotiate modes"
                yield key, f"only for security = {which} (this listener is {security!r})"

    def _relations(self) -> Iterator[tuple[str, str]]:
        defaults = _schema(ListenerConfig)
        for key, modes in self.ONLY_FOR.items():
            if self.security not in modes and getattr(self, key) != defaults[key].default:
                yield key, f"only for security = {' or '.join(modes)}"
        if self.security in _TLS_MODES and (self.cert is None or self.key is None):
            yield "", f"security = {self.security!r} needs both 'cert' and 'key'"
        if self.security in _GSS_MODES:
            if "kerberos" in self.mechanisms and self.service_principal is None:
                yield (
                    "service_principal",
                    'required when "kerberos" is allowed (e.g. "tessera/broker.example.com@REALM")',
                )
            if "ntlm" in self.mechanisms and self.ntlm_user_file is None:
                yield "ntlm_user_file", 'required when "ntlm" is allowed'
        if self.crl and self.client_ca is None:
            yield "crl", "needs client_ca (CRLs revoke client certificates)"

    @property
    def host(self) -> str:
        return parse_bind(self.bind)[0]

    @property
    def port(self) -> int:
        return parse_bind(self.bind)[1]


@dataclass(frozen=True)
class LimitsConfig:
    """``[limits]``: bounds on what one connection may use (see docs/operations.md)."""

    max_frame_bytes: Annotated[
        int, Int(min=wire.MAX_FRAME_BYTES_BEFORE_HELLO, max=wire.MAX_FRAME_BYTES_CEILING)
    ] = wire.MAX_FRAME_BYTES
    """Largest frame body after hello (announced in welcome); 64 KiB (clients refuse a smaller
    limit) to 64 MiB."""
    max_frame_bytes_before_hello: Annotated[int, Int(min=1024)] = wire.MAX_FRAME_BYTES_BEFORE_HELLO
    """Largest frame body before hello."""
    handshake_timeout: Annotated[float, Seconds()] = 10.0
    """Seconds from accept until the security handshake must be complete."""
    hello_timeout: Annotated[float, Seconds()] = 5.0
    """Seconds from the end of the security handshake until hello must have arrived."""
    heartbeat_interval: Annotated[float, Seconds(min=wire.MIN_HEARTBEAT_MS / 1000)] = (
        wire.DEFAULT_HEARTBEAT_MS / 1000
    )
    """Seconds of silence after which the broker pings; two intervals close the connection."""
    max_pending_bytes: Annotated[int, Int(min=1)] = 8 * 1024 * 1024
    """Bytes queued for one subscriber before the slow-consumer policy applies (NATS
    ``max_pending`` defaults to 64 MB; we are stricter per connection because we hold more)."""
    max_pending_messages: Annotated[int, Int(min=1)] = 65_536
    """Messages queued for one subscriber before the slow-consumer policy applies."""
    slow_consumer: Annotated[str, OneOf(SLOW_CONSUMER_POLICIES)] = "disconnect"
    """What happens to a subscriber over its pending limits: ``disconnect`` (close code 11) or
    ``drop`` (new deliveries are discarded and counted; the client is told how many in an
    ``error`` frame with code 11 and ``dropped`` once its outbox has drained)."""
    max_subscriptions: Annotated[int, Int(min=1)] = 1024
    """Live subscriptions per connection."""
    max_connections: Annotated[int, Int(min=1)] = 100_000
    """Connections held at once across all listeners; further ones are closed at accept."""
    max_connections_per_identity: Annotated[int, Int(min=1)] = 10_000
    """Connections one authenticated identity may hold at once (closed with LIMIT_EXCEEDED)."""
    max_topic_bytes: Annotated[int, Int(min=1, max=wire.MAX_TOPIC_BYTES)] = wire.MAX_TOPIC_BYTES
    """Longest topic or pattern, in UTF-8 bytes (may be lowered, not raised: clients validate
    against the protocol's limit)."""
    max_topic_tokens: Annotated[int, Int(min=1, max=wire.MAX_TOPIC_TOKENS)] = wire.MAX_TOPIC_TOKENS
    """Most tokens (levels) in a topic or pattern (may be lowered, not raised)."""
    close_timeout: Annotated[float, Seconds()] = 5.0
    """Seconds a closing connection may take to flush before it is aborted."""
    max_session_age: Annotated[float | None, Seconds()] = None
    """Seconds after which an authenticated session must re-authenticate: it is closed with
    ``CREDENTIAL_EXPIRED`` (23) and the SDK reconnects (Kafka's ``connections.max.reauth.ms``);
    none by default. A credential that ends sooner ends the session sooner."""

    def __post_init__(self) -> None:
        _self_check(self)

    def _relations(self) -> Iterator[tuple[str, str]]:
        if self.max_frame_bytes_before_hello > self.max_frame_bytes:
            yield "max_frame_bytes_before_hello", "may not exceed max_frame_bytes"


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: the opt-in HTTP listener for Prometheus, ``/healthz`` and ``/readyz``
    (needs the ``metrics`` extra; docs/operations.md)."""

    bind: Annotated[str | None, Bind()] = None
    """``host:port`` of the HTTP listener (e.g. ``127.0.0.1:9464``); none = no listener."""

    def __post_init__(self) -> None:
        _self_check(self)


class RedisURL(Spec):
    """``redis://host:port[/db]`` or ``rediss://...``, with no credentials in it."""

    def parse(self, value: object, base: Path | None) -> object:
        if not isinstance(value, str) or not value.startswith(("redis://", "rediss://")):
            raise _Invalid('required, as "redis://host:port" or "rediss://..."')
        authority = value.split("://", 1)[1].split("/", 1)[0]
        if "@" in authority:
            raise _Invalid("no credentials in the URL: use username and password_file")
        return value


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: share the topic space with other broker processes and nodes through
    Redis (issue #11; docs/scaling.md). Absent: one process, nothing external."""

    redis: Annotated[str, RedisURL()]
    """``redis://host:port[/db]`` or ``rediss://`` (TLS 1.2+, server certificate verified);
    no password in the URL (use ``password_file``)."""
    username: Annotated[str | None, Text()] = None
    """Redis ACL user (``AUTH username password``); default: Redis' ``default`` user."""
    password_file: Annotated[Path | None, File()] = None
    """File whose first line is the Redis password (keep it ``chmod 600``)."""
    tls_ca: Annotated[Path | None, File()] = None
    """``rediss://``: PEM CA bundle to verify Redis with (default: the system's)."""
    channel_prefix: Annotated[str, Text()] = "tessera"
    """Prefix of the Redis channels; brokers sharing one topic space use the same one."""
    max_queue_messages: Annotated[int, Int(min=1)] = 10_000
    """Publications queued for Redis before further ones are delivered locally only (and
    counted in ``backplane.refused_queue_full``)."""

    def __post_init__(self) -> None:
        _self_check(self)

    def _relations(self) -> Iterator[tuple[str, str]]:
        if any(c.isspace() for c in self.channel_prefix):
            yield "channel_prefix", "must be a non-empty string without spaces"
        if self.tls_ca is not None and not self.redis.startswith("rediss://"):
            yield "tls_ca", "goes with a rediss:// URL"


@dataclass(frozen=True)
class HistoryConfig:
    """One ``[[messaging.history]]`` table: a history stream (docs/messaging.md)."""

    pattern: Annotated[str, Pattern()]
    """Topics whose messages are kept (one stream, one sequence for all of them)."""
    max_messages: Annotated[int, Int(min=1, max=10_000_000)] = 1000
    """Messages kept at most (the oldest goes first)."""
    max_age: Annotated[float | None, Seconds()] = None
    """Seconds a message is kept at most (none: only ``max_messages`` applies)."""

    def __post_init__(self) -> None:
        _self_check(self)


@dataclass(frozen=True)
class MessagingConfig:
    """``[messaging]``: retained values, requests, verified sender and history
    (docs/messaging.md)."""

    retain_max_value_bytes: Annotated[int, Int(min=1)] = 64 * 1024
    """Largest retained value (payload plus headers), in bytes (RETAINED_TOO_LARGE past it)."""
    retain_max_topics: Annotated[int, Int(min=1)] = 100_000
    """Topics holding a retained value at once (RETAINED_LIMIT past it)."""
    retain_max_total_bytes: Annotated[int, Int(min=1)] = 256 * 1024 * 1024
    """Bytes of all retained values together, also held in memory (RETAINED_LIMIT past it)."""
    request_timeout_max: Annotated[float, SecondsBetween(0.001, 3600)] = 60.0
    """Longest request timeout granted, in seconds (a client asking more gets this)."""
    max_pending_requests: Annotated[int, Int(min=1)] = 1024
    """Requests one connection may have waiting for an answer (LIMIT_EXCEEDED past it)."""
    sender: Annotated[tuple[str, ...], Patterns()] = ()
    """Topic patterns whose plain deliveries carry the publisher's verified identity
    (``msg.sender``); ``[">"]`` for all. Requests and replies always carry it."""
    history: tuple[HistoryConfig, ...] = ()
    """``[[messaging.history]]`` streams; off by default. Their patterns may not overlap."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "history", tuple(self.history))
        _self_check(self)

    def _relations(self) -> Iterator[tuple[str, str]]:
        for i, h in enumerate(self.history):
            for j in range(i):
                if intersects(h.pattern.split("."), self.history[j].pattern.split(".")):
                    yield "history", f"[{i}].pattern overlaps [{j}].pattern"


@dataclass(frozen=True)
class BrokerConfig:
    """The whole broker configuration."""

    listeners: tuple[ListenerConfig, ...]
    """``[[listeners]]``: at least one."""
    acl_file: Annotated[Path | None, File()] = field(default=None, metadata=_toml("acl.file"))
    """TOML ACL policy (docs/acl.md). Without one, every publish and subscribe is denied."""
    audit_file: Annotated[Path | None, File()] = field(default=None, metadata=_toml("audit.file"))
    """JSON-lines audit trail (docs/operations.md); also logged through ``tessera.audit``."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log_level: Annotated[str, OneOf(LOG_LEVELS)] = field(
        default="info", metadata=_toml("log.level")
    )
    """``debug``, ``info``, ``warning`` or ``error``."""
    shutdown_timeout: Annotated[float, Seconds()] = 10.0
    """Seconds to flush clients on SIGTERM before exiting."""
    source: Path | None = field(default=None, metadata=_toml(""))
    """The file this was loaded from, if any."""
    log_format: Annotated[str, OneOf(LOG_FORMATS)] = field(
        default="text", metadata=_toml("log.format")
    )
    """``text`` (one human line per record) or ``json`` (one JSON object per line)."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    admin_socket: Annotated[str | None, SocketPath()] = None
    """The admin endpoint of ``tessera-broker reload``/``connections``: a Unix socket, mode
    0600. Default (unset): ``tessera-admin.sock`` beside the configuration file; ``""``: none."""
    cluster: ClusterConfig | None = None
    """``[cluster]``: the Redis backplane (docs/scaling.md); None for a single process."""
    data_dir: Annotated[Path | None, File()] = None
    """Directory of the embedded store (``tessera.sqlite3``: retained values). Without it the
    broker keeps no retained values and does not offer the ``retain`` feature."""
    messaging: MessagingConfig = field(default_factory=MessagingConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "listeners", tuple(self.listeners))
        _self_check(self)

    @property
    def admin_socket_path(self) -> Path | None:
        """Where the admin socket is (``None``: no admin endpoint)."""
        if self.admin_socket == "":
            return None
        if self.admin_socket is not None:
            return Path(self.admin_socket)
        return self.source.parent / DEFAULT_ADMIN_SOCKET if self.source is not None else None

    def _relations(self) -> Iterator[tuple[str, str]]:
        if not self.listeners:
            yield "listeners", "at least one [[listeners]] table is required"
        ntlm = {lst.ntlm_user_file for lst in self.listeners if lst.ntlm_user_file is not None}
        if len(ntlm) > 1:
            yield (
                "listeners",
                "every listener that allows NTLM must name the same ntlm_user_file "
                "(pyspnego reads one process-wide file)",
            )


# --- the loader -------------------------------------------------------------------------------

_Path = tuple[str | int, ...]


def _where(path: _Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class _Loader:
    def __init__(self, base: Path, source: str, lines: Mapping[_Path, int]) -> None:
        self.base = base
        self.source = source
        self.lines = lines
        self.problems: list[Problem] = []

    def line(self, path: _Path) -> int | None:
        for n in range(len(path), 0, -1):
            found = self.lines.get(path[:n])
            if found is not None:
                return found
        return None

    def error(self, path: _Path, message: str) -> None:
        self.problems.append(Problem(_where(path), message, self.line(path), self.source))

    def table(self, cls: type[Any], raw: object, path: _Path) -> Any:
        """Build ``cls`` from a TOML table, recording every problem; None if there were any."""
        if not isinstance(raw, dict):
            self.error(path, "must be a table")
            return None
        before = len(self.problems)
        schema = _schema(cls)
        self._unknown_keys(schema, raw, path)
        values: dict[str, Any] = {}
        given: dict[str, Any] = {}
        for f in schema.values():
            if not f.toml:
                continue
            present, value = _get(raw, f.toml)
            where = path + f.toml
            if not present:
                if f.required:
                    self.error(where, _required(f))
                continue
            given[f.name] = value
            if f.kind == "table":
                assert f.cls is not None
                parsed = self.table(f.cls, value, where)
            elif f.kind == "tables":
                assert f.cls is not None
                if not isinstance(value, list) or not value:
                    self.error(where, _required(f))
                    continue
                items = [self.table(f.cls, item, (*where, i)) for i, item in enumerate(value)]
                parsed = None if any(x is None for x in items) else tuple(items)
            elif f.spec is not None:
                try:
                    parsed = f.spec.parse(value, self.base)
                except _Invalid as exc:
                    self.error(where, str(exc))
                    continue
            else:
                parsed = value
            values[f.name] = parsed
        check_given: Callable[[Mapping[str, object]], Iterator[tuple[str, str]]] | None = getattr(
            cls, "_check_given", None
        )
        if check_given is not None:
            reported = {p.where for p in self.problems[before:]}
            for key, message in check_given(given):
                if _where(path + schema[key].toml) not in reported:
                    self.error(path + schema[key].toml, message)
        if len(self.problems) > before:
            return None
        try:
            return cls(**values)
        except ConfigError as exc:
            for p in exc.problems:
                sub = schema.get(p.where)
                self.error(path + (sub.toml if sub else ()), p.message)
            return None

    def _unknown_keys(
        self, schema: Mapping[str, _Field], raw: Mapping[str, Any], path: _Path
    ) -> None:
        tree: dict[str, set[str]] = {}
        for f in schema.values():
            if f.toml:
                tree.setdefault(f.toml[0], set()).update(f.toml[1:2])
        for key in raw:
            if key not in tree:
                self.error((*path, key), _unknown(key, tree, path))
                continue
            sub = tree[key]
            if sub:  # a table holding fields of this class (``[log]`` -> log_level, log_format)
                inner = raw[key]
                if not isinstance(inner, dict):
                    self.error((*path, key), "must be a table")
                    continue
                for k in inner:
                    if k not in sub:
                        self.error((*path, key, k), _unknown(k, dict.fromkeys(sub), (*path, key)))


def _get(raw: Mapping[str, Any], toml: tuple[str, ...]) -> tuple[bool, object]:
    value: object = raw
    for part in toml:
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _required(f: _Field) -> str:
    if f.kind == "tables":
        return f"at least one [[{f.toml[-1]}]] table is required"
    return "required"


def _all_keys() -> dict[str, list[str]]:
    """Every key of the format -> where it belongs (``shutdown_timeout`` -> ["top level"])."""
    out: dict[str, list[str]] = {}

    def walk(cls: type[Any], prefix: str) -> None:
        for f in _schema(cls).values():
            if not f.toml:
                continue
            key = ".".join(f.toml)
            table = (prefix + "." if prefix else "") + ".".join(f.toml[:-1])
            if f.kind in ("table", "tables"):
                assert f.cls is not None
                walk(f.cls, (prefix + "." if prefix else "") + key)
            else:
                out.setdefault(f.toml[-1], []).append(
                    f"[{table.strip('.')}]" if table else "the top level"
                )

    walk(BrokerConfig, "")
    return out


def _unknown(key: str, allowed: Mapping[str, object], path: _Path) -> str:
    message = "unknown key" if path else "unknown key at the top level"
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    if close:
        return f"{message}; did you mean `{close[0]}`?"
    homes = [h for h in _all_keys().get(key, []) if h != f"[{_where(path)}]"]
    if homes:
        hint = homes[0]
        if hint == "the top level":
            hint += (
                " (keys after a [table] header belong to that table: move it above the first one)"
            )
        return f"{message} here; `{key}` belongs in {hint}"
    return f"{message}; known keys: {', '.join(sorted(allowed))}"


# --- line numbers of keys in a TOML text ------------------------------------------------------

_BARE_OR_QUOTED = r"[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'"
_KEY_RE = re.compile(rf"^\s*((?:{_BARE_OR_QUOTED})(?:\s*\.\s*(?:{_BARE_OR_QUOTED}))*)\s*=")
_ARRAY_TABLE_RE = re.compile(r"^\s*\[\[\s*([^\[\]]+?)\s*\]\]")
_TABLE_RE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]")
_STRING_RE = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'[^']*'")


def _key_parts(text: str) -> tuple[str, ...]:
    return tuple(p.strip("\"'") for p in re.findall(_BARE_OR_QUOTED, text))


def _depth(value: str) -> int:
    value = _STRING_RE.sub("", value).split("#", 1)[0]
    return value.count("[") + value.count("{") - value.count("]") - value.count("}")


def key_lines(text: str) -> dict[_Path, int]:
    """Where each key and table of a TOML document starts: ``("listeners", 0, "cert") -> 7``.

    tomllib keeps no positions; this scanner knows enough TOML for configuration files (tables,
    arrays of tables, dotted keys, multi-line arrays and strings)."""
    lines: dict[_Path, int] = {}
    counts: dict[tuple[str, ...], int] = {}
    prefix: _Path = ()
    depth = 0
    multiline: str | None = None
    for n, line in enumerate(text.splitlines(), 1):
        if multiline is not None:
            if line.count(multiline) % 2 == 1:
                multiline = None
            continue
        if depth > 0:
            depth += _depth(line)
            continue
        m = _ARRAY_TABLE_RE.match(line)
        if m:
            name = _key_parts(m[1])
            index = counts.get(name, 0)
            counts[name] = index + 1
            lines.setdefault(name, n)
            prefix = (*name, index)
            lines.setdefault(prefix, n)
            continue
        m = _TABLE_RE.match(line)
        if m:
            prefix = _key_parts(m[1])
            lines.setdefault(prefix, n)
            continue
        m = _KEY_RE.match(line)
        if m:
            lines.setdefault(prefix + _key_parts(m[1]), n)
            rest = line[m.end() :]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2 == 1:
                    multiline = quote
            if multiline is None:
                depth = max(0, _depth(rest))
    return lines


_TOML_LINE_RE = re.compile(r"\(at line (\d+), column \d+\)")


def config_from_dict(
    data: Mapping[str, Any],
    *,
    base: Path,
    source: str,
    lines: Mapping[_Path, int] | None = None,
) -> BrokerConfig:
    """Build and validate a :class:`BrokerConfig` from parsed TOML; raises :class:`ConfigError`
    listing every problem."""
    loader = _Loader(base, source, lines or {})
    cfg = loader.table(BrokerConfig, dict(data), ())
    if loader.problems:
        raise ConfigError(sorted(loader.problems, key=lambda p: (p.line or 0, p.where)))
    assert isinstance(cfg, BrokerConfig)
    return cfg


def load_config(path: str | Path) -> BrokerConfig:
    """Read, parse and validate a broker configuration file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem("", f"cannot read: {exc.strerror}", file=str(p))]) from None
    except UnicodeDecodeError:
        raise ConfigError([Problem("", "not UTF-8 text", file=str(p))]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_LINE_RE.search(str(exc))
        line = int(m[1]) if m else None
        raise ConfigError([Problem("", f"not valid TOML: {exc}", line=line, file=str(p))]) from None
    cfg = config_from_dict(data, base=p.resolve().parent, source=str(p), lines=key_lines(text))
    return dataclasses.replace(cfg, source=p)
