"""The configuration keys issue #10 adds: ``crl``, ``crl_expired`` (per listener) and
``admin_socket`` (top level); validated with errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import BrokerConfig, ConfigError, config_from_dict

BASE = {"bind": "127.0.0.1:0", "cert": "s.pem", "key": "s-key.pem", "client_ca": "ca.pem"}


def build(listener: dict[str, object], **top: object) -> BrokerConfig:
    return config_from_dict({"listeners": [listener], **top}, base=Path("/etc/t"), source="b.toml")


def test_defaults() -> None:
    cfg = build(dict(BASE))
    lst = cfg.listeners[0]
    assert lst.crl == ()
    assert lst.crl_expired == "refuse"
    assert cfg.admin_socket == Path("/etc/t/tessera-admin.sock")


def test_crl_as_path_or_list_resolved_against_the_file() -> None:
    one = build({**BASE, "crl": "crl.pem", "crl_expired": "warn"}).listeners[0]
    assert one.crl == (Path("/etc/t/crl.pem"),)
    assert one.crl_expired == "warn"
    two = build({**BASE, "crl": ["a.pem", "/abs/b.pem"]}).listeners[0]
    assert two.crl == (Path("/etc/t/a.pem"), Path("/abs/b.pem"))


def test_admin_socket_can_be_moved_or_turned_off() -> None:
    assert build(dict(BASE), admin_socket="run/a.sock").admin_socket == Path("/etc/t/run/a.sock")
    assert build(dict(BASE), admin_socket="").admin_socket is None


@pytest.mark.parametrize(
    ("listener", "top", "where"),
    [
        ({**BASE, "crl": 5}, {}, "listeners[0].crl"),
        ({**BASE, "crl": [""]}, {}, "listeners[0].crl"),
        ({**BASE, "crl_expired": "ignore"}, {}, "listeners[0].crl_expired"),
        (
            {k: v for k, v in BASE.items() if k != "client_ca"} | {"crl": "c.pem"},
            {},
            "listeners[0].crl",
        ),
        (dict(BASE), {"admin_socket": 1}, "admin_socket"),
    ],
)
def test_bad_values_name_the_field(
    listener: dict[str, object], top: dict[str, object], where: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build(listener, **top)
    assert str(info.value).startswith(f"b.toml: {where}"), str(info.value)
