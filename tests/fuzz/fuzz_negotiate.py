"""Fuzz the SPNEGO acceptor (``auth.negotiate.NegotiateServerLayer``) with arbitrary records.

    python tests/fuzz/fuzz_negotiate.py [libFuzzer flags] [CORPUS_DIR ...]

Start-up (about a second): a throwaway MIT KDC from tests/kdc.py in a scratch directory, a
service principal and its keytab, a user with a ticket cache, and an ``NTLM_USER_FILE``. The
replay cache is off (``KRB5RCACHETYPE=none``) so that a recorded AP-REQ in the seeds still
opens a context and the fuzzer reaches the wrapped-record phase from the seeds alone.

Input layout: byte 0 = bits 0-1: the listener (0 Kerberos; 1 NTLM; 2 Kerberos and NTLM; 3
Kerberos and NTLM inside TLS: channel binding required, frames not wrapped); bit 2: feed the
fuzz bytes after a complete real handshake (as wrapped records) instead of from the first
record; bit 3: the real client uses NTLM. Byte 1 = how the rest is cut into reads
(:func:`fuzzlib.chunks`); bytes 2.. = the stream, then EOF.

Checked: ``receive_data`` raises nothing but :class:`auth.errors.AuthError` subclasses; after one
it raises again for any further input (the layer stays failed); ``read``/``data_to_send`` never
raise; plaintext never exceeds the bytes fed; output stays bounded; an established layer has a
peer identity.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
from pathlib import Path

import fuzzlib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: kdc.py

with fuzzlib.instrumented("auth", "spnego"):
    from tessera_mq.auth.errors import AuthError
    from tessera_mq.auth.negotiate import (
        NTLM,
        Kerberos,
        NegotiateClientLayer,
        NegotiateServerLayer,
        RecordType,
        tls_channel_bindings,
    )
from kdc import KDC

from tessera_mq.certs import pki

HOST = "fuzz.tessera.test"
SERVICE = f"tessera/{HOST}"
USER_PASSWORD = "Fuzz-pw-1"
#: What an acceptor may write beyond what it was fed: a few tokens (AP-REP ~200 B, NTLM
#: CHALLENGE ~300 B) and an error record. Generous; the point is "not unbounded".
MAX_OUTPUT_OVERHEAD_BYTES = 8 * 1024


class _Realm:
    keytab: Path
    ccache: str
    bindings: bytes


realm = _Realm()

LISTENERS = (
    {"mechanisms": frozenset({"kerberos"})},
    {"mechanisms": frozenset({"ntlm"})},
    {"mechanisms": frozenset({"kerberos", "ntlm"})},
    {
        "mechanisms": frozenset({"kerberos", "ntlm"}),
        "require_channel_binding": True,
        "protect_frames": False,
    },
)


#: Set by the first process for the processes libFuzzer starts (-fork, -jobs, -merge): they
#: share its KDC (which lives as long as it does) instead of starting their own.
_SHARED_ENV = "TESSERA_FUZZ_NEGOTIATE_REALM"


def _setup() -> None:
    shared = os.environ.get(_SHARED_ENV)
    if shared:  # the KDC and its environment variables come from the parent
        keytab, ccache, bindings = json.loads(shared)
        realm.keytab, realm.ccache, realm.bindings = Path(keytab), ccache, bytes.fromhex(bindings)
        return
    d = fuzzlib.workdir("negotiate")
    kdc_dir = d / "kdc"
    kdc_dir.mkdir()
    kdc = KDC.start(kdc_dir)  # dies with this process (setpriv --pdeathsig)
    users = d / "ntlm-users"
    users.write_text(f"TESSERA:fuzzer:{USER_PASSWORD}\n", encoding="utf-8")
    kdc.apply_env(NTLM_USER_FILE=str(users), KRB5RCACHETYPE="none")
    kdc.add_principal(SERVICE)
    user = kdc.add_principal("fuzzer", USER_PASSWORD)
    realm.keytab = kdc.export_keytab(d / "service.keytab", [SERVICE])
    realm.ccache = kdc.kinit(user, USER_PASSWORD, d / "fuzzer.ccache")
    pki.init_ca(d / "pki", common_name="Tessera fuzz CA")
    server = pki.issue(d / "pki", "server", HOST)  # its certificate gives the channel binding
    pem = server.cert.read_text(encoding="ascii")
    realm.bindings = tls_channel_bindings(ssl.PEM_cert_to_DER_cert(pem))
    os.environ[_SHARED_ENV] = json.dumps([str(realm.keytab), realm.ccache, realm.bindings.hex()])


def _server(listener: int) -> NegotiateServerLayer:
    kwargs = dict(LISTENERS[listener])
    if kwargs.get("require_channel_binding"):
        kwargs["channel_bindings"] = realm.bindings
    return NegotiateServerLayer(SERVICE, realm.keytab, **kwargs)  # type: ignore[arg-type]


def _client(listener: int, ntlm: bool) -> NegotiateClientLayer:
    credential = NTLM("fuzzer", USER_PASSWORD, domain="TESSERA") if ntlm else None
    return NegotiateClientLayer(
        HOST,
        credential=credential or Kerberos(ccache=realm.ccache),
        channel_bindings=realm.bindings if listener == 3 else None,
        protect_frames=listener != 3,
    )


def _handshake(server: NegotiateServerLayer, client: NegotiateClientLayer) -> list[bytes]:
    """Run a real handshake; return what the client sent."""
    sent = []
    client.start()
    for _ in range(10):
        out = client.data_to_send()
        if out:
            sent.append(out)
            server.receive_data(out)
        back = server.data_to_send()
        if back:
            client.receive_data(back)
        if not out and not back:
            break
    assert server.established and client.established
    return sent


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    listener = data[0] & 3
    ntlm = bool(data[0] & 8)
    if ntlm and listener == 0:
        listener = 2
    server = _server(listener)
    if data[0] & 4:
        _handshake(server, _client(listener, ntlm or listener == 1))
        server.data_to_send()
    fed = out = plain = 0
    failure: AuthError | None = None
    for piece in [*fuzzlib.chunks(data[2:], data[1]), b""]:
        fed += len(piece)
        try:
            server.receive_data(piece)
        except AuthError as exc:
            failure = exc
            break
        finally:
            plain += len(server.read())
            out += len(server.data_to_send())
        assert plain <= fed, (plain, fed)
        if server.established:
            assert server.peer_identity is not None
    if failure is not None:
        for again in (b"\x00", b""):
            try:
                server.receive_data(again)
            except AuthError:
                continue
            raise AssertionError("a failed layer accepted more input")
        out += len(server.data_to_send())
    server.close()
    out += len(server.data_to_send())
    assert out <= MAX_OUTPUT_OVERHEAD_BYTES + 2 * fed, (out, fed)


def _record(kind: RecordType, body: bytes) -> bytes:
    return (len(body) + 1).to_bytes(4, "big") + bytes((kind,)) + body


def seeds() -> list[bytes]:
    out = []
    for listener, ntlm in ((0, False), (1, True), (2, False), (2, True), (3, False), (3, True)):
        client = _client(listener, ntlm)
        sent = _handshake(_server(listener), client)
        client.send(b"\x00\x00\x00\x05hello")
        client.close()
        after = client.data_to_send()
        flags = listener | (8 if ntlm else 0)
        for selector in (0, 0x26):
            out.append(bytes([flags, selector]) + b"".join(sent) + after)
            out.append(bytes([flags | 4, selector]) + after)
        out.append(bytes([flags, 0]) + sent[0])
    out.append(b"\x00\x00" + _record(RecordType.TOKEN, b"\x60\x00"))
    out.append(b"\x00\x00" + _record(RecordType.ERROR, b"\x05"))
    out.append(b"\x00\x00" + _record(RecordType.DONE, b""))
    out.append(b"\x00\x00\x00\x00\x00\x00")  # empty record
    out.append(b"\x00\x00\xff\xff\xff\xff")  # oversize record
    return out


TOKENS = [
    b"\x00\x00\x00",  # record length high bytes
    b"\x01",
    b"\x02",
    b"\x03",
    b"NTLMSSP\x00",
    b"\x06\x06\x2b\x06\x01\x05\x05\x02",  # SPNEGO OID
    b"\x06\x09\x2a\x86\x48\x86\xf7\x12\x01\x02\x02",  # Kerberos 5 OID
    b"\x06\x0a\x2b\x06\x01\x04\x01\x82\x37\x02\x02\x0a",  # NTLM OID
    b"\x60\x82",  # [APPLICATION 0] long form
    b"\xa0\x82",
    b"\xa1\x82",
    b"\x05\x04",  # CFX wrap token id
]


if __name__ == "__main__":
    _setup()
    fuzzlib.main(
        "negotiate",
        test_one_input,
        seeds,
        dictionary=TOKENS,
        default_args=["-max_len=16384", "-timeout=10"],
        argv=sys.argv,
    )
