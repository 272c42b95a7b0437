"""The broker process: listeners and their security-layer factories, the hub, signals, graceful
shutdown. Connections are :class:`~broker.session.Session` drivers (or, on listeners whose
layer stack is TLS alone, :class:`~broker.session.SocketSession`) around a
:class:`~broker.handler.RequestHandler`; the publish pipeline is the :class:`~broker.hub.Hub`."""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import logging
import os
import select
import signal
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera_mq.auth import tls as _tls
from tessera_mq.auth.acl import Policy
from tessera_mq.auth.layer import SecurityLayer
from tessera_mq.auth.tls import CrlSet, ServerTLSSocket, TLSLayer, load_crls, server_context
from tessera_mq.broker.audit import Audit
from tessera_mq.broker.backplane import Backplane
from tessera_mq.broker.config import BrokerConfig, ListenerConfig
from tessera_mq.broker.handshake_pool import FailureGate, HandshakePool
from tessera_mq.broker.history import HistoryEngine
from tessera_mq.broker.hub import Hub
from tessera_mq.broker.session import Readiness, SocketSession, session_factory
from tessera_mq.broker.store import Store
from tessera_mq.client.protocol import ErrorCode

__all__ = ["Broker", "Listener", "SERVER_NAME"]

log = logging.getLogger("tessera.broker")

SERVER_NAME = "tessera/0.1.0"

#: One receive buffer shared by every connection of the loop: one read takes at most this much
#: from a connection (asyncio's own default is 256 KiB; smaller reads bound the work one
#: flooding client hands the loop at once, see broker.handler.EVENTS_PER_TURN).
_RECV_BUFFER_BYTES = 64 * 1024

#: Threads for blocking handshake steps (Kerberos acceptor steps take ~0.1-0.3 ms each); see
#: broker/handshake_pool.py for the per-source bounds.
_HANDSHAKE_WORKERS = 4

#: Poll interval while waiting for connections to finish closing at shutdown.
_SHUTDOWN_POLL_SECONDS = 0.05

#: Connections a socket listener accepts per readiness callback (asyncio's own servers take
#: up to their backlog, 100 by default, per callback).
_ACCEPTS_PER_TURN = 100

#: How long a socket listener stops accepting after running out of descriptors or memory
#: (asyncio's servers wait 1 s: ``constants.ACCEPT_RETRY_DELAY``).
_ACCEPT_RETRY_SECONDS = 1.0

#: accept() errors that mean "the system is out of something": stop accepting for a while.
_ACCEPT_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


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


class TLSLayers:
    """The layer factory of a ``tls`` listener: :class:`~auth.tls.TLSLayer` (memory BIOs) when
    called, :class:`~auth.tls.ServerTLSSocket` on an accepted socket with :meth:`on_socket`
    (what the broker uses, unless the opt-in ``TESSERA_TLS_RELEASE``, which works on memory
    BIOs, is set)."""

    __slots__ = ("context", "fields")

    def __init__(self, context: ssl.SSLContext, fields: Sequence[str]) -> None:
        self.context = context
        self.fields = tuple(fields)

    def __call__(self) -> SecurityLayer:
        return TLSLayer(self.context, server_side=True, identity_fields=self.fields)

    def on_socket(self, sock: socket.socket) -> ServerTLSSocket:
        return ServerTLSSocket(self.context, sock, identity_fields=self.fields)

    @staticmethod
    def use_sockets() -> bool:
        """True: ``tls`` listeners run :class:`~broker.session.SocketSession` drivers.
        ``TESSERA_TLS_DRIVER=transport`` keeps them on the asyncio-transport driver (the one
        ``negotiate`` listeners use): the operator's way back should the socket driver
        misbehave somewhere (docs/operations.md)."""
        if os.environ.get("TESSERA_TLS_DRIVER", "").strip().lower() == "transport":
            return False
        # (the socket sessions share one epoll set: Linux; elsewhere the transport driver)
        return not _tls.release_enabled() and hasattr(select, "epoll")


class SocketServer:
    """The listening sockets of a listener whose connections go to
    :class:`~broker.session.SocketSession` (what the broker uses of ``asyncio.Server``:
    ``sockets``, ``close``, ``wait_closed``, ``is_serving``)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        on_accept: Callable[[socket.socket, Any], None],
    ) -> None:
        self._loop = loop
        self.sockets = sockets
        self._on_accept = on_accept
        self._serving = True
        self._retry: asyncio.TimerHandle | None = None
        for sock in sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    @classmethod
    async def bind(
        cls,
        host: str | None,
        port: int,
        on_accept: Callable[[socket.socket, Any], None],
        *,
        reuse_port: bool = False,
        backlog: int = 4096,
    ) -> SocketServer:
        """Bind every address ``host`` resolves to (as ``loop.create_server`` does)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _name, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as exc:
                    raise OSError(
                        exc.errno,
                        f"error while attempting to bind on address {address!r}: {exc.strerror}",
                    ) from None
                sock.listen(backlog)
                sock.setblocking(False)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return cls(loop, sockets, on_accept)

    def _accept(self, lsock: socket.socket) -> None:
        for _ in range(_ACCEPTS_PER_TURN):
            try:
                conn, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _ACCEPT_EXHAUSTED:
                    log.warning("accept failed on %s: %s", lsock.getsockname(), exc)
                    return
                log.warning(
                    "accept failed on %s: %s; not accepting for %g s",
                    lsock.getsockname(),
                    exc,
                    _ACCEPT_RETRY_SECONDS,
                )
                self._pause()
                return
            try:
                conn.setblocking(False)
                if conn.family in (socket.AF_INET, socket.AF_INET6):
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._on_accept(conn, peer)
            except OSError as exc:  # the peer went already (wrap_socket asks for its name)
                log.debug("connection from %s dropped at accept: %s", peer, exc)
                conn.close()

    def _pause(self) -> None:
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
        self._retry = self._loop.call_later(_ACCEPT_RETRY_SECONDS, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if self._serving:
            for sock in self.sockets:
                self._loop.add_reader(sock.fileno(), self._accept, sock)

    def is_serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        """Stop accepting (connections already accepted are not touched)."""
        if not self._serving:
            return
        self._serving = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        else:
            for sock in self.sockets:
                self._loop.remove_reader(sock.fileno())
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        return None


@dataclass
class Listener:
    """A configured listener and the factory for its connections' security layers."""

    config: ListenerConfig
    make_layer: Callable[[], SecurityLayer]
    server: asyncio.Server | SocketServer | None = None
    #: ``host:port`` actually bound (set once listening); used in logs and the audit trail.
    label: str = ""
    #: The CRLs this listener enforces (issue #10: a reload swaps them with ``make_layer``).
    crls: CrlSet | None = None

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


def listener_crls(cfg: ListenerConfig) -> CrlSet | None:
    """Load and check a listener's ``crl`` files (``None`` without any); raises ``CrlError``.
    Logs what an operator must know: a CRL past its next update, a CA without a CRL."""
    if not cfg.crl or cfg.client_ca is None:
        return None
    crls = load_crls(cfg.crl, cfg.client_ca, policy=cfg.crl_expired)  # type: ignore[arg-type]
    for warning in crls.warnings:
        log.warning("listener %s: %s", cfg.bind, warning)
    if crls.expired(time.time()):
        if cfg.crl_expired == "refuse":
            log.error(
                "listener %s: a CRL is past its next update: new client handshakes are REFUSED"
                ' (crl_expired = "refuse"); run `tessera-certs crl` and `tessera-broker reload`',
                cfg.bind,
            )
        else:
            log.warning(
                "listener %s: a CRL is past its next update; still enforcing it"
                ' (crl_expired = "warn"); run `tessera-certs crl` and `tessera-broker reload`',
                cfg.bind,
            )
    return crls


def _layer_factory(cfg: ListenerConfig, crls: CrlSet | None = None) -> Callable[[], SecurityLayer]:
    """Build (and check once) the security-layer factory of a listener."""
    fields = cfg.identity_fields
    ctx = None
    if cfg.security in ("tls", "tls+negotiate"):
        assert cfg.cert is not None
        assert cfg.key is not None
        ctx = server_context(cfg.cert, cfg.key, cfg.client_ca, crls=crls)
    if cfg.security == "tls":
        assert ctx is not None
        return TLSLayers(ctx, fields)

    # The negotiate modes need the optional pyspnego/gssapi extra: import only when used.
    from tessera_mq.auth.negotiate import NegotiateServerLayer, tls_channel_bindings  # noqa: PLC0415
    from tessera_mq.auth.stack import StackedLayer  # noqa: PLC0415

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


def make_listener(cfg: ListenerConfig) -> Listener:
    """A listener with its layer factory and CRLs (raises on bad material: nothing is bound)."""
    crls = listener_crls(cfg)
    return Listener(cfg, _layer_factory(cfg, crls), crls=crls)


class Broker:
    """A running broker: call :meth:`start`, then :meth:`serve_until_stopped` or :meth:`stop`."""

    #: Issue #11: ``--workers`` processes listen on one port with SO_REUSEPORT (broker/workers.py).
    reuse_port = False

    def __init__(
        self,
        config: BrokerConfig,
        *,
        policy: Policy | None = None,
        backplane: Backplane | None = None,
        store: Store | None = None,
        history: HistoryEngine | None = None,
    ) -> None:
        self.config = config
        self.server_name = SERVER_NAME
        if policy is None:
            policy = Policy.from_file(config.acl_file) if config.acl_file else Policy.from_text("")
        self.audit = Audit(config.audit_file)
        if store is None and config.data_dir is not None:
            from tessera_mq.broker.store_sqlite import RetainLimits, SQLiteStore  # noqa: PLC0415

            m = config.messaging
            store = SQLiteStore(
                config.data_dir,
                RetainLimits(
                    m.retain_max_value_bytes, m.retain_max_topics, m.retain_max_total_bytes
                ),
            )
        self.hub = Hub(
            limits=config.limits,
            policy=policy,
            audit=self.audit,
            server_name=SERVER_NAME,
            store=store,
            backplane=backplane,
            messaging=config.messaging,
            history=history,
        )
        self.listeners = [make_listener(c) for c in config.listeners]
        self.recv_buffer = memoryview(bytearray(_RECV_BUFFER_BYTES))
        #: Worker threads for handshake steps that may block (GSS): a bounded queue per peer
        #: address, served round-robin, so one source cannot monopolise them (issue #13).
        self.handshake_pool = HandshakePool(_HANDSHAKE_WORKERS)
        #: Per-address budget of failed blocking handshakes (a flood is held, not read).
        self.handshake_gate = FailureGate()
        self._ids = itertools.count(1)
        #: The epoll set of every SocketSession (created with the first TLS-only listener).
        self._readiness: Readiness | None = None
        self._stopped: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    @property
    def policy(self) -> Policy:
        return self.hub.policy

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        await self.hub.start()
        for lst in self.listeners:
            cfg = lst.config
            if isinstance(lst.make_layer, TLSLayers) and TLSLayers.use_sockets():
                if self._readiness is None:
                    self._readiness = Readiness(self._loop)
                lst.server = await SocketServer.bind(
                    cfg.host,
                    cfg.port,
                    lambda sock, peer, lst=lst: self._accepted(lst, sock, peer),  # type: ignore[misc]
                    reuse_port=self.reuse_port,
                    backlog=4096,
                )
                self._listening(lst)
                continue
            factory = session_factory(
                self.hub,
                lambda lst=lst: lst.make_layer(),  # type: ignore[misc]
                lambda: next(self._ids),
                label=lambda lst=lst: lst.label or lst.config.bind,  # type: ignore[misc]
                pool=self.handshake_pool,
                gate=self.handshake_gate,
                recv_buffer=self.recv_buffer,
            )
            lst.server = await self._loop.create_server(
                factory,
                cfg.host,
                cfg.port,
                reuse_address=True,
                reuse_port=self.reuse_port,  # issue #11: see Broker.reuse_port
                backlog=4096,
            )
            self._listening(lst)

    def _listening(self, lst: Listener) -> None:
        host, port = lst.address
        lst.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("listening on %s (%s)", lst.label, lst.config.security)

    def _accepted(self, lst: Listener, sock: socket.socket, peer: Any) -> None:
        """A connection on a TLS-only listener (:class:`SocketServer`)."""
        layers = lst.make_layer  # swapped by a reload: new handshakes use the new material
        assert isinstance(layers, TLSLayers) and self._readiness is not None
        session = SocketSession(
            self.hub,
            layers.on_socket(sock),
            next(self._ids),
            label=lst.label or lst.config.bind,
            recv_buffer=self.recv_buffer,
            readiness=self._readiness,
        )
        session.start(peer)

    async def abandon(self) -> None:
        """Undo a :meth:`start` that failed part-way (a port was taken): free what it bound."""
        for lst in self.listeners:
            if lst.server is not None:
                lst.server.close()
                await lst.server.wait_closed()
        self.handshake_pool.shutdown(wait=False, cancel_futures=True)
        if self._readiness is not None:
            self._readiness.close()
        if self._loop is not None:
            await self.hub.stop()
        self.audit.close()

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
        """Graceful shutdown: stop accepting and reading, drain the pipeline (everything the
        broker acknowledged is queued for its subscribers), then send every client a
        ``going away`` close after what it is owed, and wait for the writes to finish."""
        hub = self.hub
        log.info("shutting down: closing %d connection(s)", len(hub.handlers))
        for lst in self.listeners:
            if lst.server is not None:
                lst.server.close()
        for handler in list(hub.handlers):
            handler.io.pause_reading()  # nothing new is accepted from here on
        await hub.drain()
        for handler in list(hub.handlers):
            handler.close(ErrorCode.GOING_AWAY, "broker shutting down")
        deadline = self.loop.time() + self.config.shutdown_timeout
        while hub.handlers and self.loop.time() < deadline:  # noqa: ASYNC110 - bounded poll
            await asyncio.sleep(_SHUTDOWN_POLL_SECONDS)
        for handler in list(hub.handlers):
            handler.io.abort()
        for lst in self.listeners:
            if lst.server is not None:
                await lst.server.wait_closed()
        await hub.stop()
        if self._readiness is not None:
            self._readiness.close()
        self.handshake_pool.shutdown(wait=False, cancel_futures=True)
        self.audit.close()
        log.info("stopped")

    # --- stats ----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Counters and gauges for operators and tests (also logged as JSON on SIGUSR1)."""
        out: dict[str, Any] = {
            **self.hub.info(),
            "tasks": len(asyncio.all_tasks(self.loop)),
            "open_fds": _open_fds(),
            "rss_bytes": _rss_bytes(),
            **{f"handshake_pool_{k}": v for k, v in self.handshake_pool.stats().items()},
            "handshake_queue_depth": self.handshake_pool.stats().get("queued", 0),
            "handshake_gate_held": self.handshake_gate.held,
            "handshake_gate_refused": self.handshake_gate.refused,
            "tls_driver": "socket" if TLSLayers.use_sockets() else "transport",
        }
        # issue #11: with [cluster], the Redis store's state (change feed, writes, refusals)
        health = getattr(self.hub.store, "health", None)
        if self.config.cluster is not None and callable(health):
            out["store"] = dict(health())
        return out

    def log_info(self) -> None:
        log.info("stats %s", json.dumps(self.info(), sort_keys=True, default=str))
