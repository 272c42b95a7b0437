"""The authenticated identity of a peer, and how a client certificate is mapped to one.

An :class:`Identity` is a mechanism plus a name within it. For TLS client certificates the
name comes from the first usable field of the certificate, tried in a configured order (the
listener's ``identity_fields``): see :func:`identity_from_certificate` and ``docs/identity.md``.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tessera_mq.auth.errors import AuthError

if TYPE_CHECKING:
    from cryptography import x509

# cryptography is imported where a certificate is parsed, not at module level: its x509
# package pulls in email.utils and with it `socket`, and `import auth` must not (STYLE.md 1).

__all__ = [
    "ANONYMOUS",
    "DEFAULT_X509_NAME_FIELDS",
    "X509_NAME_FIELDS",
    "Identity",
    "IdentityError",
    "identity_from_certificate",
    "validate_x509_name_fields",
]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the security layer proved the peer to be.

    ``mechanism`` is ``"x509"``, ``"kerberos"``, ``"ntlm"`` or ``"anonymous"``; ``name`` is the
    normalised name within that mechanism (``alice``, ``alice@EXAMPLE.COM``, ``DOMAIN\\alice``).
    ``str(identity)`` is the mechanism-qualified form used by ACL rules and logs: ``x509:alice``.

    ``expires_at`` is when the credential the peer proved it with ends (epoch seconds: a
    certificate's notAfter), ``None`` when unknown or unlimited. It is not part of equality or
    the hash: the same principal with a renewed credential is the same identity to the ACL.
    """

    mechanism: str
    name: str
    expires_at: float | None = dataclasses.field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.mechanism}:{self.name}"


ANONYMOUS = Identity("anonymous", "")

#: The certificate fields an x509 identity can be taken from, as named in configuration.
X509_NAME_FIELDS = ("san_email", "san_uri", "san_dns", "cn", "dn")

#: The field order a listener uses when its configuration names none: the subject CN only.
DEFAULT_X509_NAME_FIELDS: tuple[str, ...] = ("cn",)

# Unicode categories a name may not contain: C0/C1 controls (Cc), invisible format characters
# such as bidi overrides and zero-width joiners (Cf), and line/paragraph separators (Zl, Zp).
# Names end up in logs and in ACL decisions; these only ever serve to spoof one or the other.
_FORBIDDEN_NAME_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


class IdentityError(AuthError):
    """No identity could be taken from the peer's credential (no usable field, an ambiguous
    subject, a name with control characters, or a certificate that does not parse).

    The message names the field and the problem, never the offending value."""


def validate_x509_name_fields(fields: Sequence[str]) -> tuple[str, ...]:
    """Check a configured field order and return it as a tuple.

    Raises :class:`ValueError` naming the bad entry when ``fields`` is empty, is a bare string,
    names a field not in :data:`X509_NAME_FIELDS`, or names a field twice.
    """
    if isinstance(fields, str):  # a str is a Sequence[str]: "cn" would read as ("c", "n")
        raise ValueError(  # noqa: TRY004 - config validation reports ValueError throughout
            f"identity_fields must be a list of field names, not the string {fields!r}"
        )
    result = tuple(fields)
    if not result:
        raise ValueError("identity_fields must name at least one field")
    seen: set[str] = set()
    for name in result:
        if not isinstance(name, str) or name not in X509_NAME_FIELDS:
            raise ValueError(
                f"unknown identity field {name!r}; expected one of: {', '.join(X509_NAME_FIELDS)}"
            )
        if name in seen:
            raise ValueError(f"identity field {name!r} is listed twice")
        seen.add(name)
    return result


def identity_from_certificate(
    der: bytes, fields: Sequence[str] = DEFAULT_X509_NAME_FIELDS
) -> Identity:
    """Map a (verified) DER client certificate to ``Identity("x509", name)``.

    ``fields`` are tried in order; the first that yields a non-empty value names the peer:

    ``san_email``
        the first rfc822Name in the subjectAltName extension;
    ``san_uri``
        the first uniformResourceIdentifier in subjectAltName (e.g. a SPIFFE ID);
    ``san_dns``
        the first dNSName in subjectAltName;
    ``cn``
        the subject's commonName; a subject with several CN attributes is ambiguous and
        raises rather than picking one;
    ``dn``
        the whole subject as an RFC 4514 string (``CN=alice,O=Example``).

    This does not verify the certificate: call it on the peer certificate of a completed TLS
    handshake. The identity's ``expires_at`` is the certificate's notAfter. Raises
    :class:`ValueError` for a bad ``fields`` list and :class:`IdentityError`
    when the certificate does not parse, no field yields a name, the CN is ambiguous, or the
    chosen name contains control or invisible format characters.
    """
    from cryptography import x509  # noqa: PLC0415 - see the note at the imports

    order = validate_x509_name_fields(fields)
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise IdentityError("peer certificate is not a valid DER X.509 certificate") from exc
    for field in order:
        name = _field_value(cert, field)
        if name:
            _check_name(name, field)
            return Identity("x509", name, cert.not_valid_after_utc.timestamp())
    raise IdentityError(f"peer certificate has none of the identity fields: {', '.join(order)}")


def _field_value(cert: x509.Certificate, field: str) -> str | None:
    from cryptography import x509  # noqa: PLC0415 - see the note at the imports
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    if field == "cn":
        attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(attributes) > 1:
            raise IdentityError(
                f"peer certificate subject has {len(attributes)} CN attributes (ambiguous)"
            )
        if not attributes:
            return None
        value = attributes[0].value
        if not isinstance(value, str):
            raise IdentityError("peer certificate subject CN is not a string")
        return value
    if field == "dn":
        return cert.subject.rfc4514_string()
    general_name_type: type[x509.RFC822Name | x509.UniformResourceIdentifier | x509.DNSName]
    if field == "san_email":
        general_name_type = x509.RFC822Name
    elif field == "san_uri":
        general_name_type = x509.UniformResourceIdentifier
    else:  # "san_dns": validate_x509_name_fields admits nothing else
        general_name_type = x509.DNSName
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        # a malformed or duplicated extension (parsed lazily, so only now)
        raise IdentityError("peer certificate has malformed extensions") from exc
    values = san.get_values_for_type(general_name_type)
    return values[0] if values else None


def _check_name(name: str, field: str) -> None:
    for char in name:
        if unicodedata.category(char) in _FORBIDDEN_NAME_CATEGORIES:
            raise IdentityError(
                f"peer certificate {field} contains a control or invisible format character"
            )
