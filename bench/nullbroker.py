"""A null broker: the load generator's ceiling, measured rather than assumed.

It speaks just enough of the Tessera protocol for ``bench/loadgen.py`` (mutual TLS 1.3 with the
bench certificates, ``hello`` -> ``welcome``, ``sub`` -> ``ok``) and otherwise only forwards
bytes: what a publisher sends is re-labelled ``pub`` -> ``msg`` (same length) and written, as
it came, to every subscriber. No decoding per message, no routing, no ACL: the bench's publish
frames all have one length, so a read is split into whole frames with one division and checked
with strided byte counts at C speed, like the generator's own hot path.

Whatever rate a workload reaches against it is what the generator (on its own core) can drive
and count at all, or what this process can forward, whichever is lower; ``bench/bench.py``
reports it as the ``null`` column next to the real brokers, with both processes' CPU, so a
broker figure close to it says "generator limit", not "broker limit".

Only for the bench: it trusts its peers, keeps no bound beyond the generator's window, and
handles no other frame.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import ssl
import sys
from typing import Any

import msgpack

RECV_BYTES = 256 * 1024
TLS_RECORD_BYTES = 16384
PUB_HEAD = b"\x83\xa2op\xa3pub"
MSG_HEAD = b"\x83\xa2op\xa3msg"
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT


def _frame(d: dict[str, Any]) -> bytes:
    body = msgpack.packb(d, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


class Peer:
    __slots__ = ("L", "carry", "fd", "inc", "obj", "out", "shaken", "sock", "subscribed", "wbuf")

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=True)
        self.shaken = False
        self.subscribed = False
        self.carry = b""
        self.wbuf = b""
        self.L = 0  # length of this publisher's frames, once seen


class NullBroker:
    def __init__(self, port: int, certs: str) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(
            os.path.join(certs, "server.pem"), os.path.join(certs, "server-key.pem")
        )
        ctx.load_verify_locations(os.path.join(certs, "ca.pem"))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(["tessera/1"])
        self.ctx = ctx
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", port))
        self.lsock.listen(1024)
        self.lsock.setblocking(False)
        self.ep = select.epoll()
        self.ep.register(self.lsock.fileno(), _IN)
        self.peers: dict[int, Peer] = {}
        self.subscribers: list[Peer] = []
        self.rbuf = bytearray(RECV_BYTES)
        self.rmv = memoryview(self.rbuf)
        self.welcome = _frame(
            {
                "op": "welcome",
                "version": 1,
                "server": "null",
                "identity": {"mechanism": "x509", "name": "bench"},
                "max_frame": 1 << 20,
                "heartbeat_ms": 0,
            }
        )
        self.stopping = False

    # -- I/O
    def flush(self, p: Peer) -> None:
        if p.out.pending:
            p.wbuf += p.out.read()
        if not p.wbuf:
            return
        try:
            n = p.sock.send(p.wbuf)
        except BlockingIOError:
            n = 0
        except OSError:
            self.drop(p)
            return
        p.wbuf = p.wbuf[n:]
        self.ep.modify(p.fd, _IN | _OUT if p.wbuf else _IN)

    def drop(self, p: Peer) -> None:
        if self.peers.pop(p.fd, None) is None:
            return
        with contextlib.suppress(ValueError):
            self.subscribers.remove(p)
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(p.fd)
        p.sock.close()

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.lsock.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            p = Peer(sock, self.ctx)
            self.peers[p.fd] = p
            self.ep.register(p.fd, _IN)

    def readable(self, p: Peer) -> None:
        try:
            n = p.sock.recv_into(self.rbuf)
        except BlockingIOError:
            return
        except OSError:
            self.drop(p)
            return
        if n == 0:
            self.drop(p)
            return
        p.inc.write(self.rmv[:n])
        if not p.shaken:
            try:
                p.obj.do_handshake()
            except ssl.SSLWantReadError:
                self.flush(p)
                return
            except ssl.SSLError:
                self.drop(p)
                return
            p.shaken = True
        parts = []
        while True:
            try:
                d = p.obj.read(TLS_RECORD_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError:
                self.drop(p)
                return
            if not d:
                break
            parts.append(d)
        if parts:
            self.plaintext(p, b"".join(parts))
        self.flush(p)

    # -- the protocol, as far as the bench needs it
    def plaintext(self, p: Peer, data: bytes) -> None:
        buf = p.carry + data if p.carry else data
        L = p.L
        if L:
            k = len(buf) // L
            span = k * L
            if k and buf[4:span:L].count(0x83) == k and buf[9:span:L].count(0x70) == k:
                self.forward(buf[:span].replace(PUB_HEAD, MSG_HEAD))
                p.carry = buf[span:]
                return
        pos = 0
        n = len(buf)
        out = []
        while n - pos >= 4:
            end = pos + 4 + int.from_bytes(buf[pos : pos + 4], "big")
            if end > n:
                break
            body = buf[pos + 4 : end]
            if body.startswith(PUB_HEAD):
                p.L = end - pos
                out.append(MSG_HEAD.join((buf[pos : pos + 4], body[len(PUB_HEAD) :])))
            else:
                op = msgpack.unpackb(body).get("op")
                if op == "hello":
                    p.obj.write(self.welcome)
                elif op == "sub":
                    p.obj.write(_frame({"op": "ok", "sid": msgpack.unpackb(body)["sid"]}))
                    if not p.subscribed:
                        p.subscribed = True
                        self.subscribers.append(p)
                elif op == "ping":
                    p.obj.write(_frame({"op": "pong"}))
            pos = end
        p.carry = buf[pos:]
        if out:
            self.forward(b"".join(out))

    def forward(self, data: bytes) -> None:
        for s in self.subscribers:
            s.obj.write(data)
            self.flush(s)

    def run(self) -> None:
        lfd = self.lsock.fileno()
        peers = self.peers
        while not self.stopping:
            for fd, ev in self.ep.poll(0.5):
                if fd == lfd:
                    self.accept()
                    continue
                p = peers.get(fd)
                if p is None:
                    continue
                if ev & _OUT:
                    self.flush(p)
                if ev & (_IN | select.EPOLLHUP | select.EPOLLERR):
                    self.readable(p)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--certs", required=True, help="dir with ca.pem, server.pem, server-key.pem")
    args = ap.parse_args(argv)
    nb = NullBroker(args.port, args.certs)

    def stop(_sig: int, _frm: object) -> None:
        nb.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    nb.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
