"""``tessera-broker serve --workers N``: a supervisor and N broker processes sharing each port.

The supervisor reserves each listening address once (a bound, never listening socket with
``SO_REUSEPORT``, so ``port = 0`` resolves to one port for every worker and a restarted worker
gets the same one), then runs N ordinary ``serve`` processes that listen on it with
``SO_REUSEPORT``: the kernel spreads new connections over the workers' accept queues. The
workers share topics through the Redis backplane (``[cluster]``), so ``--workers`` above 1
without it is refused: split topic spaces would be a silent failure.

The supervisor prints the ``listening`` lines once every worker is listening, forwards SIGTERM
and SIGINT to the workers (graceful shutdown, each bounded by ``shutdown_timeout``), SIGUSR1
(stats) and SIGHUP (reload; workers have no admin socket), restarts a worker that dies, and
gives up when workers keep dying. Exit codes:
:data:`EXIT_OK`, :data:`EXIT_START_FAILED`, :data:`EXIT_USAGE`, :data:`EXIT_CRASH_LOOP`.

Kerberos: the workers get ``KRB5RCACHENAME`` pointing at one MIT ``file2`` replay cache (safe for
concurrent processes), unless the operator set one, so a replayed AP-REQ is refused by every
worker of the machine, not only by the one that saw it first (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tessera_mq.broker.config import BrokerConfig, parse_bind

__all__ = [
    "EXIT_CRASH_LOOP",
    "EXIT_OK",
    "EXIT_START_FAILED",
    "EXIT_USAGE",
    "parse_workers",
    "replay_cache_name",
    "supervise",
]

log = logging.getLogger("tessera.broker.workers")

#: Every worker stopped cleanly.
EXIT_OK = 0
#: A worker did not start (bad configuration, Redis unreachable, port taken), or exited non-zero
#: on shutdown.
EXIT_START_FAILED = 1
#: ``--workers`` misused (not a count, or above 1 without ``[cluster]``).
EXIT_USAGE = 2
#: Workers died more than :data:`_CRASHES_ALLOWED` times within :data:`_CRASH_WINDOW_SECONDS`.
EXIT_CRASH_LOOP = 3

#: Seconds a worker may take to print its ``listening`` lines (imports, TLS, Redis included).
_START_TIMEOUT_SECONDS = 30.0
#: Crash-loop guard: this many unexpected exits within the window and the supervisor gives up
#: (systemd's StartLimitBurst=5 / StartLimitIntervalSec=10s is the same idea, longer here).
_CRASHES_ALLOWED = 5
_CRASH_WINDOW_SECONDS = 60.0
#: Seconds between a worker's death and its replacement.
_RESTART_DELAY_SECONDS = 0.5
#: Seconds beyond ``shutdown_timeout`` a worker may take to exit before it is killed.
_STOP_GRACE_SECONDS = 10.0
#: Upper bound for ``--workers`` (a typo such as 1000 would fork-bomb the machine).
MAX_WORKERS = 256


def parse_workers(value: str) -> int:
    """``--workers``: a count, or ``auto`` for the CPUs this process may run on."""
    if value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"--workers must be a number or 'auto', not {value!r}") from None
    if not 1 <= n <= MAX_WORKERS:
        raise ValueError(f"--workers must be between 1 and {MAX_WORKERS}")
    return n


def replay_cache_name(environ: dict[str, str] | os._Environ[str]) -> str | None:
    """The ``KRB5RCACHENAME`` the workers get: the operator's if set, else one MIT ``file2``
    cache per user on this machine (None: leave the environment alone)."""
    if "KRB5RCACHENAME" in environ or "KRB5RCACHETYPE" in environ:
        return None  # the operator chose; workers inherit it
    directory = environ.get("KRB5RCACHEDIR") or tempfile.gettempdir()
    return f"file2:{Path(directory) / f'tessera_krb5_{os.geteuid()}.rcache2'}"


def _reserve(cfg: BrokerConfig) -> tuple[list[socket.socket], list[str]]:
    """Bind (not listen) every listener's address with SO_REUSEPORT; return the sockets and
    the concrete ``host:port`` of each."""
    socks: list[socket.socket] = []
    binds: list[str] = []
    try:
        for lst in cfg.listeners:
            host, port = parse_bind(lst.bind)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((host, port))
            real = int(s.getsockname()[1])
            binds.append(f"[{host}]:{real}" if family == socket.AF_INET6 else f"{host}:{real}")
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks, binds


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.listening: list[str] = []
        self.reader: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()


class _Supervisor:
    def __init__(
        self, argv: Sequence[str], n: int, binds: list[str], cfg: BrokerConfig, env: dict[str, str]
    ) -> None:
        self.argv = list(argv)
        self.n = n
        self.binds = binds
        self.cfg = cfg
        self.env = env
        self.workers = [_Worker(i) for i in range(n)]
        self.stopping = False
        self.crashes: list[float] = []
        self.exit_code = EXIT_OK
        self.stop_event = asyncio.Event()

    async def spawn(self, w: _Worker, *, restart: bool = False) -> None:
        w.listening = []
        w.ready = asyncio.Event()
        args = [
            sys.executable,
            "-m",
            "tessera_mq.broker.cli",
            *self.argv,
            "--worker-binds",
            json.dumps(self.binds),
            "--worker-index",
            str(w.index),
            # a replacement starts even while Redis is down (and reconnects): an outage plus a
            # crashed worker must not become a crash loop that stops the whole machine
            *(["--worker-restarted"] if restart else []),
        ]
        w.process = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=self.env,
        )
        w.reader = asyncio.get_running_loop().create_task(self.read(w))

    async def read(self, w: _Worker) -> None:
        assert w.process is not None and w.process.stdout is not None
        expected = len(self.binds)
        async for raw in w.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith("listening ") and not w.ready.is_set():
                w.listening.append(line)
                if len(w.listening) >= expected:
                    w.ready.set()
            elif line:
                print(f"[worker {w.index}] {line}", flush=True)

    async def start_all(self) -> bool:
        for w in self.workers:
            await self.spawn(w)
        for w in self.workers:
            assert w.process is not None
            ready = asyncio.ensure_future(w.ready.wait())
            died = asyncio.ensure_future(w.process.wait())
            done, _ = await asyncio.wait(
                {ready, died}, timeout=_START_TIMEOUT_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            ready.cancel()
            if ready not in done or not w.ready.is_set():
                died.cancel()
                code = w.process.returncode
                log.error(
                    "worker %d %s; stopping the others",
                    w.index,
                    f"exited with {code} before listening"
                    if code is not None
                    else f"printed no listening line within {_START_TIMEOUT_SECONDS:.0f} s",
                )
                return False
            died.cancel()
        return True

    async def watch(self, w: _Worker) -> None:
        """Restart ``w`` whenever it dies unexpectedly; trip the crash-loop guard."""
        while True:
            assert w.process is not None
            code = await w.process.wait()
            if self.stopping:
                return
            now = time.monotonic()
            self.crashes = [t for t in self.crashes if now - t < _CRASH_WINDOW_SECONDS]
            self.crashes.append(now)
            if len(self.crashes) > _CRASHES_ALLOWED:
                log.error(
                    "worker %d exited with %s; %d worker exits within %.0f s: giving up",
                    w.index,
                    code,
                    len(self.crashes),
                    _CRASH_WINDOW_SECONDS,
                )
                self.exit_code = EXIT_CRASH_LOOP
                self.stop_event.set()
                return
            log.error(
                "worker %d (pid %d) exited with %s; restarting it", w.index, w.process.pid, code
            )
            await asyncio.sleep(_RESTART_DELAY_SECONDS)
            if self.stopping:
                return
            await self.spawn(w, restart=True)

    def signal_all(self, sig: int) -> None:
        for w in self.workers:
            p = w.process
            if p is not None and p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)

    async def stop_all(self) -> None:
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        deadline = self.cfg.shutdown_timeout + _STOP_GRACE_SECONDS
        for w in self.workers:
            p = w.process
            if p is None:
                continue
            try:
                code = await asyncio.wait_for(p.wait(), deadline)
            except TimeoutError:
                log.error(  # noqa: TRY400 - a timeout, no traceback wanted
                    "worker %d did not exit within %.0f s: killing it", w.index, deadline
                )
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                code = await p.wait()
            if code != 0 and self.exit_code == EXIT_OK:
                log.error("worker %d exited with %d on shutdown", w.index, code)
                self.exit_code = EXIT_START_FAILED
            if w.reader is not None:
                with contextlib.suppress(Exception):
                    await w.reader

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        loop.add_signal_handler(signal.SIGUSR1, self.signal_all, signal.SIGUSR1)
        # issue #10: SIGHUP reloads every worker (each validates and applies on its own)
        loop.add_signal_handler(signal.SIGHUP, self.signal_all, signal.SIGHUP)
        if not await self.start_all():
            self.exit_code = EXIT_START_FAILED
            await self.stop_all()
            return EXIT_START_FAILED
        for line in self.workers[0].listening:
            print(line, flush=True)
        pids = ", ".join(str(w.process.pid) for w in self.workers if w.process is not None)
        log.info("%d workers listening (pids %s)", self.n, pids)
        watchers = [loop.create_task(self.watch(w)) for w in self.workers]
        await self.stop_event.wait()
        log.info("supervisor: stopping %d workers", self.n)
        await self.stop_all()
        for t in watchers:
            t.cancel()
        return self.exit_code


def supervise(argv: Sequence[str], cfg: BrokerConfig, n: int) -> int:
    """Run ``n`` workers of ``tessera-broker <argv>`` (``serve --config F ...``); return the exit
    code. ``cfg`` is the validated configuration the workers will load."""
    if cfg.cluster is None:
        print(
            f"tessera-broker: error: --workers {n} needs [cluster] redis: workers share topics "
            "through Redis (without it each worker would be a separate topic space); "
            "see docs/scaling.md",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        socks, binds = _reserve(cfg)
    except OSError as exc:
        print(f"tessera-broker: error: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    env = dict(os.environ)
    rcache = replay_cache_name(env)
    if rcache is not None:
        env["KRB5RCACHENAME"] = rcache
    try:
        return asyncio.run(_Supervisor(argv, n, binds, cfg, env).run())
    finally:
        for s in socks:
            s.close()
