"""Prometheus metrics, ``/healthz`` and ``/readyz`` on an opt-in HTTP listener (``[metrics] bind``).

Nothing here runs on the fan-out path: :class:`BrokerCollector` reads the broker's stats
interface (``Broker.info()``, a plain dict of counters and gauges) when Prometheus scrapes, on
the event loop, and turns it into metric families. Keys the broker does not (yet) report are
skipped, and numeric keys this module does not know are exported as ``tessera_<key>`` gauges,
so new counters show up without a change here. Known keys:

=============================== ============================================================
``Broker.info()`` key            metric
=============================== ============================================================
connections                      ``tessera_connections`` (gauge)
connections_by_listener          ``tessera_listener_connections{listener,mechanism}`` (gauge)
connections_accepted             ``tessera_connections_accepted_total``
connections_refused[_identity]   ``tessera_connections_refused_total{reason}``
auth_failures (reason -> n)      ``tessera_auth_failures_total{reason}``
handshake_queue_depth            ``tessera_handshake_queue_depth`` (gauge)
publishes_in                     ``tessera_messages_in_total``
deliveries_out                   ``tessera_deliveries_total``
bytes_in / bytes_out             ``tessera_bytes_in_total`` / ``tessera_bytes_out_total``
outbox_bytes                     ``tessera_outbox_bytes`` (gauge)
slow_consumer_drops              ``tessera_slow_consumer_dropped_total``
slow_consumer_disconnects        ``tessera_slow_consumer_disconnects_total``
subscriptions                    ``tessera_subscriptions`` (gauge)
tasks                            ``tessera_event_loop_tasks`` (gauge)
loop_lag_seconds                 ``tessera_event_loop_lag_seconds`` (gauge; measured here when
                                 the broker does not report it)
open_fds / rss_bytes             ``tessera_open_fds`` / ``tessera_resident_memory_bytes``
=============================== ============================================================

``prometheus_client`` is the optional ``metrics`` extra; this module imports it only when a
listener is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from tessera_mq.broker.config import parse_bind

__all__ = ["BrokerCollector", "LoopLagMonitor", "MetricsServer", "start_metrics"]

log = logging.getLogger("tessera.broker.metrics")

#: Longest HTTP request head accepted (a scrape's is ~200 bytes; Go's net/http allows 1 MiB).
_MAX_REQUEST_HEAD_BYTES = 8192
#: Seconds a client may take to send its request head (slowloris bound).
_REQUEST_TIMEOUT_SECONDS = 5.0
#: HTTP connections served at once; more are closed at accept (Prometheus uses one).
_MAX_HTTP_CONNECTIONS = 32
#: How often the fallback loop-lag probe runs (seconds).
_LAG_PROBE_SECONDS = 0.5

# (info key, metric name without _total, help)
_COUNTERS = (
    ("connections_accepted", "tessera_connections_accepted", "Connections admitted at accept."),
    ("publishes_in", "tessera_messages_in", "Publish frames received from clients."),
    ("deliveries_out", "tessera_deliveries", "Deliveries queued to subscribers."),
    ("bytes_in", "tessera_bytes_in", "Bytes received from clients (after the security layer)."),
    ("bytes_out", "tessera_bytes_out", "Bytes sent to clients (after the security layer)."),
    (
        "slow_consumer_drops",
        "tessera_slow_consumer_dropped",
        "Deliveries discarded for slow consumers (slow_consumer = drop).",
    ),
    (
        "slow_consumer_disconnects",
        "tessera_slow_consumer_disconnects",
        "Connections closed as slow consumers.",
    ),
)
_GAUGES = (
    ("connections", "tessera_connections", "Connections open now."),
    ("subscriptions", "tessera_subscriptions", "Live subscriptions."),
    ("outbox_bytes", "tessera_outbox_bytes", "Bytes queued in subscriber outboxes."),
    (
        "handshake_queue_depth",
        "tessera_handshake_queue_depth",
        "Handshake steps waiting for a worker thread.",
    ),
    ("tasks", "tessera_event_loop_tasks", "asyncio tasks alive."),
    ("open_fds", "tessera_open_fds", "Open file descriptors."),
    ("rss_bytes", "tessera_resident_memory_bytes", "Resident memory (bytes)."),
)
#: Keys of ``Broker.stats`` (a Counter: absent until the first event, so absent means 0).
_STATS_COUNTERS = frozenset(
    {"connections_accepted", "slow_consumer_drops", "slow_consumer_disconnects"}
)
_REFUSED = {
    "connections_refused": "max_connections",
    "connections_refused_identity": "per_identity",
}
_HANDLED = (
    {k for k, _, _ in _COUNTERS}
    | {k for k, _, _ in _GAUGES}
    | set(_REFUSED)
    | {"auth_failures", "connections_by_listener", "loop_lag_seconds"}
)


class BrokerCollector:
    """A Prometheus collector reading ``info()`` (``Broker.info``) at scrape time."""

    def __init__(
        self,
        info: Callable[[], Mapping[str, Any]],
        loop_lag: Callable[[], float | None] | None = None,
    ) -> None:
        self._info = info
        self._loop_lag = loop_lag

    def describe(self) -> list[Any]:
        return []  # unchecked collector: the set of metrics follows what the broker reports

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (  # noqa: PLC0415 - optional extra
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        info = self._info()
        for key, name, doc in _COUNTERS:
            value = info.get(key, 0 if key in _STATS_COUNTERS else None)
            if _number(value):
                yield CounterMetricFamily(name, doc, value=value)
        refused = CounterMetricFamily(
            "tessera_connections_refused", "Connections refused by a limit.", labels=["reason"]
        )
        for key, reason in _REFUSED.items():
            refused.add_metric([reason], info.get(key, 0) if _number(info.get(key)) else 0)
        yield refused
        failures = info.get("auth_failures")
        if isinstance(failures, Mapping):
            fam = CounterMetricFamily(
                "tessera_auth_failures", "Failed handshakes by reason code.", labels=["reason"]
            )
            for reason, n in sorted(failures.items()):
                if _number(n):
                    fam.add_metric([str(reason)], n)
            yield fam
        for key, name, doc in _GAUGES:
            value = info.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
                yield GaugeMetricFamily(name, doc, value=value)
        by_listener = info.get("connections_by_listener")
        if isinstance(by_listener, Mapping):
            gauge = GaugeMetricFamily(
                "tessera_listener_connections",
                "Connections open now by listener and mechanism.",
                labels=["listener", "mechanism"],
            )
            for listener, mechanisms in sorted(by_listener.items()):
                if isinstance(mechanisms, Mapping):
                    for mechanism, n in sorted(mechanisms.items()):
                        if _number(n):
                            gauge.add_metric([str(listener), str(mechanism)], n)
                elif _number(mechanisms):
                    gauge.add_metric([str(listener), ""], mechanisms)
            yield gauge
        lag = info.get("loop_lag_seconds")
        if not _number(lag) and self._loop_lag is not None:
            lag = self._loop_lag()
        if _number(lag):
            yield GaugeMetricFamily(
                "tessera_event_loop_lag_seconds",
                "How late the event loop ran a timer recently (worst since the last scrape).",
                value=lag,
            )
        backplane = info.get("backplane")
        if isinstance(backplane, Mapping):
            yield from _backplane_metrics(backplane)
        for key, value in sorted(info.items()):
            if key not in _HANDLED and _number(value) and key.isidentifier():
                yield GaugeMetricFamily(f"tessera_{key}", f"Broker.info()[{key!r}]", value=value)


#: Counters of the Redis backplane's ``health()`` (issue #11, docs/scaling.md); its other numeric
#: fields (``connected``, ``queue``, ``outage_seconds``, ...) are gauges.
_BACKPLANE_COUNTERS = frozenset(
    {
        "outages",
        "published",
        "redis_messages",
        "received",
        "refused_disconnected",
        "refused_queue_full",
        "lost",
        "duplicates_dropped",
        "bad_messages",
        "direct_sent",
        "direct_received",
        "direct_refused",
    }
)


def _backplane_metrics(health: Mapping[str, Any]) -> Iterator[Any]:
    """``tessera_backplane_*`` from ``info()["backplane"]`` (``connected`` is 1 or 0)."""
    from prometheus_client.core import (  # noqa: PLC0415 - optional extra
        CounterMetricFamily,
        GaugeMetricFamily,
    )

    for key, raw in sorted(health.items()):
        value = int(raw) if isinstance(raw, bool) else raw
        if not _number(value) or not key.isidentifier():
            continue
        name, doc = f"tessera_backplane_{key}", f"Backplane health()[{key!r}] (docs/scaling.md)."
        if key in _BACKPLANE_COUNTERS:
            yield CounterMetricFamily(name, doc, value=value)
        else:
            yield GaugeMetricFamily(name, doc, value=value)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class LoopLagMonitor:
    """Measures event-loop lag with a timer: how much later than asked it fires. Reports the
    worst value since it was last read (so a scrape sees a stall between two scrapes)."""

    def __init__(self, interval: float = _LAG_PROBE_SECONDS) -> None:
        self.interval = interval
        self._worst = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tessera-loop-lag")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(self.interval)
            self._worst = max(self._worst, loop.time() - t0 - self.interval)

    def read(self) -> float:
        worst, self._worst = self._worst, 0.0
        return max(0.0, worst)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class _Serving(Protocol):
    def is_serving(self) -> bool: ...


class _ListenerLike(Protocol):
    @property
    def server(self) -> _Serving | None: ...


class BrokerLike(Protocol):
    """What the metrics listener needs from the broker (``broker.server.Broker``)."""

    def info(self) -> dict[str, Any]: ...

    @property
    def listeners(self) -> Sequence[_ListenerLike]: ...


class MetricsServer:
    """The HTTP listener: ``GET /metrics`` (Prometheus text format), ``/healthz`` (the process
    and its event loop answer), ``/readyz`` (every broker listener accepts connections)."""

    def __init__(self, broker: BrokerLike, bind: str) -> None:
        from prometheus_client import (  # noqa: PLC0415 - optional extra
            CollectorRegistry,
            ProcessCollector,
        )

        self.broker = broker
        self.bind = bind
        self.lag = LoopLagMonitor()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BrokerCollector(broker.info, self.lag.read))
        ProcessCollector(registry=self.registry)
        self._server: asyncio.Server | None = None
        self._open = 0

    async def start(self) -> None:
        host, port = parse_bind(self.bind)
        self._server = await asyncio.start_server(
            self._handle, host, port, limit=_MAX_REQUEST_HEAD_BYTES, reuse_address=True
        )
        self.lag.start()
        log.info("metrics on http://%s/metrics", self.label)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None and self._server.sockets
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def label(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def ready(self) -> bool:
        listeners = self.broker.listeners
        return bool(listeners) and all(
            lst.server is not None and lst.server.is_serving() for lst in listeners
        )

    async def close(self) -> None:
        await self.lag.stop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > _MAX_HTTP_CONNECTIONS:
                return
            try:
                head = await asyncio.wait_for(
                    reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT_SECONDS
                )
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            except ConnectionError:
                return
            status, ctype, body = self._respond(head)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("ascii")
            )
            if not head.startswith(b"HEAD "):
                writer.write(body)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _respond(self, head: bytes) -> tuple[str, str, bytes]:
        text = "text/plain; charset=utf-8"
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return "400 Bad Request", text, b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", text, b"GET or HEAD\n"
        if target == b"/metrics":
            from prometheus_client import (  # noqa: PLC0415 - optional extra
                CONTENT_TYPE_LATEST,
                generate_latest,
            )

            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if target == b"/healthz":
            return "200 OK", text, b"ok\n"
        if target == b"/readyz":
            if self.ready():
                return "200 OK", text, b"ready\n"
            return "503 Service Unavailable", text, b"not ready\n"
        return "404 Not Found", text, b"not found: /metrics, /healthz, /readyz\n"


async def start_metrics(broker: BrokerLike, bind: str) -> MetricsServer:
    """Start the metrics listener for a started broker (call after ``Broker.start``)."""
    server = MetricsServer(broker, bind)
    await server.start()
    return server
