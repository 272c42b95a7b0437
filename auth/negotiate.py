"""SPNEGO security layers (Kerberos, and NTLM when enabled), sans-I/O, on public library APIs.

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

Libraries (public interfaces only, no process-wide patches; see docs/kerberos.md):

* Kerberos runs on python-gssapi's low-level API with the Kerberos 5 mechanism itself:
  ``init_sec_context``/``accept_sec_context`` (which raise their error at once, keeping MIT's
  minor status for the reason code), ``wrap``/``unwrap`` for records. The SPNEGO envelope around
  a Kerberos token (one mechanism, never renegotiated) is this module's own: the bounded DER
  reader below and a few lines of DER writing. System SPNEGO was tried and not used: MIT's
  SPNEGO mechanism remaps the Kerberos minor status (``Preauthentication failed`` arrives as an
  opaque mechglue number), so the documented failure reasons could not be told apart.
* NTLM runs on pyspnego's public ``spnego.client``/``spnego.server`` with its SPNEGO
  (``protocol="negotiate"``); the client credential is an :class:`spnego.NTLMHash`, which no
  other mechanism can use, so an NTLM client never tries Kerberos.

Before any library sees a token, the acceptor runs a cheap structural pre-parse of the first one
(:func:`parse_neg_token_init`): at most :data:`MAX_MECH_TYPES` mechanism OIDs are read, the first
must be allowed, and the optimistic token must belong to it. A hostile token therefore costs
microseconds, not a full ASN.1 decode of thousands of OIDs.

Policy is enforced by the acceptor on the *completed* context, not on what was offered: the
mechanism (Kerberos unless the listener enables NTLM), the target service principal (a ticket
for another principal in the same keytab is refused), the channel binding when required (MIT
accepts a client that sent no bindings unless the GSS ``channel_bound`` flag is checked, which we
do; for NTLM an all-zero binding is refused too), the protection flags when frames are wrapped,
the ticket's end time against ``max_clock_skew``, NTLMv2 only, and for NTLM without channel
bindings an NTLM target name that names this service.

Threading: ``blocking_handshake`` is true. Until ``established`` the driver calls ``start`` and
``receive_data`` from one worker thread at a time (a Kerberos initiator may talk to the KDC, an
acceptor reads its keytab); afterwards wrap/unwrap are cheap and run on the event loop. A layer
must never be used from two threads at once.

Secrets: no token, key or password goes into an exception message or a log record. pyspnego logs
every SPNEGO token at DEBUG level; importing this module installs a filter that drops those
records.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import struct
import threading
import time
import unicodedata
from collections.abc import Callable
from typing import Final, Literal, NamedTuple, NoReturn

from tessera_mq.auth.credentials import NTLM, Kerberos
from tessera_mq.auth.errors import AuthError, HandshakeError, HandshakeReason, IntegrityError
from tessera_mq.auth.identity import ANONYMOUS, Identity

try:
    import gssapi
    import gssapi.raw
    import spnego
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from gssapi.raw.named_tuples import InquireContextResult
    from spnego.channel_bindings import GssChannelBindings
    from spnego.exceptions import BadBindingsError, BadMechanismError, SpnegoError
except ImportError as _exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "tessera_mq.auth.negotiate needs python-gssapi and pyspnego: "
        "install 'tessera-mq[negotiate]'; "
        f"building gssapi needs the libkrb5-dev package. Import failed: {_exc}"
    ) from _exc

for _needed in ("acquire_cred_from", "acquire_cred_with_password", "export_sec_context"):
    if not hasattr(gssapi.raw, _needed):  # pragma: no cover - depends on the GSS library
        raise ImportError(f"the system GSSAPI library lacks {_needed} (use MIT krb5 >= 1.12)")

_KRB5_MECH: Final = gssapi.MechType.kerberos
if _KRB5_MECH not in gssapi.raw.indicate_mechs():  # pragma: no cover
    raise ImportError("the system GSSAPI library has no Kerberos 5 mechanism (install libkrb5)")

__all__ = [
    "DEFAULT_MAX_CLOCK_SKEW_SECONDS",
    "MAX_LEGS",
    "MAX_MECH_TYPES",
    "MAX_RECORD_PLAINTEXT_BYTES",
    "MAX_TOKEN_BYTES",
    "MAX_WRAPPED_RECORD_BYTES",
    "MECHANISMS",
    "NTLM",
    "DataKind",
    "Kerberos",
    "NegTokenInitSummary",
    "NegotiateClientLayer",
    "NegotiateServerLayer",
    "RecordType",
    "WireCode",
    "normalise_kerberos_name",
    "normalise_ntlm_name",
    "parse_neg_token_init",
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

MAX_MECH_TYPES: Final = 8
"""Most mechanism OIDs a first token may offer. Real initiators send one to three (MIT: krb5;
Windows: MS-krb5, krb5, NTLM, sometimes NegoEx); more is refused before any further parsing."""

DEFAULT_MAX_CLOCK_SKEW_SECONDS: Final = 60.0
"""How long after its end time a Kerberos ticket is still accepted (seconds). MIT and Active
Directory tolerate 300 s of clock skew and accept expired tickets for that long; with NTP-synced
hosts a minute is plenty and cuts the grace an expired (e.g. revoked user's) ticket gets by 5x."""

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


# -- mechanism OIDs --------------------------------------------------------------------------------


def _oid_der(dotted: str) -> bytes:
    """The DER content octets of an OBJECT IDENTIFIER (X.690 8.19)."""
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray((arcs[0] * 40 + arcs[1],))
    for arc in arcs[2:]:
        rest = arc >> 7
        chunk = [arc & 0x7F]
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


_SPNEGO_OID: Final = _oid_der("1.3.6.1.5.5.2")
_KRB5_OID: Final = _oid_der("1.2.840.113554.1.2.2")
_NTLM_OID: Final = _oid_der("1.3.6.1.4.1.311.2.2.10")
# The SPNEGO mechTypes that mean each mechanism: Kerberos also under Microsoft's OID (Windows
# lists it first) and the pre-RFC one, as MIT does.
_MECH_OF_OID: Final[dict[bytes, str]] = {
    _KRB5_OID: "kerberos",
    _oid_der("1.2.840.48018.1.2.2"): "kerberos",
    _oid_der("1.3.5.1.5.2"): "kerberos",
    _NTLM_OID: "ntlm",
}
_NTLMSSP: Final = b"NTLMSSP\x00"

# Context flags requested by the initiator and, when frames are wrapped, required by both sides.
_GSS_REQUESTED: Final = (
    gssapi.RequirementFlag.mutual_authentication
    | gssapi.RequirementFlag.replay_detection
    | gssapi.RequirementFlag.out_of_sequence_detection
    | gssapi.RequirementFlag.confidentiality
    | gssapi.RequirementFlag.integrity
)
_GSS_PROTECTION: Final = int(
    gssapi.RequirementFlag.replay_detection
    | gssapi.RequirementFlag.out_of_sequence_detection
    | gssapi.RequirementFlag.confidentiality
    | gssapi.RequirementFlag.integrity
)
_NTLM_REQUESTED: Final = (
    spnego.ContextReq.mutual_auth
    | spnego.ContextReq.replay_detect
    | spnego.ContextReq.sequence_detect
    | spnego.ContextReq.confidentiality
    | spnego.ContextReq.integrity
)
_NTLM_PROTECTION: Final = (
    spnego.ContextReq.replay_detect
    | spnego.ContextReq.sequence_detect
    | spnego.ContextReq.confidentiality
    | spnego.ContextReq.integrity
)

# -- keep tokens out of logs ---------------------------------------------------------------------

_TOKEN_LOG_PREFIXES: Final = ("SPNEGO step", "GSSAPI step", "NTLM step")


class _DropTokenRecords(logging.Filter):
    """Drops pyspnego's DEBUG records that carry a whole base64 token."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(_TOKEN_LOG_PREFIXES))


def _filter_spnego_loggers() -> None:
    # A logger's filters only see records logged on it, so every logger of the pyspnego package
    # gets one (they all exist once ``spnego`` is imported); found by name, not by module.
    names = [n for n in logging.root.manager.loggerDict if n == "spnego" or n.startswith("spnego.")]
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTokenRecords) for f in logger.filters):
            logger.addFilter(_DropTokenRecords())


_filter_spnego_loggers()

# -- the first token: a cheap structural pre-parse -------------------------------------------------


class NegTokenInitSummary(NamedTuple):
    """What :func:`parse_neg_token_init` reads from a first SPNEGO token."""

    mech_types: tuple[bytes, ...]
    """The offered mechanism OIDs (DER content octets), at most :data:`MAX_MECH_TYPES`."""
    mech_token: bytes
    """The optimistic token for the first mechanism (``b""`` when absent)."""
    mech_list: bytes
    """The DER encoding of the ``mechTypes`` SEQUENCE (what a ``mechListMIC`` covers)."""
    mech_list_mic: bytes
    """The initiator's ``mechListMIC`` (``b""`` when absent; MIT and Windows send none)."""


class _Malformed(ValueError):
    pass


def _tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """One DER tag-length-value at *pos*: (tag, start of value, end of value). Single-byte tags,
    definite lengths of at most 4 octets, the value inside ``[pos, end)``."""
    if end - pos < 2:
        raise _Malformed("truncated")
    tag, first = buf[pos], buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or end - pos < count:
            raise _Malformed("bad length")
        length = int.from_bytes(buf[pos : pos + count], "big")
        pos += count
    if length > end - pos:
        raise _Malformed("length past the end")
    return tag, pos, pos + length


def parse_neg_token_init(
    token: bytes, *, max_mech_types: int = MAX_MECH_TYPES
) -> NegTokenInitSummary:
    """Read the mechanism list and optimistic token of an RFC 4178 ``InitialContextToken``
    holding a ``NegTokenInit``, with bounded work: it stops at the first structural error and
    after *max_mech_types* OIDs. Raises :class:`ValueError` (never anything else)."""
    try:
        return _parse_init(token, max_mech_types)
    except _Malformed as exc:
        raise ValueError(f"first token is not a SPNEGO NegTokenInit ({exc})") from None


def _parse_init(token: bytes, max_mech_types: int) -> NegTokenInitSummary:
    end = len(token)
    tag, pos, stop = _tlv(token, 0, end)
    if tag != 0x60 or stop != end:
        raise _Malformed("not an InitialContextToken")
    tag, oid_start, pos = _tlv(token, pos, end)
    if tag != 0x06 or token[oid_start:pos] != _SPNEGO_OID:
        raise _Malformed("not SPNEGO")
    tag, pos, stop = _tlv(token, pos, end)
    if tag != 0xA0 or stop != end:
        raise _Malformed("not a NegTokenInit")
    tag, pos, end = _tlv(token, pos, end)
    if tag != 0x30:
        raise _Malformed("NegTokenInit is not a SEQUENCE")
    mech_types: list[bytes] | None = None
    mech_token = mech_list = mech_list_mic = b""
    last = -1
    while pos < end:
        tag, start, stop = _tlv(token, pos, end)
        pos = stop
        if tag <= last or not 0xA0 <= tag <= 0xA4:
            raise _Malformed("unexpected NegTokenInit field")
        last = tag
        if tag == 0xA0:  # mechTypes: SEQUENCE OF OBJECT IDENTIFIER
            inner, at, seq_end = _tlv(token, start, stop)
            if inner != 0x30 or seq_end != stop:
                raise _Malformed("mechTypes is not a SEQUENCE")
            mech_list = token[start:stop]
            mech_types = []
            while at < seq_end:
                if len(mech_types) == max_mech_types:
                    raise ValueError(f"more than {max_mech_types} mechanisms offered")
                oid_tag, oid_at, at = _tlv(token, at, seq_end)
                if oid_tag != 0x06:
                    raise _Malformed("mechTypes entry is not an OID")
                mech_types.append(token[oid_at:at])
        elif tag == 0xA2:  # mechToken: OCTET STRING
            inner, at, octets_end = _tlv(token, start, stop)
            if inner != 0x04 or octets_end != stop:
                raise _Malformed("mechToken is not an OCTET STRING")
            mech_token = token[at:octets_end]
        elif tag == 0xA3:  # mechListMIC (RFC 4178); Microsoft's NegTokenInit2 has negHints
            inner, at, octets_end = _tlv(token, start, stop)
            if inner == 0x04 and octets_end == stop:
                mech_list_mic = token[at:octets_end]
        # [1] reqFlags, [4] mechListMIC of NegTokenInit2: not needed here
    if not mech_types:
        raise _Malformed("no mechTypes")
    return NegTokenInitSummary(tuple(mech_types), mech_token, mech_list, mech_list_mic)


class _NegTokenResp(NamedTuple):
    neg_state: int | None
    supported_mech: bytes | None
    response_token: bytes
    mech_list_mic: bytes


_ACCEPT_COMPLETED: Final = 0  # RFC 4178 negState


def _parse_neg_token_resp(token: bytes) -> _NegTokenResp:
    """A SPNEGO ``NegTokenResp``; raises :class:`ValueError` when *token* is not one."""
    end = len(token)
    tag, pos, stop = _tlv(token, 0, end)
    if tag != 0xA1 or stop != end:
        raise ValueError("not a NegTokenResp")
    tag, pos, end = _tlv(token, pos, end)
    if tag != 0x30:
        raise ValueError("NegTokenResp is not a SEQUENCE")
    state: int | None = None
    mech: bytes | None = None
    octets: dict[int, bytes] = {}
    last = -1
    while pos < end:
        tag, start, pos = _tlv(token, pos, end)
        if tag <= last or not 0xA0 <= tag <= 0xA3:
            raise ValueError("unexpected NegTokenResp field")
        last = tag
        inner, at, value_end = _tlv(token, start, pos)
        if value_end != pos:
            raise ValueError("trailing bytes in a NegTokenResp field")
        value = token[at:value_end]
        if tag == 0xA0:
            if inner != 0x0A or len(value) != 1:
                raise ValueError("negState is not a one-byte ENUMERATED")
            state = value[0]
        elif tag == 0xA1:
            if inner != 0x06:
                raise ValueError("supportedMech is not an OID")
            mech = value
        elif inner != 0x04:
            raise ValueError("responseToken/mechListMIC is not an OCTET STRING")
        else:
            octets[tag] = value
    return _NegTokenResp(state, mech, octets.get(0xA2, b""), octets.get(0xA3, b""))


def _der(tag: int, value: bytes) -> bytes:
    """One DER TLV (definite length)."""
    n = len(value)
    if n < 0x80:
        return bytes((tag, n)) + value
    size = (n.bit_length() + 7) // 8
    return bytes((tag, 0x80 | size)) + n.to_bytes(size, "big") + value


_KRB5_MECH_LIST: Final = _der(0x30, _der(0x06, _KRB5_OID))


def _kerberos_neg_token_init(mech_token: bytes) -> bytes:
    """The initiator's first token: a NegTokenInit offering Kerberos 5 alone (RFC 4178 4.2.1)."""
    init = _der(0x30, _der(0xA0, _KRB5_MECH_LIST) + _der(0xA2, _der(0x04, mech_token)))
    return _der(0x60, _der(0x06, _SPNEGO_OID) + _der(0xA0, init))


def _kerberos_neg_token_resp(supported_mech: bytes, response: bytes, mic: bytes = b"") -> bytes:
    """The acceptor's last token: accept-completed, the mechanism, the AP-REP (RFC 4178 4.2.2)."""
    body = _der(0xA0, _der(0x0A, bytes((_ACCEPT_COMPLETED,))))
    body += _der(0xA1, _der(0x06, supported_mech))
    if response:
        body += _der(0xA2, _der(0x04, response))
    if mic:
        body += _der(0xA3, _der(0x04, mic))
    return _der(0xA1, _der(0x30, body))


def _is_kerberos_token(token: bytes) -> bool:
    """An RFC 2743 InitialContextToken whose thisMech is Kerberos 5 (any of its OIDs)."""
    try:
        tag, pos, stop = _tlv(token, 0, len(token))
        if tag != 0x60 or stop != len(token):
            return False
        tag, start, pos = _tlv(token, pos, stop)
    except _Malformed:
        return False
    return tag == 0x06 and _MECH_OF_OID.get(token[start:pos]) == "kerberos"


# -- NTLM helpers ----------------------------------------------------------------------------------

# MS-NLMP 2.2.1.3 (AUTHENTICATE_MESSAGE) and 2.2.2.1 (AV_PAIR)
_NTLM_AUTHENTICATE: Final = 3
_NTLM_NEGOTIATE: Final = 1
_AV_EOL: Final = 0
_AV_TARGET_NAME: Final = 9
_AV_CHANNEL_BINDINGS: Final = 10
_NTLMV2_CHALLENGE_OFFSET: Final = (
    16 + 28
)  # NTProofStr, then the fixed part of NTLMv2_CLIENT_CHALLENGE


class _NtlmAuthenticate(NamedTuple):
    ntlmv2: bool
    target_name: str | None
    channel_bindings: bytes | None


def _ntlm_message_type(token: bytes) -> int | None:
    if len(token) < 12 or not token.startswith(_NTLMSSP):
        return None
    return int.from_bytes(token[8:12], "little")


def _parse_ntlm_authenticate(raw: bytes) -> _NtlmAuthenticate:
    """The fields of an NTLM AUTHENTICATE message the acceptor's policy needs. Raises
    :class:`ValueError` (or :class:`struct.error`) on a malformed message."""
    nt_len, _, nt_offset = struct.unpack_from("<HHI", raw, 20)
    if nt_offset + nt_len > len(raw):
        raise ValueError("NtChallengeResponse past the end of the message")
    response = raw[nt_offset : nt_offset + nt_len]
    if len(response) <= 24:  # NTLMv1 is exactly 24 bytes; LM-only responses have no NT part
        return _NtlmAuthenticate(False, None, None)
    pos = _NTLMV2_CHALLENGE_OFFSET
    if len(response) < pos:
        raise ValueError("truncated NTLMv2 response")
    target: str | None = None
    binding: bytes | None = None
    while True:
        av_id, av_len = struct.unpack_from("<HH", response, pos)
        pos += 4
        value = response[pos : pos + av_len]
        if len(value) != av_len:
            raise ValueError("truncated AV_PAIR")
        pos += av_len
        if av_id == _AV_EOL:
            break
        if av_id == _AV_TARGET_NAME:
            target = value.decode("utf-16-le")
        elif av_id == _AV_CHANNEL_BINDINGS:
            binding = value
    return _NtlmAuthenticate(True, target, binding)


def _md4(data: bytes) -> bytes:
    """MD4 (RFC 1320), for the NT hash of an NTLM password; OpenSSL 3 no longer offers it."""
    mask = 0xFFFFFFFF

    def rotl(x: int, n: int) -> int:
        return ((x << n) | (x >> (32 - n))) & mask

    message = data + b"\x80" + b"\x00" * ((55 - len(data)) % 64) + struct.pack("<Q", len(data) * 8)
    h = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476]
    for offset in range(0, len(message), 64):
        x = struct.unpack_from("<16I", message, offset)
        a, b, c, d = h
        for i in range(16):  # round 1: F(b, c, d) = (b & c) | (~b & d)
            k, s = i, (3, 7, 11, 19)[i % 4]
            a = rotl((a + ((b & c) | (~b & d)) + x[k]) & mask, s)
            a, b, c, d = d, a, b, c
        for i in range(16):  # round 2: G = majority
            k, s = (i % 4) * 4 + i // 4, (3, 5, 9, 13)[i % 4]
            a = rotl((a + ((b & c) | (b & d) | (c & d)) + x[k] + 0x5A827999) & mask, s)
            a, b, c, d = d, a, b, c
        for i in range(16):  # round 3: H = parity
            k = (0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15)[i]
            s = (3, 9, 11, 15)[i % 4]
            a = rotl((a + (b ^ c ^ d) + x[k] + 0x6ED9EBA1) & mask, s)
            a, b, c, d = d, a, b, c
        h = [(v + w) & mask for v, w in zip(h, (a, b, c, d), strict=True)]
    return struct.pack("<4I", *h)


# pyspnego's NTLM acceptor reads its accounts only from the NTLM_USER_FILE environment variable:
# its public API has no per-context option. The variable is set here, in one place, only when a
# listener enables NTLM, and never over a different value an embedding application set.
_NTLM_USER_FILE_ENV: Final = "NTLM_USER_FILE"
_ntlm_env_lock = threading.Lock()


def _use_ntlm_user_file(path: str | os.PathLike[str] | None) -> str:
    """The account file NTLM is verified against; binds NTLM_USER_FILE to *path* if unset."""
    with _ntlm_env_lock:
        current = os.environ.get(_NTLM_USER_FILE_ENV)
        if path is None:
            chosen = current
        else:
            chosen = os.fspath(path)
            if current and os.path.realpath(current) != os.path.realpath(chosen):
                raise ValueError(
                    f"ntlm_user_file: this process already verifies NTLM against {current} "
                    "(NTLM_USER_FILE); pyspnego reads one process-wide file, so every NTLM "
                    "listener must name that file"
                )
            if not current:
                os.environ[_NTLM_USER_FILE_ENV] = chosen
    if not chosen or not os.path.isfile(chosen) or not os.access(chosen, os.R_OK):
        raise ValueError("ntlm_user_file: NTLM is enabled but no readable account file is named")
    return chosen


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
        return HandshakeError(default, "the NTLM exchange failed")
    if not peer_input:
        return HandshakeError(default, "the security context could not be set up")
    # struct.error, ValueError, IndexError... from decoding a peer's token.
    return HandshakeError(HandshakeReason.MALFORMED, "undecodable token")


# -- the common record machinery -------------------------------------------------------------------

_State = Literal["handshake", "established", "failed"]


def _record(kind: RecordType, body: bytes = b"") -> bytes:
    return (len(body) + 1).to_bytes(_HEADER_BYTES, "big") + bytes((kind,)) + body


def _gss_bindings(application_data: bytes | None) -> gssapi.raw.ChannelBindings | None:
    # Address types "unspecified" (0) and no addresses, as RFC 5929 channel bindings are sent by
    # Windows, Java and pyspnego: the Kerberos checksum covers the whole structure.
    if application_data is None:
        return None
    return gssapi.raw.ChannelBindings(
        initiator_address_type=0, acceptor_address_type=0, application_data=application_data
    )


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
        self._binding_data = channel_bindings
        self._gss_bindings = _gss_bindings(channel_bindings)
        self._state: _State = "handshake"
        self._error: AuthError | None = None
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._plain = bytearray()
        self._legs = 0
        # Kerberos: the GSS (SPNEGO) context; NTLM: pyspnego's SPNEGO context.
        self._gss_context: gssapi.raw.SecurityContext | None = None
        self._ntlm: spnego.ContextProxy | None = None
        self._complete = False
        self._identity: Identity | None = None
        self._mechanism: str | None = None
        self._chosen: str | None = None
        self._peer_closed = False
        self._close_sent = False

    def _ntlm_bindings(self) -> GssChannelBindings | None:
        if self._binding_data is None:
            return None
        return GssChannelBindings(application_data=self._binding_data)

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

    def _step_ntlm(self, token: bytes | None, default: HandshakeReason) -> bytes | None:
        """One step of the NTLM (pyspnego SPNEGO) context; sets ``_complete``."""
        assert self._ntlm is not None
        try:
            out = self._ntlm.step(token)
        except Exception as exc:  # pyspnego raises many types; classified, never echoed
            self._fail_with(exc, default, peer_input=token is not None)
        self._complete = self._ntlm.complete
        return out

    # -- data phase ----------------------------------------------------------------------------

    def _seal(self, plaintext: bytes) -> None:
        gss = self._gss
        if gss is not None:  # Kerberos: straight to GSS
            wrapped = gssapi.raw.wrap(gss, plaintext, True)  # type: ignore[arg-type]  # stub
            data, sealed = wrapped.message, wrapped.encrypted
        else:
            assert self._ntlm is not None
            result = self._ntlm.wrap(plaintext, encrypt=True)
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
                unwrapped = gssapi.raw.unwrap(gss, record)  # type: ignore[arg-type]  # stub
                data, sealed = unwrapped.message, unwrapped.encrypted
            else:
                assert self._ntlm is not None
                result = self._ntlm.unwrap(record)
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

    def _established(self, mechanism: str, identity: Identity) -> None:
        self._mechanism = mechanism
        self._identity = identity
        self._gss = self._gss_context if mechanism == "kerberos" and self._protect else None
        self._state = "established"

    _gss: gssapi.raw.SecurityContext | None = None


def _inquire(ctx: gssapi.raw.SecurityContext | None) -> InquireContextResult | None:
    """Target, initiator, mechanism and flags of a Kerberos 5 context in one GSS call (through
    SPNEGO, GSS reports the negotiated mechanism); None if it is not one."""
    if ctx is None:
        return None
    info = gssapi.raw.inquire_context(ctx, lifetime=False, locally_init=False, complete=False)
    return info if info.mech == _KRB5_MECH else None


def _display(name: gssapi.raw.Name | None) -> str:
    """The display form of a GSS name, or "" when absent or not UTF-8 (never guessed at)."""
    if name is None:
        return ""
    try:
        return gssapi.raw.display_name(name, name_type=False).name.decode("utf-8")
    except UnicodeDecodeError:
        return ""


def _ticket_end_time(ctx: gssapi.raw.SecurityContext) -> tuple[gssapi.raw.SecurityContext, float]:
    """The end time (UNIX seconds) of the ticket a completed Kerberos acceptor context was built
    from, and the context to use from now on.

    GSS reports only a lifetime that MIT computes against ``now - clockskew``, so the exact end
    time comes from the RFC 4121 lucid context (``gss_krb5_export_lucid_sec_context``). That call
    consumes the context it is given, so it gets a copy: the context is exported once and
    imported twice, one copy for the lucid export and one for the data phase."""
    token = gssapi.raw.export_sec_context(ctx)  # invalidates ctx
    kept = gssapi.raw.import_sec_context(token)
    copy = gssapi.raw.import_sec_context(token)
    lucid = gssapi.raw.krb5_export_lucid_sec_context(copy, 1)
    if not isinstance(lucid, gssapi.raw.Krb5LucidContextV1) or lucid.endtime is None:
        raise HandshakeError(HandshakeReason.INTERNAL, "no version 1 lucid Kerberos context")
    return kept, float(lucid.endtime)


# -- acceptor --------------------------------------------------------------------------------------


class NegotiateServerLayer(_NegotiateLayer):
    """The acceptor side of a ``negotiate`` or ``tls+negotiate`` listener.

    ``service`` is the service principal (``tessera/host.example@REALM``; with no realm the default
    realm) or a bare host name meaning ``tessera/<host>`` in the default realm; required when
    Kerberos is allowed, and when NTLM is allowed without channel bindings (the NTLM target name
    must name it). Only tickets for exactly that principal are accepted, from ``keytab`` (or the
    default keytab, ``KRB5_KTNAME``), and only until ``max_clock_skew`` seconds after their end
    time. NTLM accounts come from ``ntlm_user_file`` (see :func:`_use_ntlm_user_file`: pyspnego
    reads them through the process-wide ``NTLM_USER_FILE``, which must then name the same file;
    without ``ntlm_user_file`` that variable is used). ``channel_bindings`` is
    :func:`tls_channel_bindings` of the listener's certificate; with ``require_channel_binding``
    a client that sends none (or all zeros, NTLM) is refused. ``clock`` returns UNIX time (for
    the ticket end-time check and :attr:`credential_expires_at`). Configuration errors raise
    :class:`ValueError` naming the field.
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
        max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW_SECONDS,
        ntlm_user_file: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] = time.time,
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
        if not 0 <= max_clock_skew <= 86_400:
            raise ValueError("max_clock_skew: must be between 0 and 86400 seconds")
        self._mechanisms = mechanisms
        self._require_binding = require_channel_binding
        self._keytab = os.fspath(keytab) if keytab is not None else None
        self._principal = _service_principal(service) if service is not None else None
        self._max_clock_skew = float(max_clock_skew)
        self._clock = clock
        self._expires_at: float | None = None
        if "kerberos" in mechanisms:
            if self._principal is None:
                raise ValueError("service (the service principal) is required for kerberos")
            if self._keytab is not None and not os.path.isfile(self._keytab):
                raise ValueError(f"keytab: no such file: {self._keytab}")
        if "ntlm" in mechanisms:
            if self._principal is None and not require_channel_binding:
                raise ValueError(
                    "service: NTLM without channel bindings needs the service principal "
                    "(the NTLM target name is checked against it)"
                )
            _use_ntlm_user_file(ntlm_user_file)

    @property
    def credential_expires_at(self) -> float | None:
        """When the client's credential ends (UNIX time): the Kerberos ticket's end time, once
        established; ``None`` before that and for NTLM, whose logons do not expire."""
        return self._expires_at if self.established else None

    # -- handshake -----------------------------------------------------------------------------

    def _on_token(self, token: bytes) -> None:
        if self._chosen is None:
            init = self._first_token(token)
            if self._chosen == "kerberos":
                self._on_kerberos_token(init)
                return
        elif self._chosen == "kerberos":  # one round trip: nothing follows the first token
            self._fail(HandshakeReason.MALFORMED, "a second token in a Kerberos exchange")
        else:
            self._check_ntlm_authenticate(token)
        out = self._step_ntlm(token, HandshakeReason.BAD_CREDENTIALS)
        if self._complete:
            mechanism, identity = self._accept()
            self._outbuf += _record(RecordType.DONE, out or b"")
            self._established(mechanism, identity)
        elif out:
            self._outbuf += _record(RecordType.TOKEN, out)
        else:
            self._fail(HandshakeReason.INTERNAL, "acceptor produced no token")

    def _first_token(self, token: bytes) -> NegTokenInitSummary:
        """Bounded checks before any library parses the token: a NegTokenInit with at most
        MAX_MECH_TYPES mechanisms whose first one is allowed and whose optimistic token is for it.
        No renegotiation: the completed context is checked again in _accept()."""
        try:
            init = parse_neg_token_init(token)
        except ValueError as exc:
            self._fail(HandshakeReason.MALFORMED, str(exc))
        if not init.mech_token:
            self._fail(HandshakeReason.MALFORMED, "NegTokenInit without an optimistic token")
        chosen = _MECH_OF_OID.get(init.mech_types[0])
        self._chosen = chosen  # known from here on, also for the log line of a refusal
        if chosen is None or chosen not in self._mechanisms:
            self._fail(
                HandshakeReason.MECHANISM_REFUSED,
                f"client offered {chosen or 'an unknown mechanism'} first; "
                f"allowed: {', '.join(sorted(self._mechanisms))}",
            )
        if chosen == "kerberos":
            if not _is_kerberos_token(init.mech_token):
                self._fail(HandshakeReason.MECHANISM_REFUSED, "optimistic token is not Kerberos")
            return init
        if _ntlm_message_type(init.mech_token) != _NTLM_NEGOTIATE:
            self._fail(HandshakeReason.MECHANISM_REFUSED, "optimistic token is not NTLM")
        if any(_MECH_OF_OID.get(oid) != "ntlm" for oid in init.mech_types):
            # pyspnego would set up (and prefer) a Kerberos context of its own for them.
            self._fail(HandshakeReason.MECHANISM_REFUSED, "NTLM offered with other mechanisms")
        try:
            self._ntlm = spnego.server(
                protocol="negotiate",
                options=spnego.NegotiateOptions.use_negotiate,
                channel_bindings=self._ntlm_bindings(),
                context_req=_NTLM_REQUESTED,
            )
        except Exception as exc:
            self._fail_with(exc, HandshakeReason.INTERNAL, peer_input=False)
        return init

    def _on_kerberos_token(self, init: NegTokenInitSummary) -> None:
        """Accept the AP-REQ (one GSS call), apply the policy, answer DONE with the AP-REP in a
        NegTokenResp ``accept-completed`` naming the OID the client offered (Windows needs its
        own alias echoed). A mechListMIC from the client is verified and answered (RFC 4178 5)."""
        try:
            result = gssapi.raw.accept_sec_context(
                init.mech_token,
                acceptor_creds=self._acceptor_credential(),
                channel_bindings=self._gss_bindings,
            )
        except HandshakeError:
            raise
        except Exception as exc:  # GSSError: classified, never echoed
            self._fail_with(exc, HandshakeReason.BAD_CREDENTIALS)
        self._gss_context = result.context
        if result.more_steps:  # user-to-user or DCE style: not offered by real clients
            self._fail(HandshakeReason.MALFORMED, "Kerberos exchange of more than one token")
        if init.mech_list_mic:
            try:
                gssapi.raw.verify_mic(result.context, init.mech_list, init.mech_list_mic)  # type: ignore[arg-type]
            except Exception as exc:
                self._fail_with(exc, HandshakeReason.BAD_CREDENTIALS)
        mechanism, identity = self._accept()
        mic = b""
        if init.mech_list_mic:
            assert self._gss_context is not None
            mic = gssapi.raw.get_mic(self._gss_context, init.mech_list)  # type: ignore[arg-type]
        reply = _kerberos_neg_token_resp(init.mech_types[0], result.token or b"", mic)
        self._outbuf += _record(RecordType.DONE, reply)
        self._established(mechanism, identity)

    def _acceptor_credential(self) -> gssapi.raw.Creds:
        """Kerberos 5 acceptor credential for exactly our principal (read from the keytab at
        every connection, so rotated keys apply without a restart)."""
        assert self._principal is not None
        name = gssapi.raw.import_name(self._principal.encode(), gssapi.NameType.kerberos_principal)
        try:
            if self._keytab is not None:
                store = _cred_store(keytab=self._keytab)
                return gssapi.raw.acquire_cred_from(
                    store, name=name, mechs=[_KRB5_MECH], usage="accept"
                ).creds
            return gssapi.raw.acquire_cred(name, mechs=[_KRB5_MECH], usage="accept").creds
        except gssapi.raw.GSSError as exc:
            # Our keytab lacks the service key: a server configuration problem, not the client's.
            self._outbuf += _record(RecordType.ERROR, bytes((WireCode.INTERNAL,)))
            raise HandshakeError(
                HandshakeReason.INTERNAL, f"acceptor credential: {_gss_detail(exc)}"
            ) from exc

    def _check_ntlm_authenticate(self, token: bytes) -> None:
        """NTLMv2 only; with required bindings, a present non-zero MsvAvChannelBindings (pyspnego
        accepts an all-zero one, which a relayed client would send); without bindings, a target
        name (MsvAvTargetName) naming our service, else one naming another service when sent.
        The NTLMv2 response covers these fields, so a relay cannot alter or remove them."""
        try:
            raw = _parse_neg_token_resp(token).response_token
            if _ntlm_message_type(raw) != _NTLM_AUTHENTICATE:
                return  # e.g. a bare mechListMIC round; pyspnego validates it
            auth = _parse_ntlm_authenticate(raw)
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            self._fail_with(exc, HandshakeReason.MALFORMED)
        if not auth.ntlmv2:
            self._fail(HandshakeReason.MECHANISM_REFUSED, "NTLMv1/LM responses are refused")
        if self._require_binding:
            if not auth.channel_bindings or auth.channel_bindings == b"\x00" * 16:
                self._fail(HandshakeReason.CHANNEL_BINDING, "NTLM client sent no channel binding")
        elif not auth.target_name:
            # No channel binding to stop a relay: the target name is what ties the exchange to
            # this service (a victim lured to another service names that one).
            self._fail(HandshakeReason.WRONG_SERVICE, "NTLM client sent no target name")
        if self._principal is not None and auth.target_name:
            expected = _split_realm(self._principal)[0]
            if auth.target_name.casefold() != expected.casefold():
                self._fail(
                    HandshakeReason.WRONG_SERVICE, f"NTLM target {auth.target_name!r} is not ours"
                )

    def _accept(self) -> tuple[str, Identity]:
        """Policy on the completed context: the mechanism, and for Kerberos the target, flags,
        channel binding and ticket end time. Returns the mechanism and the client's identity."""
        if self._chosen == "kerberos":
            return "kerberos", Identity(
                "kerberos", normalise_kerberos_name(self._accept_kerberos())
            )
        assert self._ntlm is not None
        mechanism = self._ntlm.negotiated_protocol
        if mechanism != "ntlm" or "ntlm" not in self._mechanisms or self._chosen != "ntlm":
            self._fail(HandshakeReason.MECHANISM_REFUSED, f"completed with {mechanism}")
        if self._protect and (self._ntlm.context_attr & _NTLM_PROTECTION) != _NTLM_PROTECTION:
            self._fail(HandshakeReason.MECHANISM_REFUSED, "NTLM without signing and sealing")
        principal = self._ntlm.client_principal
        if not principal:
            self._fail(HandshakeReason.BAD_CREDENTIALS, "no client name")
        return mechanism, Identity("ntlm", normalise_ntlm_name(principal))

    def _accept_kerberos(self) -> str:
        """Checks the completed Kerberos context; returns the client principal."""
        info = _inquire(self._gss_context)
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
        assert self._gss_context is not None
        try:
            self._gss_context, end_time = _ticket_end_time(self._gss_context)
        except gssapi.raw.GSSError as exc:
            self._fail_with(exc, HandshakeReason.INTERNAL, peer_input=False)
        late = self._clock() - end_time
        if late > self._max_clock_skew:
            self._fail(
                HandshakeReason.NO_CREDENTIALS,
                f"ticket expired {late:.0f} s ago (max_clock_skew {self._max_clock_skew:g} s)",
            )
        self._expires_at = end_time
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
        self._target: gssapi.raw.Name | None = None
        self._gss_credential: gssapi.raw.Creds | None = None  # None: GSS's default

    def start(self) -> None:
        """Get the credential (may ask the KDC: blocking) and queue the first token."""
        if self._started:
            raise RuntimeError("start() called twice")
        self._started = True
        try:
            try:
                if self._offer == "ntlm":
                    self._ntlm = self._ntlm_context()
                else:
                    self._target = gssapi.raw.import_name(
                        f"{self._service}@{self._hostname}".encode(),
                        gssapi.NameType.hostbased_service,
                    )
                    assert isinstance(self._credential, Kerberos)
                    self._gss_credential = _kerberos_credential(self._credential)
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

    def _ntlm_context(self) -> spnego.ContextProxy:
        credential = self._credential
        assert isinstance(credential, NTLM)
        user = credential.username
        if credential.domain:
            user = f"{credential.domain}\\{user}"
        # An NT hash credential is usable by NTLM only: pyspnego's SPNEGO then offers NTLM alone.
        nt_hash = _md4(credential.password.encode("utf-16-le")).hex()
        return spnego.client(
            [spnego.NTLMHash(username=user, nt_hash=nt_hash)],
            hostname=self._hostname,
            service=self._service,
            channel_bindings=self._ntlm_bindings(),
            context_req=_NTLM_REQUESTED,
            protocol="negotiate",
            options=spnego.NegotiateOptions.use_negotiate,
        )

    def _step(self, token: bytes | None, default: HandshakeReason) -> bytes | None:
        """One initiator step. Kerberos: *token* is the AP-REP (or None for the AP-REQ), and the
        first output is wrapped in our NegTokenInit."""
        if self._offer == "ntlm":
            return self._step_ntlm(token, default)
        assert self._target is not None
        try:
            result = gssapi.raw.init_sec_context(
                self._target,
                creds=self._gss_credential,
                context=self._gss_context,
                mech=_KRB5_MECH,
                flags=_GSS_REQUESTED,
                channel_bindings=self._gss_bindings,
                input_token=token,
            )
        except Exception as exc:  # GSSError: classified, never echoed
            self._fail_with(exc, default, peer_input=token is not None)
        self._gss_context = result.context
        self._complete = not result.more_steps
        if token is None:
            return _kerberos_neg_token_init(result.token or b"")
        return result.token

    def _on_token(self, token: bytes) -> None:
        if not self._started:
            self._fail(HandshakeReason.MALFORMED, "token before start()")
        if self._offer == "kerberos":  # the acceptor answers a Kerberos token with DONE or ERROR
            self._fail(HandshakeReason.MALFORMED, "unexpected token in a Kerberos exchange")
        out = self._step(token, HandshakeReason.BAD_CREDENTIALS)
        if out:
            self._outbuf += _record(RecordType.TOKEN, out)

    def _on_done(self, token: bytes) -> None:
        if not self._started:
            self._fail(HandshakeReason.MALFORMED, "DONE before start()")
        if self._offer == "kerberos":
            self._kerberos_done(token)
            return
        if token and (self._complete or self._step(token, HandshakeReason.BAD_CREDENTIALS)):
            self._fail(HandshakeReason.MALFORMED, "server finished before the client")
        if not self._complete:
            self._fail(HandshakeReason.MALFORMED, "server finished before the client")
        assert self._ntlm is not None
        if self._ntlm.negotiated_protocol != "ntlm":
            self._fail(
                HandshakeReason.MECHANISM_REFUSED,
                f"completed with {self._ntlm.negotiated_protocol}",
            )
        if self._protect and (self._ntlm.context_attr & _NTLM_PROTECTION) != _NTLM_PROTECTION:
            self._fail(HandshakeReason.MECHANISM_REFUSED, "NTLM without signing and sealing")
        self._established("ntlm", ANONYMOUS)

    def _kerberos_done(self, token: bytes) -> None:
        """The acceptor's NegTokenResp: accept-completed, Kerberos, the AP-REP (mutual
        authentication), and a mechListMIC only if it sends one (verified then)."""
        try:
            resp = _parse_neg_token_resp(token)
        except (ValueError, IndexError) as exc:
            self._fail_with(exc, HandshakeReason.MALFORMED)
        if resp.neg_state != _ACCEPT_COMPLETED or not resp.response_token:
            self._fail(HandshakeReason.MALFORMED, "server finished before the client")
        if resp.supported_mech is not None and _MECH_OF_OID.get(resp.supported_mech) != "kerberos":
            self._fail(HandshakeReason.MECHANISM_REFUSED, "server chose another mechanism")
        if self._step(resp.response_token, HandshakeReason.BAD_CREDENTIALS) or not self._complete:
            self._fail(HandshakeReason.MALFORMED, "server finished before the client")
        if resp.mech_list_mic:
            try:
                gssapi.raw.verify_mic(self._gss_context, _KRB5_MECH_LIST, resp.mech_list_mic)  # type: ignore[arg-type]
            except Exception as exc:
                self._fail_with(exc, HandshakeReason.BAD_CREDENTIALS)
        info = _inquire(self._gss_context)
        if info is None:
            self._fail(HandshakeReason.MECHANISM_REFUSED, "not a Kerberos 5 context")
        flags = int(info.flags or 0)
        if not flags & gssapi.RequirementFlag.mutual_authentication:
            self._fail(HandshakeReason.BAD_CREDENTIALS, "server did not authenticate")
        if self._protect and (flags & _GSS_PROTECTION) != _GSS_PROTECTION:
            self._fail(HandshakeReason.MECHANISM_REFUSED, "context lacks record protection")
        identity = Identity("kerberos", normalise_kerberos_name(_display(info.target_name)))
        self._established("kerberos", identity)


def _cred_store(**elements: str) -> dict[bytes | str, bytes | str]:
    """A GSS credential store (RFC 5588 ext.) with *bytes* keys and values. python-gssapi's raw
    ``acquire_cred_from`` keeps only C pointers into the objects it is given: str values would be
    encoded into temporaries freed before MIT reads them (seen as a random fallback to the
    default keytab under load), so the bytes are made here and live as long as the dict."""
    return {key.encode(): value.encode() for key, value in elements.items()}


def _kerberos_credential(credential: Kerberos) -> gssapi.raw.Creds | None:
    """The Kerberos 5 initiator credential: from a password, a client keytab, a credential
    cache, or None for GSS's default choice (cache, then client keytab)."""
    mechs = [_KRB5_MECH]
    name = (
        gssapi.raw.import_name(credential.principal.encode(), gssapi.NameType.kerberos_principal)
        if credential.principal
        else None
    )
    if credential.password is not None:
        assert name is not None
        return gssapi.raw.acquire_cred_with_password(
            name, credential.password.encode("utf-8"), usage="initiate", mechs=mechs
        ).creds
    if credential.keytab is not None:
        # MIT gets a ticket from the client keytab into a memory cache on first use and again
        # when it expires. One cache per (principal, keytab) in the process: connections share
        # tickets, and reconnecting does not leak a new cache each time.
        keytab = os.fspath(credential.keytab)
        key = hashlib.sha256(f"{credential.principal}\0{keytab}".encode()).hexdigest()[:32]
        store = _cred_store(client_keytab=keytab, ccache=f"MEMORY:tessera-{key}")
        return gssapi.raw.acquire_cred_from(store, name=name, mechs=mechs, usage="initiate").creds
    if credential.ccache is not None:
        store = _cred_store(ccache=credential.ccache)
        return gssapi.raw.acquire_cred_from(store, name=name, mechs=mechs, usage="initiate").creds
    if name is not None:
        return gssapi.raw.acquire_cred(name, mechs=mechs, usage="initiate").creds
    return None
