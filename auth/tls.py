"""TLS: the one place that builds ``ssl.SSLContext`` objects, and a sans-I/O TLS layer.

Contexts: TLS 1.2 minimum, forward-secret AEAD suites only for TLS 1.2, no compression or
renegotiation, ALPN ``tessera/1``; a server that names a client CA requires a client
certificate. The layer drives an ``ssl.SSLObject`` over two ``MemoryBIO`` objects, so the broker
owns every buffer (asyncio's stock TLS transport keeps a 256 KiB read buffer per connection;
here plaintext is read into one buffer shared by all connections of a thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import ssl
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

from auth.errors import HandshakeError, HandshakeReason
from auth.identity import (
    ANONYMOUS,
    DEFAULT_X509_NAME_FIELDS,
    Identity,
    IdentityError,
    identity_from_certificate,
)

__all__ = [
    "ALPN_PROTOCOL",
    "CRL_EXPIRED_POLICIES",
    "TLS12_CIPHERS",
    "CrlError",
    "CrlSet",
    "TLSLayer",
    "certificate_expires_at",
    "client_context",
    "load_crls",
    "server_context",
]

#: The ALPN protocol id a broker selects and a client offers.
ALPN_PROTOCOL = "tessera/1"

#: TLS 1.2 suites: ECDHE key exchange (forward secrecy) with AEAD ciphers only (Mozilla
#: "intermediate" profile). TLS 1.3 suites are OpenSSL's defaults, all AEAD.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

#: Plaintext is read from an SSLObject into this much shared space per call (one TLS record is
#: at most 16 KiB, so a full read drains several records at once).
_READ_CHUNK_BYTES = 256 * 1024

#: A memory BIO that carried more than this in one go is replaced by an empty one afterwards
#: (server side), so a burst does not pin its size for the rest of the connection.
_BIO_KEEP_BYTES = 64 * 1024

_local = threading.local()


def _read_buffer() -> memoryview:
    buf: memoryview | None = getattr(_local, "buf", None)
    if buf is None:
        buf = memoryview(bytearray(_READ_CHUNK_BYTES))
        _local.buf = buf
    return buf


class _Native:
    """Optional post-handshake memory release through libssl, found in the running process.

    After a server-side TLS 1.3 handshake OpenSSL 3 keeps, for the whole connection, the client
    certificate twice over (the session's ``peer``/``peer_chain`` and the SSL's
    ``verified_chain``: ~9.5 KB of parsed X.509 and key per connection) and the two memory BIOs
    at the size of the largest handshake flight (~3 KB). The broker has taken the identity by
    then, so :meth:`release` frees the certificates and swaps in empty BIOs.

    OpenSSL has setters for the BIOs (``SSL_set0_rbio``/``SSL_set0_wbio``) but none for the
    peer certificate, so that field is found by value: the one pointer-aligned word in the
    structure equal to what the public getter returns (bounded by ``malloc_usable_size``); it
    is cleared and the getter must then return NULL, otherwise the word is put back and
    nothing is freed. Every step checks first and does nothing when a check fails; if the
    library, a symbol or CPython's object layout is not what is expected, :func:`_load`
    returns ``None`` and connections keep their memory.

    ``TESSERA_TLS_RELEASE`` chooses: ``bios`` (default) only swaps the memory BIOs, through
    OpenSSL's public ``SSL_set0_rbio``/``SSL_set0_wbio``; ``all`` also frees the stored client
    certificates (experimental: it writes into OpenSSL's private structures, found by value as
    described above; -9.6 KB per connection); ``0`` turns everything off.
    """

    _TLS13 = 0x0304

    def __init__(self, libssl: ctypes.CDLL, libcrypto: ctypes.CDLL, libc: ctypes.CDLL) -> None:
        vp, i = ctypes.c_void_p, ctypes.c_int

        def fn(lib: ctypes.CDLL, name: str, res: object, *args: object) -> Any:
            f = getattr(lib, name)
            f.restype, f.argtypes = res, list(args)
            return f

        self.get_ctx = fn(libssl, "SSL_get_SSL_CTX", vp, vp)
        self.version = fn(libssl, "SSL_version", i, vp)
        self.reused = fn(libssl, "SSL_session_reused", i, vp)
        self.session = fn(libssl, "SSL_get_session", vp, vp)
        self.peer = fn(libssl, "SSL_get0_peer_certificate", vp, vp)
        self.peer_chain = fn(libssl, "SSL_get_peer_cert_chain", vp, vp)
        self.verified_chain = fn(libssl, "SSL_get0_verified_chain", vp, vp)
        self.rbio = fn(libssl, "SSL_get_rbio", vp, vp)
        self.wbio = fn(libssl, "SSL_get_wbio", vp, vp)
        self.set0_rbio = fn(libssl, "SSL_set0_rbio", None, vp, vp)
        self.set0_wbio = fn(libssl, "SSL_set0_wbio", None, vp, vp)
        self.x509_free = fn(libcrypto, "X509_free", None, vp)
        self.sk_pop_free = fn(libcrypto, "OPENSSL_sk_pop_free", None, vp, vp)
        self.bio_up_ref = fn(libcrypto, "BIO_up_ref", i, vp)
        self.usable = fn(libc, "malloc_usable_size", ctypes.c_size_t, vp)
        self.x509_free_addr = ctypes.cast(self.x509_free, vp).value
        self.head = object.__basicsize__  # PyObject_HEAD: the C fields follow it
        #: (structure kind) -> byte offset of the field last found there (checked every time)
        self.offsets: dict[str, int] = {}
        #: ``TESSERA_TLS_RELEASE=all``: also free the stored client certificates (experimental).
        self.free_peer_certificates = False

    # -- CPython object layouts (Modules/_ssl.c), each checked against the library

    def _field(self, obj: object, index: int) -> int | None:
        return ctypes.c_void_p.from_address(id(obj) + self.head + 8 * index).value

    def ssl_ptr(self, sslobj: ssl.SSLObject) -> int | None:
        """The ``SSL *`` of an SSLObject: ``PySSLSocket {HEAD; Socket; ssl; ctx; ...}``."""
        inner = sslobj._sslobj  # type: ignore[attr-defined]
        if self._field(inner, 0) is not None or self._field(inner, 2) != id(inner.context):
            return None  # not a BIO-backed PySSLSocket laid out as expected
        ptr = self._field(inner, 1)
        ctx = self._field(inner.context, 0)  # PySSLContext {HEAD; SSL_CTX *ctx; ...}
        if ptr is None or ctx is None or self.get_ctx(ptr) != ctx:
            return None
        return ptr

    # -- finding and clearing a field by value

    def _find(self, kind: str, base: int, value: int, after: int | None = None) -> int | None:
        """Offset of the only aligned word at ``base`` equal to ``value`` (and, if ``after`` is
        given, followed by a word equal to it); ``None`` if there is not exactly one."""
        size = min(self.usable(base), 16384)
        pattern = value.to_bytes(8, sys.byteorder)
        if after is not None:
            pattern += after.to_bytes(8, sys.byteorder)
        known = self.offsets.get(kind)
        if (
            known is not None
            and known + len(pattern) <= size
            and ctypes.string_at(base + known, len(pattern)) == pattern
        ):
            return known
        blob = ctypes.string_at(base, size)
        hits: list[int] = []
        pos = blob.find(pattern)
        while pos >= 0:
            if pos % 8 == 0:
                hits.append(pos)
            pos = blob.find(pattern, pos + 1)
        if len(hits) != 1:
            return None
        self.offsets[kind] = hits[0]
        return hits[0]

    def _drop_peer(self, ptr: int) -> None:
        sess, peer, chain = self.session(ptr), self.peer(ptr), self.peer_chain(ptr)
        if sess is None or peer is None:
            return
        off = self._find("session.peer", sess, peer, chain or 0)
        if off is None:
            return
        words = (ctypes.c_void_p * 2).from_address(sess + off)
        words[0] = words[1] = None
        if self.peer(ptr) is not None or self.peer_chain(ptr) is not None:
            words[0], words[1] = peer, chain  # not the field the getters read: undo
            return
        self.x509_free(peer)
        if chain is not None:
            self.sk_pop_free(chain, self.x509_free_addr)

    def _drop_verified_chain(self, ptr: int) -> None:
        chain = self.verified_chain(ptr)
        if chain is None:
            return
        off = self._find("ssl.verified_chain", ptr, chain)
        if off is None:
            return
        word = ctypes.c_void_p.from_address(ptr + off)
        word.value = None
        if self.verified_chain(ptr) is not None:
            word.value = chain
            return
        self.sk_pop_free(chain, self.x509_free_addr)

    def _swap_bios(
        self, ptr: int, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
    ) -> tuple[ssl.MemoryBIO, ssl.MemoryBIO] | None:
        """Fresh BIOs in place of the handshake's grown ones (``PySSLMemoryBIO {HEAD; BIO *}``)."""
        if outgoing.pending or incoming.eof:
            return None
        if self._field(incoming, 0) != self.rbio(ptr) or self._field(outgoing, 0) != self.wbio(ptr):
            return None
        new_in, new_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        bio_in, bio_out = self._field(new_in, 0), self._field(new_out, 0)
        if bio_in is None or bio_out is None:
            return None
        rest = incoming.read()  # ciphertext that arrived with the client's Finished
        if rest:
            new_in.write(rest)
        # SSL_set0_* take over one reference and free the SSL's reference to the old BIO; the
        # Python objects keep theirs (as _ssl.c's wrap_bio does with BIO_up_ref).
        self.bio_up_ref(bio_in)
        self.set0_rbio(ptr, bio_in)
        self.bio_up_ref(bio_out)
        self.set0_wbio(ptr, bio_out)
        return new_in, new_out

    def release(
        self, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
    ) -> tuple[ssl.MemoryBIO, ssl.MemoryBIO] | None:
        """Free what a finished server handshake no longer needs; the new BIOs, if swapped."""
        ptr = self.ssl_ptr(sslobj)
        # Only a fresh TLS 1.3 session: a TLS 1.2 session may sit in the server's session cache
        # (and be resumed later with its peer certificate); TLS 1.3 ones never do with
        # num_tickets = 0 and without OP_NO_TICKET.
        if ptr is None or self.version(ptr) != self._TLS13 or self.reused(ptr):
            return None
        if self.free_peer_certificates:
            self._drop_peer(ptr)
            self._drop_verified_chain(ptr)
        return self._swap_bios(ptr, incoming, outgoing)

    def shrink(
        self, sslobj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
    ) -> tuple[ssl.MemoryBIO, ssl.MemoryBIO] | None:
        """Empty BIOs in place of ones a large read or write has grown (a memory BIO never
        gives its buffer back: one 1 MB write would otherwise stay 1 MB for the connection)."""
        ptr = self.ssl_ptr(sslobj)
        return None if ptr is None else self._swap_bios(ptr, incoming, outgoing)


def _loaded_library(stem: str) -> str | None:
    """The path of the ``libssl``/``libcrypto`` this process has mapped (the one ``_ssl`` uses)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.rsplit(" ", 1)[-1].strip()
                if os.path.basename(path).startswith(stem + ".so"):
                    return path
    except OSError:
        return None
    return None


def _load() -> _Native | None:
    mode = os.environ.get("TESSERA_TLS_RELEASE", "bios").strip().lower()
    if mode in ("0", "off", "no", "false"):
        return None
    if sys.implementation.name != "cpython" or ssl.OPENSSL_VERSION_INFO[0] != 3:
        return None
    ssl_path, crypto_path = _loaded_library("libssl"), _loaded_library("libcrypto")
    libc_path = ctypes.util.find_library("c")
    if ssl_path is None or crypto_path is None or libc_path is None:
        return None  # OpenSSL linked statically into _ssl, or not Linux: nothing to do
    try:
        libssl, libcrypto = ctypes.CDLL(ssl_path), ctypes.CDLL(crypto_path)
        version = libcrypto.OpenSSL_version_num
        version.restype = ctypes.c_ulong
        if version() != ssl.OPENSSL_VERSION_NUMBER:
            return None  # a different OpenSSL from the one the ssl module was built against
        native = _Native(libssl, libcrypto, ctypes.CDLL(libc_path))
        # malloc_usable_size only describes OpenSSL's memory with its default allocator.
        funcs = [ctypes.c_void_p() for _ in range(3)]
        get = libcrypto.CRYPTO_get_mem_functions
        get.argtypes = [ctypes.POINTER(ctypes.c_void_p)] * 3
        get(*(ctypes.byref(f) for f in funcs))
        defaults = [
            ctypes.cast(getattr(libcrypto, n), ctypes.c_void_p).value
            for n in ("CRYPTO_malloc", "CRYPTO_realloc", "CRYPTO_free")
        ]
        if [f.value for f in funcs] != defaults:
            return None
    except (OSError, AttributeError, ValueError):
        return None
    native.free_peer_certificates = mode == "all"
    return native


_native: _Native | None = _load()


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols([ALPN_PROTOCOL])


def server_context(
    cert: str | Path,
    key: str | Path,
    client_ca: str | Path | None = None,
    *,
    crls: CrlSet | None = None,
) -> ssl.SSLContext:
    """A broker listener's context. With ``client_ca`` a client certificate issued by that CA
    is required; without it clients are not asked for one (their identity is ``anonymous``).

    With ``crls`` (from :func:`load_crls`, which needs ``client_ca``) a revoked client
    certificate is refused. Policy ``"refuse"``: the CRLs are given to OpenSSL
    (``VERIFY_CRL_CHECK_LEAF``), which also refuses every client handshake while a CRL is past
    its next update. Policy ``"warn"``: the revoked serials are checked after OpenSSL's chain
    verification, whether or not a CRL has expired (the broker logs that it has).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    # No session tickets: the SDK does not resume, and each ticket costs a record per connection.
    ctx.num_tickets = 0
    ctx.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if crls is not None and crls.files:
        if client_ca is None:
            raise CrlError(
                "a CRL needs client_ca: without client certificates there is nothing to revoke"
            )
        if crls.policy == "refuse":
            for path in crls.files:
                ctx.load_verify_locations(cafile=path)  # a PEM file's CRLs go to the store too
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        else:
            ctx.sslobject_class = type(
                "RevocationCheckedSSLObject", (_RevocationCheckedSSLObject,), {"crls": crls}
            )
    return ctx


#: What a listener does when a CRL is past its next update (the ``crl_expired`` key).
CRL_EXPIRED_POLICIES: Final = ("refuse", "warn")

CrlExpiredPolicy = Literal["refuse", "warn"]


class CrlError(ValueError):
    """A CRL file is missing, malformed, not signed by a configured CA, or misconfigured.
    The message names the file."""


@dataclass(frozen=True, slots=True)
class CrlSet:
    """The revocation lists one listener enforces, parsed and signature-checked.

    ``revoked`` holds ``(issuer DER, serial)`` pairs; ``next_update`` is the earliest next
    update of the files (epoch seconds; ``None`` if no CRL names one); ``warnings`` are load
    findings for the log (a CA in the bundle without a CRL: OpenSSL would refuse its clients).
    """

    files: tuple[str, ...]
    policy: CrlExpiredPolicy
    revoked: frozenset[tuple[bytes, int]]
    next_update: float | None
    warnings: tuple[str, ...] = ()

    def expired(self, now: float) -> bool:
        """True once a CRL is past its next update."""
        return self.next_update is not None and now >= self.next_update

    def is_revoked(self, der: bytes) -> bool:
        """True if the DER certificate is on one of the lists (by issuer and serial)."""
        from cryptography import x509  # noqa: PLC0415 - kept off `import auth`

        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return False
        return (cert.issuer.public_bytes(), cert.serial_number) in self.revoked


def load_crls(
    paths: Iterable[str | Path],
    client_ca: str | Path,
    *,
    policy: CrlExpiredPolicy = "refuse",
) -> CrlSet:
    """Read PEM CRL files and check each is signed by a CA certificate in ``client_ca``.

    Raises :class:`CrlError` naming the file on any problem, so a reload with a bad CRL
    changes nothing. Expiry is not an error here: ask :meth:`CrlSet.expired`.
    """
    from cryptography import x509  # noqa: PLC0415 - kept off `import auth`

    if policy not in CRL_EXPIRED_POLICIES:
        raise CrlError(f"crl_expired must be one of: {', '.join(CRL_EXPIRED_POLICIES)}")
    files = tuple(str(p) for p in paths)
    try:
        cas = x509.load_pem_x509_certificates(Path(client_ca).read_bytes())
    except (OSError, ValueError) as exc:
        raise CrlError(f"{client_ca}: cannot read the client CA bundle: {exc}") from None
    revoked: set[tuple[bytes, int]] = set()
    next_update: float | None = None
    covered: set[bytes] = set()
    for path in files:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise CrlError(f"{path}: cannot read CRL: {exc.strerror or exc}") from None
        if b"-----BEGIN X509 CRL-----" not in data:
            raise CrlError(f"{path}: not a PEM CRL (expected -----BEGIN X509 CRL-----)")
        for block in data.split(b"-----END X509 CRL-----")[:-1]:
            pem = block[block.find(b"-----BEGIN X509 CRL-----") :] + b"-----END X509 CRL-----\n"
            try:
                crl = x509.load_pem_x509_crl(pem)
            except ValueError as exc:
                raise CrlError(f"{path}: not a valid CRL: {exc}") from None
            issuer = crl.issuer.public_bytes()
            signer = next(
                (
                    ca
                    for ca in cas
                    if ca.subject.public_bytes() == issuer
                    and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
                ),
                None,
            )
            if signer is None:
                raise CrlError(f"{path}: the CRL is not signed by a CA in {client_ca}")
            covered.add(issuer)
            end = crl.next_update_utc
            if end is not None:
                stamp = end.timestamp()
                next_update = stamp if next_update is None else min(next_update, stamp)
            revoked.update((issuer, entry.serial_number) for entry in crl)
    warnings = tuple(
        f"{client_ca}: no CRL for the CA {ca.subject.rfc4514_string()}: with crl_expired ="
        ' "refuse" OpenSSL refuses the clients it issued (a leaf needs its issuer\'s CRL)'
        for ca in cas
        if ca.subject.public_bytes() not in covered
    )
    return CrlSet(files, policy, frozenset(revoked), next_update, warnings if files else ())


class _RevocationCheckedSSLObject(ssl.SSLObject):
    """``crl_expired = "warn"``: the revoked serials are checked here, after OpenSSL's chain
    verification, so an expired CRL still revokes what it lists (through the public
    :attr:`ssl.SSLContext.sslobject_class` hook)."""

    crls: CrlSet

    def do_handshake(self) -> None:
        super().do_handshake()
        der = self.getpeercert(binary_form=True)
        if der and self.crls.is_revoked(der):
            error = ssl.SSLCertVerificationError(
                1, "certificate verify failed: certificate revoked"
            )
            error.verify_code = 23  # X509_V_ERR_CERT_REVOKED
            error.verify_message = "certificate revoked"
            raise error


def certificate_expires_at(der: bytes) -> float | None:
    """A DER certificate's notAfter as epoch seconds (``None`` if it does not parse)."""
    from cryptography import x509  # noqa: PLC0415 - kept off `import auth`

    try:
        return x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()
    except ValueError:
        return None


def client_context(
    ca: str | Path | None = None,
    cert: str | Path | None = None,
    key: str | Path | None = None,
) -> ssl.SSLContext:
    """An SDK context: verifies the broker against ``ca`` (or the system store) and its host
    name, and presents ``cert``/``key`` as the client certificate when given."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    _harden(ctx)
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    elif key is not None:
        raise ValueError("a client key was given without its certificate")
    return ctx


def _reason_for(exc: ssl.SSLError, server_side: bool) -> HandshakeError:
    """Map an OpenSSL failure to a reason code and a message a user can act on."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        what = "client" if server_side else "broker"
        reason = (
            HandshakeReason.TLS_BAD_CERT if server_side else HandshakeReason.TLS_BAD_SERVER_CERT
        )
        return HandshakeError(reason, f"{what} certificate rejected: {exc.verify_message}")
    code = (exc.reason or "").upper()
    if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in code:
        return HandshakeError(HandshakeReason.TLS_NO_CLIENT_CERT, "no client certificate sent")
    if "ALERT" in code:
        alert = code.split("ALERT_", 1)[-1].replace("_", " ").lower()
        if server_side:
            return HandshakeError(HandshakeReason.TLS_PEER_REJECTED, f"client sent alert: {alert}")
        return HandshakeError(
            HandshakeReason.TLS_PEER_REJECTED,
            f"the broker refused the connection (TLS alert: {alert}); "
            "check the client certificate, its CA and its validity",
        )
    if any(
        s in code
        for s in ("VERSION", "PROTOCOL", "CIPHER", "WRONG", "HTTP", "RECORD", "PACKET", "NO_SHARED")
    ):
        return HandshakeError(
            HandshakeReason.TLS_PROTOCOL, f"TLS negotiation failed: {code.lower()}"
        )
    return HandshakeError(HandshakeReason.TLS_PROTOCOL, f"TLS error: {code.lower() or exc}")


class TLSLayer:
    """A :class:`~auth.layer.SecurityLayer` over TLS (``ssl.SSLObject`` + two ``MemoryBIO``)."""

    __slots__ = (
        "_closed",
        "_established",
        "_fields",
        "_incoming",
        "_obj",
        "_outgoing",
        "_peer",
        "_plain",
        "_server_side",
    )

    blocking_handshake = False

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        identity_fields: Sequence[str] = DEFAULT_X509_NAME_FIELDS,
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        self._server_side = server_side
        self._fields = tuple(identity_fields)
        self._established = False
        self._closed = False
        self._peer: Identity | None = None
        self._plain: list[bytes] = []

    @property
    def established(self) -> bool:
        return self._established

    @property
    def peer_identity(self) -> Identity | None:
        return self._peer

    @property
    def credential_expires_at(self) -> float | None:
        """When the peer's credential ends (epoch seconds): its certificate's notAfter, or
        ``None`` before the handshake or without a peer certificate (an anonymous client)."""
        peer = self._peer
        return peer.expires_at if peer is not None else None

    @property
    def tls_version(self) -> str | None:
        """The negotiated protocol version, e.g. ``"TLSv1.3"``."""
        return self._obj.version()

    def peer_certificate(self) -> bytes | None:
        """The peer's certificate (DER), if it sent one. On the server side it is released
        once the handshake has produced :attr:`peer_identity` (memory: see ``_Native``)."""
        return self._obj.getpeercert(binary_form=True)

    def start(self) -> None:
        if not self._server_side:
            self._handshake()

    def receive_data(self, data: bytes) -> None:
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()
        if not self._established:
            self._handshake()
            if not self._established:
                if not data:
                    raise HandshakeError(HandshakeReason.CLOSED, "peer closed during handshake")
                return
        self._drain()
        if len(data) > _BIO_KEEP_BYTES and self._server_side and _native is not None:
            self._shrink()

    def _handshake(self) -> None:
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return
        except ssl.SSLEOFError:
            raise HandshakeError(HandshakeReason.CLOSED, "peer closed during handshake") from None
        except ssl.SSLError as exc:
            raise _reason_for(exc, self._server_side) from None
        alpn = self._obj.selected_alpn_protocol()
        if alpn is not None and alpn != ALPN_PROTOCOL:
            raise HandshakeError(HandshakeReason.TLS_PROTOCOL, f"peer selected ALPN {alpn!r}")
        der = self._obj.getpeercert(binary_form=True)
        fields = self._fields if self._server_side else ("cn", "dn")
        try:
            peer = identity_from_certificate(der, fields) if der else None
        except IdentityError as exc:
            raise HandshakeError(HandshakeReason.TLS_BAD_CERT, str(exc)) from None
        self._peer = peer if peer is not None or not self._server_side else ANONYMOUS
        self._established = True
        if self._server_side and _native is not None:
            self._release()

    def _release(self) -> None:
        """Give back what OpenSSL keeps after a server handshake (see :class:`_Native`)."""
        assert _native is not None
        try:
            swapped = _native.release(self._obj, self._incoming, self._outgoing)
        except (OSError, ValueError, TypeError, AttributeError, ctypes.ArgumentError):
            return
        if swapped is not None:
            self._incoming, self._outgoing = swapped

    def _shrink(self) -> None:
        assert _native is not None
        try:
            swapped = _native.shrink(self._obj, self._incoming, self._outgoing)
        except (OSError, ValueError, TypeError, AttributeError, ctypes.ArgumentError):
            return
        if swapped is not None:
            self._incoming, self._outgoing = swapped

    def _drain(self) -> None:
        buf = _read_buffer()
        obj = self._obj
        while True:
            try:
                # With a buffer, read() returns a count (typeshed says bytes).
                n = cast(int, obj.read(_READ_CHUNK_BYTES, buf))
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                self._closed = True
                return
            except ssl.SSLEOFError:
                self._closed = True
                return
            except ssl.SSLError as exc:
                raise _reason_for(exc, self._server_side) from None
            if not n:
                return
            self._plain.append(buf[:n].tobytes())

    def read(self) -> bytes:
        plain = self._plain
        if not plain:
            return b""
        if len(plain) == 1:
            return plain.pop()
        out = b"".join(plain)
        plain.clear()
        return out

    def send(self, data: bytes) -> None:
        if not self._established:
            raise HandshakeError(HandshakeReason.INTERNAL, "send before the TLS handshake")
        try:
            self._obj.write(data)
        except ssl.SSLError as exc:
            raise _reason_for(exc, self._server_side) from None

    def data_to_send(self) -> bytes:
        if not self._outgoing.pending:
            return b""
        out = self._outgoing.read()
        if len(out) > _BIO_KEEP_BYTES and self._server_side and _native is not None:
            self._shrink()
        return out

    @property
    def closed_by_peer(self) -> bool:
        """True once the peer sent close_notify."""
        return self._closed

    def close(self) -> None:
        if not self._established:
            return
        # WantRead means our close_notify is queued and the peer's has not arrived: fine.
        with contextlib.suppress(ssl.SSLError):
            self._obj.unwrap()
