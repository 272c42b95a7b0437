"""``--workers`` parsing and the replay-cache name the supervisor hands its workers."""

from __future__ import annotations

import os

import pytest

from tessera_mq.broker.workers import MAX_WORKERS, parse_workers, replay_cache_name


def test_parse_workers() -> None:
    assert parse_workers("1") == 1
    assert parse_workers("3") == 3
    assert parse_workers("auto") == len(os.sched_getaffinity(0))
    for bad in ("0", "-1", str(MAX_WORKERS + 1), "two", "", "1.5"):
        with pytest.raises(ValueError, match="--workers"):
            parse_workers(bad)


def test_replay_cache_name() -> None:
    uid = os.geteuid()
    assert replay_cache_name({"KRB5RCACHEDIR": "/srv/rc"}) == (
        f"file2:/srv/rc/tessera_krb5_{uid}.rcache2"
    )
    default = replay_cache_name({})
    assert default is not None and default.startswith("file2:/")
    # the operator's choice is inherited unchanged
    assert replay_cache_name({"KRB5RCACHENAME": "file2:/x"}) is None
    assert replay_cache_name({"KRB5RCACHETYPE": "file2"}) is None
