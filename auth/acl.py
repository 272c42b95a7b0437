"""Access control: which identities may publish to, and subscribe on, which topics.

A policy is a TOML file of ``[[allow]]`` and ``[[deny]]`` rules (``docs/acl.md``). Everything
not allowed is denied, and a matching deny rule beats any allow rule::

    [[allow]]
    principals = ["x509:svc-*", "kerberos:*@EXAMPLE.COM"]
    publish = ["status.>"]
    subscribe = ["cmd.{user}.>", "status.*"]

    [[deny]]
    principals = ["x509:mallory"]
    subscribe = [">"]

Rules are compiled when the policy is loaded (patterns split into tokens, principal globs
turned into regular expressions); :meth:`Policy.check` only walks tuples.

A subscription is decided by :meth:`Policy.subscription`, which returns a :class:`Grant`:
refused when no topic the pattern matches is readable, *unrestricted* when every one is (the
broker's fan-out then checks nothing per topic), else *filtered*: accepted, and
:meth:`Grant.allows` says which topics it delivers (``status.>`` with ``status.secret.>``
denied; ``org.>`` for a reader of ``org.a.>`` and ``org.b.>``). The decisions are exact:
:func:`meet` and :func:`escapes` complete the pattern algebra.

Topic syntax is the wire protocol's, replicated here because ``auth`` does not import the
SDK: a topic is dot-separated non-empty tokens; a pattern may use ``*`` as a whole token (exactly
one token) and ``>`` as its last token (one or more tokens). Tokens may not contain ``.``, ``*``,
``>``, whitespace or control characters. The pure functions :func:`matches`, :func:`covers` and
:func:`intersects` work on token tuples of already validated topics and patterns.
"""

from __future__ import annotations

import enum
import fnmatch
import functools
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, assert_never

from tessera_mq.auth.errors import AuthError
from tessera_mq.auth.identity import Identity
from tessera_mq.client.protocol.grammar import (
    MULTI_WILDCARD,
    SINGLE_WILDCARD,
    TOKEN_RE,
    covers,
    intersects,
    matches,
    split_pattern,
    split_topic,
)

__all__ = [
    "KNOWN_MECHANISMS",
    "PLACEHOLDERS",
    "Action",
    "AclError",
    "BoundPolicy",
    "Decision",
    "Grant",
    "Policy",
    "Rule",
    "covers",
    "escapes",
    "intersects",
    "matches",
    "meet",
]

#: Mechanisms a rule principal may name (``mechanism:glob``); an unknown one is a load error,
#: so that a typo in a deny rule cannot silently disable it.
KNOWN_MECHANISMS: Final = ("x509", "kerberos", "ntlm", "anonymous")

#: Placeholders a publish/subscribe pattern may contain, written ``{name}``.
PLACEHOLDERS: Final = ("name", "user", "mechanism")

_ONE: Final = SINGLE_WILDCARD  # matches exactly one token
_TAIL: Final = MULTI_WILDCARD  # matches one or more tokens; last token only
_TOKEN_RE: Final = TOKEN_RE  # a literal token (the grammar is client_sdk.protocol.grammar's)
_PLACEHOLDER_RE: Final = re.compile(r"\{([^{}]*)\}")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_RULE_KEYS: Final = ("principals", "publish", "subscribe")
_EFFECTS: Final = ("deny", "allow")

# Distinct identities whose compiled view (matching rules, substituted patterns) a Policy keeps.
# A broker connection has one identity; this bounds memory across many short connections
# (the same idea as functools' default LRU, sized for a broker's distinct principals).
_BIND_CACHE_SIZE: Final = 1024


class Action(enum.Enum):
    """What an identity asks to do with a subject."""

    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"


class AclError(AuthError):
    """The policy is malformed. The message names the source file, the rule (``allow[2]``)
    and the field (``allow[2].subscribe[1]``) so an operator can fix it."""

    def __init__(self, source: str, location: str, problem: str) -> None:
        self.source = source
        self.location = location
        self.problem = problem
        where = f"{source}: {location}" if location else source
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[allow]]`` or ``[[deny]]`` table, as written in the policy.

    ``index`` is the rule's position among the rules of the same effect (0-based), so
    ``describe()`` gives ``"allow[2]"`` for the third ``[[allow]]`` table.
    """

    effect: Literal["allow", "deny"]
    principals: tuple[str, ...]
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    index: int

    def describe(self) -> str:
        """The rule's name in errors, decisions and logs: ``"allow[2]"``."""
        return f"{self.effect}[{self.index}]"


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a check. ``rule`` is the deciding rule (``None`` when nothing matched or
    the subject was invalid); ``reason`` is safe to log (it names rules, never subjects)."""

    allowed: bool
    rule: Rule | None
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


_NO_ALLOW_RULE: Final = Decision(allowed=False, rule=None, reason="no allow rule matches")
_INVALID_TOPIC: Final = Decision(allowed=False, rule=None, reason="invalid topic")
_INVALID_PATTERN: Final = Decision(allowed=False, rule=None, reason="invalid subscription pattern")


# --------------------------------------------------------------------------------------------
# Topics and patterns as token tuples


# The grammar (split, match, cover, intersect) is written once, in client_sdk.protocol.grammar.
_split_topic = split_topic
_split_pattern = split_pattern


def meet(first: Sequence[str], second: Sequence[str]) -> tuple[str, ...] | None:
    """The pattern matching exactly the topics both patterns match, or ``None`` if none does.

    Token by token: ``*`` meets anything and yields the other token; two literals must be equal;
    a ``>`` yields the rest of the other pattern (which has at least the current token).
    """
    out: list[str] = []
    for i, (x, y) in enumerate(zip(first, second, strict=False)):
        if x == _TAIL:
            return (*out, *second[i:])
        if y == _TAIL:
            return (*out, *first[i:])
        if x == _ONE:
            out.append(y)
        elif y in (_ONE, x):
            out.append(x)
        else:
            return None
    return tuple(out) if len(first) == len(second) else None


def escapes(pattern: Sequence[str], others: Iterable[Sequence[str]]) -> bool:
    """True if some topic matches ``pattern`` and none of ``others``.

    Exact, in one pass over ``pattern``: tokens are an unbounded alphabet, so wherever
    ``pattern`` has a wildcard a witness topic can use a *fresh* token that no other pattern
    names; a fresh token keeps only the other patterns that have ``*`` there, and any other
    choice keeps a superset of them, so the fresh choice is always the best one. ``live`` holds
    the other patterns that match the witness so far; one with ``>`` at the current position
    covers every continuation (no witness). At a ``>`` in ``pattern`` the witness continues with
    ``k >= 1`` fresh tokens and only the all-``*`` remainders of ``live`` can match them: the
    witness exists unless they take every length. The witness may need more tokens than the
    wire protocol's topic limit allows; then a subscription is accepted that delivers nothing.
    """
    size = len(pattern)
    live = [other for other in others if intersects(other, pattern)]
    for i, token in enumerate(pattern):
        if token == _TAIL:
            lengths: set[int] = set()
            tail_from: int | None = None  # every length >= tail_from is taken
            for other in live:
                rest = other[i:]
                if not rest:
                    continue  # it ended; the witness goes on
                if any(t != _ONE for t in rest[:-1]):
                    continue  # a literal: a fresh token escapes it
                if rest[-1] == _TAIL:
                    n = len(rest)
                    tail_from = n if tail_from is None else min(tail_from, n)
                elif rest[-1] == _ONE:
                    lengths.add(len(rest))
            if tail_from is None:
                return True
            return any(k not in lengths for k in range(1, tail_from))
        kept: list[Sequence[str]] = []
        for other in live:
            if i >= len(other):
                continue  # it ended; the witness goes on
            theirs = other[i]
            if theirs == _TAIL:
                return False
            if theirs == _ONE or (token != _ONE and theirs == token):
                kept.append(other)
        live = kept
    return not any(len(other) == size for other in live)


# --------------------------------------------------------------------------------------------
# Compiled rules


@dataclass(frozen=True, slots=True)
class _Principal:
    mechanism: str | None  # None: any mechanism but anonymous
    name: re.Pattern[str]

    def admits(self, identity: Identity) -> bool:
        if self.mechanism is None:
            if identity.mechanism == "anonymous":
                return False
        elif identity.mechanism != self.mechanism:
            return False
        return self.name.match(identity.name) is not None


@dataclass(frozen=True, slots=True)
class _Pattern:
    """A validated pattern; ``templates`` lists the tokens holding placeholders as
    ``(index, parts)`` with ``parts`` alternating literal text and placeholder names."""

    tokens: tuple[str, ...]
    templates: tuple[tuple[int, tuple[str, ...]], ...]

    def substitute(self, values: Mapping[str, str | None]) -> tuple[str, ...] | None:
        """The pattern for one identity, or ``None`` if a value is not a valid token."""
        if not self.templates:
            return self.tokens
        tokens = list(self.tokens)
        for index, parts in self.templates:
            pieces: list[str] = []
            for j, part in enumerate(parts):
                if j % 2 == 0:
                    pieces.append(part)
                    continue
                value = values[part]
                if value is None:
                    return None
                pieces.append(value)
            tokens[index] = "".join(pieces)
        return tuple(tokens)


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    rule: Rule
    principals: tuple[_Principal, ...]
    publish: tuple[_Pattern, ...]
    subscribe: tuple[_Pattern, ...]
    decision: Decision

    def admits(self, identity: Identity) -> bool:
        return any(principal.admits(identity) for principal in self.principals)


def _compile_principal(text: str, source: str, location: str) -> _Principal:
    if not text:
        raise AclError(source, location, "empty principal")
    if text != text.strip():
        raise AclError(source, location, f"principal {text!r} has leading or trailing whitespace")
    if _CONTROL_RE.search(text):
        raise AclError(source, location, "principal contains a control character")
    if text == "anonymous":
        return _Principal("anonymous", re.compile(fnmatch.translate("*")))
    if ":" not in text:
        return _Principal(None, re.compile(fnmatch.translate(text)))
    mechanism, _, glob = text.partition(":")
    if mechanism not in KNOWN_MECHANISMS:
        raise AclError(
            source,
            location,
            f"unknown mechanism {mechanism!r} in principal {text!r}; expected one of: "
            f"{', '.join(KNOWN_MECHANISMS)} (a name containing ':' must be qualified, "
            f"e.g. 'x509:{text}')",
        )
    if not glob:
        raise AclError(source, location, f"principal {text!r} has an empty name")
    if mechanism == "anonymous" and glob != "*":
        raise AclError(
            source,
            location,
            f"principal {text!r}: anonymous peers have no name; write 'anonymous'",
        )
    return _Principal(mechanism, re.compile(fnmatch.translate(glob)))


def _compile_pattern(text: str, source: str, location: str) -> _Pattern:
    tokens = tuple(text.split("."))
    last = len(tokens) - 1
    templates: list[tuple[int, tuple[str, ...]]] = []
    for i, token in enumerate(tokens):
        if token == _ONE or (token == _TAIL and i == last):
            continue
        if token == _TAIL:
            raise AclError(source, location, f"pattern {text!r}: '>' must be the last token")
        parts = tuple(_PLACEHOLDER_RE.split(token))
        literals = parts[0::2]
        if any("{" in literal or "}" in literal for literal in literals):
            raise AclError(
                source, location, f"pattern {text!r}: unbalanced '{{' or '}}' in {token!r}"
            )
        for name in parts[1::2]:
            if name not in PLACEHOLDERS:
                known = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
                raise AclError(
                    source,
                    location,
                    f"pattern {text!r}: unknown placeholder {{{name}}}; expected one of: {known}",
                )
        # Validate with each placeholder standing for a plain token.
        if _TOKEN_RE.fullmatch("x".join(literals)) is None:
            raise AclError(
                source,
                location,
                f"pattern {text!r}: invalid token {token!r} (tokens are non-empty and may "
                "not contain '.', whitespace or control characters; '*' and '>' must be "
                "whole tokens)",
            )
        if len(parts) > 1:
            templates.append((i, parts))
    return _Pattern(tokens, tuple(templates))


def _compile_rule(rule: Rule, source: str) -> _CompiledRule:
    where = rule.describe()
    if rule.effect not in _EFFECTS:
        raise AclError(source, where, "effect must be 'allow' or 'deny'")
    if not rule.principals:
        raise AclError(source, f"{where}.principals", "must name at least one principal")
    if not rule.publish and not rule.subscribe:
        raise AclError(source, where, "needs at least one publish or subscribe pattern")
    principals = tuple(
        _compile_principal(text, source, f"{where}.principals[{i}]")
        for i, text in enumerate(rule.principals)
    )
    publish = tuple(
        _compile_pattern(text, source, f"{where}.publish[{i}]")
        for i, text in enumerate(rule.publish)
    )
    subscribe = tuple(
        _compile_pattern(text, source, f"{where}.subscribe[{i}]")
        for i, text in enumerate(rule.subscribe)
    )
    verb = "allowed" if rule.effect == "allow" else "denied"
    decision = Decision(rule.effect == "allow", rule, f"{verb} by {where}")
    return _CompiledRule(rule, principals, publish, subscribe, decision)


def _substitution_values(identity: Identity) -> dict[str, str | None]:
    """Placeholder values for an identity; ``None`` where the value is not a valid token."""
    name = identity.name
    user = name.rpartition("\\")[2]  # DOMAIN\alice -> alice
    if "@" in user:
        user = user.rpartition("@")[0]  # alice@EXAMPLE.COM -> alice
    raw = {"name": name, "user": user, "mechanism": identity.mechanism}
    return {key: value if _TOKEN_RE.fullmatch(value) else None for key, value in raw.items()}


# --------------------------------------------------------------------------------------------
# Policies

# A bound allow pattern and the decision it gives.
_Allowing = tuple[tuple[str, ...], Decision]
# A bound deny pattern: None when a placeholder could not be filled in, and the pattern then
# matches everything (deny fails closed).
_Denying = tuple[tuple[str, ...] | None, Decision]


class Grant:
    """What a subscription may receive, decided once when it is made.

    * ``possible``: some topic it matches is readable; a subscription that is not possible is
      refused (``decision`` says why).
    * ``unrestricted``: every topic it matches is readable (its matches are covered by the
      allow patterns and no deny pattern touches them), so fan-out needs no per-topic check;
      the common case costs nothing.
    * otherwise the subscription is *filtered*: :meth:`allows` decides each topic; the broker
      asks once per (subscription, topic) and keeps the answer with its per-topic match.

    ``decision`` names the deciding rule for the audit log (``allowed by allow[0]``,
    ``denied by deny[1]``); a filtered grant's reason ends in ``(filtered)``.
    """

    __slots__ = ("_allow", "_deny", "_pattern", "decision", "pattern", "possible", "unrestricted")

    def __init__(
        self,
        pattern: str,
        tokens: tuple[str, ...],
        decision: Decision,
        *,
        possible: bool,
        unrestricted: bool,
        allow: tuple[tuple[str, ...], ...] = (),
        deny: tuple[tuple[str, ...], ...] = (),
    ) -> None:
        self.pattern = pattern
        self.decision = decision
        self.possible = possible
        self.unrestricted = unrestricted
        self._pattern = tokens
        self._allow = allow
        self._deny = deny

    def __repr__(self) -> str:
        kind = "unrestricted" if self.unrestricted else "filtered" if self.possible else "refused"
        return f"<Grant {self.pattern!r} {kind}: {self.decision.reason}>"

    def __bool__(self) -> bool:
        return self.possible

    def allows(self, topic: str | Sequence[str]) -> bool:
        """True if the subscription delivers the concrete ``topic`` (it matches the pattern,
        and the identity may read it). ``topic`` is a dotted string or its tokens."""
        if not self.possible:
            return False
        tokens = _split_topic(topic) if isinstance(topic, str) else topic
        if tokens is None or not matches(self._pattern, tokens):
            return False
        if self.unrestricted:
            return True
        for deny in self._deny:
            if matches(deny, tokens):
                return False
        return any(matches(allow, tokens) for allow in self._allow)


class BoundPolicy:
    """A policy specialised to one identity: only the rules whose principals match it, with
    placeholders filled in. Cheap to check; :meth:`Policy.bind` caches these."""

    __slots__ = (
        "_allow_publish",
        "_allow_subscribe",
        "_deny_publish",
        "_deny_subscribe",
        "identity",
    )

    def __init__(self, identity: Identity, rules: Iterable[_CompiledRule]) -> None:
        self.identity = identity
        values = _substitution_values(identity)
        deny_publish: list[_Denying] = []
        deny_subscribe: list[_Denying] = []
        allow_publish: list[_Allowing] = []
        allow_subscribe: list[_Allowing] = []
        for compiled in rules:
            if not compiled.admits(identity):
                continue
            is_deny = compiled.rule.effect == "deny"
            for patterns, deny_out, allow_out in (
                (compiled.publish, deny_publish, allow_publish),
                (compiled.subscribe, deny_subscribe, allow_subscribe),
            ):
                for pattern in patterns:
                    tokens = pattern.substitute(values)
                    if is_deny:
                        deny_out.append((tokens, compiled.decision))
                    elif tokens is not None:  # an allow pattern that cannot be filled is skipped
                        allow_out.append((tokens, compiled.decision))
        self._deny_publish = tuple(deny_publish)
        self._deny_subscribe = tuple(deny_subscribe)
        self._allow_publish = tuple(allow_publish)
        self._allow_subscribe = tuple(allow_subscribe)

    def check(self, action: Action, subject: str) -> Decision:
        """Decide ``action`` on ``subject`` (a topic for publish, a pattern for subscribe).

        For a subscribe this is the strict question "may the identity read *every* topic the
        pattern matches" (:attr:`Grant.unrestricted`); the broker asks :meth:`subscription`,
        which also accepts a wildcard whose deliveries are filtered.
        """
        if action is Action.PUBLISH:
            topic = _split_topic(subject)
            if topic is None:
                return _INVALID_TOPIC
            for tokens, decision in self._deny_publish:
                if tokens is None or matches(tokens, topic):
                    return decision
            for tokens, decision in self._allow_publish:
                if matches(tokens, topic):
                    return decision
            return _NO_ALLOW_RULE
        if action is Action.SUBSCRIBE:
            pattern = _split_pattern(subject)
            if pattern is None:
                return _INVALID_PATTERN
            for tokens, decision in self._deny_subscribe:
                if tokens is None or intersects(tokens, pattern):
                    return decision
            for tokens, decision in self._allow_subscribe:
                if covers(tokens, pattern):
                    return decision
            grant = self.subscription(subject)
            if grant.unrestricted:  # covered by several allow patterns together
                return grant.decision
            return _NO_ALLOW_RULE
        assert_never(action)

    def allows(self, action: Action, subject: str) -> bool:
        """``check(action, subject).allowed``."""
        return self.check(action, subject).allowed

    def permits_anything(self) -> bool:
        """True if some publish or some subscription is allowed at all (exact): a broker closes
        a live session whose identity a new policy allows nothing."""
        for allowing, denying in (
            (self._allow_publish, self._deny_publish),
            (self._allow_subscribe, self._deny_subscribe),
        ):
            if any(tokens is None for tokens, _ in denying):
                continue  # an unfillable deny placeholder denies everything of this kind
            denies = [tokens for tokens, _ in denying if tokens is not None]
            if any(escapes(tokens, denies) for tokens, _ in allowing):
                return True
        return False

    def subscription(self, pattern: str) -> Grant:
        """What a subscription with ``pattern`` may receive (see :class:`Grant`).

        Accepted (``possible``) if some topic matches ``pattern``, an allow pattern and no
        deny pattern; ``unrestricted`` if that holds for every topic ``pattern`` matches.
        """
        tokens = _split_pattern(pattern)
        if tokens is None:
            return Grant(pattern, (), _INVALID_PATTERN, possible=False, unrestricted=False)
        denying: list[tuple[str, ...]] = []
        first_deny: Decision | None = None
        for deny, decision in self._deny_subscribe:
            if deny is None:  # an unfillable deny placeholder denies everything
                return Grant(pattern, tokens, decision, possible=False, unrestricted=False)
            if intersects(deny, tokens):
                denying.append(deny)
                if first_deny is None:
                    first_deny = decision
        if first_deny is None:
            for allow, decision in self._allow_subscribe:
                if covers(allow, tokens):  # the common case: one allow pattern covers it
                    return Grant(pattern, tokens, decision, possible=True, unrestricted=True)
        allowing: list[tuple[str, ...]] = []
        deciding: Decision | None = None
        for allow, decision in self._allow_subscribe:
            both = meet(allow, tokens)
            if both is None:
                continue
            allowing.append(allow)
            if deciding is None and escapes(both, denying):
                deciding = decision
        if deciding is None:
            refusal = first_deny if first_deny is not None and allowing else _NO_ALLOW_RULE
            return Grant(pattern, tokens, refusal, possible=False, unrestricted=False)
        if first_deny is None and not escapes(tokens, allowing):
            # covered by several allow patterns together (org.* and org.*.> cover org.>)
            return Grant(pattern, tokens, deciding, possible=True, unrestricted=True)
        filtered = Decision(True, deciding.rule, f"{deciding.reason} (filtered)")
        return Grant(
            pattern,
            tokens,
            filtered,
            possible=True,
            unrestricted=False,
            allow=tuple(allowing),
            deny=tuple(denying),
        )


class Policy:
    """A compiled access-control policy: default deny, deny wins.

    Build one with :meth:`from_file`, :meth:`from_text`, :meth:`from_dict` or
    :meth:`allow_all`; construction validates every rule and raises :class:`AclError`.
    Instances are immutable and safe to share between threads.
    """

    __slots__ = ("_bind", "_compiled", "rules", "source")

    def __init__(self, rules: Iterable[Rule], *, source: str = "<rules>") -> None:
        self.source = source
        self.rules: tuple[Rule, ...] = tuple(rules)
        compiled = [_compile_rule(rule, source) for rule in self.rules]
        # Deny rules first: BoundPolicy keeps the order, and the first deny found decides.
        compiled.sort(key=lambda c: _EFFECTS.index(c.rule.effect))
        self._compiled = tuple(compiled)
        self._bind = functools.lru_cache(maxsize=_BIND_CACHE_SIZE)(self._make_bound)

    def __repr__(self) -> str:
        return f"<Policy {self.source} with {len(self.rules)} rules>"

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Policy:
        """Load a TOML policy file. Errors name the file."""
        source = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise AclError(source, "", f"cannot read policy: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise AclError(source, "", f"invalid TOML: {exc}") from exc
        return cls.from_dict(data, source)

    @classmethod
    def from_text(cls, text: str, source: str = "<string>") -> Policy:
        """Parse a TOML policy given as text; ``source`` names it in errors."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise AclError(source, "", f"invalid TOML: {exc}") from exc
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: Mapping[str, object], source: str = "<dict>") -> Policy:
        """Build a policy from parsed TOML (``{"allow": [{...}], "deny": [{...}]}``)."""
        if not isinstance(data, Mapping):
            raise AclError(source, "", "a policy must be a table")
        for key in data:
            if key not in _EFFECTS:
                raise AclError(source, str(key), "unknown key; expected [[allow]] or [[deny]]")
        rules: list[Rule] = []
        effect: Literal["allow", "deny"]
        for effect in ("allow", "deny"):
            tables = data.get(effect, [])
            if not isinstance(tables, list | tuple):
                raise AclError(source, effect, f"expected an array of tables: write [[{effect}]]")
            for index, table in enumerate(tables):
                rules.append(_rule_from_table(effect, index, table, source))
        return cls(rules, source=source)

    @classmethod
    def allow_all(cls, *, include_anonymous: bool = False) -> Policy:
        """Everyone authenticated may publish and subscribe anywhere (``--dev``).

        Anonymous peers are not included unless ``include_anonymous`` is true.
        """
        principals = ("*", "anonymous") if include_anonymous else ("*",)
        rule = Rule("allow", principals, (_TAIL,), (_TAIL,), 0)
        return cls([rule], source="<allow-all>")

    def bind(self, identity: Identity) -> BoundPolicy:
        """The policy as it applies to ``identity`` (cached per identity)."""
        return self._bind(identity)

    def check(self, identity: Identity, action: Action, subject: str) -> Decision:
        """Decide whether ``identity`` may ``action`` on ``subject``.

        ``subject`` is a concrete topic for :attr:`Action.PUBLISH` and a subscription pattern
        for :attr:`Action.SUBSCRIBE`; an invalid one is denied (``rule`` is ``None``).
        """
        return self._bind(identity).check(action, subject)

    def allows(self, identity: Identity, action: Action, subject: str) -> bool:
        """``check(identity, action, subject).allowed``."""
        return self._bind(identity).check(action, subject).allowed

    def subscription(self, identity: Identity, pattern: str) -> Grant:
        """``bind(identity).subscription(pattern)``: what the subscription may receive."""
        return self._bind(identity).subscription(pattern)

    def permits_anything(self, identity: Identity) -> bool:
        """``bind(identity).permits_anything()``: is any publish or subscription allowed."""
        return self._bind(identity).permits_anything()

    def _make_bound(self, identity: Identity) -> BoundPolicy:
        return BoundPolicy(identity, self._compiled)


def _rule_from_table(
    effect: Literal["allow", "deny"], index: int, table: object, source: str
) -> Rule:
    where = f"{effect}[{index}]"
    if not isinstance(table, Mapping):
        raise AclError(source, where, f"expected a table: write [[{effect}]]")
    for key in table:
        if key not in _RULE_KEYS:
            raise AclError(
                source, f"{where}.{key}", f"unknown key; expected one of: {', '.join(_RULE_KEYS)}"
            )
    if "principals" not in table:
        raise AclError(source, f"{where}.principals", "missing (every rule names its principals)")
    fields = {key: _string_list(table.get(key, []), source, f"{where}.{key}") for key in _RULE_KEYS}
    return Rule(effect, fields["principals"], fields["publish"], fields["subscribe"], index)


def _string_list(value: object, source: str, location: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise AclError(source, location, "expected an array of strings")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise AclError(source, f"{location}[{i}]", "expected a string")
    return tuple(value)
