"""CRLs and credential expiry in ``auth.tls``: real TLS handshakes between two in-memory
:class:`~auth.tls.TLSLayer` endpoints, with certificates and CRLs from ``certs.pki``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tessera_mq.auth.errors import HandshakeError, HandshakeReason
from tessera_mq.auth.tls import (
    CrlError,
    CrlSet,
    TLSLayer,
    certificate_expires_at,
    client_context,
    load_crls,
    server_context,
)
from tessera_mq.certs import pki as certs_pki


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    certs_pki.init_ca(directory, common_name="Revocation test CA")
    certs_pki.issue(directory, "server", "localhost", dns=["localhost"])
    for name in ("alice", "bob"):
        certs_pki.issue(directory, "client", name)
    return directory


def pump(server: TLSLayer, client: TLSLayer) -> None:
    """Run the handshake, then one round trip so a server-side refusal surfaces."""
    client.start()
    for _ in range(20):
        out = client.data_to_send()
        if out:
            server.receive_data(out)
        back = server.data_to_send()
        if back:
            client.receive_data(back)
        if server.established and client.established and not out and not back:
            break
    client.send(b"ping")
    server.receive_data(client.data_to_send())
    assert server.read() == b"ping"


def connect(
    directory: Path, name: str, crls: CrlSet | None, *, now_crl: bool = True
) -> tuple[TLSLayer, TLSLayer]:
    ctx = server_context(
        directory / "localhost.pem",
        directory / "localhost-key.pem",
        directory / "ca.pem",
        crls=crls,
    )
    cctx = client_context(
        directory / "ca.pem", directory / f"{name}.pem", directory / f"{name}-key.pem"
    )
    server = TLSLayer(ctx, server_side=True)
    client = TLSLayer(cctx, server_side=False, server_hostname="localhost")
    pump(server, client)
    return server, client


def expired_crl(directory: Path, revoked: list[int]) -> Path:
    """A CRL signed by the CA whose next update is an hour ago."""
    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - timedelta(days=2))
        .next_update(now - timedelta(hours=1))
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now - timedelta(days=2))
            .build()
        )
    path = directory / "expired-crl.pem"
    path.write_bytes(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return path


def serial(directory: Path, name: str) -> int:
    return certs_pki.load_certificate(directory / f"{name}.pem").serial_number


@pytest.mark.parametrize("policy", ["refuse", "warn"])
def test_revoked_client_certificate_is_refused(ca_dir: Path, policy: str) -> None:
    certs_pki.revoke(ca_dir, cert=ca_dir / "alice.pem")
    crls = load_crls([ca_dir / "crl.pem"], ca_dir / "ca.pem", policy=policy)  # type: ignore[arg-type]
    assert not crls.expired(datetime.now(UTC).timestamp())
    assert crls.is_revoked((ca_dir / "alice.pem").read_bytes()) is False  # PEM is not DER
    der = certs_pki.load_certificate(ca_dir / "alice.pem").public_bytes(serialization.Encoding.DER)
    assert crls.is_revoked(der)
    with pytest.raises(HandshakeError) as excinfo:
        connect(ca_dir, "alice", crls)
    assert excinfo.value.reason is HandshakeReason.TLS_BAD_CERT
    assert "revoked" in str(excinfo.value)
    server, _ = connect(ca_dir, "bob", crls)  # not revoked: fine
    assert server.peer_identity is not None
    assert server.peer_identity.name == "bob"


def test_expired_crl_refuse_policy_refuses_everyone(ca_dir: Path) -> None:
    path = expired_crl(ca_dir, [serial(ca_dir, "alice")])
    crls = load_crls([path], ca_dir / "ca.pem", policy="refuse")
    assert crls.expired(datetime.now(UTC).timestamp())
    for name in ("alice", "bob"):
        with pytest.raises(HandshakeError) as excinfo:
            connect(ca_dir, name, crls)
        assert excinfo.value.reason is HandshakeReason.TLS_BAD_CERT
        assert "CRL has expired" in str(excinfo.value)


def test_expired_crl_warn_policy_still_revokes_what_it_lists(ca_dir: Path) -> None:
    path = expired_crl(ca_dir, [serial(ca_dir, "alice")])
    crls = load_crls([path], ca_dir / "ca.pem", policy="warn")
    assert crls.expired(datetime.now(UTC).timestamp())
    with pytest.raises(HandshakeError, match="revoked"):
        connect(ca_dir, "alice", crls)
    server, _ = connect(ca_dir, "bob", crls)
    assert server.established


def test_no_crls_changes_nothing(ca_dir: Path) -> None:
    certs_pki.revoke(ca_dir, cert=ca_dir / "alice.pem")
    server, _ = connect(ca_dir, "alice", None)
    assert server.established


def test_load_crls_rejects_bad_files(ca_dir: Path, tmp_path: Path) -> None:
    certs_pki.make_crl(ca_dir)
    ca = ca_dir / "ca.pem"
    with pytest.raises(CrlError, match="cannot read CRL"):
        load_crls([tmp_path / "missing.pem"], ca)
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    with pytest.raises(CrlError, match="not a valid CRL"):
        load_crls([bad], ca)
    with pytest.raises(CrlError, match="not a PEM CRL"):
        load_crls([ca], ca)
    other = tmp_path / "other"
    certs_pki.init_ca(other, common_name="Revocation test CA")  # same name, other key
    certs_pki.make_crl(other)
    with pytest.raises(CrlError, match="not signed by a CA"):
        load_crls([other / "crl.pem"], ca)
    with pytest.raises(CrlError, match="crl_expired"):
        load_crls([ca_dir / "crl.pem"], ca, policy="ignore")  # type: ignore[arg-type]
    crls = load_crls([ca_dir / "crl.pem"], ca)
    with pytest.raises(CrlError, match="needs client_ca"):
        server_context(ca_dir / "localhost.pem", ca_dir / "localhost-key.pem", None, crls=crls)


def test_a_ca_without_crl_is_warned_about(ca_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "second"
    certs_pki.init_ca(other, common_name="Second CA")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((ca_dir / "ca.pem").read_bytes() + (other / "ca.pem").read_bytes())
    certs_pki.make_crl(ca_dir)
    crls = load_crls([ca_dir / "crl.pem"], bundle)
    assert len(crls.warnings) == 1
    assert "CN=Second CA" in crls.warnings[0]
    certs_pki.make_crl(other)
    both = load_crls([ca_dir / "crl.pem", other / "crl.pem"], bundle)
    assert both.warnings == ()


def test_credential_expires_at_is_the_client_certificate_not_after(ca_dir: Path) -> None:
    end = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=5)
    certs_pki.issue(ca_dir, "client", "carol", not_after=end)
    server, client = connect(ca_dir, "carol", None)
    assert server.credential_expires_at == end.timestamp()
    assert server.peer_identity is not None
    assert server.peer_identity.expires_at == end.timestamp()
    # the client sees the broker's certificate end
    server_end = certs_pki.load_certificate(ca_dir / "localhost.pem").not_valid_after_utc
    assert client.credential_expires_at == server_end.timestamp()
    der = certs_pki.load_certificate(ca_dir / "carol.pem").public_bytes(serialization.Encoding.DER)
    assert certificate_expires_at(der) == end.timestamp()
    assert certificate_expires_at(b"junk") is None


def test_anonymous_client_has_no_expiry(ca_dir: Path) -> None:
    ctx = server_context(ca_dir / "localhost.pem", ca_dir / "localhost-key.pem")
    server = TLSLayer(ctx, server_side=True)
    client = TLSLayer(
        client_context(ca_dir / "ca.pem"), server_side=False, server_hostname="localhost"
    )
    assert server.credential_expires_at is None
    pump(server, client)
    assert server.peer_identity is not None
    assert server.peer_identity.mechanism == "anonymous"
    assert server.credential_expires_at is None
