"""Topic and subscription-pattern rules.

A topic is one or more tokens separated by ``.`` (``status.eu.node-17``). A token is a non-empty
string of printable characters other than ``.``, ``*``, ``>`` and white space. A subscription
pattern may use ``*`` as a whole token (exactly one token) and ``>`` as its last token (one or
more further tokens), as in NATS: ``status.>`` matches ``status.eu`` and ``status.eu.node-17`` but
not ``status``. Topics are bounded by :data:`~client_sdk.protocol.limits.MAX_TOPIC_BYTES` and
:data:`~client_sdk.protocol.limits.MAX_TOPIC_TOKENS`.
"""

from __future__ import annotations

import re

from tessera_mq.client.protocol.errors import InvalidTopic
from tessera_mq.client.protocol.grammar import MULTI_WILDCARD, SINGLE_WILDCARD, TOKEN
from tessera_mq.client.protocol.grammar import matches as _matches
from tessera_mq.client.protocol.limits import MAX_TOPIC_BYTES, MAX_TOPIC_TOKENS

__all__ = [
    "MULTI_WILDCARD",
    "SINGLE_WILDCARD",
    "matches",
    "split_pattern",
    "validate_pattern",
    "validate_topic",
]

# The grammar itself is client_sdk.protocol.grammar's; these are its whole-string forms.
_TOPIC_RE = re.compile(rf"{TOKEN}(?:\.{TOKEN})*")
_PATTERN_TOKEN_RE = re.compile(rf"{TOKEN}|\*|>")


def _check_size(value: object, what: str, max_bytes: int) -> str:
    if not isinstance(value, str):
        raise InvalidTopic(f"{what} must be a string")
    if not value:
        raise InvalidTopic(f"{what} is empty")
    if len(value) > max_bytes or len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise InvalidTopic(f"{what} is longer than {max_bytes} bytes")
    return value


def validate_topic(
    topic: object, *, max_bytes: int = MAX_TOPIC_BYTES, max_tokens: int = MAX_TOPIC_TOKENS
) -> str:
    """Return ``topic`` if it is a valid concrete topic (no wildcards), else raise InvalidTopic."""
    value = _check_size(topic, "topic", max_bytes)
    if _TOPIC_RE.fullmatch(value) is None:
        if "*" in value or ">" in value:
            raise InvalidTopic("a topic cannot contain wildcards ('*', '>'); subscribe with them")
        raise InvalidTopic(
            "topic must be dot-separated non-empty tokens without white space or control characters"
        )
    if value.count(".") >= max_tokens:
        raise InvalidTopic(f"topic has more than {max_tokens} tokens")
    _reject_surrogates(value)
    return value


def validate_pattern(
    pattern: object, *, max_bytes: int = MAX_TOPIC_BYTES, max_tokens: int = MAX_TOPIC_TOKENS
) -> str:
    """Return ``pattern`` if it is a valid subscription pattern, else raise InvalidTopic."""
    value = _check_size(pattern, "pattern", max_bytes)
    tokens = value.split(".")
    if len(tokens) > max_tokens:
        raise InvalidTopic(f"pattern has more than {max_tokens} tokens")
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        if _PATTERN_TOKEN_RE.fullmatch(token) is None:
            raise InvalidTopic(
                "pattern tokens must be non-empty, without white space or control characters, "
                "and use '*' and '>' only as whole tokens"
            )
        if token == MULTI_WILDCARD and i != last:
            raise InvalidTopic("'>' may only be the last token of a pattern")
    _reject_surrogates(value)
    return value


def _reject_surrogates(value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidTopic("topic is not valid UTF-8") from None


def split_pattern(pattern: str) -> tuple[str, ...]:
    """Split a (validated) topic or pattern into its tokens."""
    return tuple(pattern.split("."))


def matches(pattern: str | tuple[str, ...], topic: str | tuple[str, ...]) -> bool:
    """True if the concrete ``topic`` matches the subscription ``pattern``."""
    p = split_pattern(pattern) if isinstance(pattern, str) else pattern
    t = split_pattern(topic) if isinstance(topic, str) else topic
    return _matches(p, t)
