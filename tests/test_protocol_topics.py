"""Topic and pattern rules (tables), and matches() against a regex reference implementation."""

from __future__ import annotations

import re
import sys

import pytest
from helpers_protocol import pattern_st, topic_st
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera_mq.client.protocol import ErrorCode, InvalidTopic, TesseraError
from tessera_mq.client.protocol.limits import MAX_TOPIC_BYTES, MAX_TOPIC_TOKENS
from tessera_mq.client.protocol.topics import (
    matches,
    split_pattern,
    validate_pattern,
    validate_topic,
)

#: The characters no token may contain besides '.', '*' and '>': C0 and C1 controls and the
#: Unicode white space (Zs, Zl, Zp). docs/protocol.md lists the same code points.
FORBIDDEN_CODE_POINTS = [
    *range(0x00, 0x21),
    *range(0x7F, 0xA1),
    0x1680,
    *range(0x2000, 0x200B),
    0x2028,
    0x2029,
    0x202F,
    0x205F,
    0x3000,
]

VALID_TOPICS = [
    "a",
    "status",
    "status.eu.node-17",
    "a.b.c.d",
    "under_score.dash-ed.plus+hash#dollar$slash/colon:at@",
    "MixedCase.123.0",
    "ünïcödé.日本語.😀",
    "a" * MAX_TOPIC_BYTES,
    ".".join("a" * MAX_TOPIC_TOKENS),
    "é" * (MAX_TOPIC_BYTES // 2),  # two bytes each: exactly the limit
    "x<y.{name}.[1]",
    "\u00a1",  # the first printable character after the C1/NBSP range
    "\u200b",  # zero-width space is a format character (Cf), not white space: allowed
]

INVALID_TOPICS = [
    ("", "empty"),
    (".", "empty tokens"),
    ("a.", "trailing dot"),
    (".a", "leading dot"),
    ("a..b", "empty middle token"),
    ("*", "single wildcard"),
    (">", "multi wildcard"),
    ("a.*", "wildcard token"),
    ("a.>", "wildcard token at the end"),
    ("a*b", "wildcard inside a token"),
    ("a>b", "gt inside a token"),
    ("a b", "space"),
    (" a", "leading space"),
    ("a\t", "tab"),
    ("a\nb", "newline"),
    ("a\rb", "carriage return"),
    ("a\x00b", "NUL"),
    ("a\x1b[31m", "escape"),
    ("a\x7f", "DEL"),
    ("a\x85", "NEL (C1)"),
    ("a\x9f", "C1 control"),
    ("a\u00a0b", "no-break space"),
    ("a\u2028b", "line separator"),
    ("a\u3000b", "ideographic space"),
    ("a\ud800", "lone surrogate"),
    ("\udcff", "lone low surrogate"),
    ("a" * (MAX_TOPIC_BYTES + 1), "too many bytes"),
    ("é" * (MAX_TOPIC_BYTES // 2) + "a", "too many bytes in UTF-8, not in characters"),
    ("😀" * (MAX_TOPIC_BYTES // 4 + 1), "four-byte characters"),
    (".".join("a" * (MAX_TOPIC_TOKENS + 1)), "too many tokens"),
]

VALID_PATTERNS = [
    *VALID_TOPICS,
    "*",
    ">",
    "*.*",
    "status.>",
    "status.*",
    "*.eu.>",
    "a.*.c.>",
    ".".join(["*"] * MAX_TOPIC_TOKENS),
    ".".join(["*"] * (MAX_TOPIC_TOKENS - 1) + [">"]),
]

INVALID_PATTERNS = [
    ("", "empty"),
    ("a..b", "empty token"),
    ("a.", "trailing dot"),
    (".>", "leading dot"),
    (">.a", "'>' not last"),
    ("a.>.b", "'>' in the middle"),
    (">.>", "two '>'"),
    ("a*", "'*' inside a token"),
    ("*a", "'*' prefix"),
    ("a>", "'>' inside a token"),
    ("**", "double star"),
    (">>", "double gt"),
    ("a. b", "space"),
    ("a.\t", "tab"),
    ("a.\x00", "NUL"),
    ("a.\x85", "C1"),
    ("a.\u2029", "paragraph separator"),
    ("a.\ud800", "surrogate"),
    ("*." * MAX_TOPIC_TOKENS + "*", "too many tokens"),
    ("a" * (MAX_TOPIC_BYTES + 1), "too many bytes"),
]


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_valid_topics(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize(("topic", "why"), INVALID_TOPICS, ids=[w for _, w in INVALID_TOPICS])
def test_invalid_topics(topic: str, why: str) -> None:
    with pytest.raises(InvalidTopic):
        validate_topic(topic)


@pytest.mark.parametrize("pattern", VALID_PATTERNS)
def test_valid_patterns(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize(("pattern", "why"), INVALID_PATTERNS, ids=[w for _, w in INVALID_PATTERNS])
def test_invalid_patterns(pattern: str, why: str) -> None:
    with pytest.raises(InvalidTopic):
        validate_pattern(pattern)


@pytest.mark.parametrize("value", [None, b"a.b", 1, ["a"], 1.5])
def test_not_a_string(value: object) -> None:
    with pytest.raises(InvalidTopic, match="string"):
        validate_topic(value)
    with pytest.raises(InvalidTopic, match="string"):
        validate_pattern(value)


def test_invalid_topic_is_a_value_error_with_its_code() -> None:
    with pytest.raises(ValueError, match="wildcards") as info:
        validate_topic("a.*")
    assert isinstance(info.value, TesseraError)
    assert info.value.code is ErrorCode.INVALID_TOPIC


@pytest.mark.parametrize("cp", FORBIDDEN_CODE_POINTS, ids=hex)
def test_every_forbidden_character(cp: int) -> None:
    ch = chr(cp)
    for bad in (ch, f"a{ch}", f"a.{ch}b"):
        with pytest.raises(InvalidTopic):
            validate_topic(bad)
        with pytest.raises(InvalidTopic):
            validate_pattern(bad)


def test_every_other_character_is_allowed() -> None:
    # With the listed code points, '.', '*', '>' and surrogates left out, every character of
    # Unicode may appear in a token (checked in long runs; the byte limit is lifted for this).
    forbidden = set(FORBIDDEN_CODE_POINTS) | {ord("."), ord("*"), ord(">")}
    allowed = "".join(
        chr(cp)
        for cp in range(sys.maxunicode + 1)
        if cp not in forbidden and not 0xD800 <= cp <= 0xDFFF
    )
    run = 4096
    for i in range(0, len(allowed), run):
        chunk = allowed[i : i + run]
        assert validate_topic(chunk, max_bytes=4 * run) == chunk


def test_custom_limits() -> None:
    assert validate_topic("a.b.c", max_tokens=3) == "a.b.c"
    with pytest.raises(InvalidTopic, match="tokens"):
        validate_topic("a.b.c.d", max_tokens=3)
    with pytest.raises(InvalidTopic, match="tokens"):
        validate_pattern("a.b.*.>", max_tokens=3)
    assert validate_topic("abcd", max_bytes=4) == "abcd"
    with pytest.raises(InvalidTopic, match="bytes"):
        validate_topic("abcde", max_bytes=4)
    with pytest.raises(InvalidTopic, match="bytes"):
        validate_pattern("ab.>", max_bytes=3)


def test_every_topic_is_a_pattern_matching_only_itself() -> None:
    for topic in VALID_TOPICS:
        assert validate_pattern(topic) == topic
        assert matches(topic, topic)
        assert not matches(topic, topic + ".x")


# --- matching ----------------------------------------------------------------------------------

MATCHES = [
    ("a", "a", True),
    ("a", "b", False),
    ("a", "a.b", False),
    ("a.b", "a", False),
    ("*", "a", True),
    ("*", "a.b", False),
    (">", "a", True),
    (">", "a.b.c", True),
    ("a.>", "a", False),
    ("a.>", "a.b", True),
    ("a.>", "a.b.c.d", True),
    ("a.>", "b.c", False),
    ("a.*", "a.b", True),
    ("a.*", "a.b.c", False),
    ("a.*", "a", False),
    ("*.b", "a.b", True),
    ("*.b", "a.c", False),
    ("*.*", "a.b", True),
    ("*.*", "a", False),
    ("*.>", "a", False),
    ("*.>", "a.b", True),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.b.d", False),
    ("a.*.>", "a.b.c", True),
    ("a.*.>", "a.b", False),
    ("status.>", "status", False),
    ("status.>", "status.eu", True),
    ("status.>", "status.eu.node-17", True),
    ("status.*", "status.eu.node-17", False),
    ("status", "statuses", False),
    ("sta*", "status", False),  # not a valid pattern, and never a prefix match
    ("ü.*", "ü.日本", True),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCHES)
def test_matches_table(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected
    assert matches(split_pattern(pattern), split_pattern(topic)) is expected


def reference_regex(pattern: str) -> re.Pattern[str]:
    """The obvious regular expression for a pattern: '*' one token, '>' one or more tokens."""
    parts = []
    for token in pattern.split("."):
        if token == "*":
            parts.append(r"[^.]+")
        elif token == ">":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(re.escape(token))
    return re.compile(r"\.".join(parts))


_tok = st.sampled_from(["a", "b", "ab"])
small_topic = st.lists(_tok, min_size=1, max_size=5).map(".".join)
small_pattern = st.builds(
    lambda toks, tail: ".".join(toks + tail) or ">",
    st.lists(_tok | st.just("*"), max_size=5),
    st.sampled_from([[], [">"]]),
)


@given(pattern=small_pattern, topic=small_topic)
@settings(deadline=None)
def test_matches_agrees_with_a_regex_small_alphabet(pattern: str, topic: str) -> None:
    # A three-token alphabet makes matches frequent, so both outcomes are well explored.
    validate_pattern(pattern)
    expected = reference_regex(pattern).fullmatch(topic) is not None
    assert matches(pattern, topic) is expected


@given(pattern=pattern_st, topic=topic_st)
@settings(deadline=None)
def test_matches_agrees_with_a_regex_any_characters(pattern: str, topic: str) -> None:
    validate_pattern(pattern)
    validate_topic(topic)
    expected = reference_regex(pattern).fullmatch(topic) is not None
    assert matches(pattern, topic) is expected


@given(topic=topic_st)
@settings(deadline=None)
def test_generalising_a_topic_still_matches(topic: str) -> None:
    tokens = topic.split(".")
    for i in range(len(tokens)):
        assert matches(".".join([*tokens[:i], "*", *tokens[i + 1 :]]), topic)
        assert matches(".".join([*tokens[:i], ">"]), topic) is (i < len(tokens))
    assert matches(">", topic)
    assert not matches(topic + ".>", topic)
