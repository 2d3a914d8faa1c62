"""From what an identity provider says about a user to apptunnel roles and traits.

Pure functions over plain values. A rule names a claim (an OIDC claim, a SAML
attribute, the LDAP ``groups`` of a user), a value and the roles it grants; a user gets
the union of the roles of every rule that matches one of their values. Values are exact
strings or a ``^regex$`` (a full match). LDAP group DNs compare as DNs: case and the
spaces around ``,`` and ``=`` do not matter for an exact value.

Every claim also becomes a trait (``{{external.NAME}}`` in role templates, ``traits`` in
the JWT), bounded so a directory with thousands of groups cannot blow up a certificate
or an app's request headers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import attrs

from apptunnel.auth.names import TRAIT_NAME

MAX_TRAITS = 64
MAX_TRAIT_VALUES = 256
MAX_TRAIT_VALUE_LENGTH = 1024

_DN_SPACES = re.compile(r"\s*([,=+])\s*")


def normalise_dn(dn: str) -> str:
    """A DN in one spelling: case-folded, no spaces around its separators."""
    return _DN_SPACES.sub(r"\1", dn.strip()).casefold()


@attrs.frozen
class ValueMatcher:
    """One rule's value: exact (``dn`` compares as DNs) or a full-match regex."""

    raw: str
    pattern: re.Pattern | None = None
    dn: bool = False

    def matches(self, value: str) -> bool:
        if self.pattern is not None:
            return self.pattern.fullmatch(value) is not None
        if self.dn:
            return normalise_dn(value) == normalise_dn(self.raw)
        return value == self.raw


def value_matcher(raw: str, dn: bool = False) -> ValueMatcher:
    """``^...$`` is a regex (ValueError if it does not compile), anything else exact."""
    if len(raw) >= 2 and raw.startswith("^") and raw.endswith("$"):
        try:
            return ValueMatcher(raw, re.compile(raw), dn)
        except re.error as err:
            raise ValueError(f"invalid regex {raw!r}: {err}") from None
    return ValueMatcher(raw, None, dn)


@attrs.frozen
class RoleRule:
    """``claim`` having a value ``value`` matches grants ``roles``."""

    claim: str
    value: ValueMatcher
    roles: tuple[str, ...]


def roles_for(rules: Iterable[RoleRule], claims: Mapping[str, Iterable[str]]) -> tuple[str, ...]:
    """The roles the rules grant for these claims, in rule order, each once."""
    granted: dict[str, None] = {}
    for rule in rules:
        if any(rule.value.matches(v) for v in claims.get(rule.claim, ())):
            granted.update(dict.fromkeys(rule.roles))
    return tuple(granted)


def claims_to_traits(claims: Mapping[str, Iterable[str]]) -> dict[str, tuple[str, ...]]:
    """Claims as traits: names that are valid trait names, bounded in count and size."""
    traits: dict[str, tuple[str, ...]] = {}
    for name in sorted(claims):
        if len(traits) >= MAX_TRAITS or not TRAIT_NAME.match(name):
            continue
        values = tuple(dict.fromkeys(v for v in claims[name]
                                     if isinstance(v, str) and len(v) <= MAX_TRAIT_VALUE_LENGTH))
        if values:
            traits[name] = values[:MAX_TRAIT_VALUES]
    return traits
