"""``max_clock_skew`` in ``[[listeners]]`` (issue 13): validated, defaulted, negotiate only."""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera_mq.broker.config import ConfigError, config_from_dict


def _config(**listener: object) -> dict[str, object]:
    base: dict[str, object] = {
        "bind": "127.0.0.1:0",
        "security": "negotiate",
        "service_principal": "tessera/h.example@EXAMPLE.COM",
    }
    return {"listeners": [{**base, **listener}]}


def test_default_and_explicit_values() -> None:
    assert config_from_dict(_config(), base=Path("."), source="t").listeners[0].max_clock_skew == 60
    explicit = config_from_dict(_config(max_clock_skew=5), base=Path("."), source="t")
    assert explicit.listeners[0].max_clock_skew == 5.0


@pytest.mark.parametrize("value", [-1, 301, "60", True])
def test_out_of_range_or_wrong_type_names_the_field(value: object) -> None:
    with pytest.raises(ConfigError, match=r"listeners\[0\]\.max_clock_skew"):
        config_from_dict(_config(max_clock_skew=value), base=Path("."), source="t")


def test_only_for_negotiate_modes(tmp_path: Path) -> None:
    listener = {"security": "tls", "cert": "c.pem", "key": "k.pem", "max_clock_skew": 10}
    with pytest.raises(ConfigError, match=r"max_clock_skew"):
        config_from_dict(
            {"listeners": [{"bind": "127.0.0.1:0", **listener}]}, base=tmp_path, source="t"
        )
