"""``data_dir`` and ``[messaging]``: defaults, values, and errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tessera_mq.broker.config import ConfigError, MessagingConfig, config_from_dict
from tessera_mq.broker.history import HistoryConfig

LISTENER = {"bind": "127.0.0.1:0", "cert": "s.pem", "key": "s-key.pem"}


def load(**top: Any) -> Any:
    return config_from_dict({"listeners": [LISTENER], **top}, base=Path("/etc/t"), source="t.toml")


def test_defaults() -> None:
    cfg = load()
    assert cfg.data_dir is None
    assert cfg.messaging == MessagingConfig()
    assert cfg.messaging.sender == () and cfg.messaging.history == ()


def test_values() -> None:
    cfg = load(
        data_dir="store",
        messaging={
            "retain_max_value_bytes": 10,
            "retain_max_topics": 5,
            "retain_max_total_bytes": 100,
            "request_timeout_max": 2,
            "max_pending_requests": 3,
            "sender": ["status.>"],
            "history": [
                {"pattern": "events.>", "max_messages": 7, "max_age": 60},
                {"pattern": "a"},
            ],
        },
    )
    assert cfg.data_dir == Path("/etc/t/store")  # relative to the file
    m = cfg.messaging
    assert (m.retain_max_value_bytes, m.retain_max_topics, m.retain_max_total_bytes) == (10, 5, 100)
    assert (m.request_timeout_max, m.max_pending_requests, m.sender) == (2.0, 3, ("status.>",))
    assert m.history == (HistoryConfig("events.>", 7, 60.0), HistoryConfig("a", 1000, None))


@pytest.mark.parametrize(
    ("messaging", "key"),
    [
        ({"nope": 1}, "messaging"),
        ({"retain_max_topics": 0}, "messaging.retain_max_topics"),
        ({"retain_max_value_bytes": True}, "messaging.retain_max_value_bytes"),
        ({"request_timeout_max": 0}, "messaging.request_timeout_max"),
        ({"request_timeout_max": 4000}, "messaging.request_timeout_max"),
        ({"sender": "status.>"}, "messaging.sender"),
        ({"sender": ["a..b"]}, "messaging.sender"),
        ({"history": {"pattern": "a"}}, "messaging.history"),
        ({"history": [{"max_messages": 3}]}, "messaging.history[0].pattern"),
        ({"history": [{"pattern": "a", "max_messages": 0}]}, "messaging.history[0].max_messages"),
        ({"history": [{"pattern": "a", "max_age": -1}]}, "messaging.history[0].max_age"),
        ({"history": [{"pattern": "a", "bogus": 1}]}, "messaging.history[0]"),
        (
            {"history": [{"pattern": "e.>"}, {"pattern": "e.x"}]},
            "history: [1].pattern overlaps [0]",
        ),
    ],
)
def test_errors_name_the_key(messaging: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(messaging=messaging)
    assert key in str(info.value)


def test_data_dir_must_be_a_path() -> None:
    with pytest.raises(ConfigError, match="data_dir"):
        load(data_dir=3)


def test_check_config_reports_an_unusable_data_dir(tmp_path: Path) -> None:
    from tessera_mq.broker.check import preflight  # noqa: PLC0415

    afile = tmp_path / "plain-file"
    afile.write_text("x")
    cfg = load(data_dir=str(afile))
    problems = [p for p in preflight(cfg) if p.where == "data_dir"]
    assert problems and "not a directory" in problems[0].message
    fine = load(data_dir=str(tmp_path / "new" / "store"))
    assert not [p for p in preflight(fine) if p.where == "data_dir"]
