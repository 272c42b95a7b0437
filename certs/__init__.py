"""Certificate provisioning for Tessera: a small private CA and the ``tessera-certs`` command.

``init_ca`` creates the CA, ``issue`` signs server and client certificates with it, ``describe``
summarises a certificate for ``tessera-certs show``. See ``docs/certs.md``.
"""

from certs.pki import (
    AlreadyExistsError,
    CANotFoundError,
    CertsError,
    IssuedFiles,
    KeyType,
    describe,
    init_ca,
    issue,
    load_certificate,
)

__all__ = [
    "AlreadyExistsError",
    "CANotFoundError",
    "CertsError",
    "IssuedFiles",
    "KeyType",
    "describe",
    "init_ca",
    "issue",
    "load_certificate",
]
