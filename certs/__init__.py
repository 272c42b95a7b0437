"""Certificate provisioning for Tessera: a small private CA and the ``tessera-certs`` command.

``init_ca`` creates the CA, ``issue`` signs server and client certificates with it, ``describe``
summarises a certificate for ``tessera-certs show``; ``revoke`` and ``make_crl`` keep the CA's
revocation list (``revoked.json``) and its signed CRL (``crl.pem``). See ``docs/certs.md``.
"""

from tessera_mq.certs.pki import (
    CRL_FILENAME,
    REVOKED_FILENAME,
    AlreadyExistsError,
    CANotFoundError,
    CertsError,
    CrlInfo,
    IssuedFiles,
    KeyType,
    Revocation,
    describe,
    init_ca,
    issue,
    load_certificate,
    make_crl,
    revocations,
    revoke,
)

__all__ = [
    "CRL_FILENAME",
    "REVOKED_FILENAME",
    "AlreadyExistsError",
    "CANotFoundError",
    "CertsError",
    "CrlInfo",
    "IssuedFiles",
    "KeyType",
    "Revocation",
    "describe",
    "init_ca",
    "issue",
    "load_certificate",
    "make_crl",
    "revocations",
    "revoke",
]
