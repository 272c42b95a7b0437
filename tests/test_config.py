"""broker/config.py and broker/check.py: one typed source of truth, every problem of a file at
once with its line and key, "did you mean", and ``check-config`` catching what ``serve`` would
refuse (each case also run through a real ``serve`` that must fail the same way)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from test_broker_cli import run_cli

from tessera_mq.broker.cli import main
from tessera_mq.broker.config import (
    BrokerConfig,
    ConfigError,
    LimitsConfig,
    ListenerConfig,
    MetricsConfig,
    load_config,
)
from tessera_mq.certs import pki as certs_pki

REPO = Path(__file__).resolve().parent.parent


def _q(p: Path | str) -> str:
    return json.dumps(str(p))


def _config(pki: Any, *, cert: Path | None = None, key: Path | None = None, extra: str = "") -> str:
    return (
        "[[listeners]]\n"
        'bind = "127.0.0.1:0"\n'
        f"cert = {_q(cert or pki.server.cert)}\n"
        f"key = {_q(key or pki.server.key)}\n"
        f"client_ca = {_q(pki.ca)}\n" + extra
    )


# --- the dataclasses validate themselves --------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: LimitsConfig(max_frame_bytes=-1), "max_frame_bytes"),
        (lambda: LimitsConfig(max_frame_bytes=0), "max_frame_bytes"),
        (lambda: LimitsConfig(max_frame_bytes=128 * 1024 * 1024), "max_frame_bytes"),
        (lambda: LimitsConfig(handshake_timeout=0), "handshake_timeout"),
        (lambda: LimitsConfig(close_timeout=float("nan")), "close_timeout"),
        (lambda: LimitsConfig(max_subscriptions=True), "max_subscriptions"),
        (lambda: LimitsConfig(slow_consumer="discard"), "slow_consumer"),
        (lambda: LimitsConfig(max_topic_bytes=1000), "max_topic_bytes"),
        (lambda: LimitsConfig(max_frame_bytes_before_hello=2_000_000), "before_hello"),
        (lambda: ListenerConfig(bind="nope"), "bind"),
        (lambda: ListenerConfig(bind="127.0.0.1:1", security="ssh"), "security"),
        (lambda: ListenerConfig(bind="127.0.0.1:1"), "needs both 'cert' and 'key'"),
        (
            lambda: ListenerConfig(bind="127.0.0.1:1", security="negotiate", cert=Path("x")),
            "cert",
        ),
        (lambda: MetricsConfig(bind="localhost"), "bind"),
        (lambda: BrokerConfig(listeners=()), "listeners"),
        (lambda: BrokerConfig(listeners=(), log_format="xml"), "log_format"),
    ],
)
def test_direct_construction_is_validated(make: Any, field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        make()


def test_a_string_field_is_not_validated_as_a_slow_consumer_policy() -> None:
    """The old loader picked a rule from the default's type: every str was a policy."""
    listener = ListenerConfig(
        bind="127.0.0.1:1",
        security="negotiate",
        service_principal="tessera/broker.example.com@EXAMPLE.COM",
    )
    cfg = BrokerConfig(listeners=(listener,), log_format="json", log_level="debug")
    assert cfg.log_format == "json" and cfg.listeners[0].service_principal is not None
    assert LimitsConfig(handshake_timeout=3).handshake_timeout == 3.0  # int seconds -> float


# --- every problem of a file, with its line ----------------------------------------------------


def test_three_errors_are_reported_at_once_with_line_numbers(
    tmp_path: Path, pki: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        "[[listeners]]\n"  # 1
        'bind = "127.0.0.1:0"\n'  # 2
        f"cert = {_q(pki.server.cert)}\n"  # 3
        f"key = {_q(pki.server.key)}\n"  # 4
        f"clent_ca = {_q(pki.ca)}\n"  # 5: typo
        "\n"  # 6
        "[limits]\n"  # 7
        "max_frame_bytes = -1\n"  # 8: negative
        "slow_consumer = 'discard'\n"  # 9: not a policy
    )
    path = tmp_path / "broker.toml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(ConfigError) as info:
        load_config(path)
    got = [(p.line, p.where) for p in info.value.problems]
    assert got == [
        (5, "listeners[0].clent_ca"),
        (8, "limits.max_frame_bytes"),
        (9, "limits.slow_consumer"),
    ]
    assert "did you mean `client_ca`?" in info.value.problems[0].message

    assert main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"error: {path}:5: listeners[0].clent_ca: unknown key; did you mean `client_ca`?" in err
    assert f"error: {path}:8: limits.max_frame_bytes: must be an integer from 65536" in err
    assert f"error: {path}:9: limits.slow_consumer: must be one of disconnect, drop" in err
    assert f"{path}: 3 error(s)" in err

    assert main(["check-config", str(path), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert [(p["line"], p["key"]) for p in result["problems"]] == got
    assert all(p["severity"] == "error" and p["file"] == str(path) for p in result["problems"])


def test_errors_in_two_listeners_and_a_section_all_reported(tmp_path: Path, pki: Any) -> None:
    text = (
        _config(pki)
        + "[[listeners]]\n"
        + 'bind = "127.0.0.1:99999"\n'
        + 'security = "tls"\n'
        + "[log]\n"
        + "level = 'loud'\n"
        + "format = 'xml'\n"
    )
    path = tmp_path / "broker.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    wheres = {p.where: p.line for p in info.value.problems}
    assert wheres == {
        "listeners[1].bind": 7,
        "log.level": 10,
        "log.format": 11,
    }


def test_a_top_level_key_after_a_table_says_where_it_belongs(tmp_path: Path, pki: Any) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(_config(pki) + "[log]\nlevel = 'info'\n\nshutdown_timeout = 10.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert (problem.line, problem.where) == (9, "log.shutdown_timeout")
    assert "belongs in the top level" in problem.message


def test_not_toml_reports_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text('[[listeners]]\nbind = "127.0.0.1:0"\ncert = \n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].line == 3
    assert "not valid TOML" in str(info.value)


def test_every_documented_key_is_accepted_by_the_example(tmp_path: Path) -> None:
    """The annotated example of docs/configuration.md, copied as is, loads."""
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    example = re.search(r"## File format.*?```toml\n(.*?)```", doc, re.DOTALL)
    assert example is not None
    path = tmp_path / "broker.toml"
    path.write_text(example[1], encoding="utf-8")
    cfg = load_config(path)
    assert cfg.shutdown_timeout == 10.0 and cfg.listeners[0].bind == "0.0.0.0:7443"
    assert cfg.metrics.bind == "127.0.0.1:9464" and cfg.log_format == "text"


# --- check-config catches what serve refuses -----------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, pki: Any) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad-files")
    now = datetime.now(UTC)
    soon = certs_pki.issue(
        pki.directory, "server", "soon", dns=["localhost"], not_after=now + timedelta(days=5)
    )
    expired = certs_pki.issue(
        pki.directory,
        "server",
        "expired-server",
        dns=["localhost"],
        not_before=now - timedelta(days=30),
        not_after=now - timedelta(days=1),
    )
    other_ca = d / "other"
    certs_pki.init_ca(other_ca, common_name="Unrelated CA")
    chain = d / "bad-chain.pem"
    chain.write_bytes(pki.server.cert.read_bytes() + (other_ca / "ca.pem").read_bytes())
    encrypted = d / "encrypted-key.pem"
    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    encrypted.chmod(0o600)
    return {
        "soon": soon.cert,
        "soon_key": soon.key,
        "expired": expired.cert,
        "expired_key": expired.key,
        "chain": chain,
        "encrypted": encrypted,
    }


SERVE_FAILS: dict[str, tuple[Any, str, str]] = {
    # label: (pki, files -> (cert, key), file that must be named, what the error says)
    "key does not match the certificate": (
        lambda pki, f: (pki.server.cert, pki.clients["alice"].key),
        "key",
        "is not the private key of the certificate",
    ),
    "private key given as cert": (
        lambda pki, f: (pki.server.key, pki.server.key),
        "cert",
        "holds a private key, not a certificate",
    ),
    "certificate given as key": (
        lambda pki, f: (pki.server.cert, pki.server.cert),
        "key",
        "holds a certificate, not a private key",
    ),
    "encrypted key (serve would prompt for a passphrase)": (
        lambda pki, f: (pki.server.cert, f["encrypted"]),
        "key",
        "is encrypted",
    ),
}


@pytest.mark.parametrize("label", list(SERVE_FAILS))
def test_check_config_catches_what_serve_refuses(
    label: str, tmp_path: Path, pki: Any, bad_files: dict[str, Path]
) -> None:
    pick, key, says = SERVE_FAILS[label]
    cert, keyfile = pick(pki, bad_files)
    named = cert if key == "cert" else keyfile
    path = tmp_path / "broker.toml"
    path.write_text(_config(pki, cert=cert, key=keyfile), encoding="utf-8")

    check = run_cli("check-config", str(path), "--json")
    assert check.returncode == 1, check.stdout
    result = json.loads(check.stdout)
    (problem,) = [p for p in result["problems"] if p["severity"] == "error"]
    assert problem["key"] == f"listeners[0].{key}"
    assert problem["line"] == (3 if key == "cert" else 4)
    assert "listeners[0] (127.0.0.1:0)" in problem["message"]
    assert str(named) in problem["message"] and says in problem["message"]

    serve = run_cli("serve", "--config", str(path))
    assert serve.returncode == 1
    assert "listening" not in serve.stdout
    assert "listeners[0] (127.0.0.1:0)" in serve.stderr and says in serve.stderr, serve.stderr
    assert "Traceback" not in serve.stderr and "_ssl.c" not in serve.stderr


def test_a_chain_that_does_not_verify(tmp_path: Path, pki: Any, bad_files: dict[str, Path]) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(_config(pki, cert=bad_files["chain"]), encoding="utf-8")
    result = json.loads(run_cli("check-config", str(path), "--json").stdout)
    assert result["valid"] is False
    (error,) = result["errors"]
    assert "the chain does not verify" in error and "Unrelated CA" in error


def test_expired_is_an_error_and_expiring_soon_a_warning(
    tmp_path: Path, pki: Any, bad_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "soon.toml"
    path.write_text(
        _config(pki, cert=bad_files["soon"], key=bad_files["soon_key"]), encoding="utf-8"
    )
    assert main(["check-config", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    (warning,) = [w for w in result["warnings"] if "listeners[0].cert" in w]
    assert re.search(r"expires in [45] day\(s\)", warning)

    path = tmp_path / "expired.toml"
    path.write_text(
        _config(pki, cert=bad_files["expired"], key=bad_files["expired_key"]), encoding="utf-8"
    )
    assert main(["check-config", str(path), "--json"]) == 1
    (error,) = json.loads(capsys.readouterr().out)["errors"]
    assert "listeners[0].cert" in error and "expired on" in error


def test_all_file_problems_of_all_listeners_at_once(
    tmp_path: Path, pki: Any, bad_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        _config(pki, key=pki.clients["bob"].key)
        + "[[listeners]]\n"
        + 'bind = "127.0.0.1:0"\n'
        + f"cert = {_q(pki.server.key)}\n"
        + f"key = {_q(pki.server.key)}\n"
        + f"client_ca = {_q(tmp_path / 'missing-ca.pem')}\n"
        + f"[acl]\nfile = {_q(tmp_path / 'missing-acl.toml')}\n"
        + f"[audit]\nfile = {_q(tmp_path / 'no-such-dir' / 'audit.jsonl')}\n"
    )
    path = tmp_path / "broker.toml"
    path.write_text(text, encoding="utf-8")
    assert main(["check-config", str(path), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert {(p["key"], p["line"]) for p in problems if p["severity"] == "error"} == {
        ("listeners[0].key", 4),
        ("listeners[1].cert", 8),
        ("listeners[1].client_ca", 10),
        ("acl.file", 12),
        ("audit.file", 14),
    }


def test_the_key_file_mode_is_a_warning(tmp_path: Path, pki: Any) -> None:
    open_key = tmp_path / "key.pem"
    shutil.copy(pki.server.key, open_key)
    open_key.chmod(0o644)
    path = tmp_path / "broker.toml"
    path.write_text(_config(pki, key=open_key), encoding="utf-8")
    result = json.loads(run_cli("check-config", str(path), "--json").stdout)
    assert result["valid"] is True
    assert any("chmod 600" in w for w in result["warnings"])


def test_serve_names_the_listener_whose_port_is_taken(tmp_path: Path, pki: Any) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        path = tmp_path / "broker.toml"
        text = _config(pki).replace("127.0.0.1:0", f"127.0.0.1:{port}")
        path.write_text(text + f"[acl]\nfile = {_q(tmp_path / 'acl.toml')}\n", encoding="utf-8")
        (tmp_path / "acl.toml").write_text("", encoding="utf-8")
        serve = run_cli("serve", "--config", str(path))
    assert serve.returncode == 1
    assert f"listeners[0] (127.0.0.1:{port}): cannot listen: Address already in use" in (
        serve.stderr
    ), serve.stderr
    assert "Traceback" not in serve.stderr


@pytest.mark.kdc
def test_check_config_looks_the_service_principal_up_in_the_keytab(
    tmp_path: Path, kdc: Any
) -> None:
    """NegotiateServerLayer only checks that the keytab exists: serve would start and refuse
    every Kerberos login. check-config reads the keytab."""
    wanted = kdc.add_principal("tessera/kt.tessera.test")
    other = kdc.add_principal("other/kt.tessera.test")
    wrong = kdc.export_keytab(tmp_path / "wrong.keytab", [other])
    right = kdc.export_keytab(tmp_path / "right.keytab", [wanted])
    (tmp_path / "acl.toml").write_text("", encoding="utf-8")
    env = {**os.environ, **kdc.env(), "PYTHONPATH": str(REPO)}

    def check(keytab: Path) -> dict[str, Any]:
        path = tmp_path / "broker.toml"
        path.write_text(
            '[[listeners]]\nbind = "127.0.0.1:0"\nsecurity = "negotiate"\n'
            f'service_principal = "{wanted}"\nkeytab = {_q(keytab)}\n'
            f"[acl]\nfile = {_q(tmp_path / 'acl.toml')}\n",
            encoding="utf-8",
        )
        result = subprocess.run(
            [sys.executable, "-m", "tessera_mq.broker.cli", "check-config", str(path), "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        out: dict[str, Any] = json.loads(result.stdout)
        assert (result.returncode == 0) == out["valid"], result.stderr
        return out

    bad = check(wrong)
    (error,) = bad["problems"]
    assert error["key"] == "listeners[0].keytab" and error["line"] == 5
    assert f"has no key for {wanted}" in error["message"] and str(wrong) in error["message"]
    assert check(right)["valid"] is True


def test_serve_names_the_second_listener_when_only_its_port_is_taken(
    tmp_path: Path, pki: Any
) -> None:
    (tmp_path / "acl.toml").write_text("", encoding="utf-8")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with socket.socket() as probe:  # a fixed port for the first listener, free now
            probe.bind(("127.0.0.1", 0))
            first_port = probe.getsockname()[1]
        # The first listener binds; the broker must free it before naming the culprit.
        first = _config(pki).replace("127.0.0.1:0", f"127.0.0.1:{first_port}")
        second = _config(pki).replace("127.0.0.1:0", f"127.0.0.1:{port}")
        path = tmp_path / "broker.toml"
        path.write_text(
            first + second + f"[acl]\nfile = {_q(tmp_path / 'acl.toml')}\n",
            encoding="utf-8",
        )
        serve = run_cli("serve", "--config", str(path))
    assert serve.returncode == 1
    assert f"listeners[1] (127.0.0.1:{port}): cannot listen" in serve.stderr, serve.stderr
