"""The seam to other broker processes and nodes: the :class:`Backplane` protocol.

The hub hands every publication it accepted locally to the backplane, after local routing, and
the backplane injects publications accepted elsewhere into the hub's local router. The default,
:class:`LocalBackplane`, is a single process: nothing crosses. An external engine (Redis, see
docs/scaling.md) implements the same protocol; the model is centrifuge's ``Broker`` interface with
its ``MemoryBroker`` and ``RedisBroker``.

Contract:

* ``start`` is awaited once before the first listener accepts; ``stop`` once at shutdown, after
  the hub has drained its pipeline, and must hand over (or count as lost) what it still holds.
* ``interest`` is called when the first local subscription to a pattern appears
  (``added=True``) and when the last one goes (``added=False``), so that a node receives only
  topics some local subscriber matches.
* ``publish`` never blocks and never awaits: it queues. It returns ``False`` when the backplane
  refuses the publication (its own bound is reached, or the engine is unreachable and it keeps
  nothing); the hub counts that and local delivery is unaffected.
* ``inject`` (given to ``start``) is called on the event loop's thread for each remote
  publication; the hub routes it to local subscribers only (never back to the backplane).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["Backplane", "LocalBackplane", "Publication"]


@dataclass(slots=True)
class Publication:
    """One accepted publish on its way through the pipeline (decided, stored, routed)."""

    topic: str
    payload: bytes
    headers: Mapping[str, str] | None = None
    #: The publisher's authenticated identity (``mechanism:name``) as the broker established it;
    #: never taken from the client.
    sender: str | None = None
    #: The publisher asked for the value to be retained (see docs/messaging.md).
    retain: bool = False
    #: Fields the store assigns (history sequence and stream epoch), if it stores the topic.
    extra: dict[str, object] = field(default_factory=dict)


class Backplane(Protocol):
    """Where publications cross between broker processes or nodes."""

    async def start(self, inject: Callable[[Publication], None]) -> None:
        """Connect to the engine; ``inject`` delivers a remote publication locally."""

    async def stop(self) -> None:
        """Hand over what is queued (bounded by the engine's own timeout), then disconnect."""

    def interest(self, pattern: str, added: bool) -> None:
        """The first local subscription to ``pattern`` appeared, or the last one went."""

    def publish(self, pub: Publication) -> bool:
        """Queue a locally accepted publication for other nodes; ``False`` if refused."""

    def health(self) -> Mapping[str, object]:
        """Operator-facing state (``{"engine": "local", "connected": True}``, queue depth, ...)."""


class LocalBackplane:
    """A single broker process: nothing crosses."""

    async def start(self, inject: Callable[[Publication], None]) -> None:
        pass

    async def stop(self) -> None:
        pass

    def interest(self, pattern: str, added: bool) -> None:
        pass

    def publish(self, pub: Publication) -> bool:
        return True

    def health(self) -> Mapping[str, object]:
        return {"engine": "local", "connected": True}
