"""Pre-flight checks of a valid configuration: every file it names, loaded as ``serve`` would.

:func:`preflight` is what ``tessera-broker check-config`` reports and what ``serve`` runs before
it binds anything, so the two cannot disagree: for each listener it parses the certificate
chain, the private key and the client CA (a key that does not match its certificate, a private
key given as ``cert``, a chain whose links do not verify, a certificate expired or expiring
soon), looks the service principal up in the keytab, then builds the listener's security layer
exactly as the broker does; it also loads the ACL and checks that the audit file can be written.
Every problem names the listener (``listeners[0] (0.0.0.0:7443)``) and the file.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import logging
import os
import ssl
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from tessera_mq.auth.acl import AclError, Policy
from tessera_mq.broker.config import BrokerConfig, ListenerConfig, Problem

__all__ = ["EXPIRY_WARNING_DAYS", "preflight"]

#: A certificate that expires within this many days gets a warning (Let's Encrypt renews at 30).
EXPIRY_WARNING_DAYS = 30

_Lines = Mapping[tuple[str | int, ...], int]


class _Report:
    def __init__(self, source: str | None, lines: _Lines) -> None:
        self.source = source
        self.lines = lines
        self.problems: list[Problem] = []

    def add(self, path: tuple[str | int, ...], message: str, severity: str = "error") -> None:
        where = ""
        for part in path:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else part)
        line = None
        for n in range(len(path), 0, -1):
            line = self.lines.get(path[:n])
            if line is not None:
                break
        self.problems.append(Problem(where, message, line, self.source, severity))

    def errors_for(self, prefix: str) -> bool:
        return any(p.severity == "error" and p.where.startswith(prefix) for p in self.problems)


def preflight(
    cfg: BrokerConfig, lines: _Lines | None = None, *, serving: bool = False
) -> list[Problem]:
    """Every problem (``severity`` error or warning) with the files ``cfg`` names. ``serving``:
    leave out the warnings the broker logs itself as it starts (NTLM allowed)."""
    report = _Report(str(cfg.source) if cfg.source else None, lines or {})
    for i, lst in enumerate(cfg.listeners):
        _listener(report, i, lst, serving=serving)
    if cfg.acl_file is None:
        report.add(("acl",), "no [acl] file: every publish and subscribe will be denied", "warning")
    elif _readable(report, ("acl", "file"), cfg.acl_file, "ACL"):
        try:
            Policy.from_file(cfg.acl_file)
        except AclError as exc:
            report.add(("acl", "file"), str(exc))
    if cfg.audit_file is not None:
        _writable(report, ("audit", "file"), cfg.audit_file)
    if cfg.data_dir is not None:
        _data_dir(report, cfg.data_dir)
    if cfg.metrics.bind is not None:
        try:
            import prometheus_client  # noqa: F401, PLC0415
        except ImportError:
            report.add(
                ("metrics", "bind"),
                "needs the metrics extra: pip install 'tessera-mq[metrics]'",
            )
    if cfg.cluster is not None:
        _cluster(report, cfg)
    return report.problems


def _cluster(report: _Report, cfg: BrokerConfig) -> None:
    cluster = cfg.cluster
    assert cluster is not None
    if importlib.util.find_spec("redis") is None:
        report.add(("cluster",), "needs the cluster extra: pip install 'tessera-mq[cluster]'")
    if cluster.tls_ca is not None:
        _readable(report, ("cluster", "tls_ca"), cluster.tls_ca, "CA")
    pw = cluster.password_file
    readable = pw is not None and _readable(report, ("cluster", "password_file"), pw, "password")
    if readable and pw is not None and pw.stat().st_mode & 0o077:
        report.add(
            ("cluster", "password_file"), f"{pw} is readable by group/others (chmod 600)", "warning"
        )


def _name(i: int, lst: ListenerConfig) -> str:
    return f"listeners[{i}] ({lst.bind})"


def _readable(report: _Report, path: tuple[str | int, ...], file: Path, what: str) -> bool:
    if not file.exists():
        report.add(path, f"{what} file {file} does not exist")
        return False
    if not file.is_file():
        report.add(path, f"{file} is not a file")
        return False
    if not os.access(file, os.R_OK):
        report.add(path, f"{file} is not readable by this user")
        return False
    return True


def _writable(report: _Report, path: tuple[str | int, ...], file: Path) -> None:
    parent = file.parent
    if file.exists():
        if not os.access(file, os.W_OK):
            report.add(path, f"{file} is not writable by this user")
    elif not parent.is_dir():
        report.add(path, f"directory {parent} does not exist")
    elif not os.access(parent, os.W_OK):
        report.add(path, f"cannot create {file}: directory not writable")


def _data_dir(report: _Report, directory: Path) -> None:
    """The embedded store's directory exists and is writable, or can be created."""
    if directory.exists():
        if not directory.is_dir():
            report.add(("data_dir",), f"{directory} is not a directory")
        elif not os.access(directory, os.W_OK | os.X_OK):
            report.add(("data_dir",), f"{directory} is not writable by this user")
        return
    parent = directory.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        report.add(("data_dir",), f"cannot create {directory}: {parent} is not writable")


def _listener(report: _Report, i: int, lst: ListenerConfig, *, serving: bool) -> None:
    base: tuple[str | int, ...] = ("listeners", i)
    name = _name(i, lst)
    certs: list[x509.Certificate] = []
    if lst.cert is not None and _readable(report, (*base, "cert"), lst.cert, f"{name}: cert"):
        certs = _certificates(report, (*base, "cert"), name, lst.cert, "cert")
    if lst.key is not None and _readable(report, (*base, "key"), lst.key, f"{name}: key"):
        _private_key(report, (*base, "key"), name, lst.key, certs=certs, cert_file=lst.cert)
    if lst.client_ca is not None and _readable(
        report, (*base, "client_ca"), lst.client_ca, f"{name}: client_ca"
    ):
        for ca in _certificates(report, (*base, "client_ca"), name, lst.client_ca, "client_ca"):
            if not _is_ca(ca):
                report.add(
                    (*base, "client_ca"),
                    f"{name}: {lst.client_ca}: {_subject(ca)} is not a CA certificate "
                    "(basicConstraints CA:FALSE); clients it did not sign will be refused",
                    "warning",
                )
    for key in ("keytab", "ntlm_user_file"):
        p: Path | None = getattr(lst, key)
        if p is not None:
            _readable(report, (*base, key), p, f"{name}: {key}")
    for crl in lst.crl:  # issue #10; their contents are checked with the TLS context below
        _readable(report, (*base, "crl"), crl, f"{name}: crl")
    if (
        lst.keytab is not None
        and lst.service_principal
        and not report.errors_for(f"listeners[{i}]")
    ):
        _keytab(report, (*base, "keytab"), name, lst.keytab, lst.service_principal)
    if report.errors_for(f"listeners[{i}]"):
        return  # the file problems above say it better than the library would
    # Last, exactly what `serve` does for this listener (TLS context, SPNEGO acceptor).
    if not serving and "ntlm" in lst.mechanisms and lst.security in ("negotiate", "tls+negotiate"):
        report.add(
            (*base, "mechanisms"),
            f"{name} allows NTLM: NTLM sealing is RC4 and NTLM can be relayed; prefer Kerberos, "
            'and keep NTLM inside TLS (security = "tls+negotiate")',
            "warning",
        )
    server_log = logging.getLogger("tessera.broker")
    quiet = _DropAll()
    server_log.addFilter(quiet)  # the broker logs its own start-up warnings when it starts
    try:
        from tessera_mq.broker.server import _layer_factory, listener_crls  # noqa: PLC0415 - server imports this module's callers

        _layer_factory(lst, listener_crls(lst))
    except ssl.SSLError as exc:
        files = ", ".join(str(p) for p in (lst.cert, lst.key, lst.client_ca) if p is not None)
        report.add(base, f"{name}: TLS cannot load {files}: {exc.reason or exc}")
    except ImportError as exc:
        report.add(
            (*base, "security"),
            f"{name}: security = {lst.security!r} needs the negotiate extra "
            f"(pip install 'tessera-mq[negotiate]'): {exc}",
        )
    except (OSError, ValueError) as exc:
        report.add(base, f"{name}: {exc}")
    finally:
        server_log.removeFilter(quiet)


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _certificates(
    report: _Report, path: tuple[str | int, ...], name: str, file: Path, key: str
) -> list[x509.Certificate]:
    data = file.read_bytes()
    if b"-----BEGIN CERTIFICATE-----" not in data:
        if b"PRIVATE KEY-----" in data:
            report.add(
                path,
                f"{name}: {file} holds a private key, not a certificate "
                "(are `cert` and `key` swapped?)",
            )
        else:
            report.add(path, f"{name}: {file} holds no PEM certificate")
        return []
    if key == "cert" and b"PRIVATE KEY-----" in data:
        report.add(
            path,
            f"{name}: {file} also holds a private key: keep the key in its own file (mode 0600)",
            "warning",
        )
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        report.add(path, f"{name}: {file}: a certificate does not parse: {exc}")
        return []
    now = _dt.datetime.now(_dt.UTC)
    for n, cert in enumerate(certs):
        which = f"{file}" + (f" (certificate {n + 1}, {_subject(cert)})" if len(certs) > 1 else "")
        after, before = cert.not_valid_after_utc, cert.not_valid_before_utc
        if after <= now:
            report.add(path, f"{name}: {which} expired on {after:%Y-%m-%d %H:%M} UTC")
        elif before > now:
            report.add(path, f"{name}: {which} is not valid before {before:%Y-%m-%d %H:%M} UTC")
        elif after - now < _dt.timedelta(days=EXPIRY_WARNING_DAYS):
            days = (after - now).days
            report.add(
                path,
                f"{name}: {which} expires in {days} day(s), on {after:%Y-%m-%d} UTC",
                "warning",
            )
    if key == "cert":
        for n in range(len(certs) - 1):
            try:
                certs[n].verify_directly_issued_by(certs[n + 1])
            except (ValueError, TypeError, InvalidSignature) as exc:
                report.add(
                    path,
                    f"{name}: {file}: the chain does not verify: certificate {n + 2} "
                    f"({_subject(certs[n + 1])}) did not issue certificate {n + 1} "
                    f"({_subject(certs[n])}): {exc or 'bad signature'}",
                )
    return certs


def _private_key(
    report: _Report,
    path: tuple[str | int, ...],
    name: str,
    file: Path,
    *,
    certs: list[x509.Certificate],
    cert_file: Path | None,
) -> None:
    mode = file.stat().st_mode
    if mode & 0o077:
        report.add(path, f"{file} is readable by group/others (chmod 600)", "warning")
    data = file.read_bytes()
    if b"PRIVATE KEY-----" not in data:
        if b"-----BEGIN CERTIFICATE-----" in data:
            report.add(
                path,
                f"{name}: {file} holds a certificate, not a private key "
                "(are `cert` and `key` swapped?)",
            )
        else:
            report.add(path, f"{name}: {file} holds no PEM private key")
        return
    if b"ENCRYPTED" in data:
        report.add(
            path,
            f"{name}: {file} is encrypted; the broker cannot ask for a passphrase at start "
            "(store it unencrypted, mode 0600)",
        )
        return
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        report.add(path, f"{name}: {file}: the private key does not parse: {exc}")
        return
    if certs:
        der = serialization.Encoding.DER
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if private.public_key().public_bytes(der, spki) != certs[0].public_key().public_bytes(
            der, spki
        ):
            report.add(
                path, f"{name}: {file} is not the private key of the certificate in {cert_file}"
            )


def _keytab(
    report: _Report, path: tuple[str | int, ...], name: str, keytab: Path, service: str
) -> None:
    """The service principal must have a key in the keytab, or every Kerberos login fails."""
    try:
        import krb5  # noqa: PLC0415 - the negotiate extra
    except ImportError:
        return  # reported when the layer is built
    principal = service if "/" in service else f"tessera/{service}"
    try:
        ctx = krb5.init_context()
        kt = krb5.kt_resolve(ctx, f"FILE:{keytab}".encode())
        princ = krb5.parse_name_flags(ctx, principal.encode())
    except Exception as exc:  # no krb5.conf, unparsable name: cannot tell
        report.add(path, f"{name}: cannot inspect keytab {keytab}: {exc}", "warning")
        return
    try:
        krb5.kt_get_entry(ctx, kt, princ)
    except Exception:
        report.add(
            path,
            f"{name}: keytab {keytab} has no key for {principal}: every Kerberos login would fail",
        )
