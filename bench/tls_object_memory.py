"""What the server side of one idle mutual-TLS 1.3 connection costs, by ``ssl`` object kind.

An experiment for issue #14, not a test: it measures whether moving the broker from
``ssl.SSLObject`` over two ``MemoryBIO``s (what ``auth/tls.py`` does, so that security layers
can be stacked and run under asyncio's plain transports) to an ``ssl.SSLSocket`` over the real
socket would bring memory per connection below Mosquitto's, before anyone rewrites the session
driver for it.

For each mode a fresh process makes N socket pairs, runs N handshakes (the client side always
on ``SSLObject`` + ``MemoryBIO``, the same for both modes), exchanges one small record each way,
drops the client side and reports the process's malloc in-use bytes (``mallinfo2``) and RSS per
connection::

    .venv/bin/python bench/tls_object_memory.py --conns 2000          # mutual TLS
    .venv/bin/python bench/tls_object_memory.py --conns 2000 --tls    # no client certificate

Modes: ``bio`` (server ``SSLObject`` + two ``MemoryBIO``: the broker's ``negotiate`` and
``tls+negotiate`` listeners), ``socket`` (server ``SSLSocket`` wrapping its end of the pair,
non-blocking: the broker's ``tls`` listeners since issue #14). ``malloc`` is OpenSSL's share
(Python's small objects live in pymalloc arenas, which ``mallinfo2`` does not count). Only the
server objects (and both socket ends) are kept after the handshake; the client objects are
dropped.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


class _MI2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                  "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def heap_bytes() -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallinfo2.restype = _MI2
    m = libc.mallinfo2()
    return int(m.uordblks + m.hblkhd)


def rss_kb() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def contexts(certs: Path, mutual: bool = True) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(certs / "server.pem", certs / "server-key.pem")
    if mutual:
        server.load_verify_locations(certs / "ca.pem")
        server.verify_mode = ssl.CERT_REQUIRED
    server.num_tickets = 0  # as auth/tls.py's server contexts
    client = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    client.load_cert_chain(certs / "bench.pem", certs / "bench-key.pem")
    return server, client


def pump(a: socket.socket, out: ssl.MemoryBIO) -> None:
    if out.pending:
        a.sendall(out.read())


def feed(a: socket.socket, inc: ssl.MemoryBIO) -> None:
    try:
        while True:
            data = a.recv(65536)
            if not data:
                return
            inc.write(data)
    except BlockingIOError:
        return


def one(mode: str, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> list[Any]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    cli = client_ctx.wrap_bio(cin, cout, server_hostname="localhost")
    sin: ssl.MemoryBIO | None = None
    sout: ssl.MemoryBIO | None = None
    if mode == "socket":
        srv: Any = server_ctx.wrap_socket(b, server_side=True, do_handshake_on_connect=False)
    else:
        sin, sout = ssl.MemoryBIO(), ssl.MemoryBIO()
        srv = server_ctx.wrap_bio(sin, sout, server_side=True)
    done_c = done_s = False
    for _ in range(50):
        if not done_c:
            try:
                cli.do_handshake()
                done_c = True
            except ssl.SSLWantReadError:
                pass
        pump(a, cout)
        if sin is not None:
            feed(b, sin)
        if not done_s:
            try:
                srv.do_handshake()
                done_s = True
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
        if sout is not None:
            pump(b, sout)
        feed(a, cin)
        if done_c and done_s:
            break
    else:
        raise RuntimeError("handshake did not finish")
    # one small record each way, then idle
    cli.write(b"hello")
    pump(a, cout)
    if sin is not None:
        feed(b, sin)
    assert srv.read(100) == b"hello"
    srv.write(b"welcome")
    if sout is not None:
        pump(b, sout)
    feed(a, cin)
    assert cli.read(100) == b"welcome"
    # keep the server side only (and both socket ends, the same in every mode)
    return [a, b, srv, sin, sout]


def child(mode: str, n: int, certs: Path, mutual: bool) -> dict[str, Any]:
    server_ctx, client_ctx = contexts(certs, mutual)
    held = [one(mode, server_ctx, client_ctx) for _ in range(20)]  # warm-up
    h0, r0 = heap_bytes(), rss_kb()
    held += [one(mode, server_ctx, client_ctx) for _ in range(n)]
    h1, r1 = heap_bytes(), rss_kb()
    return {
        "mode": mode,
        "mutual": mutual,
        "n": n,
        "heap_per_conn": (h1 - h0) / n,
        "rss_kb_per_conn": (r1 - r0) / n,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conns", type=int, default=2000)
    p.add_argument("--tls", action="store_true", help="no client certificate (TLS, not mutual)")
    p.add_argument("--child", choices=("bio", "socket"), help=argparse.SUPPRESS)
    p.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.conns, args.certs, not args.tls)))
        return 0
    sys.path.insert(0, str(HERE))
    import bench as suite  # noqa: PLC0415 - bench/bench.py: certificates

    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp)
        suite.provision(certs)
        res = {}
        for mode in ("bio", "socket"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--conns", str(args.conns),
                 "--certs", str(certs), *(["--tls"] if args.tls else [])],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            res[mode] = json.loads(out.stdout)
    print(
        f"N={args.conns}, {'TLS' if args.tls else 'mutual TLS'} 1.3; server side per connection"
        " (+ the socket pair, same in both):"
    )
    for mode in ("bio", "socket"):
        r = res[mode]
        print(
            f"  {mode:<7} malloc {r['heap_per_conn'] / 1024:6.2f} KB, "
            f"RSS {r['rss_kb_per_conn']:6.2f} KB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
