"""``tessera-certs``: create a CA, issue server and client certificates, show a certificate,
revoke one and publish the CRL.

Exit status: 0 on success, 1 when the operation fails (the reason goes to stderr as
``tessera-certs: error: ...``), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TextIO

from tessera_mq.certs.pki import (
    CRL_DAYS_DEFAULT,
    REVOCATION_REASONS,
    RSA_MAX_BITS,
    RSA_MIN_BITS,
    CertsError,
    CrlInfo,
    IssuedFiles,
    describe,
    init_ca,
    issue,
    make_crl,
    revoke,
)

__all__ = ["main"]

PROG = "tessera-certs"

_EXIT_OK = 0
_EXIT_ERROR = 1
_EXIT_USAGE = 2

_Handler = Callable[[argparse.Namespace], int]


def main(argv: list[str] | None = None) -> int:
    """Run ``tessera-certs`` with *argv* (default ``sys.argv[1:]``) and return the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: keep the status, not the exit
        return _exit_status(exc.code)
    handler: _Handler = args.handler
    try:
        return handler(args)
    except CertsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return _EXIT_ERROR


# --------------------------------------------------------------------------------------------------
# Commands


def _cmd_init_ca(args: argparse.Namespace) -> int:
    files = init_ca(
        args.dir,
        common_name=args.name,
        key_type=args.key_type,
        rsa_bits=args.rsa_bits,
        days=args.days,
        force=args.force,
    )
    _report(files, as_json=args.json)
    return _EXIT_OK


def _cmd_issue(args: argparse.Namespace) -> int:
    files = issue(
        args.dir,
        args.kind,
        args.name,
        dns=args.dns,
        ip=args.ip,
        email=args.email,
        uri=args.uri,
        key_type=args.key_type,
        rsa_bits=args.rsa_bits,
        days=args.days,
        force=args.force,
        file_stem=args.file_stem,
    )
    _report(files, as_json=args.json)
    return _EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    info = describe(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_description(info, sys.stdout)
    return _EXIT_OK


def _cmd_revoke(args: argparse.Namespace) -> int:
    entry, info = revoke(
        args.dir,
        cert=args.file,
        serial=args.serial,
        reason=args.reason,
        crl_days=args.crl_days,
    )
    if args.json:
        print(json.dumps({**info.to_json(), "revocation": entry.to_json()}))
    else:
        who = f" ({entry.subject})" if entry.subject else ""
        print(f"revoked serial {entry.serial:x}{who}, reason {entry.reason}")
        _print_crl(info)
        print("reload the broker to apply it: tessera-broker reload")
    return _EXIT_OK


def _cmd_crl(args: argparse.Namespace) -> int:
    info = make_crl(args.dir, days=args.days)
    if args.json:
        print(json.dumps(info.to_json()))
    else:
        _print_crl(info)
    return _EXIT_OK


def _print_crl(info: CrlInfo) -> None:
    print(
        f"wrote {info.path} (CRL number {info.number}, {len(info.revoked)} revoked,"
        f" next update {info.to_json()['next_update']})"
    )


def _report(files: IssuedFiles, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"cert": str(files.cert), "key": str(files.key)}))
    else:
        print(f"wrote {files.cert} (certificate)")
        print(f"wrote {files.key} (private key, mode 0600: keep it secret)")


def _print_description(info: dict[str, object], out: TextIO) -> None:
    san = info["san"]
    assert isinstance(san, dict)
    san_text = ", ".join(
        f"{label}:{value}"
        for kind, label in (("dns", "DNS"), ("ip", "IP"), ("email", "email"), ("uri", "URI"))
        for value in san.get(kind, ())
    )
    san_text = ", ".join(filter(None, [san_text, *san.get("other", ())])) or "(none)"
    if info["expired"]:
        status = "EXPIRED"
    elif info["not_yet_valid"]:
        status = "NOT YET VALID"
    else:
        status = "valid"
    key = f"{info['key_type']} {info['key_size'] or '?'} bits"
    if info["curve"]:
        key += f" ({info['curve']})"
    ca = "no"
    if info["is_ca"]:
        ca = "yes" if info["path_length"] is None else f"yes (path length {info['path_length']})"

    def joined(value: object) -> str:
        return ", ".join(value) if isinstance(value, list) and value else "(none)"

    rows = [
        ("subject", info["subject"]),
        ("issuer", info["issuer"]),
        ("serial", info["serial"]),
        ("not before", info["not_before"]),
        ("not after", info["not_after"]),
        ("status", status),
        ("CA", ca),
        ("key", key),
        ("SAN", san_text),
        ("key usage", joined(info["key_usage"])),
        ("extended usage", joined(info["extended_key_usage"])),
        ("subject key id", info["subject_key_identifier"] or "(none)"),
        ("authority key id", info["authority_key_identifier"] or "(none)"),
        ("signature hash", info["signature_hash"] or "(none)"),
        ("SHA-256", info["fingerprint_sha256"]),
    ]
    width = max(len(label) for label, _ in rows) + 1
    print(info["path"], file=out)
    for label, value in rows:
        print(f"  {label + ':':<{width}} {value}", file=out)


# --------------------------------------------------------------------------------------------------
# Parser


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Create a private CA and issue TLS certificates for the Tessera broker and "
        "its clients.",
        epilog="Run '%(prog)s COMMAND --help' for a command's options. See docs/certs.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    init = commands.add_parser(
        "init-ca",
        help="create a CA (ca.pem, ca-key.pem)",
        description="Create a self-signed CA: DIR/ca.pem (certificate) and DIR/ca-key.pem "
        "(private key, mode 0600). DIR is created with mode 0700 if missing.",
    )
    _add_dir(init)
    init.add_argument(
        "--name", default="Tessera CA", metavar="CN", help="CA common name (default: %(default)s)"
    )
    _add_key_options(init)
    _add_days(init, default=3650)
    _add_force_json(init, what="the CA (this invalidates every certificate it issued)")
    init.set_defaults(handler=_cmd_init_ca)

    issue_parser = commands.add_parser(
        "issue",
        help="issue a server or client certificate",
        description="Issue a certificate signed by the CA in --dir.",
    )
    kinds = issue_parser.add_subparsers(title="kinds", metavar="KIND", required=True)
    server = kinds.add_parser(
        "server",
        help="certificate for a broker listener (serverAuth)",
        description="Issue a server certificate (extended key usage serverAuth). Without --dns or "
        "--ip, NAME itself becomes the certificate's only host name.",
    )
    client = kinds.add_parser(
        "client",
        help="certificate for a client identity (clientAuth)",
        description="Issue a client certificate (extended key usage clientAuth). The broker "
        "derives the client's identity from it: by default the common name (--name); see "
        "docs/identity.md.",
    )
    for kind, sub in (("server", server), ("client", client)):
        _add_dir(sub)
        sub.add_argument(
            "--name",
            required=True,
            help="subject common name"
            + (": the host name" if kind == "server" else ": the identity, e.g. alice"),
        )
        sub.add_argument(
            "--dns",
            action="append",
            default=[],
            metavar="HOST",
            help="DNS subject alternative name (repeatable; '*.example.com' allowed)",
        )
        sub.add_argument(
            "--ip",
            action="append",
            default=[],
            metavar="ADDR",
            help="IPv4/IPv6 subject alternative name (repeatable)",
        )
        sub.add_argument(
            "--email",
            action="append",
            default=[],
            metavar="ADDR",
            help="e-mail (rfc822Name) subject alternative name (repeatable)",
        )
        sub.add_argument(
            "--uri",
            action="append",
            default=[],
            metavar="URI",
            help="URI subject alternative name, e.g. spiffe://example.org/alice (repeatable)",
        )
        sub.add_argument(
            "--file-stem",
            metavar="STEM",
            help="write DIR/STEM.pem and DIR/STEM-key.pem (default: the --name)",
        )
        _add_key_options(sub)
        _add_days(sub, default=825)
        _add_force_json(sub, what="an existing certificate and key of that name")
        sub.set_defaults(handler=_cmd_issue, kind=kind)

    show = commands.add_parser(
        "show",
        help="describe a certificate",
        description="Print a certificate's subject, issuer, validity, names, key and usages.",
    )
    show.add_argument("file", type=Path, metavar="FILE", help="PEM or DER certificate")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.set_defaults(handler=_cmd_show)

    revoke_parser = commands.add_parser(
        "revoke",
        help="revoke a certificate and write a fresh CRL",
        description="Record a certificate as revoked (DIR/revoked.json) and write DIR/crl.pem, "
        "signed by the CA. Name the certificate by its FILE or by --serial. Then run "
        "`tessera-broker reload`: sessions that authenticated with it are closed.",
    )
    _add_dir(revoke_parser)
    target = revoke_parser.add_mutually_exclusive_group(required=True)
    target.add_argument("file", nargs="?", type=Path, metavar="FILE", help="the certificate")
    target.add_argument("--serial", metavar="HEX", help="the certificate's serial number (hex)")
    revoke_parser.add_argument(
        "--reason",
        choices=tuple(REVOCATION_REASONS),
        default="unspecified",
        help="RFC 5280 reason (default: %(default)s)",
    )
    revoke_parser.add_argument(
        "--crl-days",
        type=int,
        default=CRL_DAYS_DEFAULT,
        metavar="N",
        help="the new CRL's next update, in days (default: %(default)s)",
    )
    revoke_parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    revoke_parser.set_defaults(handler=_cmd_revoke)

    crl = commands.add_parser(
        "crl",
        help="write a fresh CRL (refresh its next update)",
        description="Sign DIR/crl.pem again from DIR/revoked.json with a new next update. Run "
        "it regularly (cron) before the current CRL expires, then `tessera-broker reload`.",
    )
    _add_dir(crl)
    _add_days(crl, default=CRL_DAYS_DEFAULT)
    crl.add_argument("--json", action="store_true", help="print JSON instead of text")
    crl.set_defaults(handler=_cmd_crl)
    return parser


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", required=True, type=Path, metavar="DIR", help="certificate directory"
    )


def _add_key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-type",
        choices=("ec", "rsa"),
        default="ec",
        help="ec = ECDSA P-256, rsa = RSA (default: %(default)s)",
    )
    parser.add_argument(
        "--rsa-bits",
        type=int,
        default=3072,
        metavar="N",
        help=f"RSA key size, {RSA_MIN_BITS}-{RSA_MAX_BITS} (default: %(default)s)",
    )


def _add_days(parser: argparse.ArgumentParser, *, default: int) -> None:
    parser.add_argument(
        "--days",
        type=int,
        default=default,
        metavar="N",
        help="validity in days (default: %(default)s)",
    )


def _add_force_json(parser: argparse.ArgumentParser, *, what: str) -> None:
    parser.add_argument("--force", action="store_true", help=f"overwrite {what}")
    parser.add_argument(
        "--json", action="store_true", help='print {"cert": PATH, "key": PATH} as JSON'
    )


def _version() -> str:
    try:
        return metadata.version("tessera")
    except metadata.PackageNotFoundError:
        return "unknown"


def _exit_status(code: object) -> int:
    if code is None:
        return _EXIT_OK
    if isinstance(code, int):
        return code
    return _EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
