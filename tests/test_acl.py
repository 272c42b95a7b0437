"""Access-control policy: decision tables, load errors, and the pattern algebra's properties."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera_mq.auth import ANONYMOUS, AclError, Action, Decision, Identity, Policy, Rule
from tessera_mq.auth.acl import Grant, covers, escapes, intersects, matches, meet
from tessera_mq.client.protocol import topics as wire_topics

PUB = Action.PUBLISH
SUB = Action.SUBSCRIBE


def x509(name: str) -> Identity:
    return Identity("x509", name)


def krb(name: str) -> Identity:
    return Identity("kerberos", name)


def ntlm(name: str) -> Identity:
    return Identity("ntlm", name)


# --------------------------------------------------------------------------------------------
# Decision tables. Each expected value is the decision's reason, which also fixes `allowed`.

ALLOWS = """
[[allow]]   # allow[0]: one x509 user, own command subtree by full name
principals = ["x509:alice"]
publish = ["status.>"]
subscribe = ["status.*", "cmd.{name}.>"]

[[allow]]   # allow[1]: a glob of x509 services, placeholders inside tokens
principals = ["x509:svc-*"]
publish = ["metrics.{user}.*"]
subscribe = ["cmd.{user}.>", "inbox-{user}"]

[[allow]]   # allow[2]: a Kerberos realm
principals = ["kerberos:*@EXAMPLE.COM"]
subscribe = ["inbox.{user}.>", "team.{mechanism}.*"]

[[allow]]   # allow[3]: an NTLM domain
principals = ['ntlm:CORP\\*']
publish = ["inbox.{user}.>"]

[[allow]]   # allow[4]: a bare name, under any mechanism but anonymous
principals = ["bob"]
publish = ["chat.>"]

[[allow]]   # allow[5]: anyone authenticated
principals = ["*"]
subscribe = ["announce.>"]

[[allow]]   # allow[6]: anonymous peers, named explicitly
principals = ["anonymous"]
subscribe = ["public.*"]
"""

DENIES = """
[[allow]]   # allow[0]
principals = ["*"]
publish = [">"]
subscribe = [">"]

[[deny]]    # deny[0]
principals = ["x509:mallory"]
subscribe = [">"]

[[deny]]    # deny[1]
principals = ["*"]
publish = ["sys.>"]
subscribe = ["sys.secret.>", "audit.*.raw"]

[[deny]]    # deny[2]: a deny placeholder that cannot be filled matches everything
principals = ["kerberos:*"]
publish = ["loop.{user}"]
"""

POLICIES = {
    "empty": Policy.from_text("", source="empty.toml"),
    "allows": Policy.from_text(ALLOWS, source="allows.toml"),
    "denies": Policy.from_text(DENIES, source="denies.toml"),
    "allow_all": Policy.allow_all(),
    "allow_all_anon": Policy.allow_all(include_anonymous=True),
}

NONE = "no allow rule matches"
BAD_TOPIC = "invalid topic"
BAD_PATTERN = "invalid subscription pattern"

TABLE = [
    # default deny
    ("empty", x509("alice"), PUB, "status.eu", NONE),
    ("empty", x509("alice"), SUB, "status.eu", NONE),
    ("empty", ANONYMOUS, SUB, ">", NONE),
    # exact x509 principal; publish with '>'
    ("allows", x509("alice"), PUB, "status.eu", "allowed by allow[0]"),
    ("allows", x509("alice"), PUB, "status.eu.node1", "allowed by allow[0]"),
    ("allows", x509("alice"), PUB, "status", NONE),  # '>' needs at least one more token
    ("allows", x509("alice"), PUB, "cmd.alice.x", NONE),  # subscribe-only
    ("allows", x509("alicex"), PUB, "status.eu", NONE),
    ("allows", x509("Alice"), PUB, "status.eu", NONE),  # names compared as given
    ("allows", krb("alice"), PUB, "status.eu", NONE),  # x509:alice is x509 only
    # subscribe: the allow pattern must cover the requested one
    ("allows", x509("alice"), SUB, "status.eu", "allowed by allow[0]"),
    ("allows", x509("alice"), SUB, "status.*", "allowed by allow[0]"),
    ("allows", x509("alice"), SUB, "status.>", NONE),  # also matches status.eu.node1
    ("allows", x509("alice"), SUB, "status.eu.node1", NONE),
    ("allows", x509("alice"), SUB, "*.eu", NONE),
    # {name}
    ("allows", x509("alice"), SUB, "cmd.alice.>", "allowed by allow[0]"),
    ("allows", x509("alice"), SUB, "cmd.alice.reboot", "allowed by allow[0]"),
    ("allows", x509("alice"), SUB, "cmd.alice.*.now", "allowed by allow[0]"),
    ("allows", x509("alice"), SUB, "cmd.alice", NONE),
    ("allows", x509("alice"), SUB, "cmd.bob.>", NONE),
    ("allows", x509("alice"), SUB, "cmd.*.>", NONE),
    ("allows", x509("alice"), SUB, "cmd.>", NONE),
    # glob principal; {user}, including inside a token
    ("allows", x509("svc-a"), SUB, "cmd.svc-a.>", "allowed by allow[1]"),
    ("allows", x509("svc-a"), SUB, "cmd.svc-b.>", NONE),
    ("allows", x509("svc-a"), SUB, "inbox-svc-a", "allowed by allow[1]"),
    ("allows", x509("svc-a"), SUB, "inbox-svc-b", NONE),
    ("allows", x509("svc-a"), PUB, "metrics.svc-a.cpu", "allowed by allow[1]"),
    ("allows", x509("svc-a"), PUB, "metrics.svc-a.cpu.0", NONE),
    ("allows", x509("svc-a"), PUB, "metrics.svc-b.cpu", NONE),
    ("allows", x509("svc-"), SUB, "cmd.svc-.x", "allowed by allow[1]"),  # fnmatch '*' may be empty
    ("allows", x509("svc-a@example.com"), SUB, "cmd.svc-a.>", "allowed by allow[1]"),  # {user}
    # a name with a dot cannot be substituted: the allow pattern is skipped
    ("allows", x509("svc-a.b"), SUB, "cmd.svc-a.b.>", NONE),
    ("allows", x509("svc-a.b"), SUB, "cmd.svc-a.>", NONE),
    ("allows", x509("svc-a.b"), PUB, "metrics.svc-a.b", NONE),
    ("allows", x509("svc-a.b"), SUB, "announce.x", "allowed by allow[5]"),  # others still apply
    ("allows", x509("svc-*"), SUB, "cmd.x.>", NONE),  # a '*' in a name is not a wildcard
    ("allows", x509("svc->"), SUB, "cmd.x", NONE),
    # Kerberos realm glob; {user} strips the realm; {mechanism}
    ("allows", krb("alice@EXAMPLE.COM"), SUB, "inbox.alice.>", "allowed by allow[2]"),
    ("allows", krb("alice@EXAMPLE.COM"), SUB, "inbox.alice.x", "allowed by allow[2]"),
    ("allows", krb("alice@EXAMPLE.COM"), SUB, "inbox.bob.x", NONE),
    ("allows", krb("alice@EXAMPLE.COM"), SUB, "team.kerberos.x", "allowed by allow[2]"),
    ("allows", krb("alice@EXAMPLE.COM"), SUB, "team.x509.x", NONE),
    ("allows", krb("alice@OTHER.COM"), SUB, "inbox.alice.>", NONE),
    ("allows", krb("alice@example.com"), SUB, "inbox.alice.>", NONE),  # realm case as given
    ("allows", krb("a.b@EXAMPLE.COM"), SUB, "inbox.a.b.>", NONE),  # {user} not a token
    ("allows", krb("a.b@EXAMPLE.COM"), SUB, "team.kerberos.x", "allowed by allow[2]"),
    ("allows", krb("@EXAMPLE.COM"), SUB, "inbox.x.>", NONE),  # empty {user}
    ("allows", x509("alice@EXAMPLE.COM"), SUB, "inbox.alice.>", NONE),  # wrong mechanism
    # NTLM domain glob (a literal backslash); {user} strips the domain
    ("allows", ntlm("CORP\\alice"), PUB, "inbox.alice.x", "allowed by allow[3]"),
    ("allows", ntlm("CORP\\alice"), PUB, "inbox.bob.x", NONE),
    ("allows", ntlm("OTHER\\alice"), PUB, "inbox.alice.x", NONE),
    ("allows", x509("CORP\\alice"), PUB, "inbox.alice.x", NONE),
    # bare principal: any mechanism except anonymous
    ("allows", x509("bob"), PUB, "chat.room1", "allowed by allow[4]"),
    ("allows", krb("bob"), PUB, "chat.room1", "allowed by allow[4]"),
    ("allows", ntlm("bob"), PUB, "chat.room1", "allowed by allow[4]"),
    ("allows", krb("bob@EXAMPLE.COM"), PUB, "chat.room1", NONE),
    ("allows", Identity("anonymous", "bob"), PUB, "chat.room1", NONE),
    # '*' is anyone authenticated; anonymous only where named
    ("allows", x509("zed"), SUB, "announce.>", "allowed by allow[5]"),
    ("allows", krb("zed@ELSEWHERE"), SUB, "announce.x.y", "allowed by allow[5]"),
    ("allows", ANONYMOUS, SUB, "announce.>", NONE),
    ("allows", ANONYMOUS, SUB, "public.news", "allowed by allow[6]"),
    ("allows", ANONYMOUS, SUB, "public.*", "allowed by allow[6]"),
    ("allows", ANONYMOUS, SUB, "public.>", NONE),
    ("allows", ANONYMOUS, PUB, "public.news", NONE),
    ("allows", x509("anonymous"), SUB, "public.news", NONE),  # the keyword is not a name
    # invalid subjects are denied without consulting rules
    ("allows", x509("alice"), PUB, "status.*", BAD_TOPIC),
    ("allows", x509("alice"), PUB, "status.>", BAD_TOPIC),
    ("allows", x509("alice"), PUB, "", BAD_TOPIC),
    ("allows", x509("alice"), PUB, "status..eu", BAD_TOPIC),
    ("allows", x509("alice"), PUB, "status.", BAD_TOPIC),
    ("allows", x509("alice"), PUB, "status.e u", BAD_TOPIC),
    ("allows", x509("alice"), PUB, "status.e\x00", BAD_TOPIC),
    ("allows", x509("alice"), PUB, "status.eu*", BAD_TOPIC),
    ("allows", x509("alice"), SUB, "status.>.eu", BAD_PATTERN),
    ("allows", x509("alice"), SUB, "status.e*", BAD_PATTERN),
    ("allows", x509("alice"), SUB, "", BAD_PATTERN),
    ("allows", x509("alice"), SUB, "status.\teu", BAD_PATTERN),
    ("allows", x509("alice"), SUB, "status.\u2028", BAD_PATTERN),
    # deny wins over allow
    ("denies", x509("alice"), PUB, "status.eu", "allowed by allow[0]"),
    ("denies", x509("alice"), PUB, "sys.reboot", "denied by deny[1]"),
    ("denies", x509("alice"), PUB, "sys", "allowed by allow[0]"),
    ("denies", x509("mallory"), SUB, "status.eu", "denied by deny[0]"),
    ("denies", x509("mallory"), PUB, "status.eu", "allowed by allow[0]"),  # subscribe-only deny
    ("denies", krb("mallory"), SUB, "status.eu", "allowed by allow[0]"),
    # subscribe: any overlap with a deny pattern is denied
    ("denies", x509("alice"), SUB, "sys.public.>", "allowed by allow[0]"),
    ("denies", x509("alice"), SUB, "sys.>", "denied by deny[1]"),
    ("denies", x509("alice"), SUB, ">", "denied by deny[1]"),
    ("denies", x509("alice"), SUB, "sys.*.x", "denied by deny[1]"),
    ("denies", x509("alice"), SUB, "*.secret.x", "denied by deny[1]"),
    (
        "denies",
        x509("alice"),
        SUB,
        "sys.secret",
        "allowed by allow[0]",
    ),  # 'sys.secret.>' needs more
    ("denies", x509("alice"), SUB, "audit.eu.raw", "denied by deny[1]"),
    ("denies", x509("alice"), SUB, "audit.eu.*", "denied by deny[1]"),
    ("denies", x509("alice"), SUB, "audit.>", "denied by deny[1]"),
    ("denies", x509("alice"), SUB, "audit.*", "allowed by allow[0]"),
    ("denies", x509("alice"), SUB, "audit.eu.cooked", "allowed by allow[0]"),
    ("denies", x509("alice"), SUB, "audit.eu.raw.x", "allowed by allow[0]"),
    # a deny placeholder that cannot be filled denies everything that deny pattern governs
    ("denies", krb("alice@EXAMPLE.COM"), PUB, "loop.alice", "denied by deny[2]"),
    ("denies", krb("alice@EXAMPLE.COM"), PUB, "loop.bob", "allowed by allow[0]"),
    ("denies", krb("a.b@EXAMPLE.COM"), PUB, "status.eu", "denied by deny[2]"),
    ("denies", krb("a.b@EXAMPLE.COM"), SUB, "status.eu", "allowed by allow[0]"),
    ("denies", ANONYMOUS, SUB, "status.eu", NONE),
    # allow_all: every authenticated identity, everything; anonymous only on request
    ("allow_all", x509("alice"), PUB, "a.b.c", "allowed by allow[0]"),
    ("allow_all", krb("x@Y"), SUB, ">", "allowed by allow[0]"),
    ("allow_all", ANONYMOUS, SUB, ">", NONE),
    ("allow_all_anon", ANONYMOUS, SUB, ">", "allowed by allow[0]"),
    ("allow_all_anon", ANONYMOUS, PUB, "a", "allowed by allow[0]"),
]


@pytest.mark.parametrize(("policy", "identity", "action", "subject", "reason"), TABLE)
def test_decision_table(
    policy: str, identity: Identity, action: Action, subject: str, reason: str
) -> None:
    p = POLICIES[policy]
    decision = p.check(identity, action, subject)
    assert decision.reason == reason
    assert decision.allowed is reason.startswith("allowed")
    assert bool(decision) is decision.allowed
    assert p.allows(identity, action, subject) is decision.allowed
    if reason in (NONE, BAD_TOPIC, BAD_PATTERN):
        assert decision.rule is None
    else:
        assert decision.rule is not None
        assert reason.endswith(decision.rule.describe())


def test_decision_names_the_rule() -> None:
    decision = POLICIES["denies"].check(x509("alice"), SUB, "sys.>")
    assert decision == Decision(False, decision.rule, "denied by deny[1]")
    assert decision.rule == Rule(
        effect="deny",
        principals=("*",),
        publish=("sys.>",),
        subscribe=("sys.secret.>", "audit.*.raw"),
        index=1,
    )


def test_rules_and_repr() -> None:
    policy = POLICIES["denies"]
    assert [r.describe() for r in policy.rules] == ["allow[0]", "deny[0]", "deny[1]", "deny[2]"]
    assert "denies.toml" in repr(policy)


def test_bind_is_cached_and_agrees() -> None:
    policy = POLICIES["allows"]
    bound = policy.bind(x509("alice"))
    assert policy.bind(x509("alice")) is bound
    assert bound.identity == x509("alice")
    assert bound.check(SUB, "cmd.alice.>") == policy.check(x509("alice"), SUB, "cmd.alice.>")
    assert bound.allows(PUB, "status.x")
    assert not bound.allows(PUB, "cmd.x")


def test_policy_from_rules() -> None:
    rule = Rule("allow", ("x509:a",), ("t",), (), 0)
    policy = Policy([rule])
    assert policy.allows(x509("a"), PUB, "t")
    with pytest.raises(AclError, match=r"<rules>: allow\[0\]\.principals: must name"):
        Policy([Rule("allow", (), ("t",), (), 0)])
    with pytest.raises(AclError, match=r"<rules>: permit\[0\]: effect must be"):
        Policy([Rule("permit", ("a",), ("t",), (), 0)])  # type: ignore[arg-type]


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "acl.toml"
    path.write_text(ALLOWS, encoding="utf-8")
    policy = Policy.from_file(path)
    assert policy.source == str(path)
    assert policy.allows(x509("alice"), PUB, "status.eu")


def test_from_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(AclError, match=r"missing\.toml: cannot read policy") as info:
        Policy.from_file(missing)
    assert info.value.source == str(missing)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[allow]]\nprincipals = ["x509:a"]\nsubscribe = ["a..b"]\n', encoding="utf-8")
    with pytest.raises(AclError) as info:
        Policy.from_file(bad)
    assert str(info.value).startswith(f"{bad}: allow[0].subscribe[0]: pattern 'a..b'")
    assert info.value.location == "allow[0].subscribe[0]"
    broken = tmp_path / "broken.toml"
    broken.write_text("[[allow]\n", encoding="utf-8")
    with pytest.raises(AclError, match=r"broken\.toml: invalid TOML"):
        Policy.from_file(broken)


# --------------------------------------------------------------------------------------------
# Load errors: (policy text, location, message fragment)


def _rule(**fields: str) -> str:
    body = {"principals": '["x509:a"]', "subscribe": '["a"]'} | fields
    lines = [f"{key} = {value}" for key, value in body.items() if value != "<omit>"]
    return "[[allow]]\n" + "\n".join(lines) + "\n"


ERRORS = [
    ("[[allow]\n", "", "invalid TOML"),
    ("[[allw]]\nprincipals = ['a']\n", "allw", "unknown key"),
    ("version = 1\n", "version", "unknown key"),
    ("[allow]\nprincipals = ['a']\n", "allow", "expected an array of tables"),
    ("deny = 3\n", "deny", "expected an array of tables"),
    ('allow = ["x"]\n', "allow[0]", "expected a table"),
    (_rule(publsh='["a"]'), "allow[0].publsh", "unknown key"),
    (_rule(principals="<omit>"), "allow[0].principals", "missing"),
    (_rule(principals="[]"), "allow[0].principals", "must name at least one principal"),
    (_rule(principals='"x509:a"'), "allow[0].principals", "expected an array of strings"),
    (_rule(principals="[1]"), "allow[0].principals[0]", "expected a string"),
    (_rule(subscribe="<omit>"), "allow[0]", "at least one publish or subscribe"),
    (_rule(subscribe="[]", publish="[]"), "allow[0]", "at least one publish or subscribe"),
    (_rule(subscribe='"a"'), "allow[0].subscribe", "expected an array of strings"),
    (_rule(publish='["a", 2]'), "allow[0].publish[1]", "expected a string"),
    (_rule(principals='["krb:alice"]'), "allow[0].principals[0]", "unknown mechanism 'krb'"),
    (_rule(principals='["X509:alice"]'), "allow[0].principals[0]", "unknown mechanism"),
    (
        _rule(principals='["a", "spiffe://x/y"]'),
        "allow[0].principals[1]",
        "must be qualified, e.g. 'x509:spiffe://x/y'",
    ),
    (_rule(principals='[""]'), "allow[0].principals[0]", "empty principal"),
    (_rule(principals='["x509:a "]'), "allow[0].principals[0]", "trailing whitespace"),
    (_rule(principals='[" x509:a"]'), "allow[0].principals[0]", "leading or trailing"),
    (_rule(principals='["x509:"]'), "allow[0].principals[0]", "empty name"),
    (_rule(principals='["anonymous:foo"]'), "allow[0].principals[0]", "anonymous peers"),
    (_rule(principals='["a\\u0007"]'), "allow[0].principals[0]", "control character"),
    (_rule(subscribe='[">.a"]'), "allow[0].subscribe[0]", "'>' must be the last token"),
    (_rule(subscribe='["a.>.b"]'), "allow[0].subscribe[0]", "'>' must be the last token"),
    (_rule(subscribe='["a..b"]'), "allow[0].subscribe[0]", "invalid token ''"),
    (_rule(subscribe='[""]'), "allow[0].subscribe[0]", "invalid token"),
    (_rule(subscribe='["a."]'), "allow[0].subscribe[0]", "invalid token"),
    (_rule(subscribe='["a.b*"]'), "allow[0].subscribe[0]", "invalid token 'b*'"),
    (_rule(subscribe='["a.>x"]'), "allow[0].subscribe[0]", "invalid token"),
    (_rule(subscribe='["a. b"]'), "allow[0].subscribe[0]", "invalid token"),
    (_rule(subscribe='["a.\\u0000"]'), "allow[0].subscribe[0]", "invalid token"),
    (_rule(subscribe='["a", "{nam}"]'), "allow[0].subscribe[1]", "unknown placeholder {nam}"),
    (_rule(subscribe='["a.{}"]'), "allow[0].subscribe[0]", "unknown placeholder {}"),
    (_rule(subscribe='["a.{name"]'), "allow[0].subscribe[0]", "unbalanced"),
    (_rule(subscribe='["a.name}"]'), "allow[0].subscribe[0]", "unbalanced"),
    (_rule(subscribe='["a.{{name}}"]'), "allow[0].subscribe[0]", "unbalanced"),
    (_rule(subscribe='["a.{name}*"]'), "allow[0].subscribe[0]", "invalid token"),
    (_rule(publish='["a.{user}.>x"]'), "allow[0].publish[0]", "invalid token"),
    (
        _rule() + '[[deny]]\nprincipals = ["a"]\nsubscribe = [">"]\n'
        '[[deny]]\nprincipals = ["a"]\npublish = ["a.*b"]\n',
        "deny[1].publish[0]",
        "invalid token",
    ),
]


@pytest.mark.parametrize(("text", "location", "message"), ERRORS)
def test_load_errors(text: str, location: str, message: str) -> None:
    with pytest.raises(AclError) as info:
        Policy.from_text(text, source="acl.toml")
    error = info.value
    assert error.source == "acl.toml"
    assert error.location == location
    assert message in error.problem
    prefix = f"acl.toml: {location}: " if location else "acl.toml: "
    assert str(error).startswith(prefix)


def test_from_dict_rejects_a_non_table() -> None:
    with pytest.raises(AclError, match="a policy must be a table"):
        Policy.from_dict([], "x")  # type: ignore[arg-type]


def test_from_dict_source_default() -> None:
    with pytest.raises(AclError, match=r"^<dict>: allow\[0\]"):
        Policy.from_dict({"allow": [{"principals": ["a"]}]})


# --------------------------------------------------------------------------------------------
# The pattern algebra: matches, covers, intersects

LITERALS = ("a", "b")
UNIVERSE_TOKENS = ("a", "b", "z")  # 'z' stands for any token a pattern does not name


def _patterns(max_len: int) -> list[tuple[str, ...]]:
    result: list[tuple[str, ...]] = []
    for n in range(1, max_len + 1):
        for head in itertools.product((*LITERALS, "*"), repeat=n - 1):
            result.extend((*head, last) for last in (*LITERALS, "*", ">"))
    return result


def _topics(max_len: int) -> list[tuple[str, ...]]:
    return [t for n in range(1, max_len + 1) for t in itertools.product(UNIVERSE_TOKENS, repeat=n)]


def _regex(pattern: tuple[str, ...]) -> re.Pattern[str]:
    """An independent oracle: the pattern as a regular expression over the dotted topic."""
    parts = []
    for token in pattern:
        if token == ">":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        elif token == "*":
            parts.append(r"[^.]+")
        else:
            parts.append(re.escape(token))
    return re.compile(r"\.".join(parts))


def _brute_covers(
    outer: tuple[str, ...], inner: tuple[str, ...], topics: list[tuple[str, ...]]
) -> bool:
    return all(matches(outer, t) for t in topics if matches(inner, t))


def _brute_intersects(
    first: tuple[str, ...], second: tuple[str, ...], topics: list[tuple[str, ...]]
) -> bool:
    return any(matches(first, t) and matches(second, t) for t in topics)


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a", "a", True),
        ("a", "b", False),
        ("a", "a.b", False),
        ("a.b", "a", False),
        ("*", "a", True),
        ("*", "a.b", False),
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        (">", "a", True),
        (">", "a.b.c", True),
        ("a.>", "a", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c", True),
        ("a.>", "b.c", False),
        ("*.b.>", "x.b.y.z", True),
        ("*.b.>", "x.c.y", False),
    ],
)
def test_matches_examples(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern.split("."), topic.split(".")) is expected


@pytest.mark.parametrize(
    ("outer", "inner", "covers_", "intersects_"),
    [
        (">", "a.>", True, True),
        ("a.>", ">", False, True),
        ("a.>", "a.>", True, True),
        ("a.>", "a", False, False),
        ("a.*", "a.>", False, True),
        ("a.>", "a.*", True, True),
        ("*", "a", True, True),
        ("a", "*", False, True),
        ("a.*", "*.b", False, True),
        ("a.b", "a.c", False, False),
        ("a.*.c", "a.b.>", False, True),
        ("a.b", "a.b.c", False, False),
        ("*.*", "*", False, False),
    ],
)
def test_covers_and_intersects_examples(
    outer: str, inner: str, covers_: bool, intersects_: bool
) -> None:
    o, i = tuple(outer.split(".")), tuple(inner.split("."))
    assert covers(o, i) is covers_
    assert intersects(o, i) is intersects_
    assert intersects(i, o) is intersects_


def test_algebra_exhaustive_small() -> None:
    """Every pair of patterns of up to 3 tokens over {a, b, *, >}, against every topic of up
    to 4 tokens: a counterexample, if any, fits in max(len) + 1 tokens over {a, b, z}."""
    patterns = _patterns(3)
    topics = _topics(4)
    matched = {p: frozenset(t for t in topics if matches(p, t)) for p in patterns}
    for p in patterns:
        oracle = _regex(p)
        assert matched[p] == {t for t in topics if oracle.fullmatch(".".join(t))}
        assert matched[p]  # every valid pattern matches something
    for a, b in itertools.product(patterns, repeat=2):
        assert covers(a, b) is (matched[b] <= matched[a]), (a, b)
        assert intersects(a, b) is bool(matched[a] & matched[b]), (a, b)


_token = st.sampled_from((*LITERALS, "*"))
_pattern = st.tuples(st.lists(_token, max_size=3), st.sampled_from((*LITERALS, "*", ">"))).map(
    lambda parts: (*parts[0], parts[1])
)
_topic = st.lists(st.sampled_from(UNIVERSE_TOKENS), min_size=1, max_size=8).map(tuple)
_UNIVERSE = _topics(5)  # patterns have at most 4 tokens


@settings(max_examples=150, deadline=None)
@given(outer=_pattern, inner=_pattern, topic=_topic)
def test_covers_is_sound_and_complete(
    outer: tuple[str, ...], inner: tuple[str, ...], topic: tuple[str, ...]
) -> None:
    if covers(outer, inner) and matches(inner, topic):
        assert matches(outer, topic)
    assert covers(outer, inner) is _brute_covers(outer, inner, _UNIVERSE)


@settings(max_examples=150, deadline=None)
@given(first=_pattern, second=_pattern, topic=_topic)
def test_intersects_agrees_with_brute_force(
    first: tuple[str, ...], second: tuple[str, ...], topic: tuple[str, ...]
) -> None:
    assert intersects(first, second) is intersects(second, first)
    if matches(first, topic) and matches(second, topic):
        assert intersects(first, second)
    assert intersects(first, second) is _brute_intersects(first, second, _UNIVERSE)


@settings(max_examples=100, deadline=None)
@given(pattern=_pattern, topic=_topic)
def test_matches_agrees_with_regex(pattern: tuple[str, ...], topic: tuple[str, ...]) -> None:
    assert matches(pattern, topic) is (_regex(pattern).fullmatch(".".join(topic)) is not None)


@settings(max_examples=150, deadline=None)
@given(allow=_pattern, deny=_pattern, requested=_pattern)
def test_subscribe_decision_is_exact(
    allow: tuple[str, ...], deny: tuple[str, ...], requested: tuple[str, ...]
) -> None:
    """A subscription is allowed iff every topic it can deliver is allowed by the allow pattern
    and by no deny pattern."""
    policy = Policy.from_dict(
        {
            "allow": [{"principals": ["*"], "subscribe": [".".join(allow)]}],
            "deny": [{"principals": ["*"], "subscribe": [".".join(deny)]}],
        }
    )
    delivered = [t for t in _UNIVERSE if matches(requested, t)]
    expected = all(matches(allow, t) and not matches(deny, t) for t in delivered)
    assert policy.allows(x509("u"), SUB, ".".join(requested)) is expected


@settings(max_examples=100, deadline=None)
@given(name=st.text(max_size=6), requested=st.text(alphabet="cmd.*>xa", max_size=10))
def test_name_substitution_cannot_escape(name: str, requested: str) -> None:
    """Whatever the name, an allowed subscription stays inside cmd.<name>."""
    policy = Policy.from_dict(
        {"allow": [{"principals": ["x509:*"], "subscribe": ["cmd.{name}.>"]}]}
    )
    for subject in (requested, f"cmd.{name}.x", f"cmd.{name}.>"):
        if policy.allows(x509(name), SUB, subject):
            tokens = subject.split(".")
            assert tokens[:2] == ["cmd", name]
            assert len(tokens) > 2
            assert "." not in name


# --------------------------------------------------------------------------------------------
# The ACL replicates the wire protocol's topic rules (auth may not import the SDK): keep them equal.

_GRAMMAR_ALPHABET = "ab.*> \t\x00\x7f\x85\u00a0\u2028é{}-"


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=_GRAMMAR_ALPHABET, max_size=8))
def test_topic_grammar_matches_the_wire_protocol(text: str) -> None:
    policy = Policy.allow_all()

    def wire_accepts(validate: Callable[[str], object]) -> bool:
        try:
            validate(text)
        except ValueError:
            return False
        return True

    publish = policy.check(x509("u"), PUB, text)
    assert (publish.reason != BAD_TOPIC) is wire_accepts(wire_topics.validate_topic)
    subscribe = policy.check(x509("u"), SUB, text)
    assert (subscribe.reason != BAD_PATTERN) is wire_accepts(wire_topics.validate_pattern)


@settings(max_examples=100, deadline=None)
@given(pattern=_pattern, topic=_topic)
def test_matches_agrees_with_the_wire_protocol(
    pattern: tuple[str, ...], topic: tuple[str, ...]
) -> None:
    assert matches(pattern, topic) is wire_topics.matches(pattern, topic)


# --------------------------------------------------------------------------------------------
# docs/acl.md's example table is what the code decides.


def _doc_examples() -> list[tuple[str, Identity, str, str, str]]:
    doc = (Path(__file__).parent.parent / "docs" / "acl.md").read_text(encoding="utf-8")
    section = doc.split("## Examples", 1)[1].split("## Testing", 1)[0]
    policy_text = section.split("```toml\n", 1)[1].split("```", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[1] not in ("publish", "subscribe"):
            continue
        who, action, subject, reason, _ = cells
        mechanism, _, name = who.partition(":")
        identity = ANONYMOUS if who == "anonymous" else Identity(mechanism, name)
        rows.append((policy_text, identity, action, subject, reason))
    return rows


DOC_EXAMPLES = _doc_examples()


def test_doc_examples_found() -> None:
    assert len(DOC_EXAMPLES) >= 20


@pytest.mark.parametrize(("text", "identity", "action", "subject", "reason"), DOC_EXAMPLES)
def test_doc_examples(
    text: str, identity: Identity, action: str, subject: str, reason: str
) -> None:
    assert Policy.from_text(text).check(identity, Action(action), subject).reason == reason


# --------------------------------------------------------------------------------------------
# Filtered wildcard subscriptions: BoundPolicy.subscription -> Grant.

FILTERED = """
[[allow]]   # allow[0]
principals = ["x509:dash"]
subscribe = ["status.>"]

[[allow]]   # allow[1]
principals = ["x509:org-user"]
subscribe = ["org.a.>", "org.b.>"]

[[allow]]   # allow[2]
principals = ["x509:split"]
subscribe = ["log.*", "log.*.>"]

[[allow]]   # allow[3]
principals = ["x509:carved"]
subscribe = ["t.>"]

[[deny]]    # deny[0]
principals = ["x509:dash"]
subscribe = ["status.secret.>"]

[[deny]]    # deny[1]
principals = ["x509:carved"]
subscribe = ["t.*", "t.*.>"]

[[deny]]    # deny[2]
principals = ["x509:filled"]
subscribe = ["x.{user}.>"]

[[allow]]   # allow[4]
principals = ["x509:filled", "x509:a.b"]
subscribe = [">"]

[[deny]]    # deny[3]
principals = ["x509:a.b"]
subscribe = ["x.{user}.>"]
"""


def _grant(name: str, pattern: str) -> Grant:
    return Policy.from_text(FILTERED).subscription(x509(name), pattern)


@pytest.mark.parametrize(
    ("name", "pattern", "kind", "reason"),
    [
        ("dash", "status.>", "filtered", "allowed by allow[0] (filtered)"),
        ("dash", "status.eu.>", "unrestricted", "allowed by allow[0]"),
        ("dash", "status.*", "unrestricted", "allowed by allow[0]"),
        ("dash", "status.secret", "unrestricted", "allowed by allow[0]"),
        ("dash", "status.secret.>", "refused", "denied by deny[0]"),
        ("dash", "status.secret.*", "refused", "denied by deny[0]"),
        ("dash", "status.*.keys", "filtered", "allowed by allow[0] (filtered)"),
        ("dash", ">", "filtered", "allowed by allow[0] (filtered)"),
        ("dash", "other.>", "refused", "no allow rule matches"),
        ("org-user", "org.>", "filtered", "allowed by allow[1] (filtered)"),
        ("org-user", "org.*.x", "filtered", "allowed by allow[1] (filtered)"),
        ("org-user", "org.a.>", "unrestricted", "allowed by allow[1]"),
        ("org-user", "org.c.>", "refused", "no allow rule matches"),
        ("org-user", "org.*", "refused", "no allow rule matches"),
        ("split", "log.>", "unrestricted", "allowed by allow[2]"),
        ("carved", "t.>", "refused", "denied by deny[1]"),
        ("carved", "t.x.y", "refused", "denied by deny[1]"),
        ("filled", "a.b", "unrestricted", "allowed by allow[4]"),
        ("a.b", "y.>", "refused", "denied by deny[3]"),
        ("dash", "status..x", "refused", "invalid subscription pattern"),
        ("dash", "status.>.x", "refused", "invalid subscription pattern"),
    ],
)
def test_subscription_grants(name: str, pattern: str, kind: str, reason: str) -> None:
    grant = _grant(name, pattern)
    assert grant.decision.reason == reason
    assert grant.possible is (kind != "refused") is bool(grant)
    assert grant.unrestricted is (kind == "unrestricted")
    assert grant.decision.allowed is grant.possible
    assert kind in repr(grant)


def test_denied_subtree_is_filtered_out() -> None:
    grant = _grant("dash", "status.>")
    assert grant.allows("status.eu")
    assert grant.allows("status.eu.node1")
    assert grant.allows(("status", "secret"))  # the deny needs one more token
    assert not grant.allows("status.secret.keys")
    assert not grant.allows("status.secret.a.b")
    assert not grant.allows("other.eu")  # outside the subscription
    assert not grant.allows("status")
    assert not grant.allows("status.*")  # not a topic


def test_union_of_allowed_subtrees() -> None:
    grant = _grant("org-user", "org.>")
    assert grant.allows("org.a.x")
    assert grant.allows("org.b.x.y")
    assert not grant.allows("org.c.x")
    assert not grant.allows("org.a")  # org.a.> needs one more token
    assert not grant.allows("orgs.a.x")


def test_refused_grant_allows_nothing() -> None:
    grant = _grant("carved", "t.>")
    assert not grant.allows("t.x")
    assert not grant.allows("t.x.y")
    assert not _grant("dash", "status..x").allows("status.a.x")


def test_unrestricted_grant_checks_only_the_pattern() -> None:
    grant = _grant("dash", "status.eu.>")
    assert grant.allows("status.eu.a")
    assert not grant.allows("status.us.a")


def test_check_subscribe_stays_strict() -> None:
    """check(SUBSCRIBE) answers "every topic is readable"; a filtered grant is not that."""
    policy = Policy.from_text(FILTERED)
    assert not policy.allows(x509("dash"), SUB, "status.>")
    assert policy.check(x509("dash"), SUB, "status.>").reason == "denied by deny[0]"
    assert not policy.allows(x509("org-user"), SUB, "org.>")
    # covered by two allow patterns together: unrestricted, and so allowed by check too
    assert policy.check(x509("split"), SUB, "log.>").reason == "allowed by allow[2]"
    assert policy.bind(x509("dash")).subscription("status.>").possible


def test_subscription_on_an_empty_policy() -> None:
    grant = Policy.from_text("").subscription(x509("u"), ">")
    assert not grant.possible
    assert grant.decision.reason == "no allow rule matches"


def _readable(
    allows: list[tuple[str, ...]], denies: list[tuple[str, ...]], topic: tuple[str, ...]
) -> bool:
    return any(matches(a, topic) for a in allows) and not any(matches(d, topic) for d in denies)


def test_meet_and_escapes_exhaustive_small() -> None:
    """meet() is exact, and escapes() against one or two others agrees with brute force over
    every pattern of up to 3 tokens (witnesses fit in 4 tokens over {a, b, z})."""
    patterns = _patterns(3)
    topics = _topics(4)
    matched = {p: frozenset(t for t in topics if matches(p, t)) for p in patterns}
    for a, b in itertools.product(patterns, repeat=2):
        both = meet(a, b)
        if both is None:
            assert not matched[a] & matched[b], (a, b)
        else:
            assert frozenset(t for t in topics if matches(both, t)) == matched[a] & matched[b]
        assert escapes(a, [b]) is bool(matched[a] - matched[b]), (a, b)
    short = _patterns(2)
    for a in patterns:
        for b, c in itertools.product(short, repeat=2):
            assert escapes(a, [b, c]) is bool(matched[a] - matched[b] - matched[c]), (a, b, c)


def test_escapes_needs_a_length_no_tail_takes() -> None:
    star = ("*",)
    assert not escapes((">",), [star, ("*", "*"), ("*", "*", ">")])
    assert escapes((">",), [star, ("*", "*", "*", ">")])  # two tokens escape
    assert escapes((">",), [])
    assert not escapes(("a",), [("a",)])


_patterns_small = st.lists(_pattern, min_size=0, max_size=3)


@settings(max_examples=300, deadline=None)
@given(allows=_patterns_small, denies=_patterns_small, requested=_pattern)
def test_grant_delivers_exactly_the_readable_topics(
    allows: list[tuple[str, ...]], denies: list[tuple[str, ...]], requested: tuple[str, ...]
) -> None:
    """Against brute force over every topic of up to 5 tokens: a grant is possible iff some
    topic it matches is readable, unrestricted iff all are, and allows() is exactly that."""
    data: dict[str, object] = {}
    if allows:
        data["allow"] = [{"principals": ["*"], "subscribe": [".".join(p) for p in allows]}]
    if denies:
        data["deny"] = [{"principals": ["*"], "subscribe": [".".join(p) for p in denies]}]
    policy = Policy.from_dict(data)
    grant = policy.subscription(x509("u"), ".".join(requested))
    delivered = [t for t in _UNIVERSE if matches(requested, t)]
    readable = [t for t in delivered if _readable(allows, denies, t)]
    assert grant.possible is bool(readable)
    assert grant.unrestricted is (len(readable) == len(delivered))
    for topic in _UNIVERSE:
        assert grant.allows(topic) is (
            matches(requested, topic) and _readable(allows, denies, topic)
        )
    # check(SUBSCRIBE) is the strict question
    assert policy.allows(x509("u"), SUB, ".".join(requested)) is grant.unrestricted


def _doc_grants() -> list[tuple[str, Identity, str, str]]:
    doc = (Path(__file__).parent.parent / "docs" / "acl.md").read_text(encoding="utf-8")
    section = doc.split("## Examples", 1)[1].split("## Testing", 1)[0]
    policy_text = section.split("```toml\n", 1)[1].split("```", 1)[0]
    grants = section.split("policy.subscription(identity, P)", 1)[1]
    rows = []
    for line in grants.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[2].startswith(("filtered", "refused", "unrestricted")):
            continue
        mechanism, _, name = cells[0].partition(":")
        rows.append((policy_text, Identity(mechanism, name), cells[1], cells[2]))
    return rows


DOC_GRANTS = _doc_grants()


def test_doc_grants_found() -> None:
    assert len(DOC_GRANTS) >= 6


@pytest.mark.parametrize(("text", "identity", "pattern", "expected"), DOC_GRANTS)
def test_doc_grants(text: str, identity: Identity, pattern: str, expected: str) -> None:
    grant = Policy.from_text(text).subscription(identity, pattern)
    kind = "unrestricted" if grant.unrestricted else "filtered" if grant.possible else "refused"
    rule = grant.decision.rule.describe() if grant.decision.rule else "no allow rule matches"
    assert f"{kind} ({rule})" == expected


@settings(max_examples=200, deadline=None)
@given(
    pub_allow=_patterns_small,
    pub_deny=_patterns_small,
    sub_allow=_patterns_small,
    sub_deny=_patterns_small,
)
def test_permits_anything_is_exact(
    pub_allow: list[tuple[str, ...]],
    pub_deny: list[tuple[str, ...]],
    sub_allow: list[tuple[str, ...]],
    sub_deny: list[tuple[str, ...]],
) -> None:
    data: dict[str, list[dict[str, object]]] = {"allow": [], "deny": []}
    for effect, pub, sub in (("allow", pub_allow, sub_allow), ("deny", pub_deny, sub_deny)):
        if pub or sub:
            data[effect].append(
                {
                    "principals": ["*"],
                    "publish": [".".join(p) for p in pub],
                    "subscribe": [".".join(p) for p in sub],
                }
            )
    policy = Policy.from_dict(data)
    expected = any(
        _readable(pub_allow, pub_deny, t) or _readable(sub_allow, sub_deny, t) for t in _UNIVERSE
    )
    assert policy.permits_anything(x509("u")) is expected


def test_permits_anything_examples() -> None:
    assert not Policy.from_text("").permits_anything(x509("u"))
    assert Policy.allow_all().permits_anything(x509("u"))
    assert not Policy.allow_all().permits_anything(ANONYMOUS)
    text = FILTERED
    assert Policy.from_text(text).permits_anything(x509("dash"))
    assert not Policy.from_text(text).permits_anything(x509("carved"))  # t.* and t.*.> denied
    assert not Policy.from_text(text).permits_anything(x509("a.b"))  # unfillable deny of >
