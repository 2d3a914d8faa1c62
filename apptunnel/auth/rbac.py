"""Roles: who may open which app, decided from the app's labels and the user's traits.

Nothing is allowed unless some role's allow selector matches, and any matching deny
selector wins over every allow. Parsing is strict: a role that does not say exactly what
it means is rejected with the key path of the problem, because a silently ignored deny
rule is an open door.

Label values are exact strings, ``*`` (any value, the label must exist) or ``^regex$``
(full match). A list means any of its values. The key/value pair ``"*": "*"`` matches
every app. ``{{internal.NAME}}`` / ``{{external.NAME}}`` expand to each of the user's
values for trait NAME; trait values are always taken literally (escaped inside a regex),
so a trait of ``*`` or ``.*`` from an identity provider never widens access.

An option is parsed only when something enforces it. ``require_session_mfa: true`` asks
for a fresh second factor before each app session of an app the role allows (the access
policy answers ``NeedsMore("mfa")``, auth/access.py). Access requests
(auth/access_requests.py) use ``allow.request`` (roles one may ask for, the longest
elevation, the approvals and denials that decide), ``allow.review_requests`` (roles whose
requests one may review), their ``deny`` twins (deny wins) and ``options.request_access``
(``optional``, or ``reason``: a request must say why). The parts of Teleport's model not
built here (``request_access: always``, ``search_as_roles``, ``claims_to_roles``, role
name patterns, ...) are refused (`UNSUPPORTED`), never loaded and silently ignored,
because an operator who wrote them expects them to hold.

``allow.rules`` / ``deny.rules`` say what a role may do to the cluster itself through the
admin and audit API and pages (web/admin_api.py): a list of ``{resources: [KIND, ...],
verbs: [VERB, ...]}`` with the kinds in `RESOURCE_KINDS` and the verbs in `VERBS` (``*``
for every kind or verb). `RoleSet.allows` answers it: deny wins, nothing is allowed unless
a rule says so. Teleport's ``where`` conditions and ``actions`` are refused, not ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from apptunnel.auth.errors import AuthError

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TEMPLATE_RE = re.compile(r"\{\{\s*(internal|external)\.([A-Za-z0-9_][A-Za-z0-9_.:/-]*)\s*\}\}")
_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?[dhms])+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


class RoleError(AuthError):
    """A role document is invalid; the message starts with the key path of the problem."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


@attrs.frozen
class LabelValue:
    """One allowed value of a label: exact, any, regex, or a trait template."""

    raw: str
    kind: str                    # "any" | "exact" | "regex" | "template"
    pattern: re.Pattern | None = None
    trait: str = ""              # template: the trait name
    before: str = ""             # template: text around the {{...}}
    after: str = ""
    regex: bool = False          # template: the surrounding text is a ^regex$

    def matches(self, value: str, traits: Mapping[str, tuple[str, ...]]) -> bool:
        if self.kind == "any":
            return True
        if self.kind == "exact":
            return value == self.raw
        if self.kind == "regex":
            return self.pattern is not None and self.pattern.fullmatch(value) is not None
        for trait_value in traits.get(self.trait, ()):
            if self.regex:
                expanded = self.before + re.escape(trait_value) + self.after
                if re.fullmatch(expanded, value) is not None:
                    return True
            elif value == self.before + trait_value + self.after:
                return True
        return False


# A selector maps a label key to its allowed values; "*" as key means "every app".
Selector = dict[str, tuple[LabelValue, ...]]


@attrs.frozen
class Threshold:
    """How many approvals grant a request, and how many denials refuse it."""

    approve: int = 1
    deny: int = 1


@attrs.frozen
class RequestRules:
    """``request`` / ``review_requests`` of one side (allow or deny) of a role."""

    request_roles: tuple[str, ...] = ()
    max_duration: float | None = None           # allow only
    thresholds: tuple[Threshold, ...] = ()      # allow only; () = one approval, one denial
    review_roles: tuple[str, ...] = ()


RESOURCE_KINDS = ("user", "role", "connector", "token", "lock", "bot", "app", "agent",
                  "session", "access_request", "event")
VERBS = ("list", "read", "create", "update", "delete")


@attrs.frozen
class Rule:
    """One ``{resources, verbs}`` entry: ``*`` already expanded to every kind or verb."""

    resources: frozenset[str]
    verbs: frozenset[str]

    def covers(self, kind: str, verb: str) -> bool:
        return kind in self.resources and verb in self.verbs


@attrs.frozen
class Role:
    name: str
    allow_labels: Selector
    deny_labels: Selector
    max_session_ttl: float | None
    require_session_mfa: bool = False
    allow_requests: RequestRules = RequestRules()
    deny_requests: RequestRules = RequestRules()
    request_access: str = "optional"            # "optional" | "reason"
    allow_rules: tuple[Rule, ...] = ()
    deny_rules: tuple[Rule, ...] = ()


@attrs.frozen
class Decision:
    allowed: bool
    reason: str


def _selector_matches(
    selector: Selector, labels: Mapping[str, str], traits: Mapping[str, tuple[str, ...]]
) -> bool:
    """Every key must match (any of its values); an empty selector matches nothing."""
    if not selector:
        return False
    for key, values in selector.items():
        if key == "*":
            continue
        value = labels.get(key)
        if value is None or not any(v.matches(value, traits) for v in values):
            return False
    return True


def _normalize_traits(traits: Mapping[str, Any] | None) -> dict[str, tuple[str, ...]]:
    result: dict[str, tuple[str, ...]] = {}
    for name, values in (traits or {}).items():
        if isinstance(values, str):
            result[name] = (values,)
        elif isinstance(values, Iterable):
            result[name] = tuple(v for v in values if isinstance(v, str))
    return result


class RoleSet:
    """The roles of one user, combined: deny wins, then any allow, else denied."""

    def __init__(self, roles: list[Role]) -> None:
        self.roles = tuple(roles)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(role.name for role in self.roles)

    def check_app(self, labels: Mapping[str, str], traits: Mapping[str, Any]) -> Decision:
        """Decide access to an app with these labels; the reason names the deciding role."""
        user_traits = _normalize_traits(traits)
        for role in self.roles:
            if _selector_matches(role.deny_labels, labels, user_traits):
                return Decision(False, f"denied by role {role.name!r}")
        for role in self.roles:
            if _selector_matches(role.allow_labels, labels, user_traits):
                return Decision(True, f"allowed by role {role.name!r}")
        if not self.roles:
            return Decision(False, "user has no roles")
        return Decision(False, "no role allows access to this app")

    def allows(self, kind: str, verb: str) -> bool:
        """May these roles do ``verb`` on resources of ``kind`` (admin and audit)? Deny wins;
        no rule, no access."""
        if any(rule.covers(kind, verb) for role in self.roles for rule in role.deny_rules):
            return False
        return any(rule.covers(kind, verb) for role in self.roles for rule in role.allow_rules)

    def session_mfa(self, labels: Mapping[str, str], traits: Mapping[str, Any]) -> bool:
        """Whether a role that allows this app asks for a second factor per session
        (as Teleport: any matching role with ``require_session_mfa`` is enough)."""
        user_traits = _normalize_traits(traits)
        return any(role.require_session_mfa
                   and _selector_matches(role.allow_labels, labels, user_traits)
                   for role in self.roles)

    def requestable(self) -> tuple[str, ...]:
        """Role names these roles may ask for: allowed by one, denied by none."""
        denied = {n for role in self.roles for n in role.deny_requests.request_roles}
        return tuple(dict.fromkeys(n for role in self.roles
                                   for n in role.allow_requests.request_roles
                                   if n not in denied))

    def reviewable(self) -> frozenset[str]:
        """Role names whose requests these roles may review (deny wins)."""
        denied = {n for role in self.roles for n in role.deny_requests.review_roles}
        return frozenset(n for role in self.roles for n in role.allow_requests.review_roles
                         if n not in denied)

    def granting(self, requested: Iterable[str]) -> tuple[Role, ...]:
        """The roles that allow asking for any of ``requested`` (their limits apply)."""
        wanted = set(requested)
        return tuple(role for role in self.roles
                     if wanted & set(role.allow_requests.request_roles))

    def reason_required(self) -> bool:
        """Whether a role says ``request_access: reason``."""
        return any(role.request_access == "reason" for role in self.roles)

    def max_session_ttl(self, default: float) -> float:
        """The shortest limit over the roles; a role without one contributes the default."""
        limits = [
            role.max_session_ttl if role.max_session_ttl is not None else default
            for role in self.roles
        ]
        return min(limits, default=default)


# -- parsing ---------------------------------------------------------------------


def _check_keys(path: str, mapping: Mapping, allowed: set[str]) -> None:
    for key in mapping:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise RoleError(f"{where}: unknown key (expected one of {', '.join(sorted(allowed))})")


def _mapping(path: str, value: Any) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RoleError(f"{path}: expected a mapping, got {type(value).__name__}")
    return value


def parse_duration(path: str, value: Any) -> float:
    if isinstance(value, bool):
        raise RoleError(f"{path}: expected a duration like 8h or 30m")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION_RE.fullmatch(value.strip()):
        seconds = sum(
            float(number) * _UNIT_SECONDS[unit]
            for number, unit in _DURATION_PART_RE.findall(value.strip())
        )
    else:
        raise RoleError(f"{path}: invalid duration {value!r} (use e.g. 8h, 30m, 1h30m, 7d)")
    if seconds <= 0:
        raise RoleError(f"{path}: duration must be positive")
    return seconds


def _parse_value(path: str, raw: Any) -> LabelValue:
    if not isinstance(raw, str):
        raise RoleError(f"{path}: expected a string, got {type(raw).__name__}")
    if raw == "*":
        return LabelValue(raw, "any")
    templates = list(_TEMPLATE_RE.finditer(raw))
    is_regex = raw.startswith("^") and raw.endswith("$") and len(raw) >= 2
    if "{{" in raw or "}}" in raw:
        if len(templates) != 1:
            raise RoleError(
                f"{path}: {raw!r}: expected exactly one trait template like "
                "{{internal.NAME}} or {{external.NAME}}"
            )
        match = templates[0]
        before, after = raw[: match.start()], raw[match.end():]
        if "{{" in before + after or "}}" in before + after:
            raise RoleError(f"{path}: {raw!r}: malformed trait template")
        if is_regex:
            _compile(path, before + "x" + after)
        elif "*" in raw or raw.startswith("^") or raw.endswith("$"):
            raise RoleError(f"{path}: {raw!r}: a regex must start with ^ and end with $")
        return LabelValue(raw, "template", trait=match.group(2), before=before,
                          after=after, regex=is_regex)
    if is_regex:
        return LabelValue(raw, "regex", pattern=_compile(path, raw))
    if raw.startswith("^") or raw.endswith("$"):
        raise RoleError(f"{path}: {raw!r}: a regex must start with ^ and end with $")
    if "*" in raw:
        raise RoleError(
            f"{path}: {raw!r}: \"*\" only works alone; for a pattern use a regex "
            f"such as {'^' + raw.replace('*', '.*') + '$'!r}"
        )
    return LabelValue(raw, "exact")


def _compile(path: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise RoleError(f"{path}: invalid regex {pattern!r}: {err}") from None


def _parse_selector(path: str, value: Any) -> Selector:
    selector: Selector = {}
    for key, raw in _mapping(path, value).items():
        key_path = f"{path}.{key}"
        if not isinstance(key, str) or not key:
            raise RoleError(f"{path}: label names must be non-empty strings, got {key!r}")
        items = raw if isinstance(raw, list) else [raw]
        if not items:
            raise RoleError(f"{key_path}: empty list matches nothing; remove the key instead")
        if key == "*":
            if items != ["*"]:
                raise RoleError(f'{key_path}: the wildcard key only accepts "*": "*"')
            selector[key] = (LabelValue("*", "any"),)
            continue
        if isinstance(raw, list):
            selector[key] = tuple(
                _parse_value(f"{key_path}[{i}]", item) for i, item in enumerate(items)
            )
        else:
            selector[key] = (_parse_value(key_path, raw),)
    return selector


# Parts of Teleport's access-request model not built here: refused by name, so no role
# loads with a promise nothing keeps.
UNSUPPORTED = {
    "search_as_roles": "resource-based access requests (search_as_roles) are not supported",
    "claims_to_roles": "claims_to_roles in access requests is not supported",
    "suggested_reviewers": "suggested_reviewers is not supported",
    "annotations": "request annotations are not supported",
    "where": "conditions (where) on access requests are not supported",
    "kubernetes_resources": "kubernetes resources are not supported",
    "max_duration": "max_duration only exists under allow.request",
    "thresholds": "thresholds only exist under allow.request",
    "request_access": "request_access {value!r} is not supported (use optional or reason)",
}
_REQUEST_KEYS = {"roles", "max_duration", "thresholds"}
_REVIEW_KEYS = {"roles"}


def _unsupported(path: str, key: str, value: Any = None) -> RoleError:
    return RoleError(f"{path}: {UNSUPPORTED[key].format(value=value)}; remove this option "
                     "(apptunnel does not enforce it)")


def _role_names(path: str, names: Any) -> tuple[str, ...]:
    names = names if names is not None else []
    if not isinstance(names, list):
        raise RoleError(f"{path}: expected a list of role names")
    for i, name in enumerate(names):
        if isinstance(name, str) and ("*" in name or name.startswith("^")):
            raise RoleError(f"{path}[{i}]: role name patterns are not supported; "
                            "list the role names")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise RoleError(f"{path}[{i}]: invalid role name {name!r}")
    return tuple(dict.fromkeys(names))


def _count(path: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise RoleError(f"{path}: expected a whole number from 1 to 100")
    return value


def _parse_thresholds(path: str, value: Any) -> tuple[Threshold, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise RoleError(f"{path}: expected a list like [{{approve: 2, deny: 1}}]")
    found = []
    for i, item in enumerate(value):
        item_path = f"{path}[{i}]"
        item = _mapping(item_path, item)
        for key in item:
            if key in ("name", "filter"):
                raise RoleError(f"{item_path}.{key}: named or filtered thresholds are not "
                                "supported; remove this option (apptunnel does not enforce it)")
        _check_keys(item_path, item, {"approve", "deny"})
        found.append(Threshold(_count(f"{item_path}.approve", item.get("approve", 1)),
                               _count(f"{item_path}.deny", item.get("deny", 1))))
    return tuple(found)


def _check_request_keys(path: str, spec: Mapping, allowed: set[str]) -> None:
    for key in spec:
        if key in UNSUPPORTED and key not in allowed:
            raise _unsupported(f"{path}.{key}", key)
    _check_keys(path, spec, allowed)


def _parse_requests(path: str, rules: Mapping, allow: bool) -> RequestRules:
    request = _mapping(f"{path}.request", rules.get("request"))
    _check_request_keys(f"{path}.request", request,
                        _REQUEST_KEYS if allow else {"roles"})
    review = _mapping(f"{path}.review_requests", rules.get("review_requests"))
    _check_request_keys(f"{path}.review_requests", review, _REVIEW_KEYS)
    duration = request.get("max_duration")
    return RequestRules(
        request_roles=_role_names(f"{path}.request.roles", request.get("roles")),
        max_duration=(None if duration is None
                      else parse_duration(f"{path}.request.max_duration", duration)),
        thresholds=_parse_thresholds(f"{path}.request.thresholds", request.get("thresholds")),
        review_roles=_role_names(f"{path}.review_requests.roles", review.get("roles")),
    )


def _names(path: str, value: Any, known: tuple[str, ...], what: str) -> frozenset[str]:
    """A non-empty list of ``known`` names or ``*`` (all of them)."""
    if not isinstance(value, list) or not value:
        raise RoleError(f"{path}: expected a non-empty list of {what} "
                        f"({', '.join(known)} or \"*\")")
    for i, item in enumerate(value):
        if item != "*" and item not in known:
            raise RoleError(f"{path}[{i}]: unknown {what[:-1]} {item!r} "
                            f"(expected one of {', '.join(known)} or \"*\")")
    return frozenset(known) if "*" in value else frozenset(value)


def _parse_admin_rules(path: str, value: Any) -> tuple[Rule, ...]:
    """``rules: [{resources: [event], verbs: [list, read]}]`` -> Rules (strict)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise RoleError(f"{path}: expected a list like [{{resources: [event], verbs: [list]}}]")
    found = []
    for i, item in enumerate(value):
        item_path = f"{path}[{i}]"
        item = _mapping(item_path, item)
        for key in ("where", "actions"):
            if key in item:
                raise RoleError(f"{item_path}.{key}: rule conditions are not supported; "
                                "remove this option (apptunnel does not enforce it)")
        _check_keys(item_path, item, {"resources", "verbs"})
        for key in ("resources", "verbs"):
            if key not in item:
                raise RoleError(f"{item_path}.{key}: required")
        found.append(Rule(_names(f"{item_path}.resources", item["resources"], RESOURCE_KINDS,
                                 "resources"),
                          _names(f"{item_path}.verbs", item["verbs"], VERBS, "verbs")))
    return tuple(found)


def _parse_rules(path: str, value: Any) -> tuple[Selector, RequestRules, tuple[Rule, ...]]:
    rules = _mapping(path, value)
    _check_keys(path, rules, {"app_labels", "request", "review_requests", "rules"})
    return (_parse_selector(f"{path}.app_labels", rules.get("app_labels")),
            _parse_requests(path, rules, allow=path.endswith("allow")),
            _parse_admin_rules(f"{path}.rules", rules.get("rules")))


def parse_role(doc: dict) -> Role:
    """Validate a ``kind: role`` document and compile it; RoleError names the bad key."""
    if not isinstance(doc, Mapping):
        raise RoleError(f"role: expected a mapping, got {type(doc).__name__}")
    _check_keys("", doc, {"kind", "version", "metadata", "spec"})
    if doc.get("kind") != "role":
        raise RoleError(f"kind: expected 'role', got {doc.get('kind')!r}")
    metadata = _mapping("metadata", doc.get("metadata"))
    _check_keys("metadata", metadata, {"name", "description", "labels"})
    name = metadata.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise RoleError(
            f"metadata.name: invalid role name {name!r} (letters, digits, '.', '_', '-')"
        )
    spec = _mapping("spec", doc.get("spec"))
    _check_keys("spec", spec, {"options", "allow", "deny"})
    options = _mapping("spec.options", spec.get("options"))
    _check_keys("spec.options", options, {"max_session_ttl", "require_session_mfa",
                                           "request_access"})
    request_access = options.get("request_access", "optional")
    if request_access not in ("optional", "reason"):
        raise _unsupported("spec.options.request_access", "request_access", request_access)
    ttl = options.get("max_session_ttl")
    max_ttl = None if ttl is None else parse_duration("spec.options.max_session_ttl", ttl)
    mfa = options.get("require_session_mfa", False)
    if not isinstance(mfa, bool):
        raise RoleError("spec.options.require_session_mfa: expected true or false")
    allow_labels, allow_requests, allow_rules = _parse_rules("spec.allow", spec.get("allow"))
    deny_labels, deny_requests, deny_rules = _parse_rules("spec.deny", spec.get("deny"))
    return Role(
        name=name,
        allow_labels=allow_labels,
        deny_labels=deny_labels,
        max_session_ttl=max_ttl,
        require_session_mfa=mfa,
        allow_requests=allow_requests,
        deny_requests=deny_requests,
        request_access=request_access,
        allow_rules=allow_rules,
        deny_rules=deny_rules,
    )


# -- label selectors outside roles (an agent's ``resources:``) ------------------------


def parse_label_selector(path: str, value: Any) -> Selector:
    """``{env: dev, team: [a, "^b-.*$"]}`` -> a Selector, with a role's value rules (exact,
    ``*``, ``^regex$``) but no trait templates: an agent has no user whose traits expand
    them. RoleError naming ``path`` on a bad selector."""
    selector = _parse_selector(path, value)
    for key, values in selector.items():
        if any(v.kind == "template" for v in values):
            raise RoleError(f"{path}.{key}: trait templates are for roles, not here")
    return selector


def selector_matches(selector: Selector, labels: Mapping[str, str]) -> bool:
    """Whether ``labels`` fit ``selector`` by a role's rules (every key; empty: nothing)."""
    return _selector_matches(selector, labels, {})
