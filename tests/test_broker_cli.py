"""``tessera-broker``: ``check-config`` (text and JSON, exit codes, errors naming the field),
``--help``, and ``serve --dev`` on an ephemeral port with a dev client publishing and subscribing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from brokerproc import REPO_ROOT, BrokerProcess, write_config

from tessera_mq import client as client_sdk
from tessera_mq.broker.cli import main

TIMEOUT = 5.0


def console_script() -> str:
    """The installed ``tessera-broker`` entry point of this interpreter's environment."""
    found = shutil.which("tessera-broker", path=str(Path(sys.executable).parent))
    assert found, "tessera-broker is not installed next to the interpreter (pip install -e .)"
    return found


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (
        os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else ""
    )
    return subprocess.run(
        [console_script(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
        check=False,
    )


@pytest.fixture
def valid_config(tmp_path: Path, pki: Any) -> Path:
    return write_config(
        tmp_path / "cfg",
        cert=pki.server.cert,
        key=pki.server.key,
        client_ca=pki.ca,
        acl='[[allow]]\nprincipals = ["*"]\nsubscribe = [">"]\n',
    )


# --- help and version -----------------------------------------------------------------------


def test_help_via_the_console_script() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "serve" in result.stdout and "check-config" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("argv", [["serve", "--help"], ["check-config", "--help"], ["--version"]])
def test_subcommand_help_and_version(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out
    if argv == ["serve", "--help"]:
        for flag in ("--config", "--dev", "--dev-dir", "--bind", "--log-level"):
            assert flag in out
    if argv == ["--version"]:
        assert "tessera/" in out


@pytest.mark.parametrize(
    "argv",
    [[], ["serve"], ["serve", "--config", "a.toml", "--dev"], ["frobnicate"], ["check-config"]],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: tessera-broker" in capsys.readouterr().err


def test_bind_without_dev_is_refused(
    valid_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--config", str(valid_config), "--bind", "127.0.0.1:0"]) == 2
    assert "--bind goes with --dev" in capsys.readouterr().err


# --- check-config ---------------------------------------------------------------------------


def test_check_config_valid(valid_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(valid_config)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"{valid_config}: OK (1 listener(s))"
    assert captured.err == ""


def test_check_config_valid_json(valid_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(valid_config), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["valid"] is True
    assert result["errors"] == [] and result["warnings"] == []
    assert result["file"] == str(valid_config)
    assert result["listeners"] == [
        {"bind": "127.0.0.1:0", "security": "tls", "client_certificate_required": True}
    ]


def _listener(pki: Any, **override: str) -> str:
    fields = {
        "bind": '"127.0.0.1:0"',
        "cert": json.dumps(str(pki.server.cert)),
        "key": json.dumps(str(pki.server.key)),
        "client_ca": json.dumps(str(pki.ca)),
    }
    fields.update(override)
    return "[[listeners]]\n" + "".join(f"{k} = {v}\n" for k, v in fields.items() if v)


INVALID: dict[str, tuple[Any, str]] = {
    # label: (function pki -> config text, text the error must contain: the field)
    "no listeners": (lambda pki: "[log]\nlevel = 'info'\n", "listeners"),
    "bad bind": (lambda pki: _listener(pki, bind='"nope"'), "listeners[0].bind"),
    "port out of range": (
        lambda pki: _listener(pki, bind='"127.0.0.1:70000"'),
        "listeners[0].bind",
    ),
    "unknown security": (lambda pki: _listener(pki, security='"ssh"'), "listeners[0].security"),
    "tls without key": (lambda pki: _listener(pki, key=""), "listeners[0]"),
    "unknown identity field": (
        lambda pki: _listener(pki, identity_fields='["cn", "shoe_size"]'),
        "listeners[0].identity_fields",
    ),
    "missing cert file": (
        lambda pki: _listener(pki, cert='"/nonexistent/server.pem"'),
        "listeners[0].cert",
    ),
    "unknown top-level key": (lambda pki: "colour = 'blue'\n" + _listener(pki), "top level"),
    "unknown listener key": (lambda pki: _listener(pki, colour='"blue"'), "listeners[0]"),
    "negative frame limit": (
        lambda pki: _listener(pki) + "[limits]\nmax_frame_bytes = -1\n",
        "limits.max_frame_bytes",
    ),
    "zero handshake timeout": (
        lambda pki: _listener(pki) + "[limits]\nhandshake_timeout = 0\n",
        "limits.handshake_timeout",
    ),
    "unknown slow-consumer policy": (
        lambda pki: _listener(pki) + "[limits]\nslow_consumer = 'discard'\n",
        "limits.slow_consumer",
    ),
    "unknown limit": (lambda pki: _listener(pki) + "[limits]\nspeed = 3\n", "limits"),
    "bad log level": (lambda pki: _listener(pki) + "[log]\nlevel = 'loud'\n", "log.level"),
    "missing acl file": (
        lambda pki: _listener(pki) + "[acl]\nfile = '/nonexistent/acl.toml'\n",
        "acl.file",
    ),
    "not TOML": (lambda pki: "[[listeners]\nbind = ", "not valid TOML"),
}


@pytest.mark.parametrize("label", list(INVALID))
def test_check_config_invalid(
    label: str, tmp_path: Path, pki: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    make, field = INVALID[label]
    path = tmp_path / "broker.toml"
    path.write_text(make(pki), encoding="utf-8")

    assert main(["check-config", str(path)]) == 1
    captured = capsys.readouterr()
    assert "OK" not in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert errors, captured.err
    assert any(field in line for line in errors), (field, captured.err)

    assert main(["check-config", str(path), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["valid"] is False
    assert any(field in e for e in result["errors"]), (field, result)


def test_check_config_bad_acl_names_the_rule(
    tmp_path: Path, pki: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(
        tmp_path / "cfg",
        cert=pki.server.cert,
        key=pki.server.key,
        client_ca=pki.ca,
        acl='[[allow]]\nprincipals = ["*"]\nsubscribe = ["ok.>", "cmd.{usr}.>"]\n',
    )
    assert main(["check-config", str(path), "--json"]) == 1
    (error,) = json.loads(capsys.readouterr().out)["errors"]
    assert "allow[0].subscribe[1]" in error and "{usr}" in error


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    assert main(["check-config", str(missing)]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_check_config_warnings_do_not_fail(
    tmp_path: Path, pki: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "cfg"
    directory.mkdir()
    open_key = directory / "server-key.pem"
    shutil.copy(pki.server.key, open_key)
    open_key.chmod(0o644)
    path = write_config(directory, cert=pki.server.cert, key=open_key, client_ca=pki.ca, acl=None)
    assert main(["check-config", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["valid"] is True and result["errors"] == []
    warnings = "\n".join(result["warnings"])
    assert "listeners[0].key" in warnings and "readable by group/others" in warnings
    assert "no [acl] file" in warnings


def test_check_config_resolves_relative_paths_against_the_file(
    tmp_path: Path, pki: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "etc"
    shutil.copytree(pki.directory, directory / "pki")
    (directory / "acl.toml").write_text("", encoding="utf-8")
    path = directory / "broker.toml"
    path.write_text(
        '[[listeners]]\nbind = "127.0.0.1:0"\ncert = "pki/localhost.pem"\n'
        'key = "pki/localhost-key.pem"\nclient_ca = "pki/ca.pem"\n[acl]\nfile = "acl.toml"\n',
        encoding="utf-8",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err


def test_check_config_via_the_console_script(valid_config: Path, tmp_path: Path) -> None:
    ok = run_cli("check-config", str(valid_config), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["valid"] is True
    bad = tmp_path / "bad.toml"
    bad.write_text('[[listeners]]\nbind = "127.0.0.1:0"\nsecurity = "tls"\n', encoding="utf-8")
    result = run_cli("check-config", str(bad))
    assert result.returncode == 1
    assert "listeners[0]" in result.stderr


def test_serve_refuses_an_invalid_config(tmp_path: Path, pki: Any) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(_listener(pki) + "[limits]\nmax_frame_bytes = 0\n", encoding="utf-8")
    result = run_cli("serve", "--config", str(bad))
    assert result.returncode == 1
    assert "limits.max_frame_bytes" in result.stderr
    assert "listening" not in result.stdout


# --- serve --dev ----------------------------------------------------------------------------

DEV_FILES = (
    "ca.pem",
    "ca-key.pem",
    "server.pem",
    "server-key.pem",
    "dev.pem",
    "dev-key.pem",
    "acl.toml",
    "broker.toml",
)


def start_dev(tmp_path: Path, dev_dir: Path) -> BrokerProcess:
    return BrokerProcess(
        ["serve", "--dev", "--dev-dir", str(dev_dir), "--bind", "127.0.0.1:0"], workdir=tmp_path
    ).start()


async def dev_round_trip(broker: BrokerProcess, dev_dir: Path, tag: str) -> str:
    creds = {"ca": dev_dir / "ca.pem", "cert": dev_dir / "dev.pem", "key": dev_dir / "dev-key.pem"}
    async with (
        client_sdk.connect(broker.url, timeout=TIMEOUT, **creds) as sub_client,
        client_sdk.connect(broker.url, timeout=TIMEOUT, **creds) as pub_client,
    ):
        sub = await sub_client.subscribe("status.>")
        await pub_client.publish("status.hello", f"hello {tag}".encode())
        msg = await sub.get(timeout=TIMEOUT)
        assert (msg.topic, msg.payload) == ("status.hello", f"hello {tag}".encode())
        return pub_client.identity


async def test_serve_dev_on_an_ephemeral_port(broker_factory: Any, tmp_path: Path) -> None:
    dev_dir = tmp_path / "tessera-dev"
    broker = broker_factory.track(start_dev(tmp_path, dev_dir))
    assert broker.host == "127.0.0.1" and broker.port != 0

    for name in DEV_FILES:
        assert (dev_dir / name).is_file(), name
    for key in ("ca-key.pem", "server-key.pem", "dev-key.pem"):
        assert stat.S_IMODE((dev_dir / key).stat().st_mode) == 0o600, key
    assert stat.S_IMODE(dev_dir.stat().st_mode) == 0o700

    # The hint tells how to reach THIS broker: the real port, not the bind string's 0.
    hint = broker.wait_for_stdout(r"^  stop: ")
    assert f"tls://127.0.0.1:{broker.port}" in hint, hint
    assert "127.0.0.1:0" not in hint, hint
    assert f"tessera sub --dev --url tls://127.0.0.1:{broker.port} --dev-dir {dev_dir}" in hint
    assert str(dev_dir / "ca.pem") in hint or f"{dev_dir}/ca.pem" in hint

    assert await dev_round_trip(broker, dev_dir, "first") == "x509:dev"
    assert broker.stop() == 0


async def test_serve_dev_reuses_its_files(broker_factory: Any, tmp_path: Path) -> None:
    dev_dir = tmp_path / "tessera-dev"
    first = broker_factory.track(start_dev(tmp_path, dev_dir))
    assert first.stop() == 0
    before = {name: (dev_dir / name).read_bytes() for name in DEV_FILES if name != "broker.toml"}

    second = broker_factory.track(start_dev(tmp_path, dev_dir))
    after = {name: (dev_dir / name).read_bytes() for name in before}
    assert after == before  # same CA, same certificates, same ACL: made once
    assert await dev_round_trip(second, dev_dir, "second") == "x509:dev"
    assert second.stop() == 0


def test_sigterm_right_after_listening_exits_0(broker_factory: Any) -> None:
    """The signal handlers are in place before the broker says it is listening."""
    for _ in range(3):
        broker = broker_factory.start()
        assert broker.stop() == 0, broker.describe()


def test_listening_line_format(broker_factory: Any) -> None:
    broker = broker_factory.start()
    listening = [line for line in broker.stdout_lines if line.startswith("listening ")]
    assert listening == [f"listening tls://127.0.0.1:{broker.port}"]
    assert re.search(r"INFO +tessera\.broker: listening on 127\.0\.0\.1:\d+ \(tls\)", broker.log())
