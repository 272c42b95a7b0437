"""EXPERIMENTAL, opt-in only: give back memory OpenSSL keeps after a server TLS handshake.

Loaded by :mod:`auth.tls` only when ``TESSERA_TLS_RELEASE`` is ``bios`` or ``all``; the default
path never imports this module. It reaches into the running process's libssl with ``ctypes`` and
reads CPython's ``PySSLSocket`` layout to find the ``SSL*`` of an ``ssl.SSLObject``: a broker
trusted with identity infrastructure must not do that silently, so it is off unless an operator
turns it on (docs/performance.md, "TLS memory").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import ssl
import sys
from typing import Any

__all__ = ["load"]


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
    library, a symbol or CPython's object layout is not what is expected, :func:`load`
    returns ``None`` and connections keep their memory.

    ``TESSERA_TLS_RELEASE`` chooses: ``bios`` only swaps the memory BIOs, through
    OpenSSL's public ``SSL_set0_rbio``/``SSL_set0_wbio``; ``all`` also frees the stored client
    certificates (experimental: it writes into OpenSSL's private structures, found by value as
    described above; -9.6 KB per connection); unset or ``off`` (the default) loads nothing.
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


def load(mode: str) -> _Native | None:
    """The release for ``mode`` (``bios`` or ``all``), or ``None`` where it cannot work."""
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
