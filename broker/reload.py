"""Reload a running broker's configuration: SIGHUP or ``tessera-broker reload`` (issue #10).

A reload reads the configuration file again and everything it names, and either applies all
of it or none of it:

1. **prepare** (in a worker thread: file reads and context builds stay off the loop): parse the
   configuration, load the ACL policy, build every listener's TLS context (server certificate
   and key, client CA bundle, CRLs) and security-layer factory. Any error stops here, and the
   broker keeps running exactly as before; the error names the file and field.
2. **apply** (on the loop, in one turn): swap each listener's ``make_layer`` (new handshakes use
   the new material at once; established sessions keep theirs), swap the limits, swap the policy
   with :meth:`Hub.set_policy` (live subscriptions it no longer allows are removed and their
   owners told), and close with ``CREDENTIAL_REVOKED`` (24) every session whose client
   certificate the new CRLs list.

What a reload cannot change (the listener set: binds and security modes; the audit file; the
admin socket; the log level) is refused or reported as needing a restart. Every attempt is
audited (``reload`` with ``ok``) and logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tessera_mq.auth.acl import AclError, Policy
from tessera_mq.auth.layer import SecurityLayer
from tessera_mq.auth.tls import CrlError, CrlSet
from tessera_mq.broker.check import preflight
from tessera_mq.broker.config import BrokerConfig, ConfigError, key_lines, load_config
from tessera_mq.broker.expiry import tls_layer
from tessera_mq.client.protocol import ErrorCode

if TYPE_CHECKING:
    from tessera_mq.broker.server import Broker

__all__ = ["ReloadError", "ReloadResult", "Reloader"]

log = logging.getLogger("tessera.broker")

#: Keys a running broker cannot take over: reported so the operator knows to restart.
#: Changed only by a restart; a reload that sees one of them changed says so ("restart needed").
_RESTART_KEYS = (
    "audit_file",
    "admin_socket",
    "log_level",
    "log_format",
    "data_dir",
    "messaging",
    "cluster",
    "metrics",
)


class ReloadError(Exception):
    """The new configuration is not usable; nothing was changed. The message says why."""


@dataclass
class ReloadResult:
    """What a reload did (``ok``) or why it changed nothing (``error``)."""

    ok: bool
    error: str | None = None
    config: str | None = None
    policy: str | None = None
    subscriptions_removed: int = 0
    sessions_revoked: int = 0
    warnings: list[str] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "error": self.error,
            "config": self.config,
            "policy": self.policy,
            "subscriptions_removed": self.subscriptions_removed,
            "sessions_revoked": self.sessions_revoked,
            "warnings": self.warnings,
            "restart_needed": self.restart_needed,
        }


@dataclass
class _Prepared:
    config: BrokerConfig
    policy: Policy
    layers: list[tuple[Callable[[], SecurityLayer], CrlSet | None]]
    warnings: list[str]
    restart_needed: list[str]


class Reloader:
    """Reloads one broker from its configuration file; one reload at a time."""

    def __init__(self, broker: Broker, config_path: Path | None = None) -> None:
        self.broker = broker
        self.config_path = config_path or broker.config.source
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[ReloadResult]] = set()
        self._crl_timer: asyncio.TimerHandle | None = None
        #: CRL sets whose expiry was already logged (each listener's set is replaced on reload).
        self._reported: set[CrlSet] = set()
        #: Reloads attempted and applied since start (for tests and ``info``).
        self.attempts = 0
        self.applied = 0

    def watch_crls(self) -> None:
        """Arm one timer for the next moment a listener's CRL passes its next update while the
        broker runs, so that moment is logged and audited (``crl_expired``), not just met by
        refused handshakes. Called at start and after every applied reload."""
        if self._crl_timer is not None:
            self._crl_timer.cancel()
            self._crl_timer = None
        now = time.time()
        upcoming = [
            lst.crls.next_update
            for lst in self.broker.listeners
            if lst.crls is not None and lst.crls.next_update is not None
            if lst.crls.next_update > now
        ]
        if upcoming:
            delay = min(upcoming) - now
            self._crl_timer = asyncio.get_running_loop().call_later(delay, self._crls_expired)

    def _crls_expired(self) -> None:
        self._crl_timer = None
        now = time.time()
        for lst in self.broker.listeners:
            crls = lst.crls
            if crls is None or not crls.expired(now) or crls in self._reported:
                continue
            self._reported.add(crls)
            refuse = crls.policy == "refuse"
            log.log(
                logging.ERROR if refuse else logging.WARNING,
                "listener %s: a CRL passed its next update: %s; run `tessera-certs crl` and"
                " `tessera-broker reload`",
                lst.label or lst.config.bind,
                "new client handshakes are REFUSED" if refuse else "still enforcing it (warn)",
            )
            self.broker.audit.record(
                "crl_expired",
                None,
                level=logging.WARNING,
                listener=lst.label or lst.config.bind,
                policy=crls.policy,
            )
        self.watch_crls()

    def on_signal(self) -> None:
        """SIGHUP: reload in the background (the result is logged and audited)."""
        task = asyncio.get_running_loop().create_task(self.reload(trigger="SIGHUP"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self, *, trigger: str = "admin") -> ReloadResult:
        async with self._lock:
            self.attempts += 1
            error: str | None = None
            try:
                prepared = await asyncio.to_thread(self._prepare)
            except ReloadError as exc:
                error = str(exc)
            except Exception as exc:  # a bug or an unforeseen file problem: still nothing changed
                error = f"unexpected {type(exc).__name__}: {exc}"
            if error is not None:
                result = ReloadResult(ok=False, error=error, config=str(self.config_path))
                log.error("reload (%s) failed, nothing changed: %s", trigger, error)
                self._audit(result, trigger)
                return result
            result = self._apply(prepared)
            self.applied += 1
            log.info(
                "reload (%s) applied: policy %s, %d subscription(s) removed, %d revoked"
                " session(s) closed%s",
                trigger,
                result.policy,
                result.subscriptions_removed,
                result.sessions_revoked,
                f"; restart needed for {', '.join(result.restart_needed)}"
                if result.restart_needed
                else "",
            )
            for warning in result.warnings:
                log.warning("reload: %s", warning)
            self._audit(result, trigger)
            return result

    # --- prepare: everything that can fail, off the loop ------------------------------------

    def _prepare(self) -> _Prepared:
        from tessera_mq.broker.server import _layer_factory, listener_crls  # noqa: PLC0415 - no cycle

        path = self.config_path
        if path is None:
            raise ReloadError("the broker was not started from a configuration file")
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            raise ReloadError(str(exc)) from None
        try:
            lines = key_lines(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            lines = {}
        problems = preflight(cfg, lines, serving=True)
        errors = [str(p) for p in problems if p.severity == "error"]
        if errors:
            raise ReloadError("; ".join(errors))
        old = self.broker.config
        if len(cfg.listeners) != len(old.listeners):
            raise ReloadError(
                f"{path}: the number of listeners changed ({len(old.listeners)} ->"
                f" {len(cfg.listeners)}): adding or removing a listener needs a restart"
            )
        for i, (new, cur) in enumerate(zip(cfg.listeners, old.listeners, strict=True)):
            for key in ("bind", "security"):
                if getattr(new, key) != getattr(cur, key):
                    raise ReloadError(f"{path}: listeners[{i}].{key} changed: needs a restart")
        try:
            policy = Policy.from_file(cfg.acl_file) if cfg.acl_file else Policy.from_text("")
        except AclError as exc:
            raise ReloadError(str(exc)) from None
        layers: list[tuple[Callable[[], SecurityLayer], CrlSet | None]] = []
        warnings: list[str] = []
        for i, lst in enumerate(cfg.listeners):
            try:
                crls = listener_crls(lst)
                layers.append((_layer_factory(lst, crls), crls))
            except (CrlError, OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ReloadError(f"{path}: listeners[{i}]: {exc}") from None
            if crls is not None:
                warnings.extend(f"listeners[{i}]: {w}" for w in crls.warnings)
        warnings.extend(str(p) for p in problems if p.severity != "error")
        restart = [k for k in _RESTART_KEYS if getattr(cfg, k) != getattr(old, k)]
        return _Prepared(cfg, policy, layers, warnings, restart)

    # --- apply: one loop turn, cannot fail --------------------------------------------------

    def _apply(self, prepared: _Prepared) -> ReloadResult:
        broker = self.broker
        hub = broker.hub
        for i, (factory, crls) in enumerate(prepared.layers):
            lst = broker.listeners[i]
            lst.make_layer = factory
            lst.crls = crls
            lst.config = prepared.config.listeners[i]
        broker.config = prepared.config
        hub.limits = prepared.config.limits
        removed = hub.set_policy(prepared.policy)
        revoked = self._close_revoked()
        # A handshake in flight when the CRLs were swapped completes under the old context;
        # once every such handshake has finished or timed out, look again.
        if any(lst.crls is not None and lst.crls.revoked for lst in broker.listeners):
            asyncio.get_running_loop().call_later(
                hub.limits.handshake_timeout + 1.0, self._close_revoked
            )
        self._reported.clear()
        self.watch_crls()
        return ReloadResult(
            ok=True,
            config=str(self.config_path),
            policy=prepared.policy.source,
            subscriptions_removed=removed,
            sessions_revoked=revoked,
            warnings=prepared.warnings,
            restart_needed=prepared.restart_needed,
        )

    def _close_revoked(self) -> int:
        """Close every authenticated session whose client certificate the CRLs now list."""
        broker = self.broker
        hub = broker.hub
        by_label = {lst.label: lst for lst in broker.listeners}
        closed = 0
        for record in list(hub.watch.records.values()):
            handler = record.session.handler
            listener = by_label.get(handler.listener)
            if listener is None or listener.crls is None or handler.closing:
                continue
            layer = tls_layer(record.session.layer)
            peer_certificate = getattr(layer, "peer_certificate", None)
            der = peer_certificate() if callable(peer_certificate) else None
            if not isinstance(der, bytes) or not listener.crls.is_revoked(der):
                continue
            log.warning("%s client certificate revoked, closing", handler.who())
            hub.audit("revoked", handler, logging.WARNING)
            handler.close(ErrorCode.CREDENTIAL_REVOKED, "certificate revoked")
            closed += 1
        return closed

    def _audit(self, result: ReloadResult, trigger: str) -> None:
        level = logging.INFO if result.ok else logging.WARNING
        fields = {k: v for k, v in result.to_json().items() if k != "ok" and v not in (None, [])}
        self.broker.audit.record(
            "reload", None, level=level, ok=result.ok, trigger=trigger, **fields
        )
