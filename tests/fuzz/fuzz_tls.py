"""Fuzz the broker side of the TLS layer (``auth.tls.TLSLayer(server_side=True)``).

    python tests/fuzz/fuzz_tls.py [libFuzzer flags] [CORPUS_DIR ...]

Certificates are made with ``certs.pki`` in a scratch directory at start-up: a CA, a server
certificate for ``localhost`` and a client certificate.

Input layout: byte 0 = bit 0: the listener asks for a client certificate (mutual TLS) or not;
bits 1-2: where the fuzz bytes go (0: from the first byte, in place of a ClientHello; 1: after a
real client's ClientHello, in place of its second flight; 2: after a complete real handshake, as
records of the open session); bit 3: the real client offers TLS 1.2 only. Byte 1 = how the rest
is cut into reads (:func:`fuzzlib.chunks`); bytes 2.. = the stream, then EOF.

Checked: ``receive_data`` raises nothing but :class:`auth.errors.AuthError` (``HandshakeError``
during the handshake; the driver stops there); ``read``, ``data_to_send`` and ``close`` never
raise; plaintext never exceeds the bytes fed and the layer's output stays bounded.

OpenSSL is not instrumented, so coverage guidance only sees auth/tls.py; the value here is in
volume and in the real handshakes the seeds start from.
"""

from __future__ import annotations

import ssl
import sys

import fuzzlib

with fuzzlib.instrumented("auth"):
    from tessera_mq.auth.errors import AuthError, HandshakeError
    from tessera_mq.auth.tls import TLSLayer, client_context, server_context
from tessera_mq.certs import pki

#: Bytes a server may write during and after a handshake beyond what it was fed (its certificate
#: chain, session ticket-free TLS 1.3 flight, alerts): generous, the point is "not unbounded".
MAX_OUTPUT_OVERHEAD_BYTES = 16 * 1024

_contexts: dict[str, ssl.SSLContext] = {}


def _setup() -> None:
    d = fuzzlib.workdir("tls") / "pki"
    if d.exists():
        return
    ca = pki.init_ca(d, common_name="Tessera fuzz CA")
    server = pki.issue(d, "server", "localhost", dns=["localhost"], ip=["127.0.0.1"])
    client = pki.issue(d, "client", "fuzzer")
    _contexts["mtls"] = server_context(server.cert, server.key, client_ca=ca.cert)
    _contexts["plain"] = server_context(server.cert, server.key)
    _contexts["client"] = client_context(ca.cert, client.cert, client.key)
    tls12 = client_context(ca.cert, client.cert, client.key)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    _contexts["client12"] = tls12


def _server(mtls: bool) -> TLSLayer:
    return TLSLayer(_contexts["mtls" if mtls else "plain"], server_side=True)


def _client(tls12: bool) -> TLSLayer:
    ctx = _contexts["client12" if tls12 else "client"]
    return TLSLayer(ctx, server_side=False, server_hostname="localhost")


def _handshake(server: TLSLayer, client: TLSLayer) -> list[bytes]:
    """Run a real handshake; return the client's flights (what the server received)."""
    flights = []
    client.start()
    for _ in range(10):
        out = client.data_to_send()
        if out:
            flights.append(out)
            server.receive_data(out)
        back = server.data_to_send()
        if back:
            client.receive_data(back)
        if server.established and client.established and not out and not back:
            return flights
    raise AssertionError("the real handshake did not complete")


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    mtls = bool(data[0] & 1)
    mode = (data[0] >> 1) & 3
    server = _server(mtls)
    if mode == 1:
        client = _client(bool(data[0] & 8))
        client.start()
        server.receive_data(client.data_to_send())
    elif mode >= 2:
        _handshake(server, _client(bool(data[0] & 8)))
    server.data_to_send()
    fed = 0
    out = 0
    plain = 0
    pieces = [*fuzzlib.chunks(data[2:], data[1]), b""]
    failure: AuthError | None = None
    for piece in pieces:
        fed += len(piece)
        try:
            server.receive_data(piece)
        except AuthError as exc:
            failure = exc  # the driver drops the connection here
            break
        finally:
            plain += len(server.read())
            out += len(server.data_to_send())
        assert plain <= fed, (plain, fed)
    if failure is not None and not server.established:
        assert isinstance(failure, HandshakeError), failure
    server.close()
    out += len(server.data_to_send())
    assert out <= MAX_OUTPUT_OVERHEAD_BYTES + 2 * fed, (out, fed)


def seeds() -> list[bytes]:
    out = []
    for mtls in (True, False):
        for tls12 in (False, True):
            server, client = _server(mtls), _client(tls12)
            flights = _handshake(server, client)
            client.send(b"\x00\x00\x00\x0b" + b"hello-frame")
            client.close()
            rest = client.data_to_send()
            flags = int(mtls) | (8 if tls12 else 0)
            for selector in (0, 0x25):
                out.append(bytes([flags, selector]) + b"".join(flights) + rest)
                out.append(bytes([flags | 2, selector]) + b"".join(flights[1:]) + rest)
                out.append(bytes([flags | 4, selector]) + rest)
    # A few non-TLS openings a scanner sends.
    out.append(b"\x00\x00GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    out.append(b"\x00\x00\x16\x03\x01\x00\x00")
    out.append(b"\x04\x00\x15\x03\x03\x00\x02\x02\x28")  # a plaintext alert mid-session
    return out


TOKENS = [
    b"\x16\x03\x01",  # handshake record, TLS 1.0 version field (ClientHello)
    b"\x16\x03\x03",
    b"\x17\x03\x03",  # application data
    b"\x15\x03\x03\x00\x02",  # alert
    b"\x14\x03\x03\x00\x01\x01",  # change_cipher_spec
    b"tessera/1",
]


if __name__ == "__main__":
    _setup()
    fuzzlib.main(
        "tls",
        test_one_input,
        seeds,
        dictionary=TOKENS,
        default_args=["-max_len=16384", "-timeout=10"],
        argv=sys.argv,
    )
