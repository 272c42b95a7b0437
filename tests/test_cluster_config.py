"""The ``[cluster]`` configuration section and ``check-config`` on it (no broker started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tessera_mq.broker.cli import main
from tessera_mq.broker.config import ConfigError, load_config

BASE = """\
[[listeners]]
bind = "127.0.0.1:0"
cert = "server.pem"
key = "server-key.pem"
"""


def write(tmp_path: Path, cluster: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(BASE + "\n[cluster]\n" + cluster, encoding="utf-8")
    return path


def test_cluster_section_is_parsed_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            'redis = "rediss://redis.internal:6380/2"\nusername = "tessera"\n'
            'password_file = "pw"\ntls_ca = "ca.pem"\nchannel_prefix = "prod"\n'
            "max_queue_messages = 500\n",
        )
    )
    assert cfg.cluster is not None
    assert cfg.cluster.redis == "rediss://redis.internal:6380/2"
    assert cfg.cluster.username == "tessera"
    assert cfg.cluster.password_file == tmp_path / "pw"
    assert cfg.cluster.tls_ca == tmp_path / "ca.pem"
    assert (cfg.cluster.channel_prefix, cfg.cluster.max_queue_messages) == ("prod", 500)


def test_without_the_section_there_is_no_cluster(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(BASE, encoding="utf-8")
    assert load_config(path).cluster is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("", r"cluster\.redis: required"),
        ('redis = "http://x"', r"cluster\.redis: required"),
        ('redis = "redis://u:secret@host:6379"', r"no credentials in the URL"),
        ('redis = "redis://host"\ntls_ca = "ca.pem"', r"cluster\.tls_ca: goes with a rediss://"),
        ('redis = "redis://host"\nmax_queue_messages = 0', r"max_queue_messages"),
        ('redis = "redis://host"\nmax_queue_messages = true', r"max_queue_messages"),
        ('redis = "redis://host"\nchannel_prefix = "a b"', r"channel_prefix"),
        ('redis = "redis://host"\nusername = ""', r"cluster\.username"),
        (
            'redis = "redis://host"\npasword_file = "pw"',
            r"pasword_file: unknown key; did you mean `password_file`",
        ),
    ],
)
def test_bad_cluster_settings_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write(tmp_path, body + "\n"))
    assert "secret" not in str(info.value)


def test_check_config_reports_the_password_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("server.pem", "server-key.pem"):
        (tmp_path / name).write_text("x")
        (tmp_path / name).chmod(0o600)
    path = write(tmp_path, 'redis = "redis://127.0.0.1:6379"\npassword_file = "pw"\n')
    assert main(["check-config", str(path), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert any("cluster.password_file" in e and "does not exist" in e for e in out["errors"])
    (tmp_path / "pw").write_text("hunter2\n")
    (tmp_path / "pw").chmod(0o644)
    main(["check-config", str(path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert any("cluster.password_file" in w and "chmod 600" in w for w in out["warnings"])
    assert "hunter2" not in json.dumps(out)
