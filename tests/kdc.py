"""A real, throwaway MIT Kerberos KDC for the test suite.

``KDC.start(tmpdir)`` writes ``krb5.conf`` and ``kdc.conf`` into *tmpdir* (realm ``TESSERA.TEST``,
the KDC on 127.0.0.1 with a free port, no DNS), creates the database with ``kdb5_util create -s``
and runs ``krb5kdc -n`` as a child process that dies with its parent (``setpriv --pdeathsig``) and
is stopped by :meth:`KDC.stop`. Principals and keytabs are managed with ``kadmin.local``.

Using it in-process
-------------------
MIT krb5 reads ``KRB5_CONFIG``, ``KRB5CCNAME``, ``KRB5_KTNAME``... every time it creates a
``krb5_context``; python-gssapi creates one per call (``gss_acquire_cred``,
``gss_init_sec_context``), so :meth:`KDC.apply_env` (which sets ``os.environ``, and so the C
environment) takes effect for every GSS call made afterwards, without re-importing anything. The
session fixture :func:`kdc` does that for the whole test session and restores the previous values
at the end. For subprocesses (a
real broker), pass ``env={**os.environ, **kdc.env()}``.

If the MIT binaries are missing this FAILS (never skips) naming the Debian packages to install:
``apt-get install krb5-kdc krb5-admin-server krb5-user libkrb5-dev``.

Measured start-up (``KDC.start``: config, ``kdb5_util create -s``, ``krb5kdc`` listening) is
30-65 ms on the CI machine type (2 vCPU); each ``kadmin.local`` call costs about 20 ms.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

__all__ = ["KDC", "KDCError", "REALM", "UNREACHABLE_REALM", "kdc"]

REALM = "TESSERA.TEST"
UNREACHABLE_REALM = "UNREACHABLE.TEST"
"""A realm in krb5.conf whose KDC address has nothing listening: for "KDC unreachable" tests."""
_APT_PACKAGES = "krb5-kdc krb5-admin-server krb5-user libkrb5-dev"
_BINARIES = ("kdb5_util", "kadmin.local", "krb5kdc", "kinit", "setpriv")
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
# How long the KDC may take to start listening; it normally needs well under a second.
_KDC_START_TIMEOUT_SECONDS = 10.0
_ENV_KEYS = (
    "KRB5_CONFIG",
    "KRB5_KDC_PROFILE",
    "KRB5CCNAME",
    "KRB5_KTNAME",
    "KRB5_CLIENT_KTNAME",
    "KRB5RCACHEDIR",
)


class KDCError(RuntimeError):
    """The throwaway KDC could not be set up or a kadmin command failed."""


def _find_binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        for directory in _SBIN_DIRS:  # kdb5_util, krb5kdc live in sbin, often not on PATH
            candidate = Path(directory) / name
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
        raise KDCError(
            f"MIT Kerberos binary {name!r} not found: the Kerberos tests need a real KDC. "
            f"Install it with: apt-get install {_APT_PACKAGES}"
        )
    return found


def _free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (the KDC listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise KDCError("no free port for the KDC on 127.0.0.1")


class KDC:
    """A running throwaway KDC for realm :data:`REALM`. Create with :meth:`start`."""

    realm = REALM

    def __init__(self, directory: Path, port: int, binaries: dict[str, str]) -> None:
        self.directory = directory
        self.port = port
        self.unreachable_port = _free_port()
        self._bin = binaries
        self._process: subprocess.Popen[bytes] | None = None
        self.krb5_conf = directory / "krb5.conf"
        self.kdc_conf = directory / "kdc.conf"
        self.ccache = directory / "ccache"
        self.keytab = directory / "krb5.keytab"  # KRB5_KTNAME: the default acceptor keytab
        self.client_keytab = directory / "client.keytab"  # KRB5_CLIENT_KTNAME
        self.rcache_dir = directory / "rcache"
        self.log_file = directory / "kdc.log"
        self.start_seconds = 0.0
        self._saved_env: dict[str, str | None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def start(cls, directory: str | os.PathLike[str]) -> KDC:
        """Create the realm in *directory* (which must exist) and start the KDC."""
        began = time.perf_counter()
        binaries = {name: _find_binary(name) for name in _BINARIES}
        path = Path(directory).resolve()
        last_error: Exception | None = None
        for _ in range(3):  # the free port can be taken between probing and binding
            kdc = cls(path, _free_port(), binaries)
            try:
                kdc._write_config()
                kdc._create_database()
                kdc._spawn()
            except KDCError as exc:
                kdc.stop()
                last_error = exc
                for child in (
                    "principal",
                    "principal.ok",
                    "principal.kadm5",
                    "principal.kadm5.lock",
                ):
                    (path / child).unlink(missing_ok=True)
                continue
            kdc.start_seconds = time.perf_counter() - began
            return kdc
        raise KDCError(f"the KDC did not start: {last_error}")

    def stop(self) -> None:
        """Stop the KDC process (idempotent) and restore the environment if it was applied."""
        self.restore_env()
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __enter__(self) -> KDC:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- environment ---------------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        """Variables that point MIT krb5 (library and tools) at this realm; *extra* is merged in
        (e.g. ``NTLM_USER_FILE=...``). Pass to subprocesses: ``env={**os.environ, **kdc.env()}``."""
        values = {
            "KRB5_CONFIG": str(self.krb5_conf),
            "KRB5_KDC_PROFILE": str(self.kdc_conf),
            "KRB5CCNAME": f"FILE:{self.ccache}",
            "KRB5_KTNAME": f"FILE:{self.keytab}",
            "KRB5_CLIENT_KTNAME": f"FILE:{self.client_keytab}",
            "KRB5RCACHEDIR": str(self.rcache_dir),
        }
        values.update(extra)
        return values

    def apply_env(self, **extra: str) -> None:
        """Point the current process at this realm (see the module docstring); undone by
        :meth:`restore_env` or :meth:`stop`."""
        values = self.env(**extra)
        if self._saved_env is None:
            self._saved_env = {key: os.environ.get(key) for key in (*_ENV_KEYS, *extra)}
        else:
            for key in extra:
                self._saved_env.setdefault(key, os.environ.get(key))
        os.environ.update(values)

    def restore_env(self) -> None:
        saved, self._saved_env = self._saved_env, None
        if saved is None:
            return
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    # -- principals ----------------------------------------------------------------------------

    def principal(self, name: str) -> str:
        """``name@TESSERA.TEST`` unless *name* already has a realm."""
        return name if "@" in name else f"{name}@{self.realm}"

    def add_principal(self, name: str, password: str | None = None) -> str:
        """Create *name* with *password*, or with a random key if none; returns the full name."""
        full = self.principal(name)
        if password is None:
            self._kadmin(f"addprinc -randkey {full}", what=f"add principal {full}")
        else:
            self._kadmin(f'addprinc -pw "{password}" {full}', what=f"add principal {full}")
        return full

    def export_keytab(self, path: str | os.PathLike[str], principals: Iterable[str]) -> Path:
        """Append the current keys of *principals* to the keytab *path* (keys are not changed)."""
        target = Path(path)
        for name in principals:
            full = self.principal(name)
            self._kadmin(f"ktadd -k {target} -norandkey {full}", what=f"export {full}")
        return target

    def kinit(
        self, principal: str, password: str, ccache: str | os.PathLike[str] | None = None
    ) -> str:
        """Get a TGT for *principal* into *ccache* (default: this KDC's ``KRB5CCNAME``) with the
        ``kinit`` tool; returns the ccache name."""
        name = f"FILE:{ccache}" if ccache is not None else f"FILE:{self.ccache}"
        result = subprocess.run(
            [self._bin["kinit"], "-c", name, self.principal(principal)],
            input=(password + "\n").encode(),
            env={**os.environ, **self.env()},
            capture_output=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:  # stderr names the principal, never the password
            raise KDCError(f"kinit {principal} failed: {result.stderr.decode(errors='replace')}")
        return name

    # -- internals -----------------------------------------------------------------------------

    def _write_config(self) -> None:
        d = self.directory
        self.rcache_dir.mkdir(exist_ok=True)
        self.krb5_conf.write_text(
            f"""[libdefaults]
    default_realm = {self.realm}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    dns_canonicalize_hostname = false
    rdns = false
    ignore_acceptor_hostname = false
    udp_preference_limit = 1
    default_ccache_name = FILE:{self.ccache}
    default_keytab_name = FILE:{self.keytab}
    default_client_keytab_name = FILE:{self.client_keytab}
    forwardable = false
    kdc_timesync = 0

[realms]
    {self.realm} = {{
        kdc = 127.0.0.1:{self.port}
    }}

    {UNREACHABLE_REALM} = {{
        kdc = 127.0.0.1:{self.unreachable_port}
    }}

[domain_realm]
    .tessera.test = {self.realm}
    tessera.test = {self.realm}
    localhost = {self.realm}
"""
        )
        self.kdc_conf.write_text(
            f"""[kdcdefaults]
    kdc_listen = 127.0.0.1:{self.port}
    kdc_tcp_listen = 127.0.0.1:{self.port}

[realms]
    {self.realm} = {{
        database_name = {d}/principal
        key_stash_file = {d}/stash
        acl_file = {d}/kadm5.acl
        max_life = 10h
        max_renewable_life = 0
        supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
        default_principal_flags = +preauth
    }}

[logging]
    kdc = FILE:{self.log_file}
    admin_server = FILE:{d}/kadmin.log
    default = FILE:{d}/krb5lib.log
"""
        )
        (d / "kadm5.acl").write_text("")

    def _run_tool(self, argv: list[str], what: str) -> None:
        result = subprocess.run(
            argv,
            env={**os.environ, **self.env()},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
        # kadmin.local reports some failures only on stderr with exit status 0.
        stderr = result.stderr.decode(errors="replace")
        if result.returncode != 0 or "error" in stderr.lower() or "failed" in stderr.lower():
            raise KDCError(f"{what} failed: {stderr.strip()}")

    def _kadmin(self, query: str, what: str) -> None:
        self._run_tool([self._bin["kadmin.local"], "-r", self.realm, "-q", query], what)

    def _create_database(self) -> None:
        master = secrets.token_urlsafe(24)
        self._run_tool(
            [self._bin["kdb5_util"], "-r", self.realm, "create", "-s", "-W", "-P", master],
            what="kdb5_util create",
        )

    def _spawn(self) -> None:
        # setpriv sets PR_SET_PDEATHSIG and execs krb5kdc, which keeps it: the KDC gets SIGKILL
        # when the thread that started it exits (start it from the main thread, as pytest does).
        argv = [
            self._bin["setpriv"],
            "--pdeathsig",
            "KILL",
            "--",
            self._bin["krb5kdc"],
            "-n",
            "-r",
            self.realm,
            "-P",
            str(self.directory / "kdc.pid"),
        ]
        log = (self.directory / "krb5kdc.stderr").open("wb")
        with log:
            self._process = subprocess.Popen(
                argv,
                env={**os.environ, **self.env()},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + _KDC_START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                detail = (self.directory / "krb5kdc.stderr").read_text(errors="replace")
                raise KDCError(f"krb5kdc exited with {self._process.returncode}: {detail.strip()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            time.sleep(0.005)
        raise KDCError(f"krb5kdc did not listen on 127.0.0.1:{self.port} in time")


@pytest.fixture(scope="session")
def kdc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KDC]:
    """A KDC for the whole session, with its environment applied to this process.

    Import it into ``conftest.py`` with ``from kdc import kdc``. Tests add the principals they
    need (``kdc.add_principal``); names must be unique within the session.
    """
    try:
        server = KDC.start(tmp_path_factory.mktemp("kdc"))
    except KDCError as exc:
        problem = str(exc)
    else:
        problem = ""
    if problem:  # fail (never skip): CI must run these tests
        pytest.fail(problem, pytrace=False)
    server.apply_env()
    try:
        yield server
    finally:
        server.stop()
