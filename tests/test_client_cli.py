"""``tessera`` (client_sdk/cli.py): each documented exit code produced by the real situation it
names, against a real broker (or a real socket that misbehaves); error lines without Python class
names; ``--json`` errors; ``TESSERA_CA``/``TESSERA_CERT``/``TESSERA_KEY``; named contexts; and
``--dev`` finding the running dev broker from another directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from brokerproc import REPO_ROOT, BrokerProcess

from tessera_mq.client.cli import (
    EXIT_AUTHENTICATION,
    EXIT_ERROR,
    EXIT_PERMISSION,
    EXIT_PROTOCOL,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)

PUB_ONLY_STATUS_ACL = """\
[[allow]]
principals = ["x509:alice"]
publish = ["status.>"]
subscribe = ["status.>"]
"""


def tessera_bin() -> str:
    found = shutil.which("tessera", path=str(Path(sys.executable).parent))
    assert found, "the tessera console script is not installed (pip install -e .)"
    return found


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """An environment with its own XDG directories (contexts, the dev broker record)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_RUNTIME_DIR", "run")):
        (tmp_path / sub).mkdir(mode=0o700)
        env[var] = str(tmp_path / sub)
    return env


def tessera(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tessera_bin(), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def tls_flags(pki: Any, name: str = "alice", ca: Path | None = None) -> list[str]:
    cred = pki.clients[name]
    return ["--ca", str(ca or pki.ca), "--cert", str(cred.cert), "--key", str(cred.key)]


def assert_human_error(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tessera: error: "), result.stderr
    assert text in lines[0], lines[0]
    assert not re.search(r"\((\w+Error|\w+Exception|\w+Denied|\w+Closed\w*)\)$", lines[0]), lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def broker(module_broker_factory: Any) -> BrokerProcess:
    return module_broker_factory.start(acl=PUB_ONLY_STATUS_ACL)  # type: ignore[no-any-return]


# --- exit codes ---------------------------------------------------------------------------------


def test_success_exits_0(broker: BrokerProcess, pki: Any, home: dict[str, str]) -> None:
    result = tessera(
        "pub", "--url", broker.url, *tls_flags(pki), "--json", "status.a", "x", env=home
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"topic": "status.a", "bytes": 1, "acknowledged": True}


@pytest.mark.parametrize(
    "argv",
    [
        ["pub", "-H", "novalue", "status.a", "x"],
        ["pub", "-H", "=v", "status.a", "x"],
        ["pub", "--timeout", "0", "status.a", "x"],
        ["sub"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], home: dict[str, str]) -> None:
    result = tessera(*argv, env=home)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "usage: tessera" in result.stderr and "ValueError" not in result.stderr


def test_an_invalid_topic_is_a_usage_error(
    broker: BrokerProcess, pki: Any, home: dict[str, str]
) -> None:
    result = tessera("pub", "--url", broker.url, *tls_flags(pki), "status..a", "x", env=home)
    assert_human_error(result, EXIT_USAGE, "invalid topic")


def test_unreachable_exits_3(pki: Any, home: dict[str, str]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tls://127.0.0.1:{port}"
    result = tessera("pub", "--url", url, *tls_flags(pki), "status.a", "x", env=home)
    assert_human_error(result, EXIT_UNREACHABLE, "cannot reach the broker")

    result = tessera("pub", "--url", url, *tls_flags(pki), "--json", "status.a", "x", env=home)
    assert result.returncode == EXIT_UNREACHABLE
    error = json.loads(result.stderr)["error"]
    assert error["kind"] == "unreachable" and error["exit_code"] == 3 and error["url"] == url


def test_authentication_failure_exits_4(
    broker: BrokerProcess, pki: Any, home: dict[str, str]
) -> None:
    # The client does not trust the broker's certificate.
    result = tessera(
        "pub", "--url", broker.url, *tls_flags(pki, ca=pki.other_ca), "status.a", "x", env=home
    )
    assert_human_error(result, EXIT_AUTHENTICATION, "authentication failed: tls_bad_server_cert")
    # The broker does not accept the client's certificate (issued by another CA).
    other = pki.foreign_client("alice")
    result = tessera(
        "pub",
        "--url",
        broker.url,
        "--ca",
        str(other["ca"]),
        "--cert",
        str(other["cert"]),
        "--key",
        str(other["key"]),
        "--json",
        "status.a",
        "x",
        env=home,
    )
    assert result.returncode == EXIT_AUTHENTICATION, result.stderr
    assert json.loads(result.stderr)["error"]["kind"] == "authentication"


def test_permission_denied_exits_5(broker: BrokerProcess, pki: Any, home: dict[str, str]) -> None:
    result = tessera("pub", "--url", broker.url, *tls_flags(pki), "cmd.reboot", "x", env=home)
    assert_human_error(result, EXIT_PERMISSION, "permission denied")
    result = tessera("sub", "--url", broker.url, *tls_flags(pki, "bob"), "status.>", env=home)
    assert_human_error(result, EXIT_PERMISSION, "permission denied")


@pytest.fixture
def tls_server(pki: Any) -> Iterator[tuple[socket.socket, ssl.SSLContext]]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server.cert, pki.server.key)
    ctx.set_alpn_protocols(["tessera/1"])
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        yield listener, ctx


def test_a_peer_that_breaks_the_protocol_exits_6(
    tls_server: tuple[socket.socket, ssl.SSLContext], pki: Any, home: dict[str, str]
) -> None:
    """A TLS server that answers hello with a frame that is not msgpack."""
    listener, ctx = tls_server

    def serve() -> None:
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(65536)  # the client's hello
            tls.sendall(b"\x00\x00\x00\x03\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
            tls.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    result = tessera(
        "pub", "--url", f"tls://127.0.0.1:{port}", *tls_flags(pki), "status.a", "x", env=home
    )
    assert_human_error(result, EXIT_PROTOCOL, "protocol")
    thread.join(timeout=10)


def test_a_silent_peer_times_out_with_7(pki: Any, home: dict[str, str]) -> None:
    """TCP connects (the kernel accepts into the backlog) but nobody ever speaks TLS."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"tls://127.0.0.1:{listener.getsockname()[1]}"
        result = tessera(
            "pub", "--url", url, *tls_flags(pki), "--timeout", "0.5", "status.a", "x", env=home
        )
    assert_human_error(result, EXIT_TIMEOUT, "timed out")


def test_a_missing_credential_file_exits_1(pki: Any, home: dict[str, str], tmp_path: Path) -> None:
    result = tessera("pub", "--ca", str(tmp_path / "nope.pem"), "status.a", "x", env=home)
    assert_human_error(result, EXIT_ERROR, "--ca:")


# --- environment variables and contexts -----------------------------------------------------------


def test_tls_environment_variables(broker: BrokerProcess, pki: Any, home: dict[str, str]) -> None:
    env = dict(home)
    env.update(
        TESSERA_URL=broker.url,
        TESSERA_CA=str(pki.ca),
        TESSERA_CERT=str(pki.clients["alice"].cert),
        TESSERA_KEY=str(pki.clients["alice"].key),
    )
    assert tessera("pub", "status.env", "x", env=env).returncode == 0
    # A flag wins over the variable: bob is not allowed to publish there.
    result = tessera("pub", "--cert", str(pki.clients["bob"].cert), "--key",
                     str(pki.clients["bob"].key), "status.env", "x", env=env)  # fmt: skip
    assert result.returncode == EXIT_PERMISSION


def test_contexts(broker: BrokerProcess, pki: Any, home: dict[str, str], tmp_path: Path) -> None:
    alice = pki.clients["alice"]
    add = tessera(
        "context", "add", "prod", "--url", broker.url, "--ca", str(pki.ca),
        "--cert", str(alice.cert), "--key", str(alice.key), "--description", "the test broker",
        env=home,
    )  # fmt: skip
    assert add.returncode == 0, add.stderr
    stored = Path(home["XDG_CONFIG_HOME"]) / "tessera" / "contexts.json"
    assert stored.is_file()
    bob = pki.clients["bob"]
    tessera("context", "add", "bob", "--url", broker.url, "--ca", str(pki.ca),
            "--cert", str(bob.cert), "--key", str(bob.key), env=home)  # fmt: skip

    listing = tessera("context", "list", "--json", env=home)
    assert json.loads(listing.stdout) == {"current": "prod", "contexts": ["bob", "prod"]}
    assert "* prod  the test broker" in tessera("context", "list", env=home).stdout

    # The current context is used without any flag, from any directory.
    assert tessera("pub", "status.ctx", "x", env=home, cwd=tmp_path).returncode == 0
    assert tessera("context", "use", "bob", env=home).returncode == 0
    assert tessera("pub", "status.ctx", "x", env=home).returncode == EXIT_PERMISSION
    assert tessera("pub", "--context", "prod", "status.ctx", "x", env=home).returncode == 0

    shown = json.loads(tessera("context", "show", "prod", "--json", env=home).stdout)
    assert shown["url"] == broker.url and shown["cert"] == str(alice.cert.resolve())
    assert tessera("context", "remove", "bob", env=home).returncode == 0
    missing = tessera("pub", "--context", "bob", "status.ctx", "x", env=home)
    assert_human_error(missing, EXIT_ERROR, "no context named 'bob'")


# --- --dev ----------------------------------------------------------------------------------------


def test_dev_finds_the_running_dev_broker(
    broker_factory: Any, tmp_path: Path, home: dict[str, str]
) -> None:
    workdir = tmp_path / "broker-here"
    dev_dir = workdir / "tessera-dev"
    dev = broker_factory.track(
        BrokerProcess(
            ["serve", "--dev", "--dev-dir", str(dev_dir), "--bind", "127.0.0.1:0"],
            workdir=workdir,
            env={"XDG_RUNTIME_DIR": home["XDG_RUNTIME_DIR"]},
        ).start()
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # No --url, no --dev-dir, another directory: the record of the running broker is enough
    # (its port was chosen by the system, so the default URL would be wrong).
    result = tessera("pub", "--dev", "--json", "status.dev", "hi", env=home, cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert dev.stop() == 0
    # Stopped: the record is gone, and the message says what to do.
    result = tessera("pub", "--dev", "status.dev", "hi", env=home, cwd=elsewhere)
    assert_human_error(result, EXIT_UNREACHABLE, "no dev broker is running")
