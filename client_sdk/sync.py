"""A blocking facade for scripts: the same client, driven by an event loop in a helper thread.

from tessera_mq.client.sync import connect

with connect("tls://127.0.0.1:7443", ca="ca.pem", cert="me.pem", key="me-key.pem") as client:
    client.publish("status.eu.node1", b"up")
    sub = client.subscribe("status.>")
    for msg in sub:
        print(msg.topic, msg.payload)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

from tessera_mq.client.client import Client, Delivery, IncomingRequest, Reply, Service, Subscription
from tessera_mq.client.client import connect as aconnect

__all__ = ["SyncClient", "SyncRequest", "SyncService", "SyncSubscription", "connect"]

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tessera-io", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


class SyncSubscription:
    """A subscription to iterate with ``for`` or read with :meth:`get`."""

    def __init__(self, runner: _LoopThread, sub: Subscription) -> None:
        self._runner = runner
        self._sub = sub

    @property
    def pattern(self) -> str:
        return self._sub.pattern

    @property
    def dropped(self) -> int:
        return self._sub.dropped

    def get(self, timeout: float | None = None) -> Delivery:
        """The next message; ``TimeoutError`` after ``timeout`` seconds."""
        return self._runner.run(self._sub.get(timeout))

    def __iter__(self) -> Iterator[Delivery]:
        while True:
            try:
                yield self._runner.run(self._sub.__anext__())
            except StopAsyncIteration:
                return

    def unsubscribe(self) -> None:
        self._runner.run(self._sub.unsubscribe())


class SyncRequest:
    """A request received by a :class:`SyncService`; answer it with :meth:`respond`."""

    def __init__(self, runner: _LoopThread, req: IncomingRequest) -> None:
        self._runner = runner
        self._req = req
        self.topic = req.topic
        self.payload = req.payload
        self.headers = req.headers
        self.sender = req.sender

    def respond(
        self,
        payload: bytes | bytearray | memoryview | str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._runner.run(self._req.respond(payload, headers=headers))


class SyncService:
    """Requests to serve: ``for req in client.serve("cmd.>"): req.respond(b"done")``."""

    def __init__(self, runner: _LoopThread, service: Service) -> None:
        self._runner = runner
        self._service = service

    def __iter__(self) -> Iterator[SyncRequest]:
        while True:
            try:
                req = self._runner.run(self._service.__anext__())
            except StopAsyncIteration:
                return
            yield SyncRequest(self._runner, req)

    def unsubscribe(self) -> None:
        self._runner.run(self._service.unsubscribe())


class SyncClient:
    """Blocking twin of :class:`client_sdk.Client`; create it with :func:`connect`."""

    def __init__(self, runner: _LoopThread, client: Client) -> None:
        self._runner = runner
        self._client = client

    @property
    def identity(self) -> str:
        return self._client.identity

    def publish(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview | str,
        *,
        headers: Mapping[str, str] | None = None,
        ack: bool = True,
        timeout: float | None = None,
        retain: bool = False,
    ) -> None:
        self._runner.run(
            self._client.publish(topic, payload, headers=headers, ack=ack, retain=retain), timeout
        )

    def subscribe(
        self, pattern: str, *, max_pending: int = 10_000, group: str | None = None
    ) -> SyncSubscription:
        sub = self._runner.run(
            self._client.subscribe(pattern, max_pending=max_pending, group=group)
        )
        return SyncSubscription(self._runner, sub)

    def request(
        self,
        topic: str,
        payload: bytes | bytearray | memoryview | str = b"",
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> Reply:
        """Blocking :meth:`client_sdk.Client.request`."""
        return self._runner.run(
            self._client.request(topic, payload, headers=headers, timeout=timeout)
        )

    def serve(self, pattern: str, *, group: str | None = None) -> SyncService:
        """Blocking :meth:`client_sdk.Client.serve`: subscribes at once."""
        service = self._client.serve(pattern, group=group)
        self._runner.run(service.start())
        return SyncService(self._runner, service)

    def close(self) -> None:
        try:
            self._runner.run(self._client.close(), timeout=10)
        finally:
            self._runner.stop()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def connect(url: str, **kwargs: Any) -> SyncClient:
    """Blocking :func:`client_sdk.connect`; same arguments."""
    runner = _LoopThread()

    async def _open() -> Client:
        return await aconnect(url, **kwargs)

    try:
        client = runner.run(_open())
    except BaseException:
        runner.stop()
        raise
    return SyncClient(runner, client)
