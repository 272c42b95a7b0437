"""The one definition of topics, subscription patterns and header rules.

A leaf module (standard library and the protocol's limits only) shared by the wire core
(:mod:`client_sdk.protocol.topics`, :mod:`~client_sdk.protocol.codec`), the SDK and the ACL
(:mod:`auth.acl`), so that what a client may send, what the broker accepts and what a policy can
name are the same language.

A topic is one or more tokens separated by ``.``; a token is a non-empty string of printable
characters other than ``.``, ``*``, ``>``, white space and C0/C1 controls. A pattern may use
``*`` as a whole token (exactly one token) and ``>`` as its last token (one or more further
tokens), as in NATS.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Final

from tessera_mq.client.protocol.limits import MAX_HEADER_FIELD_BYTES, MAX_HEADERS

__all__ = [
    "MULTI_WILDCARD",
    "SINGLE_WILDCARD",
    "TOKEN_RE",
    "covers",
    "header_problem",
    "intersects",
    "matches",
    "split_pattern",
    "split_topic",
]

SINGLE_WILDCARD: Final = "*"  #: matches exactly one token
MULTI_WILDCARD: Final = ">"  #: matches one or more tokens; last token only

# Anything printable but the separator, the wildcards, white space and C0/C1 controls.
# (Python's \s on str is str.isspace(); \x00-\x1f and \x7f-\x9f are Unicode category Cc.)
TOKEN: Final = r"[^\s.*>\x00-\x1f\x7f-\x9f]+"
TOKEN_RE: Final = re.compile(TOKEN)


def split_topic(text: str) -> tuple[str, ...] | None:
    """A concrete topic's tokens, or ``None`` if ``text`` is not a valid topic (sizes are the
    caller's to check)."""
    tokens = tuple(text.split("."))
    for token in tokens:
        if TOKEN_RE.fullmatch(token) is None:
            return None
    return tokens


def split_pattern(text: str) -> tuple[str, ...] | None:
    """A subscription pattern's tokens, or ``None`` if ``text`` is not a valid pattern."""
    tokens = tuple(text.split("."))
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        if token == SINGLE_WILDCARD or (token == MULTI_WILDCARD and i == last):
            continue
        if TOKEN_RE.fullmatch(token) is None:
            return None
    return tokens


def matches(pattern: Sequence[str], topic: Sequence[str]) -> bool:
    """True if the concrete ``topic`` matches ``pattern`` (both as token sequences)."""
    size = len(topic)
    for i, token in enumerate(pattern):
        if token == MULTI_WILDCARD:
            return i < size
        if i >= size:
            return False
        if token != SINGLE_WILDCARD and token != topic[i]:
            return False
    return len(pattern) == size


def covers(outer: Sequence[str], inner: Sequence[str]) -> bool:
    """True if every topic that ``inner`` matches is also matched by ``outer``.

    Token by token: ``>`` in ``outer`` covers any non-empty rest of ``inner``; ``*`` covers one
    literal or ``*`` but not a ``>``; a literal covers only itself.
    """
    size = len(inner)
    for i, token in enumerate(outer):
        if token == MULTI_WILDCARD:
            return i < size
        if i >= size:
            return False
        other = inner[i]
        if other == MULTI_WILDCARD:
            return False
        if token not in (SINGLE_WILDCARD, other):
            return False
    return len(outer) == size


def intersects(first: Sequence[str], second: Sequence[str]) -> bool:
    """True if some topic matches both patterns.

    Token by token: a ``>`` on either side absorbs whatever the other has left (it has at least
    the current token); ``*`` meets anything; two literals must be equal; otherwise the two
    must end together.
    """
    for x, y in zip(first, second, strict=False):
        if MULTI_WILDCARD in (x, y):
            return True
        if x != y and SINGLE_WILDCARD not in (x, y):
            return False
    return len(first) == len(second)


def header_problem(headers: object) -> str | None:
    """What is wrong with ``headers`` as the protocol allows them (a map of at most
    :data:`MAX_HEADERS` string names to string values, each at most
    :data:`MAX_HEADER_FIELD_BYTES` UTF-8 bytes), or ``None`` if nothing is."""
    if not isinstance(headers, Mapping):
        return "must be a map of string to string"
    if len(headers) > MAX_HEADERS:
        return f"has more than {MAX_HEADERS} entries"
    for k, v in headers.items():
        if not isinstance(k, str) or not isinstance(v, str):
            return "must be a map of string to string"
        if (
            len(k.encode("utf-8", "surrogatepass")) > MAX_HEADER_FIELD_BYTES
            or len(v.encode("utf-8", "surrogatepass")) > MAX_HEADER_FIELD_BYTES
        ):
            return f"entry longer than {MAX_HEADER_FIELD_BYTES} bytes"
    return None
