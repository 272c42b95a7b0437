"""Shared by the device-monitor example: where its files live and how to connect.

``ensure_setup`` makes, once, a private CA, a broker certificate for localhost, one client
certificate per role (``device-service``, ``operator``), the ACL and the broker configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tessera_mq.certs import pki

HERE = Path(__file__).resolve().parent
DEFAULT_DIR = HERE / "data"
DEFAULT_PORT = 7450

SERVICE = "device-service"
OPERATOR = "operator"

ACL = """\
# The service publishes status and serves commands; the operator reads status and sends
# commands. Nobody else may do either (deny by default).
[[allow]]
principals = ["x509:device-service"]
publish = ["status.device.*"]
subscribe = ["cmd.device.*"]

[[allow]]
principals = ["x509:operator"]
publish = ["cmd.device.*"]
subscribe = ["status.device.*"]
"""

CONFIG = """\
data_dir = "store"

[[listeners]]
bind = "127.0.0.1:{port}"
security = "tls"
cert = "server.pem"
key = "server-key.pem"
client_ca = "ca.pem"

[acl]
file = "acl.toml"

[messaging]
# Status deliveries carry the verified identity of whoever published them.
sender = ["status.>"]
"""


def ensure_setup(directory: Path, port: int) -> Path:
    """Create what is missing in ``directory``; return the broker configuration's path."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not (directory / pki.CA_CERT_FILENAME).exists():
        pki.init_ca(directory, common_name="Device monitor example CA")
    if not (directory / "server.pem").exists():
        pki.issue(
            directory,
            "server",
            "localhost",
            dns=["localhost"],
            ip=["127.0.0.1"],
            file_stem="server",
        )
    for name in (SERVICE, OPERATOR):
        if not (directory / f"{name}.pem").exists():
            pki.issue(directory, "client", name)
    (directory / "acl.toml").write_text(ACL, encoding="utf-8")
    config = directory / "broker.toml"
    config.write_text(CONFIG.format(port=port), encoding="utf-8")
    return config


def credentials(directory: Path, name: str) -> dict[str, Any]:
    return {
        "ca": directory / pki.CA_CERT_FILENAME,
        "cert": directory / f"{name}.pem",
        "key": directory / f"{name}-key.pem",
    }
