"""Client credentials for the negotiate security modes: plain descriptions, no GSS imports, so
the SDK can name them without the optional ``negotiate`` extra installed."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

__all__ = ["NTLM", "Kerberos"]


@dataclass(frozen=True, slots=True)
class Kerberos:
    """How a client gets its Kerberos credential. With no field set: the default credential cache
    (``KRB5CCNAME``), then the default client keytab (``KRB5_CLIENT_KTNAME``), as MIT does."""

    principal: str | None = None
    """``alice@REALM`` (or ``alice`` in the default realm); selects the entry of a cache
    collection or keytab; required with ``password``."""
    password: str | None = field(default=None, repr=False)
    """Get a ticket with this password (from the KDC, at handshake time)."""
    keytab: str | os.PathLike[str] | None = None
    """Get a ticket with the key of ``principal`` (or of the keytab's first entry) in this file."""
    ccache: str | None = None
    """Use this credential cache (``FILE:/path``, ``KCM:``, ``DIR:...``)."""

    def __post_init__(self) -> None:
        if self.password is not None and self.principal is None:
            raise ValueError("Kerberos.principal is required with a password")
        if sum(v is not None for v in (self.password, self.keytab, self.ccache)) > 1:
            raise ValueError("Kerberos: give at most one of password, keytab, ccache")


@dataclass(frozen=True, slots=True)
class NTLM:
    """An NTLM user name and password (NTLMv2 only). ``username`` may be ``DOMAIN\\user`` or
    ``user@domain`` when ``domain`` is not given."""

    username: str
    password: str = field(repr=False)
    domain: str | None = None

    def __post_init__(self) -> None:
        if not self.username:
            raise ValueError("NTLM.username is required")
