"""Security layers, authenticated identities and access control, shared by broker and SDK.

Nothing here does I/O: a security layer takes wire bytes in and gives wire bytes out
(see :mod:`auth.layer`); the broker and the SDK drive it from their event loops.
"""

from tessera_mq.auth.acl import AclError, Action, BoundPolicy, Decision, Grant, Policy, Rule
from tessera_mq.auth.errors import AuthError, HandshakeError, HandshakeReason, IntegrityError
from tessera_mq.auth.identity import (
    ANONYMOUS,
    DEFAULT_X509_NAME_FIELDS,
    X509_NAME_FIELDS,
    Identity,
    IdentityError,
    identity_from_certificate,
    validate_x509_name_fields,
)
from tessera_mq.auth.layer import SecurityLayer

__all__ = [
    "ANONYMOUS",
    "DEFAULT_X509_NAME_FIELDS",
    "X509_NAME_FIELDS",
    "AclError",
    "Action",
    "AuthError",
    "BoundPolicy",
    "Decision",
    "Grant",
    "HandshakeError",
    "HandshakeReason",
    "Identity",
    "IdentityError",
    "IntegrityError",
    "Policy",
    "Rule",
    "SecurityLayer",
    "identity_from_certificate",
    "validate_x509_name_fields",
]
