"""TLS: the one place that builds ``ssl.SSLContext`` objects, and a sans-I/O TLS layer.

Contexts: TLS 1.2 minimum, forward-secret AEAD suites only for TLS 1.2, no compression or
renegotiation, ALPN ``tessera/1``; a server that names a client CA requires a client
certificate. The layer drives an ``ssl.SSLObject`` over two ``MemoryBIO`` objects, so the broker
owns every buffer (asyncio's stock TLS transport keeps a 256 KiB read buffer per connection;
here plaintext is read into one buffer shared by all connections of a thread).

:class:`ServerTLSSocket` is the broker's other TLS path, for listeners whose layer stack is TLS
alone: an ``ssl.SSLSocket`` on the connection's own (non-blocking) socket, no memory BIOs. A
memory BIO never shrinks, so the pair keeps the handshake flights (about 3 KiB) for the life of
the connection; OpenSSL's socket BIO keeps nothing (``SSL_MODE_RELEASE_BUFFERS``, which CPython
sets, frees the record buffers whenever they are empty).
"""

from __future__ import annotations

import contextlib
import os
import ssl
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, cast

from tessera_mq.auth.errors import HandshakeError, HandshakeReason
from tessera_mq.auth.identity import (
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
    "ServerTLSSocket",
    "TLSLayer",
    "certificate_expires_at",
    "client_context",
    "load_crls",
    "release_enabled",
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

#: At most this many reads of the shared buffer drop what a closing peer sent (1 MiB).
_DRAIN_READS = 4

_local = threading.local()


def _read_buffer() -> memoryview:
    buf: memoryview | None = getattr(_local, "buf", None)
    if buf is None:
        buf = memoryview(bytearray(_READ_CHUNK_BYTES))
        _local.buf = buf
    return buf


def _load_release() -> Any:
    """The experimental post-handshake memory release (:mod:`auth.tls_release`), only when the
    operator asks for it with ``TESSERA_TLS_RELEASE=bios`` or ``all``. The default path uses
    public ``ssl`` APIs only: nothing here reads or writes CPython's or OpenSSL's private memory,
    and ``ctypes`` is not even imported."""
    mode = os.environ.get("TESSERA_TLS_RELEASE", "off").strip().lower()
    if mode in ("", "0", "off", "no", "false"):
        return None
    from tessera_mq.auth import tls_release  # noqa: PLC0415 - opt-in only

    return tls_release.load(mode)


#: The opt-in memory release, or ``None`` (the default).
_native: Any = _load_release()


def release_enabled() -> bool:
    """True if the opt-in post-handshake release (``TESSERA_TLS_RELEASE``) is on: it works on
    :class:`TLSLayer`'s memory BIOs, so a broker then keeps TLS-only listeners on them too."""
    return _native is not None


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
            ctx.sslsocket_class = type(
                "RevocationCheckedSSLSocket", (_RevocationCheckedSSLSocket,), {"crls": crls}
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


def _check_revoked(crls: CrlSet, der: bytes | None) -> None:
    if der and crls.is_revoked(der):
        error = ssl.SSLCertVerificationError(1, "certificate verify failed: certificate revoked")
        error.verify_code = 23  # X509_V_ERR_CERT_REVOKED
        error.verify_message = "certificate revoked"
        raise error


class _RevocationCheckedSSLObject(ssl.SSLObject):
    """``crl_expired = "warn"``: the revoked serials are checked here, after OpenSSL's chain
    verification, so an expired CRL still revokes what it lists (through the public
    :attr:`ssl.SSLContext.sslobject_class` hook)."""

    crls: CrlSet

    def do_handshake(self) -> None:
        super().do_handshake()
        _check_revoked(self.crls, self.getpeercert(binary_form=True))


class _RevocationCheckedSSLSocket(ssl.SSLSocket):
    """The same check for :class:`ServerTLSSocket` (``SSLContext.sslsocket_class``)."""

    crls: CrlSet

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _check_revoked(self.crls, self.getpeercert(binary_form=True))


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


def _peer_after_handshake(
    obj: ssl.SSLObject | ssl.SSLSocket, fields: Sequence[str], server_side: bool
) -> Identity | None:
    """Check ALPN and take the peer's identity from its certificate (``anonymous`` for a
    server whose client sent none)."""
    alpn = obj.selected_alpn_protocol()
    if alpn is not None and alpn != ALPN_PROTOCOL:
        raise HandshakeError(HandshakeReason.TLS_PROTOCOL, f"peer selected ALPN {alpn!r}")
    der = obj.getpeercert(binary_form=True)
    try:
        peer = identity_from_certificate(der, fields) if der else None
    except IdentityError as exc:
        raise HandshakeError(HandshakeReason.TLS_BAD_CERT, str(exc)) from None
    return peer if peer is not None or not server_side else ANONYMOUS


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
        fields = self._fields if self._server_side else ("cn", "dn")
        self._peer = _peer_after_handshake(self._obj, fields, self._server_side)
        self._established = True
        if self._server_side and _native is not None:
            self._release()

    def _release(self) -> None:
        """Give back what OpenSSL keeps after a server handshake (see :class:`_Native`)."""
        assert _native is not None
        try:
            swapped = _native.release(self._obj, self._incoming, self._outgoing)
        except (OSError, ValueError, TypeError, AttributeError):  # ctypes.ArgumentError too
            return
        if swapped is not None:
            self._incoming, self._outgoing = swapped

    def _shrink(self) -> None:
        assert _native is not None
        try:
            swapped = _native.shrink(self._obj, self._incoming, self._outgoing)
        except (OSError, ValueError, TypeError, AttributeError):  # ctypes.ArgumentError too
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


#: What :meth:`ServerTLSSocket.handshake` waits for before it can go on.
WaitFor = Literal["read", "write"]


class ServerTLSSocket:
    """The server side of TLS on a connection's own socket (``ssl.SSLSocket``, non-blocking).

    Not a sans-I/O :class:`~auth.layer.SecurityLayer`: it reads and writes the socket it wraps
    (the broker's socket driver, ``broker/session.py`` ``SocketSession``, waits for readiness).
    It offers the same read-outs as :class:`TLSLayer` (``established``, ``peer_identity``,
    ``credential_expires_at``, ``tls_version``, ``peer_certificate()``) and the same handshake
    checks and errors. ``sock`` is taken over: it must not be used afterwards.
    """

    __slots__ = ("_closed", "_fields", "_peer", "sock")

    blocking_handshake = False

    def __init__(
        self,
        context: ssl.SSLContext,
        sock: Any,
        *,
        identity_fields: Sequence[str] = DEFAULT_X509_NAME_FIELDS,
    ) -> None:
        #: The wrapped socket (its ``fileno()`` is what the driver watches).
        self.sock: ssl.SSLSocket = context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        )
        self._fields = tuple(identity_fields)
        self._closed = False
        self._peer: Identity | None = None

    @property
    def established(self) -> bool:
        return self._peer is not None

    @property
    def peer_identity(self) -> Identity | None:
        return self._peer

    @property
    def credential_expires_at(self) -> float | None:
        """The client certificate's notAfter (epoch seconds); ``None`` without one."""
        peer = self._peer
        return peer.expires_at if peer is not None else None

    @property
    def tls_version(self) -> str | None:
        return self.sock.version()

    def peer_certificate(self) -> bytes | None:
        """The client's certificate (DER), if it sent one."""
        return self.sock.getpeercert(binary_form=True)

    @property
    def closed_by_peer(self) -> bool:
        """True once the peer sent close_notify."""
        return self._closed

    def handshake(self) -> WaitFor | None:
        """Advance the handshake: ``None`` once established, else what the socket must become
        (readable, writable) first. Raises :class:`HandshakeError` (OpenSSL has then written
        its alert to the socket if it could); ``OSError`` for a broken connection."""
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            return "read"
        except ssl.SSLWantWriteError:
            return "write"
        except ssl.SSLEOFError:
            raise HandshakeError(HandshakeReason.CLOSED, "peer closed during handshake") from None
        except ssl.SSLError as exc:
            raise _reason_for(exc, True) from None
        self._peer = _peer_after_handshake(self.sock, self._fields, True)
        return None

    def recv_into(self, buf: memoryview) -> int:
        """Read plaintext into ``buf``: the count, ``0`` at the end of the stream (close_notify
        or a TCP close), ``-1`` when nothing is ready. Raises :class:`HandshakeError` for a
        broken record, ``OSError`` for a broken connection."""
        try:
            n = self.sock.recv_into(buf)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return -1
        except ssl.SSLZeroReturnError:
            self._closed = True
            return 0
        except ssl.SSLEOFError:
            return 0
        except ssl.SSLError as exc:
            raise _reason_for(exc, True) from None
        if not n:
            self._closed = True
        return n

    def pending(self) -> int:
        """Decrypted bytes OpenSSL holds that :meth:`recv_into` has not returned yet."""
        return self.sock.pending()

    def send(self, data: bytes | memoryview) -> int:
        """Protect and write ``data``: the count written (all of it: CPython does not enable
        partial writes), or ``-1`` when the socket is full; then call again with the same
        bytes once it is writable (OpenSSL has already taken part of them). Raises
        :class:`HandshakeError` or ``OSError``."""
        try:
            return self.sock.send(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return -1
        except ssl.SSLError as exc:
            raise _reason_for(exc, True) from None

    def shutdown(self) -> None:
        """Write close_notify (best effort: the peer's is not awaited)."""
        with contextlib.suppress(ssl.SSLError, OSError, ValueError):
            self.sock.unwrap()

    def close(self) -> None:
        """Close the socket. What the peer sent that TLS has not read (a request pipelined
        behind its handshake, say) is read and dropped first: closing a socket with unread
        bytes makes the kernel reset the connection, which can destroy the alert or the close
        frame still on the way to the peer (a transport would have read them already)."""
        sock = self.sock
        raw: Any = super(ssl.SSLSocket, sock)  # the plain socket's recv_into: below TLS
        buf = _read_buffer()
        with contextlib.suppress(OSError, ValueError):
            for _ in range(_DRAIN_READS):
                if not raw.recv_into(buf):
                    break
        sock.close()
