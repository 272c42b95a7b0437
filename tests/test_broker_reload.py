"""Reload, revocation, expiry and the admin endpoint, against REAL broker processes (issue #10).

Every test makes its own CA with ``certs.pki`` (it revokes, rotates or expires certificates),
runs ``tessera-broker serve`` as a child process, and drives it with SIGHUP or the real
``tessera-broker reload`` / ``connections`` commands; clients are raw TLS sockets speaking the
wire protocol, or the SDK.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from brokerproc import REPO_ROOT, BrokerProcess, RawClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tessera_mq import client as client_sdk
from tessera_mq.auth.tls import client_context
from tessera_mq.certs import pki as certs_pki
from tessera_mq.client.protocol import ErrorCode

ALLOW_ALL = """\
[[allow]]
principals = ["*"]
publish = [">"]
subscribe = [">"]
"""


class Setup:
    """A CA directory, a broker configuration in ``root``, and the running broker."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pki = root / "pki"
        certs_pki.init_ca(self.pki, common_name="Reload test CA")
        certs_pki.issue(self.pki, "server", "localhost", dns=["localhost"], ip=["127.0.0.1"])
        for name in ("alice", "bob"):
            certs_pki.issue(self.pki, "client", name)
        self.config = root / "broker.toml"
        self.acl = root / "acl.toml"
        self.acl.write_text(ALLOW_ALL)
        self.crl: list[Path] = []
        self.crl_expired = "refuse"
        self.top: list[str] = []
        self.broker: BrokerProcess | None = None

    def write_config(self) -> None:
        lines = [
            *self.top,
            "[[listeners]]",
            'bind = "127.0.0.1:0"',
            'security = "tls"',
            f"cert = {json.dumps(str(self.pki / 'localhost.pem'))}",
            f"key = {json.dumps(str(self.pki / 'localhost-key.pem'))}",
            f"client_ca = {json.dumps(str(self.pki / 'ca.pem'))}",
        ]
        if self.crl:
            lines.append(f"crl = {json.dumps([str(p) for p in self.crl])}")
            lines.append(f"crl_expired = {json.dumps(self.crl_expired)}")
        lines += ["", "[acl]", f"file = {json.dumps(str(self.acl))}", ""]
        self.config.write_text("\n".join(lines))

    def start(self) -> BrokerProcess:
        self.write_config()
        self.broker = BrokerProcess.serve(self.config)
        return self.broker

    @property
    def running(self) -> BrokerProcess:
        assert self.broker is not None
        return self.broker

    def context(self, name: str, ca: Path | None = None) -> ssl.SSLContext:
        return client_context(
            ca or self.pki / "ca.pem", self.pki / f"{name}.pem", self.pki / f"{name}-key.pem"
        )

    def raw(self, name: str, ca: Path | None = None) -> RawClient:
        broker = self.running
        return RawClient(broker.host, broker.port, self.context(name, ca), timeout=10.0)

    def admin(self, command: str, *extra: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "tessera_mq.broker.cli",
                command,
                "--config",
                str(self.config),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )

    def reload(self) -> dict[str, Any]:
        done = self.admin("reload", "--json")
        answer = json.loads(done.stdout)
        assert isinstance(answer, dict)
        answer["exit"] = done.returncode
        return answer


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    try:
        yield s
    finally:
        broker = s.broker
        if broker is not None:
            try:
                if broker.running:
                    assert broker.stop() == 0, broker.describe()
                assert not broker.unexpected_log_lines(), broker.describe()
            finally:
                broker.kill()


def subscribe(client: RawClient, sid: int, pattern: str) -> None:
    client.send(op="sub", sid=sid, pattern=pattern)
    reply, _ = client.recv_until("ok")
    assert reply.get("sid") == sid, reply


def test_sighup_reloads_instead_of_terminating(setup: Setup) -> None:
    broker = setup.start()
    with setup.raw("alice") as alice:
        alice.hello()
        subscribe(alice, 1, "status.>")
        mark = broker.log_mark()
        broker.send_signal(signal.SIGHUP)
        record = broker.wait_for_audit("reload", since=mark, ok=True, trigger="SIGHUP")
        assert record["policy"] == str(setup.acl)
        assert broker.running
        # the session survived the reload
        alice.send(op="pub", topic="status.a", payload=b"x", ack=7)
        msg, _ = alice.recv_until("msg")
        assert msg["topic"] == "status.a"


def test_admin_socket_is_private(setup: Setup) -> None:
    setup.start()
    sock = setup.root / "tessera-admin.sock"
    mode = sock.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_tightened_acl_removes_one_live_subscription(setup: Setup) -> None:
    broker = setup.start()
    with setup.raw("alice") as alice, setup.raw("bob") as bob:
        alice.hello()
        bob.hello()
        subscribe(alice, 1, "status.>")
        subscribe(alice, 2, "secret.>")
        setup.acl.write_text(
            ALLOW_ALL + '\n[[deny]]\nprincipals = ["x509:alice"]\nsubscribe = ["secret.>"]\n'
        )
        answer = setup.reload()
        assert answer["exit"] == 0, answer
        assert answer["ok"] is True
        assert answer["subscriptions_removed"] == 1
        error, _ = alice.recv_until("error")
        assert error["sid"] == 2
        assert error["code"] == ErrorCode.PERMISSION_DENIED
        bob.send(op="pub", topic="secret.x", payload=b"1")
        bob.send(op="pub", topic="status.x", payload=b"2", ack=1)
        bob.recv_until("ok")
        msg, before = alice.recv_until("msg")
        assert msg["topic"] == "status.x"  # secret.x was not delivered: sid 2 is gone
        assert all(f.get("op") != "msg" for f in before)
        # re-subscribing is refused under the new policy
        alice.send(op="sub", sid=3, pattern="secret.>")
        error, _ = alice.recv_until("error")
        assert error["sid"] == 3
    assert broker.running


def test_broken_acl_is_rejected_and_the_old_policy_stays(setup: Setup) -> None:
    broker = setup.start()
    with setup.raw("alice") as alice:
        alice.hello()
        setup.acl.write_text("[[allow]]\nprincipals = ['*']\nsubscribe = ['a..b']\n")
        mark = broker.log_mark()
        done = setup.admin("reload")
        assert done.returncode == 1
        assert "acl.toml: allow[0].subscribe[0]" in done.stderr
        broker.wait_for_log(r"reload \(admin\) failed, nothing changed", since=mark)
        broker.wait_for_audit("reload", since=mark, ok=False)
        # the old allow-all policy is still in force
        subscribe(alice, 1, "anything.>")
        alice.send(op="pub", topic="anything.x", payload=b"x", ack=1)
        msg, _ = alice.recv_until("msg")
        assert msg["topic"] == "anything.x"


def test_revoked_certificate_is_refused_and_its_session_cut_by_one_reload(setup: Setup) -> None:
    certs_pki.make_crl(setup.pki)
    setup.crl = [setup.pki / "crl.pem"]
    broker = setup.start()
    with setup.raw("alice") as alice, setup.raw("bob") as bob:
        alice.hello()
        bob.hello()
        certs_pki.revoke(setup.pki, cert=setup.pki / "alice.pem", reason="keyCompromise")
        mark = broker.log_mark()
        answer = setup.reload()
        assert answer["ok"] is True, answer
        assert answer["sessions_revoked"] == 1
        close, _ = alice.read_to_close()
        assert close is not None
        assert close["code"] == ErrorCode.CREDENTIAL_REVOKED
        broker.wait_for_audit("revoked", since=mark, identity="x509:alice")
        # bob is untouched
        bob.send(op="ping")
        bob.recv_until("pong")
    # a new handshake with the revoked certificate is refused by the broker
    mark = broker.log_mark()
    with pytest.raises((ssl.SSLError, ConnectionError)), setup.raw("alice") as again:
        again.hello()
    broker.wait_for_log(
        r"handshake failed: tls_bad_cert: client certificate rejected: certificate revoked",
        since=mark,
    )


def test_expired_crl_policy(setup: Setup) -> None:
    """crl_expired = "refuse" (the default) refuses new client handshakes while the CRL is
    stale; "warn" keeps accepting them and still enforces the list."""
    expired = setup.pki / "stale-crl.pem"
    _write_expired_crl(setup.pki, expired)
    setup.crl = [expired]
    broker = setup.start()
    broker.wait_for_log(r"CRL is past its next update: new client handshakes are REFUSED")
    with pytest.raises((ssl.SSLError, ConnectionError)), setup.raw("bob") as bob:
        bob.hello()
    setup.crl_expired = "warn"
    setup.write_config()
    answer = setup.reload()
    assert answer["ok"] is True, answer
    broker.wait_for_log(r"CRL is past its next update; still enforcing it")
    with setup.raw("bob") as bob:
        bob.hello()


def _write_expired_crl(
    directory: Path, path: Path, next_update: timedelta = timedelta(hours=-1)
) -> None:
    ca = certs_pki.load_certificate(directory / "ca.pem")
    key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), None)
    now = datetime.now(UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - timedelta(days=2))
        .next_update(now + next_update)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def test_rotate_server_certificate_and_ca_while_clients_stay(setup: Setup, tmp_path: Path) -> None:
    broker = setup.start()
    old_ca = setup.pki / "ca.pem"
    new_dir = tmp_path / "new-pki"
    certs_pki.init_ca(new_dir, common_name="Reload test CA 2")
    certs_pki.issue(new_dir, "server", "localhost", dns=["localhost"], ip=["127.0.0.1"])
    certs_pki.issue(new_dir, "client", "carol")
    with setup.raw("alice") as alice:
        alice.hello()
        subscribe(alice, 1, "t.>")
        # Step 1: trust both CAs for clients; serve the new server certificate.
        bundle = setup.root / "clients-ca.pem"
        bundle.write_bytes(old_ca.read_bytes() + (new_dir / "ca.pem").read_bytes())
        text = setup.config.read_text()
        text = text.replace(str(setup.pki / "localhost.pem"), str(new_dir / "localhost.pem"))
        text = text.replace(
            str(setup.pki / "localhost-key.pem"), str(new_dir / "localhost-key.pem")
        )
        text = text.replace(json.dumps(str(old_ca)), json.dumps(str(bundle)))
        setup.config.write_text(text)
        answer = setup.reload()
        assert answer["ok"] is True, answer
        # a new client that trusts only the new CA sees the new server certificate
        with RawClient(
            broker.host,
            broker.port,
            client_context(new_dir / "ca.pem", new_dir / "carol.pem", new_dir / "carol-key.pem"),
        ) as carol:
            welcome = carol.hello()
            assert welcome["identity"]["name"] == "carol"
            peer = carol.sock.getpeercert()
            assert peer is not None
            assert dict(x[0] for x in peer["issuer"])["commonName"] == "Reload test CA 2"
            carol.send(op="pub", topic="t.rotated", payload=b"r", ack=1)
            carol.recv_until("ok")
        # a client that trusts only the old CA cannot verify the new server certificate
        with pytest.raises(ssl.SSLCertVerificationError), setup.raw("bob"):
            pass
        # the old session is still there and still receives
        msg, _ = alice.recv_until("msg")
        assert msg["topic"] == "t.rotated"


def test_connections_lists_who_is_connected(setup: Setup) -> None:
    end = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3)
    certs_pki.issue(setup.pki, "client", "dave", not_after=end)
    setup.start()
    with setup.raw("dave") as dave, setup.raw("alice") as alice:
        dave.hello()
        alice.hello()
        subscribe(dave, 4, "status.>")
        done = setup.admin("connections", "--json")
        assert done.returncode == 0, done.stderr
        rows = {r["identity"]: r for r in json.loads(done.stdout)["connections"]}
        assert set(rows) == {"x509:dave", "x509:alice"}
        row = rows["x509:dave"]
        assert row["mechanism"] == "x509"
        assert row["subscriptions"] == {"4": "status.>"}
        assert row["credential_expires_at"] == end.isoformat(timespec="seconds")
        since = datetime.fromisoformat(row["since"])
        assert abs((datetime.now(UTC) - since).total_seconds()) < 60
        text = setup.admin("connections")
        assert text.returncode == 0
        assert "x509:dave" in text.stdout
        assert "status.>" in text.stdout


def test_admin_commands_without_a_broker(tmp_path: Path) -> None:
    setup = Setup(tmp_path)
    setup.write_config()
    done = setup.admin("reload")
    assert done.returncode == 3
    assert "is the broker running?" in done.stderr


async def test_short_lived_certificate_ends_its_session_and_the_sdk_reconnects_renewed(
    setup: Setup,
) -> None:
    """The session closes at the certificate's notAfter with CREDENTIAL_EXPIRED; the SDK
    reconnects at once, reading the renewed certificate that replaced the old files."""
    now = datetime.now(UTC).replace(microsecond=0)
    short = certs_pki.issue(
        setup.pki, "client", "erin", not_after=now + timedelta(seconds=4), force=True
    )
    broker = await asyncio.to_thread(setup.start)
    states: list[tuple[client_sdk.ConnectionState, object]] = []
    async with client_sdk.connect(
        broker.url,
        ca=setup.pki / "ca.pem",
        cert=short.cert,
        key=short.key,
        reconnect=client_sdk.Reconnect(initial_delay=0.1, max_delay=0.5),
        on_state_change=lambda state, err: states.append((state, err)),
    ) as client:
        assert client.welcome is not None
        # renew now: same files, a new certificate valid for a day
        certs_pki.issue(setup.pki, "client", "erin", days=1, force=True)
        deadline = time.monotonic() + 20
        while client.reconnects < 1:
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.1)
        await client.publish("erin.ok", b"1")
    closes = [err for state, err in states if state is client_sdk.ConnectionState.RECONNECTING]
    assert closes
    assert getattr(closes[0], "code", None) == ErrorCode.CREDENTIAL_EXPIRED
    record = broker.wait_for_audit("credential_expired", identity="x509:erin")
    assert record["mechanism"] == "x509"


def test_reload_rechecks_filtered_wildcards(setup: Setup) -> None:
    """A filtered subscription follows the new policy: narrower after one reload, removed
    (with an error naming it) when nothing it matches is readable any more."""
    acl = 'principals = ["x509:bob"]\nsubscribe = [{}]\n'
    publisher = '[[allow]]\nprincipals = ["x509:alice"]\npublish = [">"]\n\n'
    setup.acl.write_text(publisher + "[[allow]]\n" + acl.format('"org.a.>", "org.b.>"'))
    setup.start()
    with setup.raw("alice") as alice, setup.raw("bob") as bob:
        alice.hello()
        bob.hello()
        subscribe(bob, 1, "org.>")

        def publish_all() -> None:
            for i, topic in enumerate(("org.a.x", "org.b.x", "org.c.x", "org.end.x")):
                alice.send(op="pub", topic=topic, payload=b"x", ack=i + 1)
                alice.recv_until("ok")

        publish_all()
        got: list[str] = []
        while not got or got[-1] != "org.b.x":
            msg, _ = bob.recv_until("msg")
            got.append(msg["topic"])
        assert got == ["org.a.x", "org.b.x"]
        setup.acl.write_text(publisher + "[[allow]]\n" + acl.format('"org.b.>", "org.end.>"'))
        assert setup.reload()["subscriptions_removed"] == 0
        publish_all()
        msg, _ = bob.recv_until("msg")
        assert msg["topic"] == "org.b.x"  # org.a.x is no longer delivered
        msg, _ = bob.recv_until("msg")
        assert msg["topic"] == "org.end.x"
        setup.acl.write_text(publisher + "[[allow]]\n" + acl.format('"status.>"'))
        assert setup.reload()["subscriptions_removed"] == 1
        error, _ = bob.recv_until("error")
        assert error["sid"] == 1


def test_admin_socket_answers_bad_requests_with_errors(setup: Setup) -> None:
    broker = setup.start()
    path = str(setup.root / "tessera-admin.sock")
    for request in (b"not json\n", b"[1, 2]\n", b'{"op": "shutdown"}\n', b'{"op": 5}\n'):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(request)
            answer = json.loads(sock.makefile("rb").readline())
        assert answer["ok"] is False
        assert answer["error"]
    assert broker.running
    assert setup.admin("connections", "--json").returncode == 0


def test_admin_command_usage(setup: Setup) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    for argv, status in ((["reload", "--help"], 0), (["reload"], 2), (["connections", "-h"], 0)):
        done = subprocess.run(
            [sys.executable, "-m", "tessera_mq.broker.cli", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert done.returncode == status, (argv, done.stderr)


async def test_expired_certificate_without_renewal_stops_the_sdk_with_the_reason(
    setup: Setup,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    short = certs_pki.issue(setup.pki, "client", "fred", not_after=now + timedelta(seconds=3))
    broker = await asyncio.to_thread(setup.start)
    states: list[tuple[client_sdk.ConnectionState, object]] = []
    client = await client_sdk.connect(
        broker.url,
        ca=setup.pki / "ca.pem",
        cert=short.cert,
        key=short.key,
        reconnect=client_sdk.Reconnect(initial_delay=0.1, max_delay=0.5),
        on_state_change=lambda state, err: states.append((state, err)),
    )
    try:
        deadline = time.monotonic() + 20
        while not any(s is client_sdk.ConnectionState.CLOSED for s, _ in states):
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.1)
    finally:
        await client.close()
    final = next(err for s, err in states if s is client_sdk.ConnectionState.CLOSED)
    assert "expired" in str(final), final
    assert client.reconnects == 0


def test_identity_allowed_nothing_after_reload_is_closed(setup: Setup) -> None:
    broker = setup.start()
    with setup.raw("alice") as alice, setup.raw("bob") as bob:
        alice.hello()
        bob.hello()
        subscribe(bob, 1, "x.>")
        setup.acl.write_text(
            '[[allow]]\nprincipals = ["x509:alice"]\npublish = [">"]\nsubscribe = [">"]\n'
        )
        mark = broker.log_mark()
        answer = setup.reload()
        assert answer["ok"] is True, answer
        close, frames = bob.read_to_close()
        assert close is not None
        assert close["code"] == ErrorCode.PERMISSION_DENIED
        assert [f["sid"] for f in frames if f.get("op") == "error"] == [1]
        broker.wait_for_audit("policy_closed", since=mark, identity="x509:bob")
        alice.send(op="ping")
        alice.recv_until("pong")  # alice is still allowed: untouched


def test_a_crl_that_expires_while_running_is_reported_and_refused(setup: Setup) -> None:
    path = setup.pki / "short-crl.pem"
    _write_expired_crl(setup.pki, path, next_update=timedelta(seconds=3))
    setup.crl = [path]
    broker = setup.start()
    with setup.raw("bob") as bob:
        bob.hello()  # still fresh
        record = broker.wait_for_audit("crl_expired", timeout=15, policy="refuse")
        assert record["listener"].startswith("127.0.0.1:")
        broker.wait_for_log(r"a CRL passed its next update: new client handshakes are REFUSED")
        bob.send(op="ping")
        bob.recv_until("pong")  # established sessions continue
    with pytest.raises((ssl.SSLError, ConnectionError)), setup.raw("alice") as alice:
        alice.hello()


async def test_max_session_age_makes_sessions_re_authenticate(setup: Setup) -> None:
    broker = await asyncio.to_thread(setup.start)
    setup.config.write_text(setup.config.read_text() + "\n[limits]\nmax_session_age = 1.5\n")
    answer = await asyncio.to_thread(setup.reload)  # a limit that applies to new sessions
    assert answer["ok"] is True, answer
    async with client_sdk.connect(
        broker.url,
        ca=setup.pki / "ca.pem",
        cert=setup.pki / "alice.pem",
        key=setup.pki / "alice-key.pem",
        reconnect=client_sdk.Reconnect(initial_delay=0.1, max_delay=0.5),
    ) as client:
        deadline = time.monotonic() + 15
        while client.reconnects < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        await client.publish("age.ok", b"1")
    broker.wait_for_audit("credential_expired", identity="x509:alice")


def test_admin_socket_default_unusable_is_a_warning_explicit_is_an_error(setup: Setup) -> None:
    (setup.root / "tessera-admin.sock").write_text("not a socket")
    broker = setup.start()
    broker.wait_for_log(r"admin endpoint off .*not a socket.*; set admin_socket to enable it")
    broker.send_signal(signal.SIGHUP)  # reload still works without the endpoint
    broker.wait_for_audit("reload", ok=True, trigger="SIGHUP")
    assert broker.stop() == 0
    setup.top = [f"admin_socket = {json.dumps(str(setup.root / 'missing' / 'a.sock'))}"]
    setup.write_config()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "tessera_mq.broker.cli", "serve", "--config", str(setup.config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 1
    assert "cannot listen on" in done.stderr
    assert "listening" not in done.stdout
