"""A small private CA: create it, issue server and client certificates, inspect a certificate.

Everything here works on plain files in one directory ``D``::

    D/ca.pem            the CA certificate (0644), the trust anchor both sides load
    D/ca-key.pem        the CA private key (0600), needed only to issue
    D/<stem>.pem        an issued leaf certificate (0644)
    D/<stem>-key.pem    its private key (0600)
    D/revoked.json      the serials revoked by ``revoke`` (0644), the CRL's source of truth
    D/crl.pem           the certificate revocation list signed by the CA (0644)

Private keys are unencrypted PKCS#8 PEM, created with mode 0600 from the first byte; every file is
written to a temporary file in the same directory and moved into place with :func:`os.replace`, so
a reader never sees half a file. Nothing is overwritten unless ``force=True``.

The certificate profile is strict enough for OpenSSL's ``X509_V_FLAG_X509_STRICT`` (the default
for :mod:`ssl` from Python 3.13): the CA has a critical ``basicConstraints`` and a subject key
identifier, and every leaf carries an authority key identifier.

Every failure is a :class:`CertsError` whose message is meant for the person at the terminal.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shlex
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, TypeVar, get_args
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT_FILENAME",
    "CA_KEY_FILENAME",
    "CRL_DAYS_DEFAULT",
    "CRL_FILENAME",
    "REVOCATION_REASONS",
    "REVOKED_FILENAME",
    "CrlInfo",
    "Revocation",
    "AlreadyExistsError",
    "CANotFoundError",
    "CertsError",
    "IssuedFiles",
    "KeyType",
    "describe",
    "init_ca",
    "issue",
    "load_certificate",
    "make_crl",
    "revocations",
    "revoke",
]

KeyType = Literal["ec", "rsa"]
"""``"ec"``: ECDSA on P-256 (the default). ``"rsa"``: RSA, 3072 bits unless told otherwise."""

Kind = Literal["server", "client"]

CA_CERT_FILENAME = "ca.pem"
"""The CA certificate inside the certificate directory."""
CA_KEY_FILENAME = "ca-key.pem"
"""The CA private key inside the certificate directory."""

CRL_FILENAME = "crl.pem"
"""The CRL inside the certificate directory (``revoke`` and ``crl`` write it)."""
REVOKED_FILENAME = "revoked.json"
"""The list of revoked serials inside the certificate directory."""
CRL_DAYS_DEFAULT = 7
"""A CRL's default lifetime (``nextUpdate - thisUpdate``) in days: long enough to survive a
weekend without a refresh, short enough that a stale list is noticed (Let's Encrypt's CRLs
also last about a week). Refresh it with ``tessera-certs crl`` from cron, well before."""

#: RFC 5280 reason names (``tessera-certs revoke --reason``); ``certificateHold`` is left out:
#: a revocation here is final.
REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
}

NOT_BEFORE_BACKDATE_SECONDS = 300
"""New certificates start this far in the past so a peer whose clock runs a little behind still
accepts them (trustme and mkcert backdate too, by far more)."""

RSA_MIN_BITS = 2048
"""Smallest RSA modulus accepted (NIST SP 800-131A; OpenSSL security level 2 rejects less)."""
RSA_MAX_BITS = 16384
"""Largest RSA modulus accepted; beyond this key generation takes minutes and peers may refuse."""

COMMON_NAME_MAX_CHARS = 64
"""``ub-common-name`` from RFC 5280; longer host names go in ``--dns`` only."""
DNS_NAME_MAX_CHARS = 253
"""Longest DNS name in presentation form (RFC 1035)."""
FILE_STEM_MAX_CHARS = 200
"""Keeps ``<stem>-key.pem`` under the usual 255-byte file name limit."""

_KEY_FILE_MODE = 0o600
_CERT_FILE_MODE = 0o644
_CA_DIR_MODE = 0o700

_DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_URI_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*$")
_FILE_STEM_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._@+-]*$")
_RESERVED_STEMS = frozenset({"ca", "ca-key"})

_EKU_NAMES: dict[x509.ObjectIdentifier, str] = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}

_SigningKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
_LeafKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_E = TypeVar("_E", bound=x509.ExtensionType)


# --------------------------------------------------------------------------------------------------
# Errors and results


class CertsError(Exception):
    """Root of every error raised by :mod:`certs`.

    ``str(error)`` is a complete message for the person at the terminal.
    """


class CANotFoundError(CertsError):
    """``ca.pem`` or ``ca-key.pem`` is missing from the certificate directory."""


class AlreadyExistsError(CertsError):
    """A file to be written already exists and ``force`` was not given."""


@dataclass(frozen=True)
class IssuedFiles:
    """The pair of files written by :func:`init_ca` or :func:`issue`."""

    cert: Path
    """The PEM certificate (mode 0644)."""
    key: Path
    """The PEM PKCS#8 private key, unencrypted (mode 0600)."""


@dataclass(frozen=True)
class Revocation:
    """One revoked certificate, as kept in ``revoked.json``."""

    serial: int
    revoked_at: datetime
    reason: str
    """An RFC 5280 reason name, a key of :data:`REVOCATION_REASONS`."""
    subject: str | None = None
    """The certificate's subject (RFC 4514), when it was revoked from its file."""
    not_after: datetime | None = None
    """When the certificate expires anyway, when known."""

    def to_json(self) -> dict[str, object]:
        return {
            "serial": f"{self.serial:x}",
            "revoked_at": _iso(self.revoked_at),
            "reason": self.reason,
            "subject": self.subject,
            "not_after": _iso(self.not_after) if self.not_after is not None else None,
        }


@dataclass(frozen=True)
class CrlInfo:
    """What :func:`make_crl` wrote."""

    path: Path
    number: int
    """The CRL number (RFC 5280 cRLNumber), one more than the previous CRL's."""
    this_update: datetime
    next_update: datetime
    revoked: tuple[Revocation, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "crl": str(self.path),
            "number": self.number,
            "this_update": _iso(self.this_update),
            "next_update": _iso(self.next_update),
            "revoked": [r.to_json() for r in self.revoked],
        }


# --------------------------------------------------------------------------------------------------
# Public operations


def init_ca(
    directory: Path | str,
    *,
    common_name: str = "Tessera CA",
    key_type: KeyType = "ec",
    rsa_bits: int = 3072,
    days: int = 3650,
    force: bool = False,
) -> IssuedFiles:
    """Create a self-signed CA in *directory*: ``ca.pem`` and ``ca-key.pem``.

    The directory is created with mode 0700 if it does not exist. Existing CA files are kept unless
    *force* is true; replacing the CA invalidates every certificate it issued.
    """
    directory = Path(directory)
    _check_common_name(common_name, flag="--name")
    _check_key_params(key_type, rsa_bits)
    _check_days(days)
    files = IssuedFiles(directory / CA_CERT_FILENAME, directory / CA_KEY_FILENAME)
    _ensure_directory(directory)
    if not force:
        _refuse_existing(files)

    key = _generate_key(key_type, rsa_bits)
    now = _utcnow()
    not_before = now - timedelta(seconds=NOT_BEFORE_BACKDATE_SECONDS)
    not_after = now + timedelta(days=days)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    _write_pair(files, cert, key)
    return files


def issue(
    directory: Path | str,
    kind: Kind,
    name: str,
    *,
    dns: Sequence[str] = (),
    ip: Sequence[str] = (),
    email: Sequence[str] = (),
    uri: Sequence[str] = (),
    key_type: KeyType = "ec",
    rsa_bits: int = 3072,
    days: int = 825,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    force: bool = False,
    file_stem: str | None = None,
) -> IssuedFiles:
    """Issue a ``"server"`` or ``"client"`` certificate for *name*, signed by *directory*'s CA.

    Writes ``<file_stem or name>.pem`` and ``<file_stem or name>-key.pem`` next to the CA.

    The subject is ``CN=<name>``. The subject alternative names are built from *dns*, *ip*,
    *email* and *uri*; a server given no *dns* and no *ip* gets *name* itself (as an IP address
    if it is one, else as a DNS name), a client given none gets no SAN extension at all.

    The validity runs from *not_before* to *not_after*; each defaults from *days*: *not_before* to
    now (minus :data:`NOT_BEFORE_BACKDATE_SECONDS`, or ``not_after - days`` when *not_after* is
    already past), *not_after* to ``not_before + days``. Naive datetimes are refused.
    """
    directory = Path(directory)
    if kind not in get_args(Kind):
        raise CertsError(f"invalid certificate kind {kind!r}: expected 'server' or 'client'")
    _check_common_name(name, flag="--name")
    stem = _check_file_stem(
        name if file_stem is None else file_stem, explicit=file_stem is not None
    )
    _check_key_params(key_type, rsa_bits)
    _check_days(days)
    start, end = _validity(days, not_before, not_after)
    san = _build_san(kind, name, dns=dns, ip=ip, email=email, uri=uri)
    files = IssuedFiles(directory / f"{stem}.pem", directory / f"{stem}-key.pem")

    ca_cert, ca_key = _load_ca(directory)
    if not force:
        _refuse_existing(files)

    key = _generate_key(key_type, rsa_bits)
    ca_ski = _subject_key_identifier(ca_cert)
    eku = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_encipherment=isinstance(key, rsa.RSAPrivateKey)),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(ca_key, _signature_hash(ca_key))
    _write_pair(files, cert, key)
    return files


def revoke(
    directory: Path | str,
    *,
    cert: Path | str | None = None,
    serial: int | str | None = None,
    reason: str = "unspecified",
    crl_days: int = CRL_DAYS_DEFAULT,
) -> tuple[Revocation, CrlInfo]:
    """Revoke a certificate issued by *directory*'s CA and write a fresh ``crl.pem``.

    Name the certificate by its file (*cert*; it must have been issued by this CA) or by its
    *serial* (an int, or hex as printed by ``tessera-certs show``). Revoking a serial twice is
    not an error: the first revocation is kept. Returns the revocation and the new CRL.
    """
    directory = Path(directory)
    if reason not in REVOCATION_REASONS:
        raise CertsError(
            f"unknown revocation reason {reason!r}; expected one of: "
            f"{', '.join(REVOCATION_REASONS)}"
        )
    if (cert is None) == (serial is None):
        raise CertsError("name the certificate to revoke: a certificate FILE or --serial HEX")
    _check_days(crl_days, flag="--crl-days")
    ca_cert, ca_key = _load_ca(directory)
    subject: str | None = None
    not_after: datetime | None = None
    if cert is not None:
        leaf = load_certificate(cert)
        if leaf.issuer != ca_cert.subject or not _signed_by(leaf, ca_cert):
            raise CertsError(f"{cert} was not issued by the CA in {directory}")
        number = leaf.serial_number
        subject = leaf.subject.rfc4514_string()
        not_after = leaf.not_valid_after_utc
    else:
        number = _parse_serial(serial)
    state = _load_revoked(directory)
    entries: dict[int, Revocation] = {r.serial: r for r in state.revoked}
    entry = entries.get(number)
    if entry is None:
        entry = Revocation(number, _utcnow(), reason, subject, not_after)
        entries[number] = entry
    info = _write_crl(
        directory,
        ca_cert,
        ca_key,
        revoked=tuple(entries.values()),
        previous_number=state.number,
        days=crl_days,
    )
    return entry, info


def make_crl(directory: Path | str, *, days: int = CRL_DAYS_DEFAULT) -> CrlInfo:
    """Sign and write a fresh ``crl.pem`` (next update in *days*) from ``revoked.json``.

    Run it before the current CRL's next update (from cron): a listener whose CRL has expired
    refuses new client handshakes by default (``crl_expired = "refuse"``).
    """
    directory = Path(directory)
    _check_days(days)
    ca_cert, ca_key = _load_ca(directory)
    state = _load_revoked(directory)
    return _write_crl(
        directory,
        ca_cert,
        ca_key,
        revoked=state.revoked,
        previous_number=state.number,
        days=days,
    )


def revocations(directory: Path | str) -> tuple[Revocation, ...]:
    """The revocations recorded in *directory* (empty when nothing was ever revoked)."""
    return _load_revoked(Path(directory)).revoked


def load_certificate(path: Path | str) -> x509.Certificate:
    """Load the first certificate in a PEM (or DER) file; a :class:`CertsError` says why not."""
    path = Path(path)
    data = _read_file(path, what="certificate")
    try:
        if b"-----BEGIN" in data:
            if b"-----BEGIN CERTIFICATE-----" not in data:
                hint = " (it holds a private key)" if b"PRIVATE KEY-----" in data else ""
                raise CertsError(f"{path} is not a PEM certificate{hint}")
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise CertsError(f"{path} is not a valid certificate: {exc}") from None


def describe(path: Path | str) -> dict[str, object]:
    """Summarise the certificate in *path* as JSON-ready data (what ``tessera-certs show`` prints).

    Keys: ``path``, ``subject``, ``common_name``, ``issuer``, ``serial`` (lowercase hex),
    ``not_before``/``not_after`` (ISO 8601, UTC, ``Z`` suffix), ``expired``, ``not_yet_valid``,
    ``is_ca``, ``path_length``, ``key_type`` (``ec``, ``rsa``, ``ed25519``, ...), ``key_size``
    (bits), ``curve``, ``san`` (``{"dns": [...], "ip": [...], "email": [...], "uri": [...]}``,
    plus ``"other"`` when present), ``key_usage`` and ``extended_key_usage`` (RFC 5280 names),
    ``subject_key_identifier``/``authority_key_identifier`` (hex), ``signature_hash`` and
    ``fingerprint_sha256`` (colon-separated uppercase hex).
    """
    cert = load_certificate(path)
    try:
        return _describe(cert, path)
    except ValueError as exc:  # a malformed or duplicated extension in a foreign certificate
        raise CertsError(f"{path}: cannot parse the certificate: {exc}") from None


def _describe(cert: x509.Certificate, path: Path | str) -> dict[str, object]:
    now = _utcnow()
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    basic = _extension(cert, x509.BasicConstraints)
    ski = _extension(cert, x509.SubjectKeyIdentifier)
    aki = _extension(cert, x509.AuthorityKeyIdentifier)
    key_type, key_size, curve = _public_key_info(cert)
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    hash_algorithm = _signature_hash_name(cert)
    return {
        "path": str(path),
        "subject": cert.subject.rfc4514_string(),
        "common_name": _attribute_text(common_names[0]) if common_names else None,
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_before": _iso(start),
        "not_after": _iso(end),
        "expired": now > end,
        "not_yet_valid": now < start,
        "is_ca": bool(basic is not None and basic.ca),
        "path_length": basic.path_length if basic is not None else None,
        "key_type": key_type,
        "key_size": key_size,
        "curve": curve,
        "san": _describe_san(cert),
        "key_usage": _describe_key_usage(cert),
        "extended_key_usage": _describe_eku(cert),
        "subject_key_identifier": ski.digest.hex() if ski is not None else None,
        "authority_key_identifier": (
            aki.key_identifier.hex() if aki is not None and aki.key_identifier else None
        ),
        "signature_hash": hash_algorithm,
        "fingerprint_sha256": cert.fingerprint(hashes.SHA256()).hex(":").upper(),
    }


# --------------------------------------------------------------------------------------------------
# Validation


def _check_common_name(value: str, *, flag: str) -> None:
    if not value or not value.strip():
        raise CertsError(f"{flag} must not be empty")
    if value != value.strip():
        raise CertsError(f"invalid {flag} {value!r}: leading or trailing whitespace")
    if any(not ch.isprintable() for ch in value):
        raise CertsError(f"invalid {flag} {value!r}: contains control characters")
    if len(value) > COMMON_NAME_MAX_CHARS:
        raise CertsError(
            f"invalid {flag} {value!r}: longer than {COMMON_NAME_MAX_CHARS} characters"
            " (a common name's limit); use a shorter --name and put long host names in --dns"
        )


def _check_file_stem(stem: str, *, explicit: bool) -> str:
    problem = None
    if not _FILE_STEM_RE.fullmatch(stem) or len(stem) > FILE_STEM_MAX_CHARS:
        problem = (
            f"not usable as a file name (letters, digits and . _ @ + - only, at most "
            f"{FILE_STEM_MAX_CHARS} characters, not starting with . or -)"
        )
    elif stem.lower() in _RESERVED_STEMS:
        problem = "it would overwrite the CA's own files"
    if problem is None:
        return stem
    if explicit:
        raise CertsError(f"invalid --file-stem {stem!r}: {problem}")
    raise CertsError(f"--name {stem!r} is {problem}; pass --file-stem to choose the file names")


def _check_key_params(key_type: str, rsa_bits: int) -> None:
    if key_type not in get_args(KeyType):
        raise CertsError(f"invalid --key-type {key_type!r}: expected 'ec' or 'rsa'")
    if key_type == "rsa" and not RSA_MIN_BITS <= rsa_bits <= RSA_MAX_BITS:
        raise CertsError(
            f"invalid --rsa-bits {rsa_bits}: must be between {RSA_MIN_BITS} and {RSA_MAX_BITS}"
        )


def _check_days(days: int, *, flag: str = "--days") -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days <= 0:
        raise CertsError(f"invalid {flag} {days!r}: must be a whole number of days, at least 1")


def _validity(
    days: int, not_before: datetime | None, not_after: datetime | None
) -> tuple[datetime, datetime]:
    for value, label in ((not_before, "not_before"), (not_after, "not_after")):
        if value is not None and value.utcoffset() is None:
            raise CertsError(f"{label} must be timezone-aware (for example datetime.now(UTC))")
    span = timedelta(days=days)
    if not_before is None:
        backdated = _utcnow() - timedelta(seconds=NOT_BEFORE_BACKDATE_SECONDS)
        if not_after is not None and not_after <= backdated:
            not_before = not_after - span
        else:
            not_before = backdated
    if not_after is None:
        not_after = not_before + span
    if not_after <= not_before:
        raise CertsError(
            f"not_after ({_iso(not_after)}) must be later than not_before ({_iso(not_before)})"
        )
    return not_before.astimezone(UTC), not_after.astimezone(UTC)


def _build_san(
    kind: Kind,
    name: str,
    *,
    dns: Sequence[str],
    ip: Sequence[str],
    email: Sequence[str],
    uri: Sequence[str],
) -> list[x509.GeneralName]:
    # A bare str would be iterated character by character; catch that programming slip early.
    for values, flag in ((dns, "--dns"), (ip, "--ip"), (email, "--email"), (uri, "--uri")):
        if isinstance(values, str):
            raise CertsError(f"{flag} takes a list of values, not a single string")
    names: list[x509.GeneralName] = []
    names += [x509.DNSName(_check_dns(value, flag="--dns")) for value in dns]
    names += [x509.IPAddress(_check_ip(value)) for value in ip]
    names += [x509.RFC822Name(_check_email(value)) for value in email]
    names += [x509.UniformResourceIdentifier(_check_uri(value)) for value in uri]
    if kind == "server" and not dns and not ip:
        try:
            names.insert(0, x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            try:
                names.insert(0, x509.DNSName(_check_dns(name, flag="--name")))
            except CertsError as exc:
                raise CertsError(
                    f"{exc}; a server certificate needs a host name: pass --dns or --ip"
                ) from None
    return list(_unique(names))


def _check_dns(value: str, *, flag: str) -> str:
    def bad(reason: str) -> CertsError:
        return CertsError(f"invalid {flag} {value!r}: {reason}")

    if not value:
        raise bad("empty")
    if not value.isascii():
        raise bad("not ASCII; give internationalised names in their xn-- (IDNA) form")
    if _is_ip_address(value):
        raise bad("an IP address; use --ip for addresses")
    host = value[:-1] if value.endswith(".") else value
    if len(host) > DNS_NAME_MAX_CHARS:
        raise bad(f"longer than {DNS_NAME_MAX_CHARS} characters")
    labels = host.split(".")
    if labels[0] == "*" and len(labels) > 2:
        labels = labels[1:]
    for label in labels:
        if not _DNS_LABEL_RE.fullmatch(label):
            raise bad(
                "not a DNS name (labels of letters, digits and inner hyphens, 1-63 characters,"
                " and at most a leading '*.' wildcard)"
            )
    return host


def _is_ip_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _check_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise CertsError(f"invalid --ip {value!r}: not an IPv4 or IPv6 address") from None


def _check_email(value: str) -> str:
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain:
        raise CertsError(f"invalid --email {value!r}: expected user@domain")
    if not value.isascii() or any(ch.isspace() or not ch.isprintable() for ch in value):
        raise CertsError(f"invalid --email {value!r}: must be ASCII without spaces")
    return value


def _check_uri(value: str) -> str:
    if not value.isascii() or any(ch.isspace() or not ch.isprintable() for ch in value):
        raise CertsError(f"invalid --uri {value!r}: must be ASCII without spaces")
    scheme = urlsplit(value).scheme if ":" in value else ""
    if not scheme or not _URI_SCHEME_RE.fullmatch(scheme) or value == f"{scheme}:":
        raise CertsError(
            f"invalid --uri {value!r}: expected an absolute URI with a scheme,"
            " such as spiffe://example.org/alice"
        )
    return value


def _unique(items: Iterable[x509.GeneralName]) -> Iterator[x509.GeneralName]:
    seen: set[x509.GeneralName] = set()
    for item in items:
        if item not in seen:
            seen.add(item)
            yield item


# --------------------------------------------------------------------------------------------------
# Keys and certificates


def _generate_key(key_type: KeyType, rsa_bits: int) -> _LeafKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    return ec.generate_private_key(ec.SECP256R1())


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _signature_hash(key: _SigningKey) -> hashes.SHA256 | None:
    # EdDSA hashes internally; cryptography wants no algorithm for it.
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _load_ca(directory: Path) -> tuple[x509.Certificate, _SigningKey]:
    cert_path, key_path = directory / CA_CERT_FILENAME, directory / CA_KEY_FILENAME
    missing = [p for p in (cert_path, key_path) if not p.exists()]
    if missing:
        quoted = shlex.quote(str(directory))
        if len(missing) == 2:
            raise CANotFoundError(
                f"no CA in {directory}: {cert_path} and {key_path} not found;"
                f" create one with `tessera-certs init-ca --dir {quoted}`"
            )
        if missing[0] == key_path:
            raise CANotFoundError(
                f"CA private key {key_path} not found (the certificate {cert_path} exists);"
                f" restore it, or create a new CA with `tessera-certs init-ca --dir {quoted}"
                " --force` (this invalidates every certificate the old CA issued)"
            )
        raise CANotFoundError(
            f"CA certificate {cert_path} not found (the key {key_path} exists); restore it,"
            f" or create a new CA with `tessera-certs init-ca --dir {quoted} --force`"
        )

    cert = load_certificate(cert_path)
    basic = _extension(cert, x509.BasicConstraints)
    if basic is None or not basic.ca:
        raise CertsError(f"{cert_path} is not a CA certificate (basicConstraints CA is not set)")
    if _utcnow() > cert.not_valid_after_utc:
        raise CertsError(
            f"the CA certificate {cert_path} expired on {_iso(cert.not_valid_after_utc)};"
            " create a new CA with `tessera-certs init-ca --force` and reissue"
        )

    key = _load_private_key(key_path)
    if not isinstance(
        key,
        ec.EllipticCurvePrivateKey
        | rsa.RSAPrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise CertsError(
            f"{key_path}: unsupported CA key type {type(key).__name__} (EC, RSA or EdDSA needed)"
        )
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise CertsError(f"{key_path} is not the private key of {cert_path}")
    return cert, key


def _load_private_key(path: Path) -> PrivateKeyTypes:
    data = _read_file(path, what="private key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertsError(f"{path} is encrypted; tessera-certs needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertsError(f"{path} is not a valid PEM private key: {exc}") from None


def _subject_key_identifier(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    ski = _extension(cert, x509.SubjectKeyIdentifier)
    if ski is not None:
        return ski
    # A CA made elsewhere may lack SKI; derive it the RFC 5280 way so leaves still get an AKI.
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _public_key_info(cert: x509.Certificate) -> tuple[str, int | None, str | None]:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return "unknown", None, None
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ec", key.curve.key_size, key.curve.name
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa", key.key_size, None
    if isinstance(key, dsa.DSAPublicKey):
        return "dsa", key.key_size, None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519", 256, None
    if isinstance(key, ed448.Ed448PublicKey):
        return "ed448", 456, None
    return type(key).__name__, None, None


def _signature_hash_name(cert: x509.Certificate) -> str | None:
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return None
    return algorithm.name if algorithm is not None else None


def _attribute_text(attribute: x509.NameAttribute[str | bytes]) -> str:
    value = attribute.value
    return value if isinstance(value, str) else value.hex()


def _describe_san(cert: x509.Certificate) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {"dns": [], "ip": [], "email": [], "uri": []}
    san = _extension(cert, x509.SubjectAlternativeName)
    for general_name in san or ():
        if isinstance(general_name, x509.DNSName):
            result["dns"].append(general_name.value)
        elif isinstance(general_name, x509.IPAddress):
            result["ip"].append(str(general_name.value))
        elif isinstance(general_name, x509.RFC822Name):
            result["email"].append(general_name.value)
        elif isinstance(general_name, x509.UniformResourceIdentifier):
            result["uri"].append(general_name.value)
        else:
            result.setdefault("other", []).append(repr(general_name))
    return result


def _describe_key_usage(cert: x509.Certificate) -> list[str]:
    usage = _extension(cert, x509.KeyUsage)
    if usage is None:
        return []
    flags = {
        "digitalSignature": usage.digital_signature,
        "nonRepudiation": usage.content_commitment,
        "keyEncipherment": usage.key_encipherment,
        "dataEncipherment": usage.data_encipherment,
        "keyAgreement": usage.key_agreement,
        "keyCertSign": usage.key_cert_sign,
        "cRLSign": usage.crl_sign,
    }
    if usage.key_agreement:  # encipher_only/decipher_only are undefined otherwise
        flags["encipherOnly"] = usage.encipher_only
        flags["decipherOnly"] = usage.decipher_only
    return [name for name, on in flags.items() if on]


def _describe_eku(cert: x509.Certificate) -> list[str]:
    eku = _extension(cert, x509.ExtendedKeyUsage)
    return [_EKU_NAMES.get(oid, oid.dotted_string) for oid in eku or ()]


# --------------------------------------------------------------------------------------------------
# Revocation


@dataclass(frozen=True)
class _RevokedState:
    revoked: tuple[Revocation, ...]
    number: int  # the last CRL number written (0: none yet)


_REVOKED_FORMAT = 1


def _signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _parse_serial(serial: int | str | None) -> int:
    if isinstance(serial, int) and not isinstance(serial, bool):
        number = serial
    elif isinstance(serial, str):
        text = serial.strip().lower().replace(":", "")
        text = text.removeprefix("0x")
        try:
            number = int(text, 16)
        except ValueError:
            raise CertsError(
                f"invalid serial {serial!r}: expected hex, as printed by `tessera-certs show`"
            ) from None
    else:
        raise CertsError(f"invalid serial {serial!r}")
    if not 0 < number < 2**160:  # RFC 5280: positive, at most 20 octets
        raise CertsError(f"invalid serial {serial!r}: must be positive and at most 20 bytes")
    return number


def _parse_time(value: object, where: str) -> datetime:
    if not isinstance(value, str):
        raise CertsError(f"{where}: expected an ISO 8601 time")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise CertsError(f"{where}: invalid time {value!r}") from None
    if moment.tzinfo is None:
        raise CertsError(f"{where}: time {value!r} has no time zone")
    return moment.astimezone(UTC)


def _load_revoked(directory: Path) -> _RevokedState:
    path = directory / REVOKED_FILENAME
    if not path.exists():
        return _RevokedState((), 0)
    raw = _read_file(path, what="revocation list")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CertsError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != _REVOKED_FORMAT:
        raise CertsError(f"{path}: not a Tessera revocation list (version {_REVOKED_FORMAT})")
    number = data.get("crl_number", 0)
    items = data.get("revoked", [])
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise CertsError(f"{path}: crl_number must be a non-negative integer")
    if not isinstance(items, list):
        raise CertsError(f"{path}: revoked must be a list")
    revoked: list[Revocation] = []
    for i, item in enumerate(items):
        where = f"{path}: revoked[{i}]"
        if not isinstance(item, dict):
            raise CertsError(f"{where}: expected an object")
        reason = item.get("reason", "unspecified")
        if reason not in REVOCATION_REASONS:
            raise CertsError(f"{where}: unknown reason {reason!r}")
        subject = item.get("subject")
        not_after = item.get("not_after")
        revoked.append(
            Revocation(
                serial=_parse_serial(item.get("serial")),
                revoked_at=_parse_time(item.get("revoked_at"), f"{where}.revoked_at"),
                reason=reason,
                subject=subject if isinstance(subject, str) else None,
                not_after=None
                if not_after is None
                else _parse_time(not_after, f"{where}.not_after"),
            )
        )
    return _RevokedState(tuple(revoked), number)


def _write_crl(
    directory: Path,
    ca_cert: x509.Certificate,
    ca_key: _SigningKey,
    *,
    revoked: tuple[Revocation, ...],
    previous_number: int,
    days: int,
) -> CrlInfo:
    number = previous_number + 1
    now = _utcnow()
    next_update = now + timedelta(days=days)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                _subject_key_identifier(ca_cert)
            ),
            critical=False,
        )
    )
    for entry in revoked:
        revoked_cert = x509.RevokedCertificateBuilder().serial_number(entry.serial)
        revoked_cert = revoked_cert.revocation_date(entry.revoked_at)
        if entry.reason != "unspecified":  # RFC 5280 5.3.1: omit rather than say unspecified
            revoked_cert = revoked_cert.add_extension(
                x509.CRLReason(REVOCATION_REASONS[entry.reason]), critical=False
            )
        builder = builder.add_revoked_certificate(revoked_cert.build())
    crl = builder.sign(ca_key, _signature_hash(ca_key))
    listing = {
        "version": _REVOKED_FORMAT,
        "crl_number": number,
        "revoked": [entry.to_json() for entry in revoked],
    }
    crl_path = directory / CRL_FILENAME
    revoked_path = directory / REVOKED_FILENAME
    # The listing first: if the CRL write fails, `tessera-certs crl` rebuilds it from there.
    for target, data in (
        (revoked_path, (json.dumps(listing, indent=2) + "\n").encode()),
        (crl_path, crl.public_bytes(serialization.Encoding.PEM)),
    ):
        try:
            os.replace(_stage(target, data, _CERT_FILE_MODE), target)
        except OSError as exc:
            raise CertsError(f"cannot write {target}: {exc.strerror or exc}") from None
    _fsync_directory(directory)
    return CrlInfo(crl_path, number, now, next_update, revoked)


# --------------------------------------------------------------------------------------------------
# Files


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_file(path: Path, *, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertsError(f"{what} file {path} not found") from None
    except IsADirectoryError:
        raise CertsError(f"{path} is a directory, not a {what} file") from None
    except OSError as exc:
        raise CertsError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None


def _ensure_directory(directory: Path) -> None:
    try:
        directory.mkdir(mode=_CA_DIR_MODE, parents=True, exist_ok=True)
    except FileExistsError:
        raise CertsError(f"{directory} exists and is not a directory") from None
    except OSError as exc:
        raise CertsError(f"cannot create directory {directory}: {exc.strerror or exc}") from None


def _refuse_existing(files: IssuedFiles) -> None:
    for path in (files.cert, files.key):
        if path.exists() or path.is_symlink():
            raise AlreadyExistsError(f"{path} already exists; pass --force to overwrite it")


def _write_pair(files: IssuedFiles, cert: x509.Certificate, key: _LeafKey) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    # Stage both files first, then rename: a failure before the renames leaves the old pair intact.
    staged: list[Path] = []
    target = files.key
    try:
        staged.append(_stage(files.key, key_pem, _KEY_FILE_MODE))
        target = files.cert
        staged.append(_stage(files.cert, cert_pem, _CERT_FILE_MODE))
        for target, temporary in zip((files.key, files.cert), staged, strict=True):
            os.replace(temporary, target)
    except OSError as exc:
        for temporary in staged:
            with contextlib.suppress(OSError):
                temporary.unlink()
        raise CertsError(f"cannot write {target}: {exc.strerror or exc}") from None
    _fsync_directory(files.cert.parent)


def _stage(final: Path, data: bytes, mode: int) -> Path:
    """Write *data* to a new temporary file beside *final*, created with *mode*; return its path."""
    temporary = final.with_name(f".{final.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(temporary, flags, mode)
    try:
        try:
            # The umask may have cleared bits of *mode*: set it exactly before writing any byte.
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return temporary


def _fsync_directory(directory: Path) -> None:
    # Makes the renames durable; best effort, and not possible at all on Windows.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
