"""SPNEGO security layers (Kerberos, and NTLM when enabled) on pyspnego, sans-I/O.

:class:`NegotiateServerLayer` (acceptor) and :class:`NegotiateClientLayer` (initiator) implement
:class:`auth.layer.SecurityLayer`. The wire format is specified in ``docs/protocol.md`` section 2.2:

* handshake: records ``len(4, big-endian) | type(1) | body`` with type TOKEN (a SPNEGO token),
  DONE (acceptor only: the context is complete and accepted; body = last token, may be empty) or
  ERROR (body = one code byte, see :class:`WireCode`; sent before closing, never with details);
* then, with ``protect_frames=True`` (mode ``negotiate``): records ``len(4) | GSS wrap token``
  whose sealed plaintext is ``kind(1) | data`` (kind DATA or CLOSE); a record that unwraps
  without confidentiality, fails its check, is replayed, reordered or missing raises
  :class:`auth.errors.IntegrityError`;
* with ``protect_frames=False`` (mode ``tls+negotiate``, TLS protects the stream and the context
  is bound to it): after DONE the stream passes through unchanged.

Policy is enforced by the acceptor on the *completed* context, not on what was offered: the
mechanism (Kerberos unless the listener enables NTLM), the target service principal (a ticket
for another principal in the same keytab is refused), the channel binding when required (MIT
accepts a client that sent no bindings unless the GSS ``channel_bound`` flag is checked, which we
do; for NTLM an all-zero binding is refused too), the protection flags when frames are wrapped,
and NTLMv2 only.

Threading: ``blocking_handshake`` is true. Until ``established`` the driver calls ``start`` and
``receive_data`` from one worker thread at a time (a Kerberos initiator may talk to the KDC, an
acceptor reads its keytab); afterwards wrap/unwrap are cheap and run on the event loop. A layer
must never be used from two threads at once.

Secrets: no token, key or password goes into an exception message or a log record. pyspnego logs
every token at DEBUG level; importing this module installs a filter that drops those records.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import unicodedata
from typing import Final, Literal, NoReturn

from auth.credentials import NTLM, Kerberos
from auth.errors import AuthError, HandshakeError, HandshakeReason, IntegrityError
from auth.identity import ANONYMOUS, Identity

# pyspnego's public API (spnego.client/server) cannot restrict the mechanisms, take a keytab and
# service principal per listener, or expose the Kerberos context for the target/flag checks, so
# this module uses its internals: NegotiateProxy(_negotiate_contexts=...) with one inner context,
# GSSAPIProxy(_gssapi_credential=...), GSSAPIProxy._context, ._is_wrapped, spnego._spnego (SPNEGO
# parsing) and spnego._ntlm_raw.messages (NTLM AUTHENTICATE inspection). Tested with pyspnego
# 0.12.4; tests/test_negotiate_layer.py exercises every one of them, so pin pyspnego < 0.13.
try:
    import gssapi
    import gssapi.raw
    import krb5  # noqa: F401  pyspnego silently drops Kerberos when this is missing
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from gssapi.raw.named_tuples import InquireContextResult
    from spnego import _gss as _spnego_gss
    from spnego._context import ContextReq, GSSMech
    from spnego._credential import Password
    from spnego._gss import GSSAPIProxy
    from spnego._negotiate import NegotiateProxy
    from spnego._ntlm import NTLMProxy
    from spnego._ntlm_raw.messages import Authenticate, AvId, MessageType, NTClientChallengeV2
    from spnego._spnego import NegTokenInit, NegTokenResp, unpack_token
    from spnego.channel_bindings import GssChannelBindings
    from spnego.exceptions import BadBindingsError, BadMechanismError, SpnegoError
except ImportError as _exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "auth.negotiate needs pyspnego with Kerberos support (the gssapi and krb5 packages): "
        "install 'tessera[negotiate]'; building gssapi/krb5 needs the libkrb5-dev package. "
        f"Import failed: {_exc}"
    ) from _exc

if not _spnego_gss.HAS_GSSAPI:  # pragma: no cover
    raise ImportError(
        "pyspnego cannot use gssapi/krb5, so Kerberos would silently be unavailable: "
        f"{_spnego_gss.GSSAPI_IMP_ERR}"
    )
if gssapi.MechType.kerberos not in gssapi.raw.indicate_mechs():  # pragma: no cover
    raise ImportError("the system GSSAPI library has no Kerberos 5 mechanism (install libkrb5)")

# Surface the real GSS error from step() instead of pyspnego's AttributeError on a later call.
gssapi.SecurityContext.__DEFER_STEP_ERRORS__ = False  # type: ignore[attr-defined]

__all__ = [
    "MAX_LEGS",
    "MAX_RECORD_PLAINTEXT_BYTES",
    "MAX_TOKEN_BYTES",
    "MAX_WRAPPED_RECORD_BYTES",
    "MECHANISMS",
    "NTLM",
    "DataKind",
    "Kerberos",
    "NegotiateClientLayer",
    "NegotiateServerLayer",
    "RecordType",
    "WireCode",
    "normalise_kerberos_name",
    "normalise_ntlm_name",
    "tls_channel_bindings",
    "tls_server_end_point",
]

# -- limits ----------------------------------------------------------------------------------------

MAX_TOKEN_BYTES: Final = 64 * 1024
"""Default bound on one handshake token (bytes, checked on the length prefix). Windows' default
Kerberos MaxTokenSize is 48000 bytes (tickets with a large PAC approach it); 64 KiB leaves room."""

MAX_LEGS: Final = 4
"""Default bound on handshake TOKEN records accepted from the peer. SPNEGO needs 1 from a
Kerberos initiator and 2 from an NTLM one; a mechListMIC round adds 1."""

MAX_RECORD_PLAINTEXT_BYTES: Final = 64 * 1024
"""Plaintext carried by one wrapped record (bytes). 65536 is the SASL GSSAPI default ``maxbuf``
(RFC 4752, Cyrus SASL); larger writes are split into several records."""

_MAX_WRAP_OVERHEAD_BYTES: Final = 1024  # AES Kerberos adds 60 B, RC4 Kerberos ~45 B, NTLM 16 B

MAX_WRAPPED_RECORD_BYTES: Final = MAX_RECORD_PLAINTEXT_BYTES + 1 + _MAX_WRAP_OVERHEAD_BYTES
"""Largest wrapped record body accepted (bytes, checked on the length prefix before buffering)."""

MECHANISMS: Final = frozenset({"kerberos", "ntlm"})
"""The mechanism names a listener may allow."""

_HEADER_BYTES: Final = 4


class RecordType(enum.IntEnum):
    """First byte of a handshake record."""

    TOKEN = 0x01
    DONE = 0x02
    ERROR = 0x03


class DataKind(enum.IntEnum):
    """First byte of the sealed plaintext of a wrapped record (``protect_frames=True``)."""

    DATA = 0x00
    CLOSE = 0x01


class WireCode(enum.IntEnum):
    """The code byte of an ERROR record: the only failure information that crosses the wire."""

    MALFORMED = 0x01
    TOKEN_TOO_LARGE = 0x02
    TOO_MANY_LEGS = 0x03
    MECHANISM_REFUSED = 0x04
    BAD_CREDENTIALS = 0x05
    WRONG_SERVICE = 0x06
    CHANNEL_BINDING = 0x07
    NO_CREDENTIALS = 0x08
    KDC_UNREACHABLE = 0x09
    INTERNAL = 0x0A

    @property
    def reason(self) -> HandshakeReason:
        return HandshakeReason[self.name]

    @classmethod
    def for_reason(cls, reason: HandshakeReason) -> WireCode:
        return cls.__members__.get(reason.name, cls.INTERNAL)


# pyspnego's names for the mechanisms it negotiates, and the SPNEGO OIDs that mean each one.
_MECH_OF_OID: Final[dict[str, str]] = {
    GSSMech.kerberos.value: "kerberos",
    GSSMech._ms_kerberos.value: "kerberos",
    GSSMech._kerberos_draft.value: "kerberos",
    GSSMech.ntlm.value: "ntlm",
}
_GSSMECH: Final[dict[str, GSSMech]] = {"kerberos": GSSMech.kerberos, "ntlm": GSSMech.ntlm}

# Context flags requested by the initiator and, when frames are wrapped, required by both sides.
_REQUESTED: Final = (
    ContextReq.mutual_auth
    | ContextReq.replay_detect
    | ContextReq.sequence_detect
    | ContextReq.confidentiality
    | ContextReq.integrity
)
_PROTECTION: Final = (
    ContextReq.replay_detect
    | ContextReq.sequence_detect
    | ContextReq.confidentiality
    | ContextReq.integrity
)
_GSS_PROTECTION: Final = int(
    gssapi.RequirementFlag.replay_detection
    | gssapi.RequirementFlag.out_of_sequence_detection
    | gssapi.RequirementFlag.confidentiality
    | gssapi.RequirementFlag.integrity
)

# -- keep tokens out of logs ---------------------------------------------------------------------

_TOKEN_LOG_PREFIXES: Final = ("SPNEGO step", "GSSAPI step", "NTLM step")


class _DropTokenRecords(logging.Filter):
    """Drops pyspnego's DEBUG records that carry a whole base64 token."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(_TOKEN_LOG_PREFIXES))


for _name in ("spnego._negotiate", "spnego._gss", "spnego._ntlm"):
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _DropTokenRecords) for f in _logger.filters):
        _logger.addFilter(_DropTokenRecords())

# -- credentials -----------------------------------------------------------------------------------


# -- channel bindings ------------------------------------------------------------------------------

_TLS_SERVER_END_POINT_PREFIX: Final = b"tls-server-end-point:"


def tls_server_end_point(cert_der: bytes) -> bytes:
    """The RFC 5929 ``tls-server-end-point`` binding value of a server certificate (DER, the leaf
    exactly as sent in the TLS Certificate message): its hash under the certificate's signature
    hash, SHA-256 when that is MD5 or SHA-1. Raises :class:`ValueError` for signature algorithms
    without a single hash (Ed25519, Ed448), for which RFC 5929 defines no value."""
    cert = x509.load_der_x509_certificate(cert_der)
    try:
        algorithm = cert.signature_hash_algorithm
    except Exception as exc:  # cryptography.exceptions.UnsupportedAlgorithm
        raise ValueError("unsupported certificate signature algorithm") from exc
    if algorithm is None:
        raise ValueError(
            "tls-server-end-point is undefined for this certificate's signature algorithm "
            "(no single hash, e.g. Ed25519): use an RSA or ECDSA server certificate"
        )
    if isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert_der)
    return digest.finalize()


def tls_channel_bindings(cert_der: bytes) -> bytes:
    """GSS channel-bindings application data for a TLS channel: ``b"tls-server-end-point:"`` +
    :func:`tls_server_end_point` (RFC 5929 section 4, RFC 5056). Both layers take this value as
    ``channel_bindings``; address fields of the GSS bindings are left empty."""
    return _TLS_SERVER_END_POINT_PREFIX + tls_server_end_point(cert_der)


# -- identity --------------------------------------------------------------------------------------


def _fold(text: str) -> str:
    # NFC, then upper- then lower-case: any two spellings that are equal under str.upper() (what
    # pyspnego's NTLM user lookup compares, and close to Windows' case-insensitive comparison)
    # fold to the same string, e.g. "ALICE", "alice" and "al\u0131ce" (dotless i) become "alice".
    return unicodedata.normalize("NFC", text).upper().lower()


def _split_realm(principal: str) -> tuple[str, str]:
    """Split ``name@REALM`` at the last ``@`` that is not escaped with a backslash."""
    index = len(principal)
    while True:
        index = principal.rfind("@", 0, index)
        if index < 0:
            return principal, ""
        backslashes = len(principal[:index]) - len(principal[:index].rstrip("\\"))
        if backslashes % 2 == 0:
            return principal[:index], principal[index + 1 :]


def normalise_kerberos_name(principal: str) -> str:
    """The ACL form of a Kerberos principal: name part case-folded, realm upper-case.

    ``Alice@tessera.test`` -> ``alice@TESSERA.TEST``;
    ``HTTP/Web.Example@R`` -> ``http/web.example@R``.
    Active Directory compares names case-insensitively and a ticket carries the case the client
    typed, so without folding ``Mallory@CORP`` would slip past a rule for ``mallory@CORP``. MIT
    names are case-sensitive, so folding merges ``Alice`` and ``alice``: only a KDC administrator
    can create such a pair. Apply the same function to names in ACL rules.
    """
    name, realm = _split_realm(principal)
    folded = _fold(name)
    return f"{folded}@{unicodedata.normalize('NFC', realm).upper()}" if realm else folded


def normalise_ntlm_name(name: str) -> str:
    """The ACL form of an NTLM account: ``DOMAIN\\user``, domain upper-case, user case-folded
    (NTLM is case-insensitive: ``tessera\\Alice`` -> ``TESSERA\\alice``); ``user`` when no domain
    was sent; ``user@dns.domain`` (UPN form) is folded as a whole."""
    domain, sep, user = name.partition("\\")
    if not sep:
        return _fold(name)
    return f"{unicodedata.normalize('NFC', domain).upper()}\\{_fold(user)}"


# -- error classification --------------------------------------------------------------------------


def _u32(code: int) -> int:
    return code & 0xFFFFFFFF


# MIT com_err codes (krb5.h), as the unsigned minor status GSS reports them.
_MINOR_REASON: Final[dict[int, HandshakeReason]] = {
    _u32(-1765328243): HandshakeReason.NO_CREDENTIALS,  # KRB5_CC_NOTFOUND
    _u32(-1765328189): HandshakeReason.NO_CREDENTIALS,  # KRB5_FCC_NOFILE
    _u32(-1765328203): HandshakeReason.NO_CREDENTIALS,  # KRB5_KT_NOTFOUND
    _u32(-1765328202): HandshakeReason.NO_CREDENTIALS,  # KRB5_KT_END
    _u32(-1765328352): HandshakeReason.NO_CREDENTIALS,  # KRB5KRB_AP_ERR_TKT_EXPIRED
    _u32(-1765328228): HandshakeReason.KDC_UNREACHABLE,  # KRB5_KDC_UNREACH
    _u32(-1765328230): HandshakeReason.KDC_UNREACHABLE,  # KRB5_REALM_UNKNOWN
    _u32(-1765328164): HandshakeReason.KDC_UNREACHABLE,  # KRB5_REALM_CANT_RESOLVE
    _u32(-1765328160): HandshakeReason.KDC_UNREACHABLE,  # KRB5_CONFIG_NODEFREALM
    _u32(-1765328377): HandshakeReason.WRONG_SERVICE,  # KRB5KDC_ERR_S_PRINCIPAL_UNKNOWN
    _u32(-1765328349): HandshakeReason.WRONG_SERVICE,  # KRB5KRB_AP_ERR_NOT_US
    _u32(-1765328240): HandshakeReason.WRONG_SERVICE,  # KRB5KRB_AP_WRONG_PRINC
    _u32(-1765328378): HandshakeReason.BAD_CREDENTIALS,  # KRB5KDC_ERR_C_PRINCIPAL_UNKNOWN
    _u32(-1765328360): HandshakeReason.BAD_CREDENTIALS,  # KRB5KDC_ERR_PREAUTH_FAILED
    _u32(-1765328353): HandshakeReason.BAD_CREDENTIALS,  # KRB5KRB_AP_ERR_BAD_INTEGRITY
    _u32(-1765328366): HandshakeReason.BAD_CREDENTIALS,  # KRB5KDC_ERR_CLIENT_REVOKED
    _u32(-1765328361): HandshakeReason.BAD_CREDENTIALS,  # KRB5KDC_ERR_KEY_EXP
    _u32(-1765328347): HandshakeReason.BAD_CREDENTIALS,  # KRB5KRB_AP_ERR_SKEW
    _u32(-1765328350): HandshakeReason.BAD_CREDENTIALS,  # KRB5KRB_AP_ERR_REPEAT
    _u32(-1765328343): HandshakeReason.BAD_CREDENTIALS,  # KRB5KRB_AP_ERR_MODIFIED
}
_GSS_S_BAD_MECH: Final = 1 << 16
_GSS_S_BAD_BINDINGS: Final = 4 << 16
_GSS_S_NO_CRED: Final = 7 << 16
_GSS_S_DEFECTIVE_TOKEN: Final = 9 << 16
_GSS_S_CREDENTIALS_EXPIRED: Final = 11 << 16


def _gss_error(exc: BaseException) -> gssapi.raw.GSSError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, gssapi.raw.GSSError):
            return current
        base = getattr(current, "base_error", None)  # SpnegoError keeps the native error here
        current = base if isinstance(base, BaseException) else current.__cause__
    return None


def _gss_detail(error: gssapi.raw.GSSError) -> str:
    # The text of the GSS major/minor codes: names principals and files, never a token or key.
    try:
        return error.gen_message()
    except Exception:
        return f"GSS major {error.maj_code:#x}, minor {error.min_code}"


def _classify(
    exc: BaseException, *, default: HandshakeReason, peer_input: bool = True
) -> HandshakeError:
    """Map a pyspnego/gssapi failure to a :class:`HandshakeError` without leaking a secret.
    Other exceptions are ``MALFORMED`` when they came from decoding the peer's token
    (*peer_input*), else *default*."""
    gss = _gss_error(exc)
    if gss is not None:
        reason = _MINOR_REASON.get(_u32(gss.min_code))
        if reason is None:
            routine = gss.routine_code
            if routine == _GSS_S_BAD_MECH:
                reason = HandshakeReason.MECHANISM_REFUSED
            elif routine == _GSS_S_BAD_BINDINGS:
                reason = HandshakeReason.CHANNEL_BINDING
            elif routine in (_GSS_S_NO_CRED, _GSS_S_CREDENTIALS_EXPIRED):
                reason = HandshakeReason.NO_CREDENTIALS
            elif routine == _GSS_S_DEFECTIVE_TOKEN:
                reason = HandshakeReason.MALFORMED
            else:
                reason = default
        return HandshakeError(reason, _gss_detail(gss))
    if isinstance(exc, BadBindingsError):
        return HandshakeError(HandshakeReason.CHANNEL_BINDING, "channel bindings do not match")
    if isinstance(exc, BadMechanismError):
        return HandshakeError(HandshakeReason.MECHANISM_REFUSED, "no usable mechanism")
    if isinstance(exc, SpnegoError):
        return HandshakeError(default, type(exc).__name__)
    if not peer_input:
        return HandshakeError(default, type(exc).__name__)
    # struct.error, ValueError, IndexError... from decoding a peer's token.
    return HandshakeError(HandshakeReason.MALFORMED, f"undecodable token ({type(exc).__name__})")


# -- the common record machinery -------------------------------------------------------------------

_State = Literal["handshake", "established", "failed"]


def _record(kind: RecordType, body: bytes = b"") -> bytes:
    return (len(body) + 1).to_bytes(_HEADER_BYTES, "big") + bytes((kind,)) + body


class _NegotiateLayer:
    """Record parsing, bounds, the data phase; subclasses drive the SPNEGO context."""

    _role: str = "peer"

    def __init__(
        self,
        *,
        protect_frames: bool,
        max_token_bytes: int,
        max_legs: int,
        channel_bindings: bytes | None,
    ) -> None:
        if max_token_bytes < 1:
            raise ValueError("max_token_bytes must be positive")
        if max_legs < 1:
            raise ValueError("max_legs must be positive")
        self._protect = protect_frames
        self._max_token_bytes = max_token_bytes
        self._max_legs = max_legs
        self._bindings = (
            GssChannelBindings(application_data=channel_bindings)
            if channel_bindings is not None
            else None
        )
        self._state: _State = "handshake"
        self._error: AuthError | None = None
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._plain = bytearray()
        self._legs = 0
        self._context: NegotiateProxy | None = None
        self._identity: Identity | None = None
        self._mechanism: str | None = None
        self._peer_closed = False
        self._close_sent = False

    # -- SecurityLayer -------------------------------------------------------------------------

    @property
    def established(self) -> bool:
        return self._state == "established"

    @property
    def peer_identity(self) -> Identity | None:
        return self._identity if self._state == "established" else None

    @property
    def blocking_handshake(self) -> bool:
        return True

    @property
    def mechanism(self) -> str | None:
        """``"kerberos"`` or ``"ntlm"``: the negotiated mechanism once established, before that
        the one being tried (known after the first token; for logging a failed handshake)."""
        return self._mechanism or self._chosen

    @property
    def peer_closed(self) -> bool:
        """True once the peer sent its authenticated CLOSE record (``protect_frames=True``); an
        EOF without it may be a truncation by an attacker (the driver may log it)."""
        return self._peer_closed

    def start(self) -> None:
        """Nothing to do here; the client overrides this."""

    def receive_data(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if not data:
            self._eof()
            return
        if self._state == "established" and not self._protect:
            self._plain += data
            return
        self._inbuf += data
        try:
            self._process()
        except AuthError as exc:
            self._state = "failed"
            self._error = exc
            raise

    def read(self) -> bytes:
        data = bytes(self._plain)
        self._plain.clear()
        return data

    def send(self, data: bytes) -> None:
        if self._state != "established":
            raise HandshakeError(HandshakeReason.INTERNAL, "send before the handshake completed")
        if self._close_sent:
            raise HandshakeError(HandshakeReason.INTERNAL, "send after close")
        if not self._protect:
            self._outbuf += data
            return
        if len(data) <= MAX_RECORD_PLAINTEXT_BYTES:  # the common case: one record
            if data:
                self._seal(b"\x00" + data)
            return
        view = memoryview(data)
        for offset in range(0, len(view), MAX_RECORD_PLAINTEXT_BYTES):
            self._seal(b"\x00" + view[offset : offset + MAX_RECORD_PLAINTEXT_BYTES])

    def data_to_send(self) -> bytes:
        data = bytes(self._outbuf)
        self._outbuf.clear()
        return data

    def close(self) -> None:
        if self._state == "established" and self._protect and not self._close_sent:
            self._seal(bytes((DataKind.CLOSE,)))
        self._close_sent = True

    # -- records -------------------------------------------------------------------------------

    def _process(self) -> None:
        buf = self._inbuf
        pos = 0
        try:
            while len(buf) - pos >= _HEADER_BYTES:
                length = int.from_bytes(buf[pos : pos + _HEADER_BYTES], "big")
                if self._state == "handshake":
                    if length == 0:
                        self._fail(HandshakeReason.MALFORMED, "empty handshake record")
                    if length - 1 > self._max_token_bytes:
                        self._fail(
                            HandshakeReason.TOKEN_TOO_LARGE,
                            f"handshake record of {length} bytes "
                            f"(limit {self._max_token_bytes} + 1)",
                        )
                elif length == 0 or length > MAX_WRAPPED_RECORD_BYTES:
                    raise IntegrityError(f"wrapped record of {length} bytes is out of bounds")
                end = pos + _HEADER_BYTES + length
                if len(buf) < end:
                    break
                body = bytes(buf[pos + _HEADER_BYTES : end])
                pos = end
                if self._state == "handshake":
                    self._handshake_record(body)
                    if self.established and not self._protect:  # the rest is the plain stream
                        self._plain += buf[pos:]
                        pos = len(buf)
                else:
                    self._unseal(body)
        finally:
            del buf[:pos]

    def _handshake_record(self, body: bytes) -> None:
        kind, payload = body[0], body[1:]
        if kind == RecordType.TOKEN:
            self._legs += 1
            if self._legs > self._max_legs:
                self._fail(HandshakeReason.TOO_MANY_LEGS, f"more than {self._max_legs} tokens")
            self._on_token(payload)
        elif kind == RecordType.DONE:
            self._on_done(payload)
        elif kind == RecordType.ERROR:
            if len(payload) != 1:
                self._fail(HandshakeReason.MALFORMED, "malformed error record", send=False)
            try:
                reason = WireCode(payload[0]).reason
            except ValueError:
                reason = HandshakeReason.INTERNAL
            self._fail(reason, f"refused by the {self._role}", send=False)
        else:
            self._fail(HandshakeReason.MALFORMED, f"unknown handshake record type {kind:#04x}")

    def _on_token(self, token: bytes) -> None:
        raise NotImplementedError

    def _on_done(self, token: bytes) -> None:
        self._fail(HandshakeReason.MALFORMED, "unexpected DONE record")

    def _eof(self) -> None:
        # After the handshake an EOF is not an error (like TLSLayer, which treats a missing
        # close_notify as closed); ``peer_closed`` tells a clean CLOSE from a truncation.
        if self._state == "handshake":
            self._state = "failed"
            self._error = HandshakeError(HandshakeReason.CLOSED, "peer closed during the handshake")
            raise self._error

    def _fail(self, reason: HandshakeReason, detail: str = "", *, send: bool = True) -> NoReturn:
        """Queue an ERROR record for the peer (when *send*) and raise. Never returns."""
        if send:
            self._outbuf += _record(RecordType.ERROR, bytes((WireCode.for_reason(reason),)))
        raise HandshakeError(reason, detail)

    def _fail_with(
        self, exc: BaseException, default: HandshakeReason, *, peer_input: bool = True
    ) -> NoReturn:
        error = _classify(exc, default=default, peer_input=peer_input)
        self._outbuf += _record(RecordType.ERROR, bytes((WireCode.for_reason(error.reason),)))
        raise error from exc

    def _step(self, token: bytes | None, default: HandshakeReason) -> bytes | None:
        assert self._context is not None
        try:
            return self._context.step(token)
        except Exception as exc:  # pyspnego raises many types; classified, never echoed
            self._fail_with(exc, default, peer_input=token is not None)

    # -- data phase ----------------------------------------------------------------------------

    def _seal(self, plaintext: bytes) -> None:
        gss = self._gss
        if gss is not None:  # Kerberos: straight to GSS, no pyspnego layers on the hot path
            wrapped = gssapi.raw.wrap(gss, plaintext, True)
            data, sealed = wrapped.message, wrapped.encrypted
        else:
            assert self._context is not None
            result = self._context.wrap(plaintext, encrypt=True)
            data, sealed = result.data, result.encrypted
        if not sealed:  # never expected: the context was checked for confidentiality
            raise IntegrityError("the security context cannot seal records")
        self._outbuf += len(data).to_bytes(_HEADER_BYTES, "big")
        self._outbuf += data

    def _unseal(self, record: bytes) -> None:
        if self._peer_closed:
            raise IntegrityError("record after the peer's CLOSE record")
        gss = self._gss
        try:
            if gss is not None:
                unwrapped = gssapi.raw.unwrap(gss, record)
                data, sealed = unwrapped.message, unwrapped.encrypted
            else:
                assert self._context is not None
                result = self._context.unwrap(record)
                data, sealed = result.data, result.encrypted
        except Exception as exc:  # bad MIC, duplicate, gap, too late, undecodable
            raise IntegrityError(
                "wrapped record failed its check (tampered, replayed, reordered or missing)"
            ) from exc
        if not sealed:
            raise IntegrityError("wrapped record was not sealed (no confidentiality)")
        if not data:
            raise IntegrityError("wrapped record without a kind byte")
        kind = data[0]
        if kind == DataKind.DATA:
            self._plain += memoryview(data)[1:]
        elif kind == DataKind.CLOSE and len(data) == 1:
            self._peer_closed = True
        else:
            raise IntegrityError("wrapped record of unknown kind")

    # -- helpers for the subclasses ------------------------------------------------------------

    def _kerberos_context(self) -> gssapi.SecurityContext | None:
        inner = self._inner
        return inner._context if isinstance(inner, GSSAPIProxy) else None

    def _established(self, mechanism: str, identity: Identity) -> None:
        self._mechanism = mechanism
        self._identity = identity
        self._gss = self._kerberos_context() if self._protect else None
        self._state = "established"

    _inner: GSSAPIProxy | NTLMProxy | None = None
    _gss: gssapi.SecurityContext | None = None
    _chosen: str | None = None


def _inquire(ctx: gssapi.SecurityContext | None) -> InquireContextResult | None:
    """Target, initiator, mechanism and flags of a Kerberos 5 context in one GSS call; None if
    it is not one."""
    if ctx is None:
        return None
    info = gssapi.raw.inquire_context(ctx, lifetime=False, locally_init=False, complete=False)
    return info if info.mech == gssapi.MechType.kerberos else None


def _display(name: gssapi.raw.Name | None) -> str:
    """The display form of a GSS name, or "" when absent or not UTF-8 (never guessed at)."""
    if name is None:
        return ""
    try:
        return gssapi.raw.display_name(name, name_type=False).name.decode("utf-8")
    except UnicodeDecodeError:
        return ""


def _mechanism_of(oid: str) -> str | None:
    return _MECH_OF_OID.get(oid)


# -- acceptor --------------------------------------------------------------------------------------


class NegotiateServerLayer(_NegotiateLayer):
    """The acceptor side of a ``negotiate`` or ``tls+negotiate`` listener.

    ``service`` is the service principal (``tessera/host.example@REALM``; with no realm the default
    realm) or a bare host name meaning ``tessera/<host>`` in the default realm; required when
    Kerberos is allowed. Only tickets for exactly that principal are accepted, from ``keytab`` (or
    the default keytab, ``KRB5_KTNAME``). NTLM accounts come from the file named by the
    ``NTLM_USER_FILE`` environment variable (process-wide: pyspnego reads nothing else).
    ``channel_bindings`` is :func:`tls_channel_bindings` of the listener's certificate; with
    ``require_channel_binding`` a client that sends none (or all zeros, NTLM) is refused.
    Configuration errors raise :class:`ValueError` naming the field.
    """

    _role = "client"

    def __init__(
        self,
        service: str | None,
        keytab: str | os.PathLike[str] | None = None,
        *,
        mechanisms: frozenset[str] = frozenset({"kerberos"}),
        channel_bindings: bytes | None = None,
        require_channel_binding: bool = False,
        protect_frames: bool = True,
        max_token_bytes: int = MAX_TOKEN_BYTES,
        max_legs: int = MAX_LEGS,
    ) -> None:
        super().__init__(
            protect_frames=protect_frames,
            max_token_bytes=max_token_bytes,
            max_legs=max_legs,
            channel_bindings=channel_bindings,
        )
        mechanisms = frozenset(mechanisms)
        if not mechanisms or not mechanisms <= MECHANISMS:
            raise ValueError(f"mechanisms must be a non-empty subset of {sorted(MECHANISMS)}")
        if require_channel_binding and channel_bindings is None:
            raise ValueError("require_channel_binding needs channel_bindings")
        self._mechanisms = mechanisms
        self._require_binding = require_channel_binding
        self._keytab = os.fspath(keytab) if keytab is not None else None
        self._principal = _service_principal(service) if service is not None else None
        if "kerberos" in mechanisms:
            if self._principal is None:
                raise ValueError("service (the service principal) is required for kerberos")
            if self._keytab is not None and not os.path.isfile(self._keytab):
                raise ValueError(f"keytab: no such file: {self._keytab}")
        if "ntlm" in mechanisms and not _ntlm_user_file():
            raise ValueError(
                "ntlm_user_file: NTLM is enabled but NTLM_USER_FILE does not name a readable file"
            )

    # -- handshake -----------------------------------------------------------------------------

    def _on_token(self, token: bytes) -> None:
        if self._context is None:
            self._first_token(token)
        elif self._chosen == "ntlm":
            self._check_ntlm_authenticate(token)
        out = self._step(token, HandshakeReason.BAD_CREDENTIALS)
        assert self._context is not None
        if self._context.complete:
            mechanism, identity = self._accept()
            self._outbuf += _record(RecordType.DONE, out or b"")
            self._established(mechanism, identity)
        elif out:
            self._outbuf += _record(RecordType.TOKEN, out)
        else:
            self._fail(HandshakeReason.INTERNAL, "acceptor produced no token")

    def _first_token(self, token: bytes) -> None:
        try:
            init = unpack_token(token)
        except Exception:
            init = None
        if not isinstance(init, NegTokenInit):
            self._fail(HandshakeReason.MALFORMED, "first token is not a SPNEGO NegTokenInit")
        if not init.mech_types or not init.mech_token:
            self._fail(HandshakeReason.MALFORMED, "NegTokenInit without mechanism or token")
        # No renegotiation: the initiator's preferred mechanism, which its optimistic token is
        # for, must be allowed here. The completed context is checked again in _accept().
        chosen = _mechanism_of(init.mech_types[0])
        self._chosen = chosen  # known from here on, also for the log line of a refusal
        if chosen is None or chosen not in self._mechanisms:
            self._fail(
                HandshakeReason.MECHANISM_REFUSED,
                f"client offered {chosen or 'an unknown mechanism'} first; "
                f"allowed: {', '.join(sorted(self._mechanisms))}",
            )
        try:
            inner: GSSAPIProxy | NTLMProxy
            if chosen == "kerberos":
                inner = GSSAPIProxy(
                    usage="accept",
                    channel_bindings=self._bindings,
                    context_req=_REQUESTED,
                    _gssapi_credential=self._acceptor_credential(),
                )
            else:
                inner = NTLMProxy(
                    usage="accept", channel_bindings=self._bindings, context_req=_REQUESTED
                )
            inner._is_wrapped = True  # no per-step token logging by the inner context
            self._inner = inner
            self._context = NegotiateProxy(
                usage="accept",
                channel_bindings=self._bindings,
                context_req=_REQUESTED,
                _negotiate_contexts={_GSSMECH[chosen]: inner},
            )
        except HandshakeError:
            raise
        except Exception as exc:
            self._fail_with(exc, HandshakeReason.INTERNAL, peer_input=False)

    def _acceptor_credential(self) -> gssapi.Credentials:
        assert self._principal is not None
        name = gssapi.Name(self._principal, gssapi.NameType.kerberos_principal)
        store: dict[bytes | str, bytes | str] | None = (
            {"keytab": self._keytab} if self._keytab is not None else None
        )
        try:
            return gssapi.Credentials(
                name=name, usage="accept", mechs=[gssapi.MechType.kerberos], store=store
            )
        except gssapi.raw.GSSError as exc:
            # Our keytab lacks the service key: a server configuration problem, not the client's.
            self._outbuf += _record(RecordType.ERROR, bytes((WireCode.INTERNAL,)))
            raise HandshakeError(
                HandshakeReason.INTERNAL, f"acceptor credential: {_gss_detail(exc)}"
            ) from exc

    def _check_ntlm_authenticate(self, token: bytes) -> None:
        """NTLMv2 only; with required bindings, a present non-zero MsvAvChannelBindings (pyspnego
        accepts an all-zero one, which a relayed client would send); the SPN, when sent, must
        name our service. The NTLMv2 response covers these fields, so they cannot be altered."""
        try:
            message = unpack_token(token)
            raw = message.response_token if isinstance(message, NegTokenResp) else None
            if not raw or not raw.startswith(b"NTLMSSP\x00"):
                return  # e.g. a bare mechListMIC round; pyspnego validates it
            if int.from_bytes(raw[8:12], "little") != MessageType.authenticate:
                return
            auth = Authenticate.unpack(raw)
            response = auth.nt_challenge_response or b""
            if len(response) <= 24:
                self._fail(HandshakeReason.MECHANISM_REFUSED, "NTLMv1/LM responses are refused")
            av_pairs = NTClientChallengeV2.unpack(response[16:]).av_pairs
        except HandshakeError:
            raise
        except Exception as exc:
            self._fail_with(exc, HandshakeReason.MALFORMED)
        if self._require_binding:
            binding = av_pairs.get(AvId.channel_bindings)
            if not binding or binding == b"\x00" * 16:
                self._fail(HandshakeReason.CHANNEL_BINDING, "NTLM client sent no channel binding")
        spn = av_pairs.get(AvId.target_name)
        if self._principal is not None and isinstance(spn, str) and spn:
            expected = _split_realm(self._principal)[0]
            if spn.casefold() != expected.casefold():
                self._fail(HandshakeReason.WRONG_SERVICE, f"NTLM target {spn!r} is not ours")

    def _accept(self) -> tuple[str, Identity]:
        """Policy on the completed context: the mechanism, and for Kerberos the target, flags and
        channel binding. Returns the mechanism and the client's identity."""
        assert self._context is not None
        mechanism = self._context.negotiated_protocol
        if mechanism not in self._mechanisms or mechanism != self._chosen:
            self._fail(HandshakeReason.MECHANISM_REFUSED, f"completed with {mechanism}")
        if mechanism == "kerberos":
            return mechanism, Identity("kerberos", normalise_kerberos_name(self._accept_kerberos()))
        if self._protect and (self._context.context_attr & _PROTECTION) != _PROTECTION:
            self._fail(HandshakeReason.MECHANISM_REFUSED, "NTLM without signing and sealing")
        principal = self._context.client_principal
        if not principal:
            self._fail(HandshakeReason.BAD_CREDENTIALS, "no client name")
        return mechanism, Identity("ntlm", normalise_ntlm_name(principal))

    def _accept_kerberos(self) -> str:
        """Checks the completed Kerberos context; returns the client principal."""
        info = _inquire(self._kerberos_context())
        if info is None:
            self._fail(HandshakeReason.MECHANISM_REFUSED, "not a Kerberos 5 context")
        if info.target_name is None or not gssapi.raw.compare_name(
            info.target_name, self._expected_name()
        ):
            self._fail(HandshakeReason.WRONG_SERVICE, f"ticket is for {_display(info.target_name)}")
        flags = int(info.flags or 0)
        if flags & gssapi.RequirementFlag.anonymity:
            self._fail(HandshakeReason.BAD_CREDENTIALS, "anonymous Kerberos is refused")
        if self._require_binding and not flags & gssapi.RequirementFlag.channel_bound:
            self._fail(HandshakeReason.CHANNEL_BINDING, "client sent no channel bindings")
        if self._protect and (flags & _GSS_PROTECTION) != _GSS_PROTECTION:
            self._fail(
                HandshakeReason.MECHANISM_REFUSED,
                "client did not request confidentiality, integrity, replay and sequence checks",
            )
        client = _display(info.initiator_name)
        if not client:
            self._fail(HandshakeReason.BAD_CREDENTIALS, "client name is not valid UTF-8")
        return client

    def _expected_name(self) -> gssapi.raw.Name:
        assert self._principal is not None
        return gssapi.raw.import_name(self._principal.encode(), gssapi.NameType.kerberos_principal)


def _service_principal(service: str) -> str:
    if not service or any(c.isspace() for c in service):
        raise ValueError("service: empty or contains spaces")
    if "/" in service:
        return service
    if "@" in service:
        raise ValueError("service: give 'tessera/host@REALM' or a bare host name")
    return f"tessera/{service}"


def _ntlm_user_file() -> str | None:
    path = os.environ.get("NTLM_USER_FILE")
    return path if path and os.path.isfile(path) and os.access(path, os.R_OK) else None


# -- initiator -------------------------------------------------------------------------------------


class NegotiateClientLayer(_NegotiateLayer):
    """The initiator side. Authenticates with ``credential`` to ``service/hostname`` (a host-based
    service name; with ``dns_canonicalize_hostname = false`` exactly ``tessera/<hostname>``).

    Only the credential's mechanism is offered, so a Kerberos failure never falls back to NTLM.
    ``channel_bindings`` is :func:`tls_channel_bindings` of the server certificate the TLS layer
    received. ``peer_identity`` is the server's Kerberos principal (mutual authentication), or
    :data:`auth.identity.ANONYMOUS` with NTLM, which does not authenticate the server.
    """

    _role = "server"

    def __init__(
        self,
        hostname: str,
        service: str = "tessera",
        *,
        credential: Kerberos | NTLM | None = None,
        channel_bindings: bytes | None = None,
        protect_frames: bool = True,
        max_token_bytes: int = MAX_TOKEN_BYTES,
        max_legs: int = MAX_LEGS,
    ) -> None:
        super().__init__(
            protect_frames=protect_frames,
            max_token_bytes=max_token_bytes,
            max_legs=max_legs,
            channel_bindings=channel_bindings,
        )
        if not hostname or not service:
            raise ValueError("hostname and service are required")
        self._hostname = hostname
        self._service = service
        self._credential = credential if credential is not None else Kerberos()
        self._offer = "ntlm" if isinstance(self._credential, NTLM) else "kerberos"
        self._chosen = self._offer
        if self._offer == "ntlm" and int(os.environ.get("LM_COMPAT_LEVEL", "3")) < 3:
            raise ValueError("LM_COMPAT_LEVEL below 3 would allow NTLMv1: refusing")
        self._started = False

    def start(self) -> None:
        """Get the credential (may ask the KDC: blocking) and queue the first token."""
        if self._started:
            raise RuntimeError("start() called twice")
        self._started = True
        try:
            try:
                inner = self._build_inner()
                inner._is_wrapped = True
                self._inner = inner
                self._context = NegotiateProxy(
                    usage="initiate",
                    hostname=self._hostname,
                    service=self._service,
                    channel_bindings=self._bindings,
                    context_req=_REQUESTED,
                    _negotiate_contexts={_GSSMECH[self._offer]: inner},
                )
            except HandshakeError:
                raise
            except Exception as exc:
                self._fail_with(exc, HandshakeReason.NO_CREDENTIALS, peer_input=False)
            out = self._step(None, HandshakeReason.NO_CREDENTIALS)
            if not out:
                self._fail(HandshakeReason.INTERNAL, "initiator produced no token")
            self._outbuf += _record(RecordType.TOKEN, out)
        except AuthError as exc:
            self._state = "failed"
            self._error = exc
            raise

    def _build_inner(self) -> GSSAPIProxy | NTLMProxy:
        credential = self._credential
        if isinstance(credential, NTLM):
            user = credential.username
            if credential.domain:
                user = f"{credential.domain}\\{user}"
            return NTLMProxy(
                username=Password(username=user, password=credential.password),
                hostname=self._hostname,
                service=self._service,
                channel_bindings=self._bindings,
                context_req=_REQUESTED,
                usage="initiate",
            )
        return GSSAPIProxy(
            hostname=self._hostname,
            service=self._service,
            channel_bindings=self._bindings,
            context_req=_REQUESTED,
            usage="initiate",
            _gssapi_credential=_kerberos_credential(credential),
        )

    def _on_token(self, token: bytes) -> None:
        if not self._started:
            self._fail(HandshakeReason.MALFORMED, "token before start()")
        out = self._step(token, HandshakeReason.BAD_CREDENTIALS)
        if out:
            self._outbuf += _record(RecordType.TOKEN, out)

    def _on_done(self, token: bytes) -> None:
        if not self._started:
            self._fail(HandshakeReason.MALFORMED, "DONE before start()")
        assert self._context is not None
        if token and self._step(token, HandshakeReason.BAD_CREDENTIALS):
            self._fail(HandshakeReason.MALFORMED, "server finished before the client")
        if not self._context.complete:
            self._fail(HandshakeReason.MALFORMED, "server finished before the client")
        mechanism = self._context.negotiated_protocol
        if mechanism != self._offer:
            self._fail(HandshakeReason.MECHANISM_REFUSED, f"completed with {mechanism}")
        assert mechanism is not None
        if mechanism == "kerberos":
            info = _inquire(self._kerberos_context())
            if info is None:
                self._fail(HandshakeReason.MECHANISM_REFUSED, "not a Kerberos 5 context")
            flags = int(info.flags or 0)
            if not flags & gssapi.RequirementFlag.mutual_authentication:
                self._fail(HandshakeReason.BAD_CREDENTIALS, "server did not authenticate")
            if self._protect and (flags & _GSS_PROTECTION) != _GSS_PROTECTION:
                self._fail(HandshakeReason.MECHANISM_REFUSED, "context lacks record protection")
            identity = Identity("kerberos", normalise_kerberos_name(_display(info.target_name)))
        else:
            if self._protect and (self._context.context_attr & _PROTECTION) != _PROTECTION:
                self._fail(HandshakeReason.MECHANISM_REFUSED, "NTLM without signing and sealing")
            identity = ANONYMOUS
        self._established(mechanism, identity)


def _kerberos_credential(credential: Kerberos) -> gssapi.Credentials | None:
    """The initiator credential, or None for GSS's default choice (cache, then client keytab)."""
    mech = gssapi.MechType.kerberos
    name = (
        gssapi.Name(credential.principal, gssapi.NameType.kerberos_principal)
        if credential.principal
        else None
    )
    if credential.password is not None:
        assert name is not None
        result = gssapi.raw.acquire_cred_with_password(
            name, credential.password.encode("utf-8"), usage="initiate", mechs=[mech]
        )
        return gssapi.Credentials(base=result.creds)
    if credential.keytab is not None:
        # MIT gets a ticket from the client keytab into a memory cache on first use and again
        # when it expires. One cache per (principal, keytab) in the process: connections share
        # tickets, and reconnecting does not leak a new cache each time.
        keytab = os.fspath(credential.keytab)
        key = hashlib.sha256(f"{credential.principal}\0{keytab}".encode()).hexdigest()[:32]
        store: dict[bytes | str, bytes | str] = {
            "client_keytab": keytab,
            "ccache": f"MEMORY:tessera-{key}",
        }
        return gssapi.Credentials(name=name, usage="initiate", mechs=[mech], store=store)
    if credential.ccache is not None:
        return gssapi.Credentials(
            name=name, usage="initiate", mechs=[mech], store={"ccache": credential.ccache}
        )
    if name is not None:
        return gssapi.Credentials(name=name, usage="initiate", mechs=[mech])
    return None
