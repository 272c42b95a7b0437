"""The configuration keys issue #10 adds: ``crl``, ``crl_expired`` (per listener) and
``admin_socket`` (top level); validated with errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tessera_mq.broker.cli import main
from tessera_mq.broker.config import BrokerConfig, ConfigError, config_from_dict, load_config
from tessera_mq.certs import pki

BASE = {"bind": "127.0.0.1:0", "cert": "s.pem", "key": "s-key.pem", "client_ca": "ca.pem"}


def build(listener: dict[str, object], **top: object) -> BrokerConfig:
    return config_from_dict({"listeners": [listener], **top}, base=Path("/etc/t"), source="b.toml")


def test_defaults() -> None:
    cfg = build(dict(BASE))
    lst = cfg.listeners[0]
    assert lst.crl == ()
    assert lst.crl_expired == "refuse"
    assert cfg.admin_socket_path is None  # built in Python: no file to sit beside


def test_admin_socket_defaults_beside_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('[[listeners]]\nbind = "127.0.0.1:0"\ncert = "s.pem"\nkey = "k.pem"\n')
    assert load_config(path).admin_socket_path == tmp_path / "tessera-admin.sock"


def test_crl_as_path_or_list_resolved_against_the_file() -> None:
    one = build({**BASE, "crl": "crl.pem", "crl_expired": "warn"}).listeners[0]
    assert one.crl == (Path("/etc/t/crl.pem"),)
    assert one.crl_expired == "warn"
    two = build({**BASE, "crl": ["a.pem", "/abs/b.pem"]}).listeners[0]
    assert two.crl == (Path("/etc/t/a.pem"), Path("/abs/b.pem"))


def test_admin_socket_can_be_moved_or_turned_off() -> None:
    moved = build(dict(BASE), admin_socket="run/a.sock")
    assert moved.admin_socket_path == Path("/etc/t/run/a.sock")
    assert build(dict(BASE), admin_socket="").admin_socket_path is None


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


def test_check_config_loads_the_crls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki.init_ca(tmp_path)
    pki.issue(tmp_path, "server", "localhost")
    other = tmp_path / "other"
    pki.init_ca(other)
    pki.make_crl(other)  # signed by a CA the listener does not trust
    config = tmp_path / "broker.toml"
    config.write_text(
        '[[listeners]]\nbind = "127.0.0.1:0"\ncert = "localhost.pem"\nkey = "localhost-key.pem"\n'
        f'client_ca = "ca.pem"\ncrl = "{other / "crl.pem"}"\n'
    )
    assert main(["check-config", str(config)]) == 1
    assert "the CRL is not signed by a CA in" in capsys.readouterr().err
    pki.make_crl(tmp_path)
    config.write_text(config.read_text().replace(str(other / "crl.pem"), "crl.pem"))
    assert main(["check-config", str(config)]) == 0
