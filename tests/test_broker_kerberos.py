"""Kerberos and NTLM through SPNEGO against a REAL broker process and the REAL test KDC.

One KDC for the session (tests/kdc.py) and one broker for this module, with four listeners:

* ``krb``: ``negotiate`` (every record GSS-sealed), Kerberos only;
* ``krb_ntlm``: ``negotiate`` with Kerberos and NTLM;
* ``tls_gss``: ``tls+negotiate`` (channel bindings always required) with Kerberos and NTLM;
* ``x509``: plain mutual ``tls`` with client certificates;
* ``short_strict`` / ``short_lenient``: ``negotiate`` for ``tessera/short.tessera.test``, whose
  tickets live :data:`SHORT_TICKET_SECONDS`, with ``max_clock_skew`` 1 s and 300 s.

The broker runs at DEBUG level, so the log-hygiene test sees everything it could ever write.
Nothing here is mocked: clients are the SDK, the ``tessera`` CLI, or hand-driven
``NegotiateClientLayer`` objects over real sockets (for what the SDK would never send).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import krb5
import msgpack
import pytest
from brokerproc import REPO_ROOT, BrokerProcess, pack
from kdc import KDC, UNREACHABLE_REALM

from tessera_mq import client as client_sdk
from tessera_mq.auth.errors import HandshakeError, HandshakeReason
from tessera_mq.auth.layer import SecurityLayer
from tessera_mq.auth.negotiate import NTLM, Kerberos, NegotiateClientLayer, RecordType, WireCode
from tessera_mq.auth.stack import StackedLayer
from tessera_mq.auth.tls import TLSLayer, client_context, server_context
from tessera_mq.certs import pki as certs_pki
from tessera_mq.client import AuthenticationError, PermissionDenied

pytestmark = pytest.mark.kdc

TIMEOUT = 10.0
#: The broker's security-handshake deadline here (the stall test waits for it).
HANDSHAKE_TIMEOUT_SECONDS = 2.0
#: ``max_handshake_token_bytes`` of the ``krb`` listener (a Kerberos AP-REQ here is ~1 KiB).
MAX_TOKEN_BYTES = 16_384
HOST = "localhost"  # the SPN is tessera/localhost: clients must use this name, not 127.0.0.1
#: The host of the short-lived service principal (its tickets end after SHORT_TICKET_SECONDS).
SHORT_HOST = "short.tessera.test"
SHORT_TICKET_SECONDS = 2

# Distinctive secrets: the log-hygiene test greps the broker's log and the CLI's output for them.
PASSWORDS = {
    "alice": "Alice-krb-9f3Kq!",
    "bob": "Bob-krb-2mZx7#",
    "Mallory": "Mallory-krb-5tRw1%",
}
NTLM_PASSWORDS = {"Alice": "Alice-ntlm-4hYp8&", "Mallory": "Mallory-ntlm-6vNc3*"}
WRONG_PASSWORD = "Wrong-pw-0aB1c2$"
ALL_SECRETS = (*PASSWORDS.values(), *NTLM_PASSWORDS.values(), WRONG_PASSWORD)

ACL = """\
[[allow]]   # allow[0]: every principal of the realm
principals = ["kerberos:*@TESSERA.TEST"]
publish = ["krb.>", "mixed.>"]
subscribe = ["krb.>", "inbox.{user}.>", "mixed.>"]

[[allow]]   # allow[1]: one Kerberos principal only
principals = ["kerberos:alice@TESSERA.TEST"]
publish = ["alice.>"]
subscribe = ["alice.>"]

[[allow]]   # allow[2]: every account of the NTLM domain
principals = ['ntlm:TESSERA\\*']
publish = ["ntlm.>", "mixed.>"]
subscribe = ["ntlm.>", "inbox.{user}.>", "mixed.>"]

[[allow]]   # allow[3]: certificate clients
principals = ["x509:*"]
publish = ["mixed.>"]
subscribe = ["mixed.>"]

[[allow]]   # allow[4]: anyone authenticated may drop a note into an inbox
principals = ["*"]
publish = ["inbox.>"]

[[deny]]    # deny[0]: the case of the name in the ticket must not get mallory past this
principals = ["kerberos:mallory@TESSERA.TEST", 'ntlm:TESSERA\\mallory']
publish = [">"]
subscribe = [">"]
"""


# -- fixtures -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Realm:
    kdc: KDC
    directory: Path
    keytab: Path  # the broker's: tessera/localhost AND other/localhost
    alice_ccache: str
    alice_keytab: Path
    empty_ccache: str  # initialised for alice, holds no ticket
    ntlm_user_file: Path


@pytest.fixture(scope="module")
def realm(kdc: KDC, tmp_path_factory: pytest.TempPathFactory) -> Realm:
    directory = tmp_path_factory.mktemp("kerberos-broker-realm")
    services = [f"tessera/{HOST}", f"other/{HOST}"]
    for name in services:
        kdc.add_principal(name)
    for name, password in PASSWORDS.items():
        kdc.add_principal(name, password)
    short = kdc.add_principal(f"tessera/{SHORT_HOST}")
    kdc._kadmin(f'modprinc -maxlife "{SHORT_TICKET_SECONDS} seconds" {short}', "short maxlife")
    keytab = kdc.export_keytab(directory / "broker.keytab", [*services, short])
    alice_keytab = kdc.export_keytab(directory / "alice.keytab", ["alice"])
    alice_ccache = kdc.kinit("alice", PASSWORDS["alice"], directory / "alice.ccache")
    ctx = krb5.init_context()
    empty = f"FILE:{directory / 'empty.ccache'}"
    krb5.cc_initialize(
        ctx,
        krb5.cc_resolve(ctx, empty.encode()),
        krb5.parse_name_flags(ctx, kdc.principal("alice").encode()),
    )
    users = directory / "ntlm-users"
    users.write_text("".join(f"TESSERA:{u}:{p}\n" for u, p in NTLM_PASSWORDS.items()))
    users.chmod(0o600)
    return Realm(kdc, directory, keytab, alice_ccache, alice_keytab, empty, users)


def _toml(value: object) -> str:
    return json.dumps(str(value) if isinstance(value, Path) else value)  # JSON is valid TOML here


@dataclass(frozen=True)
class Broker:
    proc: BrokerProcess
    pki: Any

    LISTENERS = ("krb", "krb_ntlm", "tls_gss", "x509", "short_strict", "short_lenient")

    def port(self, listener: str) -> int:
        return self.proc.addresses[self.LISTENERS.index(listener)][2]

    def url(self, listener: str) -> str:
        scheme = self.proc.addresses[self.LISTENERS.index(listener)][0]
        return f"{scheme}://{HOST}:{self.port(listener)}"

    def connect(self, listener: str, auth: Any = None, **kwargs: Any) -> client_sdk.connect:
        if listener in ("tls_gss", "x509"):
            kwargs.setdefault("ca", self.pki.ca)
        return client_sdk.connect(self.url(listener), auth=auth, timeout=TIMEOUT, **kwargs)


@pytest.fixture(scope="module")
def broker(
    realm: Realm, pki: Any, module_broker_factory: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Broker]:
    directory = tmp_path_factory.mktemp("kerberos-broker")
    (directory / "acl.toml").write_text(ACL, encoding="utf-8")
    gss = {
        "service_principal": f"tessera/{HOST}@{realm.kdc.realm}",
        "keytab": realm.keytab,
    }
    listeners: list[dict[str, object]] = [
        {"security": "negotiate", **gss, "max_handshake_token_bytes": MAX_TOKEN_BYTES},
        {
            "security": "negotiate",
            **gss,
            "mechanisms": ["kerberos", "ntlm"],
            "ntlm_user_file": realm.ntlm_user_file,
        },
        {
            "security": "tls+negotiate",
            "cert": pki.server.cert,
            "key": pki.server.key,
            **gss,
            "mechanisms": ["kerberos", "ntlm"],
            "ntlm_user_file": realm.ntlm_user_file,
        },
        {
            "security": "tls",
            "cert": pki.server.cert,
            "key": pki.server.key,
            "client_ca": pki.ca,
        },
        *(
            {
                "security": "negotiate",
                "service_principal": f"tessera/{SHORT_HOST}@{realm.kdc.realm}",
                "keytab": realm.keytab,
                "max_clock_skew": skew,
            }
            for skew in (1, 300)
        ),
    ]
    lines: list[str] = []
    for listener in listeners:
        lines += ["[[listeners]]", 'bind = "127.0.0.1:0"']
        lines += [f"{key} = {_toml(value)}" for key, value in listener.items()]
        lines.append("")
    lines += [
        "[acl]",
        f"file = {_toml(directory / 'acl.toml')}",
        "",
        "[limits]",
        f"handshake_timeout = {HANDSHAKE_TIMEOUT_SECONDS}",
        "",
        "[log]",
        'level = "debug"',
        "",
    ]
    config = directory / "broker.toml"
    config.write_text("\n".join(lines), encoding="utf-8")
    proc = BrokerProcess(
        ["serve", "--config", str(config)],
        workdir=directory,
        env=realm.kdc.env(),
        listeners=len(Broker.LISTENERS),
    )
    module_broker_factory.track(proc)
    proc.start()
    assert [scheme for scheme, _, _ in proc.addresses] == [
        "negotiate",
        "negotiate",
        "tls+negotiate",
        "tls",
        "negotiate",
        "negotiate",
    ]
    yield Broker(proc, pki)
    # Whatever ran in this module: no secret and no token ever reached the log.
    assert_log_is_clean(proc.log())


def alice() -> Kerberos:
    return Kerberos(principal="alice", password=PASSWORDS["alice"])


def krb(name: str) -> Kerberos:
    return Kerberos(principal=name, password=PASSWORDS[name])


def ntlm(user: str = "aLiCe", domain: str = "tessera", password: str | None = None) -> NTLM:
    return NTLM(user, password or NTLM_PASSWORDS[user.capitalize()], domain=domain)


async def refused(connecting: client_sdk.connect) -> AuthenticationError:
    with pytest.raises(AuthenticationError) as info:
        async with connecting:
            pass
    return info.value


# -- a hand-driven client -------------------------------------------------------------------------


class RawSession:
    """A blocking client over a real socket that runs the handshake with a given security layer
    and then builds Tessera frames by hand, so a test can tamper with the protected records.
    Run it with ``asyncio.to_thread`` when SDK clients share the test's event loop."""

    def __init__(self, port: int, layer: SecurityLayer) -> None:
        self.layer = layer
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._plain = bytearray()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def handshake(self) -> None:
        """Run the security handshake to completion; raises the layer's HandshakeError."""
        layer = self.layer
        layer.start()
        self.sock.sendall(layer.data_to_send())
        while not layer.established:
            data = self._recv_bytes()
            try:
                layer.receive_data(data)
            finally:
                out = layer.data_to_send()
                if out:
                    with contextlib.suppress(OSError):
                        self.sock.sendall(out)
        self._plain += layer.read()

    def seal(self, **fields: Any) -> bytes:
        """The wire bytes (protected records) of one Tessera frame."""
        self.layer.send(pack(fields))
        return self.layer.data_to_send()

    def send(self, **fields: Any) -> None:
        self.sock.sendall(self.seal(**fields))

    def _recv_bytes(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except ConnectionResetError:
            return b""

    def recv(self) -> dict[str, Any] | None:
        """The next frame, or None once the broker has closed the connection."""
        while True:
            if len(self._plain) >= 4:
                n = int.from_bytes(self._plain[:4], "big")
                if len(self._plain) >= 4 + n:
                    body = bytes(self._plain[4 : 4 + n])
                    del self._plain[: 4 + n]
                    frame = msgpack.unpackb(body, raw=False)
                    assert isinstance(frame, dict)
                    return frame
            data = self._recv_bytes()
            if not data:
                return None
            self.layer.receive_data(data)
            self._plain += self.layer.read()

    def hello(self) -> dict[str, Any]:
        self.send(op="hello", version=1, client="raw-kerberos-test/1")
        welcome = self.recv()
        assert welcome is not None and welcome["op"] == "welcome", welcome
        return welcome

    def closed_by_broker(self) -> bool:
        """True when the broker closes the connection without sending another frame."""
        return self.recv() is None


def negotiate_layer(credential: Kerberos | NTLM, **kwargs: Any) -> NegotiateClientLayer:
    return NegotiateClientLayer(HOST, credential=credential, **kwargs)


def tls_stack(pki: Any, inner: Callable[[SecurityLayer], SecurityLayer]) -> StackedLayer:
    tls = TLSLayer(client_context(pki.ca), server_side=False, server_hostname=HOST)
    return StackedLayer(tls, inner)


# -- Kerberos success ------------------------------------------------------------------------------


def _credential(source: str, realm: Realm, monkeypatch: pytest.MonkeyPatch) -> Kerberos:
    if source == "password":
        return alice()
    if source == "keytab":
        return Kerberos(principal="alice", keytab=realm.alice_keytab)
    if source == "ccache":
        return Kerberos(ccache=realm.alice_ccache)
    monkeypatch.setenv("KRB5CCNAME", realm.alice_ccache)  # the default cache, as after kinit
    return Kerberos()


@pytest.mark.parametrize("listener", ["krb", "tls_gss"])
@pytest.mark.parametrize("source", ["password", "keytab", "ccache", "default_ccache"])
async def test_kerberos_success_identity_in_welcome_and_audit(
    broker: Broker, realm: Realm, listener: str, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mark = broker.proc.log_mark()
    credential = _credential(source, realm, monkeypatch)
    async with broker.connect(listener, credential) as client:
        assert client.identity == "kerberos:alice@TESSERA.TEST"
        assert client.welcome is not None and client.welcome.mechanism == "kerberos"
        # The identity reaches the ACL: alice.> is granted to this one principal only.
        sub = await client.subscribe(f"alice.{listener}.>")
        await client.publish(f"alice.{listener}.{source}", b"x" * 256)
        msg = await sub.get(timeout=TIMEOUT)
        assert (msg.topic, msg.payload) == (f"alice.{listener}.{source}", b"x" * 256)
    record = broker.proc.wait_for_audit(
        "auth_success", since=mark, identity="kerberos:alice@TESSERA.TEST"
    )
    assert record["mechanism"] == "kerberos"
    assert record["listener"].endswith(f":{broker.port(listener)}")


async def test_tls_x509_and_kerberos_clients_publish_to_each_other(broker: Broker) -> None:
    """Three security modes on one broker, one topic space: x509 alice over ``tls``, Kerberos
    alice over ``negotiate`` and Kerberos bob over ``tls+negotiate``."""
    async with (
        broker.connect("x509", **broker.pki.client("alice")) as x509,
        broker.connect("krb", alice()) as kerberos,
        broker.connect("tls_gss", krb("bob")) as bound,
    ):
        assert x509.identity == "x509:alice"
        assert kerberos.identity == "kerberos:alice@TESSERA.TEST"
        assert bound.identity == "kerberos:bob@TESSERA.TEST"
        clients = {"x509": x509, "kerberos": kerberos, "bound": bound}
        subs = {name: await c.subscribe("mixed.>") for name, c in clients.items()}
        for name, c in clients.items():
            await c.publish(f"mixed.{name}", f"from {name}".encode())
        for name, sub in subs.items():
            got = {}
            for _ in clients:
                msg = await sub.get(timeout=TIMEOUT)
                got[msg.topic] = msg.payload
            assert got == {f"mixed.{n}": f"from {n}".encode() for n in clients}, name


# -- ACL on Kerberos and NTLM identities ----------------------------------------------------------

PUB, SUB = "publish", "subscribe"

#: (action, subject, allowed) per client.
ACL_MATRIX: dict[str, list[tuple[str, str, bool]]] = {
    "kerberos alice": [
        (PUB, "krb.a", True),  # realm glob kerberos:*@TESSERA.TEST
        (PUB, "alice.a", True),  # the principal itself
        (SUB, "alice.>", True),
        (SUB, "inbox.alice.>", True),  # {user} = alice
        (SUB, "inbox.bob.>", False),
        (SUB, "inbox.>", True),  # filtered (issue #10): only inbox.alice.… is delivered
        (PUB, "ntlm.a", False),  # a Kerberos identity is not an NTLM one
    ],
    "kerberos bob": [
        (PUB, "krb.a", True),
        (SUB, "krb.>", True),
        (PUB, "alice.a", False),
        (SUB, "alice.>", False),
        (SUB, "inbox.bob.>", True),
        (SUB, "inbox.alice.>", False),
    ],
    "kerberos Mallory": [  # the ticket says "Mallory": normalised to mallory, and denied
        (PUB, "krb.a", False),
        (SUB, "krb.>", False),
        (SUB, "inbox.mallory.>", False),
        (PUB, "inbox.alice.x", False),
    ],
    "ntlm tessera\\aLiCe": [
        (PUB, "ntlm.a", True),  # domain glob ntlm:TESSERA\*
        (SUB, "ntlm.>", True),
        (SUB, "inbox.alice.>", True),  # {user} = alice
        (SUB, "inbox.bob.>", False),
        (PUB, "krb.a", False),
        (PUB, "alice.a", False),  # kerberos:alice only
    ],
    "ntlm Tessera\\MALLORY": [
        (PUB, "ntlm.a", False),
        (SUB, "ntlm.>", False),
    ],
}
ACL_CLIENTS: dict[str, tuple[str, Callable[[], Kerberos | NTLM], str]] = {
    "kerberos alice": ("krb", alice, "kerberos:alice@TESSERA.TEST"),
    "kerberos bob": ("tls_gss", lambda: krb("bob"), "kerberos:bob@TESSERA.TEST"),
    "kerberos Mallory": ("krb", lambda: krb("Mallory"), "kerberos:mallory@TESSERA.TEST"),
    "ntlm tessera\\aLiCe": ("tls_gss", ntlm, "ntlm:TESSERA\\alice"),
    "ntlm Tessera\\MALLORY": (
        "krb_ntlm",
        lambda: ntlm("MALLORY", "Tessera", NTLM_PASSWORDS["Mallory"]),
        "ntlm:TESSERA\\mallory",
    ),
}


@pytest.mark.parametrize("who", sorted(ACL_MATRIX))
async def test_acl_matrix_for_kerberos_and_ntlm_identities(broker: Broker, who: str) -> None:
    listener, credential, identity = ACL_CLIENTS[who]
    mark = broker.proc.log_mark()
    async with broker.connect(listener, credential()) as client:
        assert client.identity == identity
        for action, subject, allowed in ACL_MATRIX[who]:
            attempt = (
                client.publish(subject, b"acl") if action == PUB else client.subscribe(subject)
            )
            if allowed:
                await attempt
            else:
                with pytest.raises(PermissionDenied):
                    await attempt
                record = broker.proc.wait_for_audit(
                    "denied", since=mark, identity=identity, action=action, subject=subject
                )
                if "mallory" in identity:
                    assert record["reason"] == "denied by deny[0]"


async def test_user_placeholder_delivers_only_to_the_named_inbox(broker: Broker) -> None:
    async with (
        broker.connect("krb", alice()) as kerberos_alice,
        broker.connect("tls_gss", ntlm()) as ntlm_alice,
        broker.connect("tls_gss", krb("bob")) as bob,
    ):
        inbox = await kerberos_alice.subscribe("inbox.alice.>")
        ntlm_inbox = await ntlm_alice.subscribe("inbox.alice.>")
        await bob.publish("inbox.alice.note", b"for alice")
        for sub in (inbox, ntlm_inbox):
            msg = await sub.get(timeout=TIMEOUT)
            assert (msg.topic, msg.payload) == ("inbox.alice.note", b"for alice")


# -- Kerberos failures ----------------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["krb", "tls_gss"])
async def test_wrong_password(broker: Broker, listener: str) -> None:
    error = await refused(
        broker.connect(listener, Kerberos(principal="alice", password=WRONG_PASSWORD))
    )
    assert error.reason == "bad_credentials"
    assert WRONG_PASSWORD not in str(error)


@pytest.mark.parametrize("how", ["empty_ccache", "default_cache_and_keytab_empty"])
async def test_no_credentials(
    broker: Broker, realm: Realm, how: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if how == "empty_ccache":
        credential = Kerberos(ccache=realm.empty_ccache)
    else:
        monkeypatch.setenv("KRB5CCNAME", realm.empty_ccache)
        monkeypatch.setenv("KRB5_CLIENT_KTNAME", f"FILE:{tmp_path / 'none.keytab'}")
        credential = Kerberos()
    error = await refused(broker.connect("krb", credential))
    assert error.reason == "no_credentials"


async def test_kdc_unreachable(broker: Broker) -> None:
    credential = Kerberos(principal=f"alice@{UNREACHABLE_REALM}", password="irrelevant")
    started = time.monotonic()
    error = await refused(broker.connect("krb", credential))
    assert error.reason == "kdc_unreachable"
    assert time.monotonic() - started < TIMEOUT


async def test_ticket_for_another_service_in_the_keytab_is_refused(broker: Broker) -> None:
    """other/localhost is in the broker's keytab (MIT would accept its ticket); the listener only
    takes tessera/localhost."""
    for listener in ("krb", "tls_gss"):
        mark = broker.proc.log_mark()
        error = await refused(broker.connect(listener, alice(), service="other"))
        assert error.reason == "wrong_service"
        record = broker.proc.wait_for_audit("auth_failure", since=mark, reason="wrong_service")
        assert record.get("mechanism") == "kerberos", record


async def test_service_principal_unknown_to_the_kdc(broker: Broker) -> None:
    # "127.0.0.1" instead of the name the SPN was made for: the KDC has no tessera/127.0.0.1.
    mark = broker.proc.log_mark()
    url = f"negotiate://127.0.0.1:{broker.port('krb')}"
    error = await refused(client_sdk.connect(url, auth=alice(), timeout=TIMEOUT))
    assert error.reason == "wrong_service"
    # The client gave up before sending a token and told the broker why (an ERROR record): the
    # broker audits the refusal, and cannot name a mechanism it was never offered. The client
    # sees its error before the broker has handled that record, so wait for it here: a late
    # record must not be taken for the next test's.
    record = broker.proc.wait_for_audit("auth_failure", since=mark, reason="wrong_service")
    assert "mechanism" not in record, record


def test_refusal_is_audited_even_when_the_client_closes_at_once(
    broker: Broker, realm: Realm
) -> None:
    """A client that sends its token and closes without waiting for the verdict (a scanner, a
    password sprayer) is still in the audit trail."""
    for _ in range(5):  # the race this guards against is timing-dependent
        mark = broker.proc.log_mark()
        layer = NegotiateClientLayer(HOST, "other", credential=Kerberos(ccache=realm.alice_ccache))
        layer.start()
        with socket.create_connection(("127.0.0.1", broker.port("krb")), timeout=TIMEOUT) as sock:
            host, port = sock.getsockname()[:2]
            sock.sendall(layer.data_to_send())
            sock.shutdown(socket.SHUT_WR)
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(65536):
                    pass
        # This connection's record (by its address): under load another connection's refusal
        # (one that named no mechanism) can still be written after the mark.
        record = broker.proc.wait_for_audit(
            "auth_failure", since=mark, reason="wrong_service", peer=f"{host}:{port}"
        )
        assert record["mechanism"] == "kerberos", record


def test_oversized_token_is_refused_from_its_header(broker: Broker) -> None:
    """The listener's max_handshake_token_bytes is applied to the length prefix: the broker
    answers an ERROR record without waiting for (or buffering) the body."""
    mark = broker.proc.log_mark()
    header = (MAX_TOKEN_BYTES + 2).to_bytes(4, "big") + bytes((RecordType.TOKEN,))
    with socket.create_connection(("127.0.0.1", broker.port("krb")), timeout=TIMEOUT) as sock:
        sock.sendall(header + b"\x60" * 100)  # the body never comes
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                reply += chunk
    assert reply == b"\x00\x00\x00\x02\x03" + bytes((WireCode.TOKEN_TOO_LARGE,))
    broker.proc.wait_for_audit("auth_failure", since=mark, reason="token_too_large")


# -- NTLM -----------------------------------------------------------------------------------------


async def test_ntlm_refused_when_the_listener_does_not_enable_it(broker: Broker) -> None:
    mark = broker.proc.log_mark()
    error = await refused(broker.connect("krb", ntlm()))
    assert error.reason == "mechanism_refused"
    record = broker.proc.wait_for_audit("auth_failure", since=mark, reason="mechanism_refused")
    assert record.get("mechanism") == "ntlm", record
    # The same account is fine where NTLM is enabled.
    async with broker.connect("krb_ntlm", ntlm()) as client:
        assert client.identity == "ntlm:TESSERA\\alice"


@pytest.mark.parametrize("listener", ["krb_ntlm", "tls_gss"])
async def test_ntlm_works_when_enabled_with_a_normalised_identity(
    broker: Broker, listener: str
) -> None:
    mark = broker.proc.log_mark()
    async with broker.connect(listener, ntlm("aLiCe", "tessera")) as client:
        assert client.identity == "ntlm:TESSERA\\alice"
        sub = await client.subscribe("ntlm.>")
        await client.publish(f"ntlm.{listener}", b"sealed with ntlm" * 16)
        msg = await sub.get(timeout=TIMEOUT)
        assert msg.payload == b"sealed with ntlm" * 16
    broker.proc.wait_for_audit(
        "auth_success", since=mark, identity="ntlm:TESSERA\\alice", mechanism="ntlm"
    )


async def test_ntlm_wrong_password(broker: Broker) -> None:
    mark = broker.proc.log_mark()
    error = await refused(broker.connect("tls_gss", ntlm(password=WRONG_PASSWORD)))
    assert error.reason == "bad_credentials"
    record = broker.proc.wait_for_audit("auth_failure", since=mark, reason="bad_credentials")
    assert record.get("mechanism") == "ntlm", record


def test_ntlm_warning_logged_at_start(broker: Broker) -> None:
    lines = broker.proc.wait_for_log(r"allows NTLM: NTLM sealing is RC4", count=2)
    assert all("WARNING" in line for line in lines)


# -- protected records: tampered, replayed, reordered ---------------------------------------------


def _flip_last_byte(record: bytes) -> bytes:
    return record[:-1] + bytes((record[-1] ^ 0x01,))


@pytest.mark.parametrize("attack", ["tampered", "replayed", "reordered"])
@pytest.mark.parametrize("mechanism", ["kerberos", "ntlm"])
async def test_wrapped_record_attack_closes_only_that_connection(
    broker: Broker, attack: str, mechanism: str
) -> None:
    credential: Kerberos | NTLM = alice() if mechanism == "kerberos" else ntlm()
    topic = f"inbox.bob.{mechanism}-{attack}"  # anyone may publish there; bob reads it
    identity = "kerberos:alice@TESSERA.TEST" if mechanism == "kerberos" else "ntlm:TESSERA\\alice"
    mark = broker.proc.log_mark()

    async with broker.connect("krb_ntlm", krb("bob")) as watcher:
        watched = await watcher.subscribe(topic)

        def attack_once() -> tuple[dict[str, Any] | None, bool]:
            with RawSession(broker.port("krb_ntlm"), negotiate_layer(credential)) as raw:
                raw.handshake()
                welcome = raw.hello()
                assert welcome["identity"]["name"] == identity.split(":", 1)[1]
                first = raw.seal(op="pub", topic=topic, payload=b"one", ack=1)
                second = raw.seal(op="pub", topic=topic, payload=b"two", ack=2)
                if attack == "reordered":  # "two" overtakes "one"
                    raw.sock.sendall(second)
                    return None, raw.closed_by_broker()
                raw.sock.sendall(first)
                ok = raw.recv()
                bad = _flip_last_byte(second) if attack == "tampered" else first
                raw.sock.sendall(bad)
                return ok, raw.closed_by_broker()

        ok, closed = await asyncio.to_thread(attack_once)
        assert closed, "the broker must close a connection whose record fails its check"
        if attack != "reordered":
            assert ok == {"op": "ok", "ack": 1}
        record = broker.proc.wait_for_audit("layer_failure", since=mark, identity=identity)
        assert record["reason"] == "IntegrityError"
        assert record["mechanism"] == mechanism

        # Only the genuine, in-order record was published, exactly once; the broker and its
        # other connections carry on.
        await watcher.publish(topic, b"end")
        payloads = []
        while (msg := await watched.get(timeout=TIMEOUT)).payload != b"end":
            payloads.append(msg.payload)
        assert payloads == ([] if attack == "reordered" else [b"one"])
        async with broker.connect("krb", alice()) as other:
            await other.publish("krb.after-attack", b"still fine")


def test_unsealed_bytes_after_the_handshake_close_the_connection(broker: Broker) -> None:
    """A Tessera frame in the clear where a sealed record is expected is refused."""
    with RawSession(broker.port("krb"), negotiate_layer(alice())) as raw:
        raw.handshake()
        raw.sock.sendall(pack({"op": "hello", "version": 1, "client": "cleartext"}))
        assert raw.closed_by_broker()


# -- tls+negotiate: channel bindings --------------------------------------------------------------


@dataclass
class Relay:
    """A TLS-terminating relay: accepts TLS with its own certificate, opens a new TLS connection
    to the broker, and copies bytes both ways (what a TLS-inspecting proxy or an attacker with
    a certificate the client trusts would do)."""

    port: int
    connections: int = 0


@contextlib.asynccontextmanager
async def tls_relay(cert: Path, key: Path, target_port: int, ca: Path) -> AsyncIterator[Relay]:
    front = server_context(cert, key)
    back = client_context(ca)
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        relay.connections += 1
        try:
            b_reader, b_writer = await asyncio.open_connection(
                "127.0.0.1", target_port, ssl=back, server_hostname=HOST
            )
        except (OSError, ssl.SSLError):
            c_writer.close()
            return
        await asyncio.gather(pipe(c_reader, b_writer), pipe(b_reader, c_writer))
        for writer in (c_writer, b_writer):
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    def spawn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(handle(r, w))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(spawn, "127.0.0.1", 0, ssl=front)
    relay = Relay(port=server.sockets[0].getsockname()[1])
    try:
        yield relay
    finally:
        server.close()
        for task in list(tasks):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, TIMEOUT)
        await server.wait_closed()


@pytest.fixture(scope="module")
def relay_cert(pki: Any) -> tuple[Path, Path]:
    """A certificate for localhost from the CA the clients trust, but not the broker's."""
    files = certs_pki.issue(
        pki.directory, "server", HOST, dns=[HOST], ip=["127.0.0.1"], file_stem="relay-localhost"
    )
    return files.cert, files.key


@pytest.mark.parametrize("mechanism", ["kerberos", "ntlm"])
async def test_tls_terminating_relay_is_refused_with_channel_binding(
    broker: Broker, relay_cert: tuple[Path, Path], mechanism: str
) -> None:
    credential: Kerberos | NTLM = alice() if mechanism == "kerberos" else ntlm()
    pki = broker.pki
    # Control: a relay that presents the broker's own certificate (what TCP pass-through
    # amounts to) works, so the refusal below is the binding and nothing else.
    async with tls_relay(pki.server.cert, pki.server.key, broker.port("tls_gss"), pki.ca) as ok:
        url = f"tls+negotiate://{HOST}:{ok.port}"
        async with client_sdk.connect(url, ca=pki.ca, auth=credential, timeout=TIMEOUT) as c:
            assert c.identity.startswith(mechanism)
    mark = broker.proc.log_mark()
    async with tls_relay(*relay_cert, broker.port("tls_gss"), pki.ca) as relay:
        url = f"tls+negotiate://{HOST}:{relay.port}"
        error = await refused(client_sdk.connect(url, ca=pki.ca, auth=credential, timeout=TIMEOUT))
        assert relay.connections == 1
    assert error.reason == "channel_binding"
    record = broker.proc.wait_for_audit("auth_failure", since=mark, reason="channel_binding")
    assert record.get("mechanism") == mechanism, record


@pytest.mark.parametrize("mechanism", ["kerberos", "ntlm"])
def test_client_without_channel_bindings_is_refused(broker: Broker, mechanism: str) -> None:
    credential: Kerberos | NTLM = alice() if mechanism == "kerberos" else ntlm()
    mark = broker.proc.log_mark()

    def inner(outer: SecurityLayer) -> SecurityLayer:  # no channel_bindings=
        return negotiate_layer(credential, protect_frames=False)

    with RawSession(broker.port("tls_gss"), tls_stack(broker.pki, inner)) as raw:
        with pytest.raises(HandshakeError) as info:
            raw.handshake()
        assert info.value.reason is HandshakeReason.CHANNEL_BINDING
    record = broker.proc.wait_for_audit("auth_failure", since=mark, reason="channel_binding")
    assert record.get("mechanism") == mechanism, record


# -- handshake deadline ---------------------------------------------------------------------------


async def test_stalled_handshakes_are_closed_and_do_not_block_others(broker: Broker) -> None:
    """More stalled clients than the broker has handshake worker threads: an NTLM client that
    sent its first TOKEN (NEGOTIATE), got the CHALLENGE and says nothing more, and a Kerberos
    client that sent half a TOKEN record. Others authenticate meanwhile, without waiting."""
    mark = broker.proc.log_mark()
    first_token = negotiate_layer(ntlm())
    first_token.start()
    ntlm_negotiate = first_token.data_to_send()
    assert ntlm_negotiate[4] == 0x01  # a TOKEN record

    async def stall(port: int, data: bytes, expect_reply: bool) -> float:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            await writer.drain()
            if expect_reply:
                header = await reader.readexactly(5)
                assert header[4] == 0x01, "the broker answers NEGOTIATE with a CHALLENGE TOKEN"
                await reader.readexactly(int.from_bytes(header[:4], "big") - 1)
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""
            return time.monotonic() - started
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    stalls = [
        asyncio.create_task(stall(broker.port("krb_ntlm"), ntlm_negotiate, True)) for _ in range(6)
    ] + [
        asyncio.create_task(stall(broker.port("krb"), ntlm_negotiate[:20], False)) for _ in range(6)
    ]
    await asyncio.sleep(0.3)  # every staller is connected and waiting
    for listener, credential in (("krb", alice()), ("krb_ntlm", ntlm()), ("tls_gss", alice())):
        started = time.monotonic()
        async with broker.connect(listener, credential) as client:
            assert client.is_open
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT_SECONDS / 2
    for elapsed in await asyncio.gather(*stalls):
        assert HANDSHAKE_TIMEOUT_SECONDS - 0.1 <= elapsed <= HANDSHAKE_TIMEOUT_SECONDS + 2.0
    timeouts = [
        r
        for r in broker.proc.audit_events(mark)
        if r["event"] == "handshake_timeout" and r.get("stage") == "security_handshake"
    ]
    assert len(timeouts) == len(stalls)
    assert sum(r.get("mechanism") == "ntlm" for r in timeouts) == 6


# -- the tessera CLI ------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str], **popen: Any) -> subprocess.Popen[str]:
    tessera = shutil.which("tessera", path=str(Path(sys.executable).parent))
    assert tessera, "the tessera console script is not installed next to the interpreter"
    return subprocess.Popen(
        [tessera, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def test_cli_sub_and_pub_over_negotiate_with_password_env(broker: Broker, realm: Realm) -> None:
    env = {
        **os.environ,
        **realm.kdc.env(),
        "PYTHONPATH": str(REPO_ROOT),
        "ALICE_PW": PASSWORDS["alice"],
        "BOB_PW": PASSWORDS["bob"],
        "BAD_PW": WRONG_PASSWORD,
    }
    url = broker.url("krb")
    mark = broker.proc.log_mark()
    sub = _cli(
        "sub", "krb.cli.>", "-n", "1", "--json", "--url", url,
        "--principal", "alice", "--password-env", "ALICE_PW", env=env,
    )  # fmt: skip
    try:
        broker.proc.wait_for_log(r"subscribed sid=\d+ 'krb\.cli\.>'", since=mark, timeout=TIMEOUT)
        pub = _cli(
            "pub", "krb.cli.hello", "from the cli", "--url", url,
            "--principal", "bob@TESSERA.TEST", "--password-env", "BOB_PW", env=env,
        )  # fmt: skip
        pub_out, pub_err = pub.communicate(timeout=30)
        assert pub.returncode == 0, pub_err
        sub_out, sub_err = sub.communicate(timeout=30)
    finally:
        sub.kill()
        sub.communicate()
    assert sub.returncode == 0, sub_err
    assert json.loads(sub_out) == {"topic": "krb.cli.hello", "payload": "from the cli"}
    broker.proc.wait_for_audit("auth_success", since=mark, identity="kerberos:alice@TESSERA.TEST")
    broker.proc.wait_for_audit("auth_success", since=mark, identity="kerberos:bob@TESSERA.TEST")

    bad = _cli(
        "pub", "krb.cli.x", "y", "--url", url,
        "--principal", "alice", "--password-env", "BAD_PW", env=env,
    )  # fmt: skip
    out, err = bad.communicate(timeout=30)
    assert bad.returncode == 4  # authentication failed (docs/sdk.md, exit codes)
    assert "bad_credentials" in err and "tessera: error: authentication failed" in err
    for text in (out, err, sub_out, sub_err, pub_out, pub_err):
        for secret in ALL_SECRETS:
            assert secret not in text


# -- logs: mechanism and reason, never a secret ---------------------------------------------------

#: 40+ characters of the base64 alphabet: a token (SPNEGO tokens start "YII") or a key.
_BASE64_BLOB = re.compile(r"[A-Za-z0-9+/]{40,}={0,2}")
_HEX_BLOB = re.compile(r"\b[0-9a-fA-F]{48,}\b")


def assert_log_is_clean(log: str) -> None:
    for secret in ALL_SECRETS:
        assert secret not in log, "a password reached the broker log"
    blobs = _BASE64_BLOB.findall(log) + _HEX_BLOB.findall(log)
    assert not blobs, f"token-like data in the broker log: {blobs[:3]}"
    reasons = {r.value for r in HandshakeReason}
    for line in log.splitlines():
        if "tessera.audit: " in line:
            record = json.loads(line.split("tessera.audit: ", 1)[1])
            if record["event"] == "auth_failure":
                assert record["reason"] in reasons, line


async def test_failures_are_logged_with_mechanism_and_reason_and_no_secret(
    broker: Broker,
) -> None:
    """Provoke one broker-side failure of each kind the broker can see, then read the log."""
    mark = broker.proc.log_mark()
    attempts: list[tuple[str, Kerberos | NTLM, str | None]] = [
        ("krb", ntlm(), "mechanism_refused"),
        ("krb", alice(), None),  # successes with passwords, too
        ("tls_gss", ntlm(password=WRONG_PASSWORD), "bad_credentials"),
        ("krb_ntlm", ntlm(), None),
    ]
    for listener, credential, reason in attempts:
        if reason is None:
            async with broker.connect(listener, credential):
                pass
        else:
            assert (await refused(broker.connect(listener, credential))).reason == reason
    error = await refused(broker.connect("krb", alice(), service="other"))
    assert error.reason == "wrong_service"

    log = "\n".join(broker.proc.log_lines()[mark:])
    assert_log_is_clean(log)
    # ("closed": a client of an earlier test that gave up on its own side, logged late.)
    failures = [
        r
        for r in broker.proc.audit_events(mark)
        if r["event"] == "auth_failure" and r["reason"] != "closed"
    ]
    assert sorted((r["reason"], r.get("mechanism")) for r in failures) == [
        ("bad_credentials", "ntlm"),
        ("mechanism_refused", "ntlm"),
        ("wrong_service", "kerberos"),
    ]
    for record in failures:
        assert record["conn"] and record["peer"].startswith("127.0.0.1:")
    # The human-readable line carries the same code (and no token).
    failed = [
        line
        for line in log.splitlines()
        if "handshake failed" in line and "handshake failed: closed:" not in line
    ]
    assert len(failed) == 3
    for line in failed:
        assert re.search(
            r"handshake failed: (bad_credentials|mechanism_refused|wrong_service): "
            r".*\(mechanism: (kerberos|ntlm)\)$",
            line,
        ), line


# -- issue 13: clock skew, NTLM target names ------------------------------------------------------


def _first_reply(port: int, first_token_record: bytes) -> bytes:
    """Send one handshake record, return the broker's reply record (header included)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(first_token_record)
        reply = b""
        while len(reply) < 4 or len(reply) < 4 + int.from_bytes(reply[:4], "big"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply


def test_max_clock_skew_is_honoured(broker: Broker, realm: Realm) -> None:
    """Tickets for tessera/short.tessera.test end SHORT_TICKET_SECONDS after issue. Tokens made
    while the ticket was valid and sent once it had expired: MIT would take both (its own skew
    is 300 s); the listener with max_clock_skew = 1 refuses with NO_CREDENTIALS (0x08), the one
    with 300 s accepts."""
    layers = [
        NegotiateClientLayer(SHORT_HOST, credential=Kerberos(ccache=realm.alice_ccache))
        for _ in range(3)
    ]
    tokens = []
    for layer in layers:
        layer.start()
        tokens.append(layer.data_to_send())
    fresh = _first_reply(broker.port("short_strict"), tokens[0])
    assert fresh[4] == RecordType.DONE, fresh[:6]
    time.sleep(SHORT_TICKET_SECONDS + 1.5)  # real time must pass: the KDC's clock is real
    mark = broker.proc.log_mark()
    strict = _first_reply(broker.port("short_strict"), tokens[1])
    assert strict == b"\x00\x00\x00\x02\x03" + bytes((WireCode.NO_CREDENTIALS,))
    record = broker.proc.wait_for_audit("auth_failure", since=mark, reason="no_credentials")
    assert record["mechanism"] == "kerberos"
    lenient = _first_reply(broker.port("short_lenient"), tokens[2])
    assert lenient[4] == RecordType.DONE, lenient[:6]
    with pytest.raises(HandshakeError) as error:  # the client sees the code too
        layers[1].receive_data(strict)
    assert error.value.reason is HandshakeReason.NO_CREDENTIALS


def test_ntlm_without_target_name_refused_on_plain_negotiate(broker: Broker) -> None:
    """An NTLM exchange that names no service (what a relay from another protocol carries) is
    refused on a plain ``negotiate`` listener that allows NTLM, and audited as wrong_service."""
    import spnego  # noqa: PLC0415

    from tessera_mq.auth.negotiate import _md4  # noqa: PLC0415

    nt_hash = _md4(NTLM_PASSWORDS["Alice"].encode("utf-16-le")).hex()
    ctx = spnego.client(
        [spnego.NTLMHash("TESSERA\\Alice", nt_hash=nt_hash)],
        hostname="",
        service="",
        protocol="negotiate",
        options=spnego.NegotiateOptions.use_negotiate,
    )
    mark = broker.proc.log_mark()
    with socket.create_connection(("127.0.0.1", broker.port("krb_ntlm")), timeout=TIMEOUT) as sock:
        layer_records = bytearray()

        def record(token: bytes) -> bytes:
            return (len(token) + 1).to_bytes(4, "big") + bytes((RecordType.TOKEN,)) + token

        token = ctx.step()
        assert token is not None
        sock.sendall(record(token))
        while len(layer_records) < 4 or len(layer_records) < 4 + int.from_bytes(
            layer_records[:4], "big"
        ):
            layer_records += sock.recv(65536)
        challenge = bytes(layer_records[5 : 4 + int.from_bytes(layer_records[:4], "big")])
        authenticate = ctx.step(challenge)
        assert authenticate is not None
        sock.sendall(record(authenticate))
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                reply += chunk
    assert reply == b"\x00\x00\x00\x02\x03" + bytes((WireCode.WRONG_SERVICE,))
    audit = broker.proc.wait_for_audit("auth_failure", since=mark, reason="wrong_service")
    assert audit["mechanism"] == "ntlm"


async def test_short_ticket_ends_its_session_and_the_sdk_reconnects_with_a_new_one(
    broker: Broker,
) -> None:
    """Issue #10: a session authenticated with a ticket that lives SHORT_TICKET_SECONDS is
    closed at the ticket's end time with CREDENTIAL_EXPIRED (23); the SDK then reconnects,
    getting a new ticket (here from the password; a ccache or keytab works alike)."""
    mark = broker.proc.log_mark()
    states: list[tuple[client_sdk.ConnectionState, object]] = []
    async with broker.connect(
        "short_strict",
        alice(),
        server_hostname=SHORT_HOST,
        reconnect=client_sdk.Reconnect(initial_delay=0.1, max_delay=0.5),
        on_state_change=lambda state, err: states.append((state, err)),
    ) as client:
        assert client.identity == "kerberos:alice@TESSERA.TEST"
        deadline = time.monotonic() + SHORT_TICKET_SECONDS + 15
        while client.reconnects < 1:
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.1)
        sub = await client.subscribe("krb.after")
        await client.publish("krb.after", b"renewed")
        assert (await sub.get(timeout=TIMEOUT)).payload == b"renewed"
    lost = [err for state, err in states if state is client_sdk.ConnectionState.RECONNECTING]
    assert getattr(lost[0], "code", None) == client_sdk.ErrorCode.CREDENTIAL_EXPIRED
    record = broker.proc.wait_for_audit(
        "credential_expired", since=mark, identity="kerberos:alice@TESSERA.TEST"
    )
    assert record["mechanism"] == "kerberos"
