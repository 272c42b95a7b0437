"""Tests for the certificate provisioning helper (``certs``) and ``tessera-certs``.

Everything runs on real files in ``tmp_path``; the TLS tests complete real handshakes with
:mod:`ssl` over memory BIOs, with OpenSSL's strict X.509 checks on (Python 3.13's default).
"""

from __future__ import annotations

import ipaddress
import json
import os
import ssl
import stat
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tessera_mq import certs
from tessera_mq.certs import (
    AlreadyExistsError,
    CANotFoundError,
    CertsError,
    IssuedFiles,
    describe,
    init_ca,
    issue,
    load_certificate,
)
from tessera_mq.certs.cli import main

X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_INVALID_PURPOSE = 26

E = TypeVar("E", bound=x509.ExtensionType)


# --------------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A directory holding a fresh EC CA."""
    directory = tmp_path / "pki"
    init_ca(directory)
    return directory


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def extension(cert: x509.Certificate, kind: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(kind)


def load_key(path: Path) -> PrivateKeyTypes:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def server_context(ca: Path, files: IssuedFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_cert_chain(files.cert, files.key)
    return context


def client_context(ca: Path, files: IssuedFiles | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    if files is not None:
        context.load_cert_chain(files.cert, files.key)
    return context


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Run a TLS handshake between two in-memory endpoints; return (server, client) objects.

    Whatever :mod:`ssl` raises on either side (a verification failure) propagates.
    """
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(server_in, server_out, server_side=True)
    client = client_ctx.wrap_bio(client_in, client_out, server_hostname=hostname)
    pending = {"client": client, "server": server}
    for _ in range(10):
        for side, endpoint in list(pending.items()):
            try:
                endpoint.do_handshake()
            except ssl.SSLWantReadError:
                continue
            del pending[side]
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if not pending:
            # TLS 1.3 clients finish first; the server judges the client certificate on its
            # last step, so only now has a rejection had its chance to surface.
            client.write(b"ping")
            server_in.write(client_out.read())
            assert server.read() == b"ping"
            server.write(b"pong")
            client_in.write(server_out.read())
            assert client.read() == b"pong"
            return server, client
    raise AssertionError(f"handshake stalled; still pending: {sorted(pending)}")


def subject_cn(peer_cert: Mapping[str, object]) -> str:
    subject = peer_cert["subject"]
    assert isinstance(subject, tuple)
    return next(str(value) for rdn in subject for key, value in rdn if key == "commonName")


# --------------------------------------------------------------------------------------------------
# The CA


def test_public_names_are_exported() -> None:
    assert set(certs.__all__) >= {
        "AlreadyExistsError",
        "CANotFoundError",
        "CertsError",
        "IssuedFiles",
        "KeyType",
        "describe",
        "init_ca",
        "issue",
        "load_certificate",
    }
    assert issubclass(CANotFoundError, CertsError)
    assert issubclass(AlreadyExistsError, CertsError)


def test_init_ca_writes_a_strict_ca(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "pki"
    files = init_ca(directory, common_name="Test Root")

    assert files == IssuedFiles(directory / "ca.pem", directory / "ca-key.pem")
    assert mode(directory) == 0o700
    assert mode(files.key) == 0o600
    assert mode(files.cert) == 0o644
    assert sorted(p.name for p in directory.iterdir()) == ["ca-key.pem", "ca.pem"]  # no temps
    assert files.key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, clear

    cert = load_certificate(files.cert)
    key = load_key(files.key)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert cert.public_key() == key.public_key()
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Test Root"
    cert.verify_directly_issued_by(cert)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)

    basic = extension(cert, x509.BasicConstraints)
    assert basic.critical
    assert basic.value == x509.BasicConstraints(ca=True, path_length=0)
    usage = extension(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = extension(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert 0 < cert.serial_number < 2**159

    info = describe(files.cert)
    assert info["is_ca"] is True
    assert info["key_usage"] == ["keyCertSign", "cRLSign"]
    days = datetime.fromisoformat(str(info["not_after"])) - datetime.now(UTC)
    assert timedelta(days=3649) < days <= timedelta(days=3650)


def test_init_ca_modes_are_exact_under_any_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        files = init_ca(tmp_path / "a")
    finally:
        os.umask(old)
    assert mode(files.cert) == 0o644
    assert mode(files.key) == 0o600

    old = os.umask(0)
    try:
        files = init_ca(tmp_path / "b")
    finally:
        os.umask(old)
    assert mode(files.key) == 0o600
    assert mode(tmp_path / "b") == 0o700


def test_init_ca_refuses_to_overwrite_without_force(pki: Path) -> None:
    before = (pki / "ca.pem").read_bytes()
    with pytest.raises(AlreadyExistsError, match=r"ca\.pem already exists.*--force"):
        init_ca(pki)
    assert (pki / "ca.pem").read_bytes() == before

    init_ca(pki, force=True)
    assert (pki / "ca.pem").read_bytes() != before


def test_init_ca_refuses_when_only_the_key_remains(pki: Path) -> None:
    (pki / "ca.pem").unlink()
    with pytest.raises(AlreadyExistsError, match=r"ca-key\.pem already exists"):
        init_ca(pki)


def test_init_ca_rejects_a_file_as_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(CertsError, match="not a directory"):
        init_ca(tmp_path / "file")


# --------------------------------------------------------------------------------------------------
# Issuing


def test_issue_server_profile(pki: Path) -> None:
    files = issue(
        pki, "server", "broker.example", dns=["broker.example", "*.broker.example"], ip=["::1"]
    )

    assert files == IssuedFiles(pki / "broker.example.pem", pki / "broker.example-key.pem")
    assert mode(files.key) == 0o600
    assert mode(files.cert) == 0o644
    ca = load_certificate(pki / "ca.pem")
    cert = load_certificate(files.cert)
    key = load_key(files.key)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(ca)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert cert.subject.rfc4514_string() == "CN=broker.example"
    assert 0 < cert.serial_number < 2**159

    basic = extension(cert, x509.BasicConstraints)
    assert basic.critical
    assert not basic.value.ca
    usage = extension(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_encipherment  # EC keys do not encipher
    assert not usage.value.key_cert_sign
    assert list(extension(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = extension(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == extension(ca, x509.SubjectKeyIdentifier).value.digest
    san = extension(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example", "*.broker.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]

    info = describe(files.cert)
    assert info["issuer"] == "CN=Tessera CA"
    assert info["san"] == {
        "dns": ["broker.example", "*.broker.example"],
        "ip": ["::1"],
        "email": [],
        "uri": [],
    }
    assert info["extended_key_usage"] == ["serverAuth"]
    assert info["key_usage"] == ["digitalSignature"]
    assert info["is_ca"] is False
    assert info["expired"] is False
    assert (info["key_type"], info["key_size"]) == ("ec", 256)
    assert info["serial"] == f"{cert.serial_number:x}"
    assert info["fingerprint_sha256"] == cert.fingerprint(hashes.SHA256()).hex(":").upper()
    days = datetime.fromisoformat(str(info["not_after"])) - datetime.now(UTC)
    assert timedelta(days=824) < days <= timedelta(days=825)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("localhost", {"dns": ["localhost"], "ip": []}),
        ("127.0.0.1", {"dns": [], "ip": ["127.0.0.1"]}),
    ],
)
def test_server_without_names_is_named_by_its_cn(
    pki: Path, name: str, expected: dict[str, list[str]]
) -> None:
    info = describe(issue(pki, "server", name).cert)
    assert info["san"] == {**expected, "email": [], "uri": []}


def test_issue_client_without_san_has_cn_only(pki: Path) -> None:
    cert = load_certificate(issue(pki, "client", "alice").cert)
    assert cert.subject.rfc4514_string() == "CN=alice"
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert list(extension(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_issue_client_with_san(pki: Path) -> None:
    files = issue(
        pki,
        "client",
        "alice",
        email=["alice@example.org"],
        uri=["spiffe://example.org/alice"],
        dns=["alice.example.org"],
        file_stem="alice-laptop",
    )
    assert files.cert.name == "alice-laptop.pem"
    assert files.key.name == "alice-laptop-key.pem"
    info = describe(files.cert)
    assert info["common_name"] == "alice"
    assert info["san"] == {
        "dns": ["alice.example.org"],
        "ip": [],
        "email": ["alice@example.org"],
        "uri": ["spiffe://example.org/alice"],
    }
    assert info["extended_key_usage"] == ["clientAuth"]


def test_issue_refuses_to_overwrite_without_force(pki: Path) -> None:
    first = issue(pki, "server", "localhost")
    cert_before, key_before = first.cert.read_bytes(), first.key.read_bytes()

    with pytest.raises(AlreadyExistsError, match=r"localhost\.pem already exists.*--force"):
        issue(pki, "server", "localhost")
    assert first.cert.read_bytes() == cert_before
    assert first.key.read_bytes() == key_before

    first.cert.unlink()  # half a pair left behind is protected too
    with pytest.raises(AlreadyExistsError, match=r"localhost-key\.pem already exists"):
        issue(pki, "server", "localhost")

    second = issue(pki, "server", "localhost", force=True)
    assert second == first
    assert second.key.read_bytes() != key_before
    assert mode(second.key) == 0o600
    assert load_certificate(second.cert).public_key() == load_key(second.key).public_key()
    assert sorted(p.name for p in pki.iterdir()) == [
        "ca-key.pem",
        "ca.pem",
        "localhost-key.pem",
        "localhost.pem",
    ]


def test_issue_without_ca(tmp_path: Path) -> None:
    with pytest.raises(CANotFoundError) as excinfo:
        issue(tmp_path / "nothing", "server", "localhost")
    message = str(excinfo.value)
    assert "ca.pem" in message
    assert "ca-key.pem" in message
    assert f"tessera-certs init-ca --dir {tmp_path / 'nothing'}" in message
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize(
    ("missing", "present"), [("ca-key.pem", "ca.pem"), ("ca.pem", "ca-key.pem")]
)
def test_issue_with_half_a_ca(pki: Path, missing: str, present: str) -> None:
    (pki / missing).unlink()
    with pytest.raises(CANotFoundError, match=rf"{missing} not found.*{present} exists.*--force"):
        issue(pki, "client", "alice")


def test_issue_checks_the_ca_key_matches(pki: Path, tmp_path: Path) -> None:
    other = init_ca(tmp_path / "other")
    (pki / "ca-key.pem").write_bytes(other.key.read_bytes())
    with pytest.raises(CertsError, match="is not the private key of"):
        issue(pki, "client", "alice")


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"ip": ["1.2.3"]}, "--ip"),
        ({"ip": ["localhost"]}, "--ip"),
        ({"email": ["alice"]}, "--email"),
        ({"email": ["alice@"]}, "--email"),
        ({"uri": ["example.org/alice"]}, "--uri"),
        ({"uri": ["spiffe://a b"]}, "--uri"),
        ({"dns": ["bad_host!"]}, "--dns"),
        ({"dns": ["10.0.0.1"]}, "--dns"),
        ({"dns": ["*.com"]}, "--dns"),
        ({"dns": ["bücher.example"]}, "--dns"),
        ({"dns": "localhost"}, "--dns"),
        ({"days": 0}, "--days"),
        ({"days": -5}, "--days"),
        ({"name": ""}, "--name"),
        ({"name": "  "}, "--name"),
        ({"name": "x" * 65}, "--name"),
        ({"file_stem": "ca"}, "--file-stem"),
        ({"file_stem": "../escape"}, "--file-stem"),
        ({"name": "a/b"}, "--file-stem"),
        ({"key_type": "rsa", "rsa_bits": 1024}, "--rsa-bits"),
        ({"key_type": "dsa"}, "--key-type"),
    ],
)
def test_issue_rejects_bad_input(pki: Path, kwargs: dict[str, object], flag: str) -> None:
    args = {"name": "alice", **kwargs}
    name = args.pop("name")
    with pytest.raises(CertsError, match=flag):
        issue(pki, "client", name, **args)  # type: ignore[arg-type]
    assert sorted(p.name for p in pki.iterdir()) == ["ca-key.pem", "ca.pem"]


def test_server_name_must_be_a_host_without_dns_or_ip(pki: Path) -> None:
    with pytest.raises(CertsError, match="--dns or --ip"):
        issue(pki, "server", "My Broker", file_stem="broker")
    issue(pki, "server", "My Broker", file_stem="broker", dns=["broker.example"])


def test_validity_overrides(pki: Path) -> None:
    now = datetime.now(UTC)
    expired = issue(pki, "client", "old", not_after=now - timedelta(days=1))
    info = describe(expired.cert)
    assert info["expired"] is True
    assert info["not_yet_valid"] is False
    assert datetime.fromisoformat(str(info["not_before"])) < datetime.fromisoformat(
        str(info["not_after"])
    )

    future = issue(
        pki,
        "client",
        "future",
        not_before=now + timedelta(days=1),
        not_after=now + timedelta(days=2),
    )
    info = describe(future.cert)
    assert info["expired"] is False
    assert info["not_yet_valid"] is True

    with pytest.raises(CertsError, match="later than"):
        issue(pki, "client", "x", not_before=now, not_after=now - timedelta(seconds=1))
    with pytest.raises(CertsError, match="timezone-aware"):
        issue(pki, "client", "x", not_after=datetime(2030, 1, 1))


def test_rsa_keys(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    ca = init_ca(directory, key_type="rsa", rsa_bits=2048)
    assert describe(ca.cert)["key_type"] == "rsa"
    files = issue(directory, "server", "localhost", key_type="rsa", rsa_bits=2048)
    key = load_key(files.key)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    assert mode(files.key) == 0o600
    info = describe(files.cert)
    assert (info["key_type"], info["key_size"]) == ("rsa", 2048)
    assert info["key_usage"] == ["digitalSignature", "keyEncipherment"]
    assert info["signature_hash"] == "sha256"

    ec_leaf = issue(directory, "client", "alice")  # an EC leaf under an RSA CA
    assert describe(ec_leaf.cert)["key_type"] == "ec"
    handshake(
        server_context(ca.cert, files), client_context(ca.cert, ec_leaf), hostname="localhost"
    )


def test_load_certificate_errors(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(CertsError, match="not found"):
        load_certificate(tmp_path / "absent.pem")
    with pytest.raises(CertsError, match="holds a private key"):
        load_certificate(pki / "ca-key.pem")
    (tmp_path / "junk.pem").write_bytes(b"not a certificate")
    with pytest.raises(CertsError, match="not a valid certificate"):
        load_certificate(tmp_path / "junk.pem")
    with pytest.raises(CertsError, match="is a directory"):
        load_certificate(pki)

    der = tmp_path / "ca.der"
    der.write_bytes(load_certificate(pki / "ca.pem").public_bytes(serialization.Encoding.DER))
    assert describe(der)["subject"] == "CN=Tessera CA"


# --------------------------------------------------------------------------------------------------
# TLS with the issued certificates


@pytest.fixture
def tls_pki(pki: Path) -> tuple[Path, IssuedFiles, IssuedFiles]:
    server = issue(pki, "server", "localhost", dns=["localhost"], ip=["127.0.0.1"])
    client = issue(pki, "client", "alice", email=["alice@example.org"])
    return pki / "ca.pem", server, client


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
def test_mutual_tls_handshake(
    tls_pki: tuple[Path, IssuedFiles, IssuedFiles], version: ssl.TLSVersion, hostname: str
) -> None:
    ca, server_files, client_files = tls_pki
    server_ctx = server_context(ca, server_files)
    server_ctx.minimum_version = server_ctx.maximum_version = version
    server, client = handshake(server_ctx, client_context(ca, client_files), hostname)

    assert server.version() == client.version()
    peer = server.getpeercert()
    assert peer is not None
    assert subject_cn(peer) == "alice"
    assert ("email", "alice@example.org") in peer["subjectAltName"]
    server_cert = client.getpeercert()
    assert server_cert is not None
    assert subject_cn(server_cert) == "localhost"


def test_expired_client_certificate_is_rejected(
    tls_pki: tuple[Path, IssuedFiles, IssuedFiles],
) -> None:
    ca, server_files, _ = tls_pki
    expired = issue(
        ca.parent, "client", "mallory", not_after=datetime.now(UTC) - timedelta(hours=1)
    )
    with pytest.raises(ssl.SSLCertVerificationError) as excinfo:
        handshake(server_context(ca, server_files), client_context(ca, expired), "localhost")
    assert excinfo.value.verify_code == X509_V_ERR_CERT_HAS_EXPIRED


def test_expired_server_certificate_is_rejected(
    tls_pki: tuple[Path, IssuedFiles, IssuedFiles],
) -> None:
    ca, _, client_files = tls_pki
    expired = issue(
        ca.parent,
        "server",
        "localhost",
        not_after=datetime.now(UTC) - timedelta(hours=1),
        file_stem="stale",
    )
    with pytest.raises(ssl.SSLCertVerificationError) as excinfo:
        handshake(server_context(ca, expired), client_context(ca, client_files), "localhost")
    assert excinfo.value.verify_code == X509_V_ERR_CERT_HAS_EXPIRED


def test_certificates_are_bound_to_their_purpose(
    tls_pki: tuple[Path, IssuedFiles, IssuedFiles],
) -> None:
    ca, server_files, client_files = tls_pki
    # A client certificate cannot serve ...
    with pytest.raises(ssl.SSLCertVerificationError) as excinfo:
        handshake(server_context(ca, client_files), client_context(ca, None), "alice")
    assert excinfo.value.verify_code == X509_V_ERR_INVALID_PURPOSE
    # ... nor a server certificate authenticate a client.
    with pytest.raises(ssl.SSLCertVerificationError) as excinfo:
        handshake(server_context(ca, server_files), client_context(ca, server_files), "localhost")
    assert excinfo.value.verify_code == X509_V_ERR_INVALID_PURPOSE


def test_certificate_from_another_ca_is_rejected(
    tls_pki: tuple[Path, IssuedFiles, IssuedFiles], tmp_path: Path
) -> None:
    ca, server_files, _ = tls_pki
    rogue_dir = tmp_path / "rogue"
    init_ca(rogue_dir, common_name="Tessera CA")  # same name, different key
    rogue = issue(rogue_dir, "client", "alice")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context(ca, server_files), client_context(ca, rogue), "localhost")


# --------------------------------------------------------------------------------------------------
# The command line


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")

    status, out, err = run(capsys, "init-ca", "--dir", d, "--name", "Dev CA", "--json")
    assert (status, err) == (0, "")
    assert json.loads(out) == {"cert": f"{d}/ca.pem", "key": f"{d}/ca-key.pem"}

    status, out, _ = run(
        capsys, "issue", "server", "--dir", d, "--name", "localhost",
        "--dns", "localhost", "--ip", "127.0.0.1", "--ip", "::1", "--days", "30", "--json",
    )  # fmt: skip
    assert status == 0
    server = json.loads(out)
    assert server == {"cert": f"{d}/localhost.pem", "key": f"{d}/localhost-key.pem"}
    assert mode(Path(server["key"])) == 0o600

    status, out, _ = run(
        capsys, "issue", "client", "--dir", d, "--name", "alice",
        "--email", "alice@example.org", "--uri", "spiffe://example.org/alice",
    )  # fmt: skip
    assert status == 0
    assert f"{d}/alice.pem" in out
    assert f"{d}/alice-key.pem" in out

    status, out, _ = run(capsys, "show", server["cert"], "--json")
    assert status == 0
    info = json.loads(out)
    assert info["issuer"] == "CN=Dev CA"
    assert info["san"]["ip"] == ["127.0.0.1", "::1"]
    assert info["expired"] is False
    not_after = datetime.fromisoformat(info["not_after"])
    assert timedelta(days=29) < not_after - datetime.now(UTC) <= timedelta(days=30)

    status, out, _ = run(capsys, "show", f"{d}/alice.pem")
    assert status == 0
    assert "CN=alice" in out
    assert "email:alice@example.org" in out
    assert "clientAuth" in out
    assert "status:" in out


def test_cli_rsa(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path)
    assert run(capsys, "init-ca", "--dir", d, "--key-type", "rsa", "--rsa-bits", "2048")[0] == 0
    status, out, _ = run(
        capsys, "issue", "client", "--dir", d, "--name", "bob",
        "--key-type", "rsa", "--rsa-bits", "2048", "--json",
    )  # fmt: skip
    assert status == 0
    info = describe(json.loads(out)["cert"])
    assert (info["key_type"], info["key_size"]) == ("rsa", 2048)


def test_cli_overwrite_and_force(pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(pki)
    assert run(capsys, "issue", "client", "--dir", d, "--name", "alice")[0] == 0
    before = (pki / "alice-key.pem").read_bytes()

    status, out, err = run(capsys, "issue", "client", "--dir", d, "--name", "alice")
    assert status == 1
    assert out == ""
    assert err.startswith("tessera-certs: error: ")
    assert "alice.pem already exists" in err
    assert "--force" in err
    assert "Traceback" not in err

    status, _, _ = run(capsys, "issue", "client", "--dir", d, "--name", "alice", "--force")
    assert status == 0
    assert (pki / "alice-key.pem").read_bytes() != before


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["issue", "server", "--dir", "{tmp}/none", "--name", "x"], "init-ca --dir"),
        (["issue", "server", "--dir", "{pki}", "--name", "x", "--ip", "300.1.1.1"], "--ip"),
        (["issue", "client", "--dir", "{pki}", "--name", "x", "--email", "x"], "--email"),
        (["issue", "client", "--dir", "{pki}", "--name", "x", "--days", "0"], "--days"),
        (["show", "{tmp}/missing.pem"], "not found"),
        (["show", "{pki}/ca-key.pem"], "private key"),
    ],
)
def test_cli_operational_errors(
    pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    args = [a.format(tmp=tmp_path, pki=pki) for a in argv]
    status, out, err = run(capsys, *args)
    assert status == 1
    assert out == ""
    assert err.startswith("tessera-certs: error: ")
    assert needle in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["issue"],
        ["issue", "peer", "--dir", "d", "--name", "x"],
        ["issue", "server", "--name", "x"],
        ["issue", "client", "--dir", "d"],
        ["init-ca", "--dir", "d", "--key-type", "dsa"],
        ["init-ca", "--dir", "d", "--days", "ten"],
        ["show"],
    ],
)
def test_cli_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    status, _, err = run(capsys, *argv)
    assert status == 2
    assert "usage: tessera-certs" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["init-ca", "--help"],
        ["issue", "--help"],
        ["issue", "server", "--help"],
        ["issue", "client", "--help"],
        ["show", "--help"],
        ["revoke", "--help"],
        ["crl", "--help"],
    ],
)
def test_cli_help(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    status, out, _ = run(capsys, *argv)
    assert status == 0
    assert out.startswith("usage: tessera-certs")


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--version")
    assert status == 0
    assert out.startswith("tessera-certs ")


# --------------------------------------------------------------------------------------------------
# Revocation: revoke, crl


def _crl(pki: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())


def test_revoke_by_file_writes_a_signed_crl(pki: Path) -> None:
    alice = issue(pki, "client", "alice")
    bob = issue(pki, "client", "bob")
    serial = load_certificate(alice.cert).serial_number
    entry, info = certs.revoke(pki, cert=alice.cert, reason="keyCompromise", crl_days=3)
    assert entry.serial == serial
    assert entry.subject == "CN=alice"
    assert entry.reason == "keyCompromise"
    assert info.path == pki / "crl.pem"
    assert info.number == 1
    crl = _crl(pki)
    ca = load_certificate(pki / "ca.pem")
    assert crl.issuer == ca.subject
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == timedelta(days=3)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    revoked = crl.get_revoked_certificate_by_serial_number(serial)
    assert revoked is not None
    reason = revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.key_compromise
    bob_serial = load_certificate(bob.cert).serial_number
    assert crl.get_revoked_certificate_by_serial_number(bob_serial) is None
    assert mode(pki / "crl.pem") == 0o644
    assert [r.serial for r in certs.revocations(pki)] == [serial]


def test_revoke_by_serial_accumulates_and_is_idempotent(pki: Path) -> None:
    alice = issue(pki, "client", "alice")
    bob = issue(pki, "client", "bob")
    a = load_certificate(alice.cert).serial_number
    b = load_certificate(bob.cert).serial_number
    certs.revoke(pki, serial=f"{a:x}")
    first = certs.revocations(pki)[0]
    _, info = certs.revoke(pki, serial=":".join(f"{b:x}"[i : i + 2] for i in range(0, 4, 2)))
    assert info.number == 2
    _, info = certs.revoke(pki, serial=a, reason="superseded")  # again: the first entry stays
    assert info.number == 3
    entries = {r.serial: r for r in certs.revocations(pki)}
    assert entries[a] == first
    assert entries[a].reason == "unspecified"
    assert len(entries) == 2
    crl = _crl(pki)
    assert crl.get_revoked_certificate_by_serial_number(a) is not None
    # reason unspecified is omitted from the entry (RFC 5280 5.3.1)
    entry = crl.get_revoked_certificate_by_serial_number(a)
    assert entry is not None
    assert not list(entry.extensions)


def test_make_crl_renews_next_update(pki: Path) -> None:
    alice = issue(pki, "client", "alice")
    certs.revoke(pki, cert=alice.cert)
    info = certs.make_crl(pki, days=30)
    assert info.number == 2
    assert len(info.revoked) == 1
    crl = _crl(pki)
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == timedelta(days=30)
    assert len(list(crl)) == 1
    empty = certs.make_crl(pki)
    assert empty.number == 3


def test_make_crl_without_revocations(tmp_path: Path) -> None:
    init_ca(tmp_path)
    info = certs.make_crl(tmp_path)
    assert info.number == 1
    assert info.revoked == ()
    assert len(list(_crl(tmp_path))) == 0


def test_revoke_refuses_a_certificate_of_another_ca(pki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_ca(other)  # same CA name, other key
    stranger = issue(other, "client", "alice")
    with pytest.raises(CertsError, match="not issued by the CA"):
        certs.revoke(pki, cert=stranger.cert)
    assert not (pki / "crl.pem").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"serial": "zz"}, "invalid serial"),
        ({"serial": "0"}, "must be positive"),
        ({"serial": "ff" * 21}, "at most 20 bytes"),
        ({"serial": "01", "reason": "bored"}, "unknown revocation reason"),
        ({}, "name the certificate"),
        ({"serial": "01", "crl_days": 0}, "invalid --crl-days"),
    ],
)
def test_revoke_rejects_bad_input(pki: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(CertsError, match=message):
        certs.revoke(pki, **kwargs)  # type: ignore[arg-type]


def test_corrupt_revocation_list_is_reported(pki: Path) -> None:
    (pki / "revoked.json").write_text("{not json")
    with pytest.raises(CertsError, match=r"revoked\.json is not valid JSON"):
        certs.make_crl(pki)
    (pki / "revoked.json").write_text('{"version": 1, "revoked": [{"serial": "xyz"}]}')
    with pytest.raises(CertsError, match="invalid serial"):
        certs.make_crl(pki)


def test_cli_revoke_and_crl(pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    alice = issue(pki, "client", "alice")
    serial = load_certificate(alice.cert).serial_number
    status, out, _ = run(capsys, "revoke", "--dir", str(pki), str(alice.cert), "--json")
    assert status == 0
    data = json.loads(out)
    assert data["revocation"]["serial"] == f"{serial:x}"
    assert data["crl"] == str(pki / "crl.pem")
    assert data["number"] == 1
    assert data["next_update"].endswith("Z")
    status, out, _ = run(capsys, "revoke", "--dir", str(pki), "--serial", "abc123")
    assert status == 0
    assert "revoked serial abc123" in out
    assert "tessera-broker reload" in out
    status, out, _ = run(capsys, "crl", "--dir", str(pki), "--days", "2", "--json")
    assert status == 0
    data = json.loads(out)
    assert data["number"] == 3
    assert {r["serial"] for r in data["revoked"]} == {f"{serial:x}", "abc123"}
    status, out, _ = run(capsys, "crl", "--dir", str(pki))
    assert status == 0
    assert "CRL number 4, 2 revoked" in out


def test_cli_revoke_errors(pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "revoke", "--dir", str(pki), "--serial", "zz")
    assert status == 1
    assert "tessera-certs: error: invalid serial" in err
    status, _, err = run(capsys, "revoke", "--dir", str(pki))
    assert status == 2
    status, _, err = run(capsys, "revoke", "--dir", str(pki), "--serial", "1", "x.pem")
    assert status == 2
    status, _, err = run(capsys, "crl", "--dir", str(pki / "missing"))
    assert status == 1
    assert "no CA in" in err
