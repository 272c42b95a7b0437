"""Fan-out cost of ACL-filtered wildcard subscriptions (issue #10), in-process.

The same router fan-out as the broker's hot path (``Router.route`` + ``flush_pending``: encode
once, one block per subscriber per turn), with N subscribers on ``status.>``:

* ``unrestricted``: every subscription is covered by its allow rule (no per-topic check);
* ``filtered``: every subscriber's ACL denies ``status.secret.>``, so each subscription is
  filtered; a per-(subscription, topic) decision is taken once and cached with the topic's match;
* ``filtered, cold``: the match cache cleared before every publish (the worst case: every
  publish pays the per-subscription decisions; happens only after subscription changes).

Run: ``python bench/filtered_fanout.py [--subs 1000] [--publishes 20000]``. Prints one JSON line
per case with microseconds per publish and per delivery. Single-threaded; a shared machine
adds noise, so compare the rows of one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tessera_mq.auth.acl import Policy
from tessera_mq.auth.identity import Identity
from tessera_mq.broker.router import Router

TOPICS = [f"status.eu.node{i}" for i in range(64)]


class Sink:
    __slots__ = ("frames",)

    def __init__(self) -> None:
        self.frames = 0

    def deliver(self, data: bytes, count: int) -> None:
        self.frames += count


def run(case: str, subs: int, publishes: int, batch: int) -> dict[str, object]:
    rules = '[[allow]]\nprincipals = ["*"]\nsubscribe = ["status.>"]\n'
    if case != "unrestricted":
        rules += '[[deny]]\nprincipals = ["*"]\nsubscribe = ["status.secret.>"]\n'
    policy = Policy.from_text(rules)
    router = Router(schedule=lambda: None)
    sinks = [Sink() for _ in range(subs)]
    for i, sink in enumerate(sinks):
        grant = policy.subscription(Identity("x509", f"user{i}"), "status.>")
        assert grant.possible and grant.unrestricted is (case == "unrestricted")
        router.subscribe(sink, "status.>", grant)
    cold = case.endswith("cold")
    payload = b"x" * 64
    start = time.perf_counter()
    for n in range(publishes):
        if cold:
            router._cache.clear()
        router.route(TOPICS[n % len(TOPICS)], payload)
        if n % batch == batch - 1:
            router.flush_pending()
    router.flush_pending()
    elapsed = time.perf_counter() - start
    delivered = sum(s.frames for s in sinks)
    assert delivered == subs * publishes
    return {
        "case": case,
        "subscribers": subs,
        "publishes": publishes,
        "us_per_publish": round(elapsed / publishes * 1e6, 2),
        "ns_per_delivery": round(elapsed / delivered * 1e9, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subs", type=int, default=1000)
    p.add_argument("--publishes", type=int, default=20000)
    p.add_argument("--batch", type=int, default=64, help="publishes per loop turn (block)")
    args = p.parse_args()
    for case in ("unrestricted", "filtered", "filtered, cold"):
        publishes = args.publishes if not case.endswith("cold") else max(args.publishes // 20, 1)
        print(json.dumps(run(case, args.subs, publishes, args.batch)), flush=True)


if __name__ == "__main__":
    main()
