"""Mapping client certificates to identities, on real certificates built with cryptography."""

from __future__ import annotations

import datetime
import subprocess
import sys
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tessera_mq.auth import (
    ANONYMOUS,
    DEFAULT_X509_NAME_FIELDS,
    X509_NAME_FIELDS,
    AuthError,
    Identity,
    IdentityError,
    identity_from_certificate,
    validate_x509_name_fields,
)

_KEY = ec.generate_private_key(ec.SECP256R1())
_NOW = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)


def make_cert(
    *,
    cn: Sequence[str] = (),
    org: str | None = "Example",
    email: Sequence[str] = (),
    uri: Sequence[str] = (),
    dns: Sequence[str] = (),
    san_order: Sequence[str] = ("dns", "uri", "email"),
) -> bytes:
    """A self-signed DER certificate with the given subject CNs and SAN entries.

    ``san_order`` sets the order of the SAN types inside the extension, to show that a field
    takes the first entry of its own type wherever it sits.
    """
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, value) for value in cn]
    if org is not None:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    subject = x509.Name(attributes)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")]))
        .public_key(_KEY.public_key())
        .serial_number(1)
        .not_valid_before(_NOW)
        .not_valid_after(_NOW + datetime.timedelta(days=1))
    )
    by_type: dict[str, list[x509.GeneralName]] = {
        "dns": [x509.DNSName(v) for v in dns],
        "uri": [x509.UniformResourceIdentifier(v) for v in uri],
        "email": [x509.RFC822Name(v) for v in email],
    }
    names = [name for kind in san_order for name in by_type[kind]]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(_KEY, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.DER)


FULL = {
    "cn": ["alice"],
    "email": ["alice@example.com", "al@example.com"],
    "uri": ["spiffe://example.com/ns/prod/sa/alice", "https://example.com/alice"],
    "dns": ["alice.example.com", "a.example.com"],
}

NAMES = [
    # (certificate, fields, expected name)
    ({"cn": ["alice"]}, DEFAULT_X509_NAME_FIELDS, "alice"),
    (FULL, ("cn",), "alice"),
    (FULL, ("san_email",), "alice@example.com"),
    (FULL, ("san_uri",), "spiffe://example.com/ns/prod/sa/alice"),
    (FULL, ("san_dns",), "alice.example.com"),
    (FULL, ("dn",), "CN=alice,O=Example"),
    (FULL, ("san_uri", "san_email", "cn"), "spiffe://example.com/ns/prod/sa/alice"),
    (FULL, ("cn", "san_email"), "alice"),
    (FULL, X509_NAME_FIELDS, "alice@example.com"),
    ({**FULL, "san_order": ("email", "uri", "dns")}, ("san_dns",), "alice.example.com"),
    # a missing field falls through to the next
    ({"cn": ["alice"]}, ("san_email", "san_uri", "san_dns", "cn"), "alice"),
    ({"cn": ["alice"], "dns": ["h.example.com"]}, ("san_email", "san_dns"), "h.example.com"),
    ({"email": ["bob@example.com"]}, ("cn", "san_email"), "bob@example.com"),
    ({"uri": ["urn:x:y"], "org": None}, ("cn", "dn", "san_uri"), "urn:x:y"),
    # several CNs: ambiguous only when the CN is what we ask for
    ({"cn": ["alice", "bob"], "email": ["a@example.com"]}, ("san_email", "cn"), "a@example.com"),
    ({"cn": ["alice", "bob"]}, ("dn",), "CN=bob,CN=alice,O=Example"),
    # non-ASCII is fine; the name is taken as written
    ({"cn": ["Zoë Ünicode"]}, ("cn",), "Zoë Ünicode"),
    ({"cn": ["Alice Smith"]}, ("cn",), "Alice Smith"),
]


@pytest.mark.parametrize(("cert", "fields", "expected"), NAMES)
def test_identity_from_certificate(
    cert: dict[str, object], fields: tuple[str, ...], expected: str
) -> None:
    der = make_cert(**cert)  # type: ignore[arg-type]
    assert identity_from_certificate(der, fields) == Identity("x509", expected)


def test_default_fields_is_cn() -> None:
    assert DEFAULT_X509_NAME_FIELDS == ("cn",)
    assert identity_from_certificate(make_cert(**FULL)) == Identity("x509", "alice")  # type: ignore[arg-type]


FAILURES = [
    # (certificate, fields, message fragment)
    ({"cn": ["alice", "bob"]}, ("cn",), "2 CN attributes"),
    ({"cn": ["alice", "bob"]}, ("san_email", "cn", "dn"), "2 CN attributes"),
    ({"cn": []}, ("cn",), "none of the identity fields: cn"),
    ({"cn": ["alice"]}, ("san_email", "san_uri", "san_dns"), "san_email, san_uri, san_dns"),
    ({"cn": [], "org": None}, X509_NAME_FIELDS, "none of the identity fields"),
    ({"cn": [], "dns": ["h.example.com"]}, ("cn", "san_email"), "none of the identity fields"),
    ({"cn": ["ali\x1bce"]}, ("cn",), "cn contains a control"),
    ({"cn": ["alice\n"]}, ("cn",), "control"),
    ({"cn": ["alice\u202egpj.exe"]}, ("cn",), "invisible format"),  # bidi override
    ({"cn": ["a\u200bb"]}, ("cn",), "control"),  # zero-width space
    ({"cn": ["a\x1bb"]}, ("dn",), "dn contains a control"),
]


@pytest.mark.parametrize(("cert", "fields", "message"), FAILURES)
def test_identity_failures(cert: dict[str, object], fields: tuple[str, ...], message: str) -> None:
    der = make_cert(**cert)  # type: ignore[arg-type]
    with pytest.raises(IdentityError, match=message) as info:
        identity_from_certificate(der, fields)
    assert isinstance(info.value, AuthError)
    assert "\x1b" not in str(info.value)  # the offending value is never echoed


@pytest.mark.parametrize("der", [b"", b"not a certificate", make_cert(cn=["a"])[:-10]])
def test_not_a_certificate(der: bytes) -> None:
    with pytest.raises(IdentityError, match="not a valid DER"):
        identity_from_certificate(der, ("cn",))


def test_pem_is_not_accepted() -> None:
    cert = x509.load_der_x509_certificate(make_cert(cn=["a"]))
    with pytest.raises(IdentityError):
        identity_from_certificate(cert.public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (["cn"], ("cn",)),
        (("san_email", "cn"), ("san_email", "cn")),
        (list(X509_NAME_FIELDS), X509_NAME_FIELDS),
    ],
)
def test_validate_fields(fields: Sequence[str], expected: tuple[str, ...]) -> None:
    assert validate_x509_name_fields(fields) == expected


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ([], "at least one field"),
        ((), "at least one field"),
        (["cn", "CN"], "'CN'"),
        (["cn", "email"], "unknown identity field 'email'"),
        (["cn", "san_email", "cn"], "'cn' is listed twice"),
        ("cn", "not the string 'cn'"),
        ([1], "unknown identity field 1"),
    ],
)
def test_validate_fields_errors(fields: Sequence[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_x509_name_fields(fields)
    with pytest.raises(ValueError, match=message):
        identity_from_certificate(make_cert(cn=["a"]), fields)


def test_identity_unchanged() -> None:
    assert str(Identity("x509", "alice")) == "x509:alice"
    assert Identity("anonymous", "") == ANONYMOUS
    assert str(ANONYMOUS) == "anonymous:"


def test_identity_carries_the_certificate_end() -> None:
    identity = identity_from_certificate(make_cert(cn=["alice"]))
    assert identity.expires_at == (_NOW + datetime.timedelta(days=1)).timestamp()
    # the credential's end is not part of who the peer is: the ACL and caches see one identity
    assert identity == Identity("x509", "alice")
    assert hash(identity) == hash(Identity("x509", "alice", expires_at=1.0))
    assert str(identity) == "x509:alice"
    assert Identity("kerberos", "bob@EXAMPLE.COM").expires_at is None


def test_auth_import_stays_clean() -> None:
    """`import auth` loads no event loop, socket, SDK I/O, or (lazily imported) cryptography
    (of the SDK only the sans-I/O protocol core, for the shared topic grammar)."""
    code = (
        "import sys, auth, auth.acl, auth.identity\n"
        "bad = {'asyncio', 'socket', 'ssl', 'cryptography'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in bad\n"
        "    or m.startswith('client_sdk.') and not m.startswith('tessera_mq.client.protocol')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
