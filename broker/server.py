"""The broker process: listeners, sessions, the flush and heartbeat loops, graceful shutdown."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auth.acl import Policy
from auth.layer import SecurityLayer
from auth.tls import TLSLayer, server_context
from broker.audit import Audit
from broker.config import BrokerConfig, ListenerConfig
from broker.handshake_pool import FailureGate, HandshakePool
from broker.router import Backplane, Router
from broker.session import Session
from client_sdk.protocol import ErrorCode

__all__ = ["Broker", "Listener", "SERVER_NAME"]

log = logging.getLogger("tessera.broker")

SERVER_NAME = "tessera/0.1.0"

#: One receive buffer shared by every connection of the loop (a TLS read yields at most this).
_RECV_BUFFER_BYTES = 256 * 1024

#: Threads for blocking handshake steps (Kerberos acceptor steps take ~0.1-0.3 ms each).
_HANDSHAKE_WORKERS = 4  # see broker/handshake_pool.py for the per-source bounds

#: Connections the heartbeat sweep visits between two yields to the event loop.
_SWEEP_SLICE = 1000

#: How often the heartbeat sweep runs, as a fraction of the heartbeat interval.
_SWEEP_FRACTION = 0.25


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return -1


@dataclass
class Listener:
    """A configured listener and the factory for its connections' security layers."""

    config: ListenerConfig
    make_layer: Callable[[], SecurityLayer]
    server: asyncio.Server | None = None
    #: ``host:port`` actually bound (set once listening); used in logs and the audit trail.
    label: str = ""

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (the real port when the config says port 0)."""
        assert self.server is not None and self.server.sockets
        host, port = self.server.sockets[0].getsockname()[:2]
        return str(host), int(port)


def _certificate_der(path: Path) -> bytes:
    """The first certificate of a PEM chain file, as DER (for channel bindings)."""
    pem = path.read_text(encoding="ascii", errors="replace")
    start = pem.find("-----BEGIN CERTIFICATE-----")
    end = pem.find("-----END CERTIFICATE-----", start)
    if start < 0 or end < 0:
        raise ValueError(f"{path}: no PEM certificate found")
    return ssl.PEM_cert_to_DER_cert(pem[start : end + len("-----END CERTIFICATE-----")])


def _layer_factory(cfg: ListenerConfig) -> Callable[[], SecurityLayer]:
    """Build (and check once) the security-layer factory of a listener."""
    fields = cfg.identity_fields
    ctx = None
    if cfg.security in ("tls", "tls+negotiate"):
        assert cfg.cert is not None
        assert cfg.key is not None
        ctx = server_context(cfg.cert, cfg.key, cfg.client_ca)
    if cfg.security == "tls":
        assert ctx is not None
        tls_ctx = ctx

        def make_tls() -> SecurityLayer:
            return TLSLayer(tls_ctx, server_side=True, identity_fields=fields)

        return make_tls

    # The negotiate modes need the optional pyspnego/gssapi extra: import only when used.
    from auth.negotiate import NegotiateServerLayer, tls_channel_bindings  # noqa: PLC0415
    from auth.stack import StackedLayer  # noqa: PLC0415

    if "ntlm" in cfg.mechanisms:
        log.warning(
            "listener %s allows NTLM: NTLM sealing is RC4 and NTLM can be relayed; "
            'prefer Kerberos, and keep NTLM inside TLS (security = "tls+negotiate")',
            cfg.bind,
        )
    mechanisms = frozenset(cfg.mechanisms)
    keytab = cfg.keytab
    service = cfg.service_principal
    if cfg.security == "negotiate":

        def make_gss() -> SecurityLayer:
            return NegotiateServerLayer(
                service,
                keytab,
                mechanisms=mechanisms,
                max_token_bytes=cfg.max_handshake_token_bytes,
                max_legs=cfg.max_handshake_legs,
                max_clock_skew=cfg.max_clock_skew,
                ntlm_user_file=cfg.ntlm_user_file,
            )

        make_gss()  # configuration errors surface at start-up, not per connection
        return make_gss

    assert ctx is not None and cfg.cert is not None
    stack_ctx = ctx
    bindings = tls_channel_bindings(_certificate_der(cfg.cert))

    def make_stack() -> SecurityLayer:
        return StackedLayer(
            TLSLayer(stack_ctx, server_side=True, identity_fields=fields),
            NegotiateServerLayer(
                service,
                keytab,
                mechanisms=mechanisms,
                channel_bindings=bindings,
                require_channel_binding=True,
                protect_frames=False,
                max_token_bytes=cfg.max_handshake_token_bytes,
                max_legs=cfg.max_handshake_legs,
                max_clock_skew=cfg.max_clock_skew,
                ntlm_user_file=cfg.ntlm_user_file,
            ),
        )

    make_stack()
    return make_stack


class Broker:
    """A running broker: call :meth:`start`, then :meth:`serve_until_stopped` or :meth:`stop`."""

    def __init__(
        self,
        config: BrokerConfig,
        *,
        policy: Policy | None = None,
        backplane: Backplane | None = None,
    ) -> None:
        self.config = config
        self.server_name = SERVER_NAME
        if policy is None:
            policy = Policy.from_file(config.acl_file) if config.acl_file else Policy.from_text("")
        self.policy = policy
        self.router = Router(backplane, schedule=self._schedule_flush)
        self.audit = Audit(config.audit_file)
        self._per_identity: collections.Counter[str] = collections.Counter()
        self.listeners = [Listener(c, _layer_factory(c)) for c in config.listeners]
        self.sessions: set[Session] = set()
        self.stats: collections.Counter[str] = collections.Counter()
        self.recv_buffer = memoryview(bytearray(_RECV_BUFFER_BYTES))
        #: Worker threads for handshake steps that may block (GSS): a bounded queue per peer
        #: address, served round-robin, so one source cannot monopolise them (issue 13).
        self.handshake_pool = HandshakePool(_HANDSHAKE_WORKERS)
        #: Per-address budget of failed handshakes: a flooding address is held, not read.
        self.handshake_gate = FailureGate()
        #: Sessions with queued output this turn (appended by the sessions themselves).
        self.dirty: list[Session] = []
        limits = config.limits
        # Read on the fan-out path for every subscriber: kept as plain attributes.
        self.max_pending_bytes = limits.max_pending_bytes
        self.max_pending_msgs = limits.max_pending_messages
        self.drop_slow_consumers = limits.slow_consumer == "drop"
        self._flush_scheduled = False
        self._next_id = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._stopped: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        for lst in self.listeners:
            cfg = lst.config

            def factory(lst: Listener = lst) -> Session:
                self._next_id += 1
                return Session(self, lst, self._next_id)

            lst.server = await self._loop.create_server(
                factory, cfg.host, cfg.port, reuse_address=True, backlog=4096
            )
            host, port = lst.address
            lst.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            log.info("listening on %s (%s)", lst.label, cfg.security)
        self._sweeper = asyncio.create_task(self._sweep(), name="tessera-heartbeat-sweep")

    async def serve_until_stopped(self, *, install_signal_handlers: bool = True) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`request_stop`), then shut down gracefully."""
        assert self._stopped is not None
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.loop.add_signal_handler(sig, self.request_stop)
        await self._stopped.wait()
        await self.stop()

    def request_stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    async def stop(self) -> None:
        """Stop accepting, send every client a ``going away`` close, flush, and close."""
        log.info("shutting down: closing %d connection(s)", len(self.sessions))
        for lst in self.listeners:
            if lst.server is not None:
                lst.server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for session in list(self.sessions):
            session.close(ErrorCode.GOING_AWAY, "broker shutting down")
        deadline = self.loop.time() + self.config.shutdown_timeout
        while self.sessions and self.loop.time() < deadline:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session._abort()
        for lst in self.listeners:
            if lst.server is not None:
                await lst.server.wait_closed()
        self.handshake_pool.shutdown(wait=False, cancel_futures=True)
        self.audit.close()
        log.info("stopped")

    # --- sessions -------------------------------------------------------------------------

    def admit(self, session: Session) -> bool:
        if len(self.sessions) >= self.config.limits.max_connections:
            self.stats["connections_refused"] += 1
            return False
        self.sessions.add(session)
        self.stats["connections_accepted"] += 1
        return True

    def admit_identity(self, session: Session) -> bool:
        """Count an authenticated connection against its identity's limit."""
        key = str(session.identity)
        if self._per_identity[key] >= self.config.limits.max_connections_per_identity:
            self.stats["connections_refused_identity"] += 1
            return False
        self._per_identity[key] += 1
        session.counted = True
        return True

    def forget(self, session: Session) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            if session.counted:
                key = str(session.identity)
                self._per_identity[key] -= 1
                if self._per_identity[key] <= 0:
                    del self._per_identity[key]

    def mark_dirty(self, session: Session) -> None:
        self.dirty.append(session)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_dirty)

    def _flush_dirty(self) -> None:
        """Once per loop turn: hand this turn's delivery blocks to their subscribers, then write
        every session with something queued, each in one TLS write."""
        self._flush_scheduled = False
        self.router.flush_pending()
        dirty = self.dirty
        self.dirty = []
        for session in dirty:
            session.flush()

    async def _sweep(self) -> None:  # one task for all connections, not one per connection
        interval = max(0.25, self.config.limits.heartbeat_interval * _SWEEP_FRACTION)
        while True:
            await asyncio.sleep(interval)
            now = self.loop.time()
            for i, session in enumerate(list(self.sessions)):
                session.on_timer(now)
                if i % _SWEEP_SLICE == _SWEEP_SLICE - 1:
                    await asyncio.sleep(0)  # 100k connections must not stall the loop at once

    def info(self) -> dict[str, Any]:
        """Counters for operators and tests (also logged as JSON on SIGUSR1)."""
        return {
            "connections": len(self.sessions),
            "subscriptions": self.router.subscription_count,
            "tasks": len(asyncio.all_tasks(self.loop)),
            "open_fds": _open_fds(),
            "rss_bytes": _rss_bytes(),
            **{f"handshake_pool_{k}": v for k, v in self.handshake_pool.stats().items()},
            "handshake_gate_held": self.handshake_gate.held,
            "handshake_gate_refused": self.handshake_gate.refused,
            **self.stats,
        }

    def log_info(self) -> None:
        log.info("stats %s", json.dumps(self.info(), sort_keys=True))
