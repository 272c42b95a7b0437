"""Shared fixtures: a session-wide PKI made with ``certs.pki`` and factories for REAL brokers.

``pki``
    One CA with a server certificate for ``localhost``/``127.0.0.1``, client certificates for
    ``alice``, ``bob``, ``mallory``, ``carol`` (SAN e-mail ``carol@example.com``) and an expired
    one, plus a second, unrelated CA with its own ``alice``. ``pki.client("alice")`` gives the
    ``ca``/``cert``/``key`` keyword arguments of ``client_sdk.connect``.
``broker_factory`` / ``module_broker_factory``
    ``start(acl=..., limits={...}, identity_fields=[...])`` writes a configuration into a fresh
    directory, runs ``tessera-broker serve --config`` as a child process bound to 127.0.0.1:0 and
    returns a :class:`~brokerproc.BrokerProcess` (``.url``, ``.wait_for_log(...)``). On teardown
    every broker still running gets SIGTERM and must exit 0 with no traceback in its log; it is
    killed whatever happens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from brokerproc import BrokerProcess, write_config
from redisproc import redis_server  # noqa: F401  (a fixture: imported for pytest to find)

from tessera_mq.certs import pki as certs_pki

#: An ACL under which every authenticated client may publish and subscribe everywhere.
ALLOW_ALL_ACL = """\
[[allow]]
principals = ["*"]
publish = [">"]
subscribe = [">"]
"""


@dataclass(frozen=True)
class Credential:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    """Paths of the test certificates (all PEM)."""

    directory: Path
    ca: Path
    server: Credential
    clients: Mapping[str, Credential]
    other_ca: Path
    other_clients: Mapping[str, Credential] = field(default_factory=dict)

    def client(self, name: str, *, ca: Path | None = None) -> dict[str, Path]:
        """``client_sdk.connect`` keyword arguments for client ``name`` trusting our CA."""
        cred = self.clients[name]
        return {"ca": ca or self.ca, "cert": cred.cert, "key": cred.key}

    def foreign_client(self, name: str) -> dict[str, Path]:
        """A client certificate issued by the OTHER CA (the broker must refuse it)."""
        cred = self.other_clients[name]
        return {"ca": self.ca, "cert": cred.cert, "key": cred.key}


def _issue(directory: Path, kind: str, name: str, **kwargs: object) -> Credential:
    files = certs_pki.issue(directory, kind, name, **kwargs)  # type: ignore[arg-type]
    return Credential(files.cert, files.key)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    main = tmp_path_factory.mktemp("pki")
    certs_pki.init_ca(main, common_name="Tessera test CA")
    server = _issue(main, "server", "localhost", dns=["localhost"], ip=["127.0.0.1"])
    clients = {name: _issue(main, "client", name) for name in ("alice", "bob", "mallory")}
    clients["carol"] = _issue(main, "client", "carol", email=["carol@example.com"])
    now = datetime.now(UTC)
    clients["expired"] = _issue(
        main,
        "client",
        "expired",
        not_before=now - timedelta(days=30),
        not_after=now - timedelta(days=1),
    )
    other = tmp_path_factory.mktemp("pki-other")
    certs_pki.init_ca(other, common_name="Some other CA")
    # Same CN as a legitimate client: only the issuer tells them apart.
    other_clients = {"alice": _issue(other, "client", "alice")}
    return PKI(
        directory=main,
        ca=main / certs_pki.CA_CERT_FILENAME,
        server=server,
        clients=clients,
        other_ca=other / certs_pki.CA_CERT_FILENAME,
        other_clients=other_clients,
    )


class BrokerFactory:
    """Starts brokers on 127.0.0.1:0 from an ACL text and overrides; stops them all at the end."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> None:
        self._tmp = tmp_path_factory
        self.pki = pki
        self.brokers: list[BrokerProcess] = []

    def config(
        self,
        *,
        acl: str | None = ALLOW_ALL_ACL,
        limits: Mapping[str, object] | None = None,
        identity_fields: Sequence[str] | None = None,
        require_client_cert: bool = True,
        shutdown_timeout: float | None = None,
        log_level: str = "info",
    ) -> Path:
        """Write a configuration into a fresh directory; return its path."""
        return write_config(
            self._tmp.mktemp("broker"),
            cert=self.pki.server.cert,
            key=self.pki.server.key,
            client_ca=self.pki.ca if require_client_cert else None,
            acl=acl,
            limits=limits,
            identity_fields=identity_fields,
            shutdown_timeout=shutdown_timeout,
            log_level=log_level,
        )

    def start(self, acl: str | None = ALLOW_ALL_ACL, **kwargs: object) -> BrokerProcess:
        """Write a configuration (see :meth:`config`) and run a broker on it."""
        return self.serve(self.config(acl=acl, **kwargs))  # type: ignore[arg-type]

    def serve(self, config: Path) -> BrokerProcess:
        broker = BrokerProcess(["serve", "--config", str(config)], workdir=config.parent)
        self.brokers.append(broker)
        return broker.start()

    def track(self, broker: BrokerProcess) -> BrokerProcess:
        """Have a broker started elsewhere stopped and checked at teardown too."""
        self.brokers.append(broker)
        return broker

    def close(self) -> None:
        problems: list[str] = []
        for broker in self.brokers:
            try:
                if broker.running:
                    code = broker.stop()
                    if code != 0:
                        problems.append(
                            f"broker exited with {code} on SIGTERM\n{broker.describe()}"
                        )
                unexpected = broker.unexpected_log_lines()
                if unexpected:
                    problems.append(
                        "exception in the broker's log:\n"
                        + "\n".join(unexpected)
                        + f"\n{broker.describe()}"
                    )
            except Exception as exc:  # report every broker, then fail
                problems.append(f"{type(exc).__name__}: {exc}")
            finally:
                with contextlib.suppress(Exception):
                    broker.kill()
        self.brokers.clear()
        if problems:
            pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def broker_factory(tmp_path_factory: pytest.TempPathFactory, pki: PKI) -> Iterator[BrokerFactory]:
    factory = BrokerFactory(tmp_path_factory, pki)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def module_broker_factory(
    tmp_path_factory: pytest.TempPathFactory, pki: PKI
) -> Iterator[BrokerFactory]:
    factory = BrokerFactory(tmp_path_factory, pki)
    try:
        yield factory
    finally:
        factory.close()


# ------------------------------------------------------------------------------------------------
# Reserved for the lead: the Kerberos KDC fixture is imported here (`from kdc import kdc`; ruff
# wants E402 and F401 silenced on that line: it is a fixture, imported for pytest to find).
# Keep this section last; do not add fixtures below it.
# ------------------------------------------------------------------------------------------------
from kdc import kdc  # noqa: E402, F401
