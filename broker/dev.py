"""``tessera-broker serve --dev``: a local development setup made once and reused.

Creates, in a folder (``./tessera-dev`` by default): a development CA, a server certificate for
``localhost``/``127.0.0.1``, a client certificate named ``dev``, a permissive ACL and a broker
configuration. While it runs, the broker records its directory and URL in
``$XDG_RUNTIME_DIR/tessera/dev-broker.json`` (client_sdk/contexts.py) for ``tessera ... --dev``.
Nothing here is meant for production: the CA key sits next to the certificates.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tessera_mq.certs import pki
from tessera_mq.client.contexts import DevRecord, remove_dev_record, write_dev_record

__all__ = [
    "DEFAULT_DEV_BIND",
    "DEFAULT_DEV_DIR",
    "DEV_CLIENT",
    "ensure_dev_setup",
    "forget_dev_broker",
    "record_dev_broker",
]

log = logging.getLogger("tessera.broker")

DEFAULT_DEV_DIR = Path("tessera-dev")
DEFAULT_DEV_BIND = "127.0.0.1:7443"
DEV_CLIENT = "dev"

_DEV_ACL = """\
# Development ACL made by `tessera-broker serve --dev`: every authenticated client may publish
# and subscribe everywhere. Production brokers use a least-privilege policy (docs/acl.md).
[[allow]]
principals = ["*"]
publish = [">"]
subscribe = [">"]
"""

_DEV_CONFIG = """\
# Development configuration made by `tessera-broker serve --dev` (docs/configuration.md).
[[listeners]]
bind = "{bind}"
security = "tls"
cert = "server.pem"
key = "server-key.pem"
client_ca = "ca.pem"

[acl]
file = "acl.toml"
"""


def ensure_dev_setup(directory: Path = DEFAULT_DEV_DIR, bind: str = DEFAULT_DEV_BIND) -> Path:
    """Create whatever is missing of the dev setup in ``directory``; return the config path."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not (directory / pki.CA_CERT_FILENAME).exists():
        pki.init_ca(directory, common_name="Tessera development CA")
    if not (directory / "server.pem").exists():
        pki.issue(
            directory,
            "server",
            "localhost",
            dns=["localhost"],
            ip=["127.0.0.1", "::1"],
            file_stem="server",
        )
    if not (directory / f"{DEV_CLIENT}.pem").exists():
        pki.issue(directory, "client", DEV_CLIENT)
    acl = directory / "acl.toml"
    if not acl.exists():
        acl.write_text(_DEV_ACL, encoding="utf-8")
    config = directory / "broker.toml"
    config.write_text(_DEV_CONFIG.format(bind=bind), encoding="utf-8")
    return config


def record_dev_broker(directory: Path, url: str) -> None:
    """Tell clients where this dev broker keeps its files (``tessera ... --dev`` reads it)."""
    try:
        write_dev_record(DevRecord(dir=str(directory.resolve()), url=url, pid=os.getpid()))
    except OSError as exc:  # clients fall back to ./tessera-dev
        log.warning("cannot record the dev broker for clients: %s", exc)


def forget_dev_broker() -> None:
    remove_dev_record(os.getpid())
