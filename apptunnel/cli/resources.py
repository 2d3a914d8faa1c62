"""`apptunnel create -f`, `get`, `rm`: roles, users, connectors and apps as YAML documents.

A file is validated completely before anything is written, and nothing is replaced
without ``--force``, so a half-applied file or a silently overwritten role cannot happen.
`get` prints documents that `create -f` reads back unchanged. `get` and `rm` name what
they act on as ``KIND/NAME`` or ``KIND NAME``, the kind singular or plural (``role``,
``roles``, ``user``, ``users``, ``connector``, ``connectors``), as kubectl and tctl accept.

Connectors (``kind: ldap``; ``oidc`` and ``saml`` are refused until their sign-in flows
exist) are checked in full by ``auth/connectors/specs.py``; the roles their rules grant
must exist like a user's. `get connectors` prints no secret (``public_doc``).

Apps (``kind: app``: ``metadata: {name, labels}``, ``spec`` = the other keys of an agent's
``apps:`` entry) are read by the agent config's own parser (``config.app_from_resource``)
and stored as resources of kind ``app``; agents whose ``resources`` selectors match serve
them (``proxy/app_resources.py``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import attrs

from apptunnel.auth.connectors.specs import KINDS as CONNECTOR_KINDS
from apptunnel.auth.connectors.specs import (
    ConnectorError,
    parse_connector,
    public_doc,
)
from apptunnel.auth.connectors.store import RESOURCE_KIND as CONNECTOR
from apptunnel.auth.rbac import RoleError, parse_role
from apptunnel.backend.records import User
from apptunnel.admin.context import AdminError
from apptunnel.admin.resources import ResourceAdmin
from apptunnel.cli.context import Admin, CliError, Io, UsageError, cli_error
from apptunnel.cli.output import clean, iso, json_text, table, yaml_docs
from apptunnel.cli.users import ROLE_NAME, TRAIT_NAME, USER_NAME, require_roles
from apptunnel.config import ConfigError, app_from_resource, load_yaml_documents

APP = "app"
KINDS = {"role": "role", "roles": "role", "user": "user", "users": "user",
         "connector": CONNECTOR, "connectors": CONNECTOR, "app": APP, "apps": APP}
STORED = ("role", CONNECTOR, APP)   # kinds kept as resource documents


def add_parsers(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    create = verbs.add_parser("create", parents=[common],
                              help="create roles, users, connectors and apps from a (multi-document) YAML file")
    create.add_argument("-f", "--file", required=True, metavar="FILE")
    create.add_argument("--force", action="store_true", help="replace resources that exist")
    create.set_defaults(handler=create_resources, read_inputs=read_documents)

    get = verbs.add_parser("get", parents=[common], help="show roles, users, connectors or apps")
    get.add_argument("kind", metavar="KIND[/NAME]", type=_kind_word,
                     help="roles, users, connectors, apps, or KIND/NAME")
    get.add_argument("name", nargs="?", metavar="NAME")
    get.add_argument("--format", choices=("yaml", "json", "text"), default="yaml")
    get.set_defaults(handler=get_resources)

    rm = verbs.add_parser("rm", parents=[common],
                          help="remove a role, a user, a connector or an app")
    rm.add_argument("kind", metavar="KIND[/NAME]", type=_kind_word,
                    help="role/NAME, user/NAME, connector/NAME, app/NAME or KIND NAME")
    rm.add_argument("name", nargs="?", metavar="NAME")
    rm.set_defaults(handler=remove_resource)


def _kind_word(text: str) -> str:
    """argparse type: the kind part must be known, so `get apps` fails before any config."""
    if text.partition("/")[0].lower() not in KINDS:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text.partition('/')[0]!r} (expected role/NAME, user/NAME, "
            f"connector/NAME, app/NAME or "
            f"KIND NAME with KIND one of {', '.join(sorted(KINDS))})")
    return text


def parse_ref(verb: str, first: str, second: str | None, name_required: bool
              ) -> tuple[str, str | None]:
    """``("role/x", None)`` or ``("roles", "x")`` -> ("role", "x"); UsageError otherwise."""
    kind_text, sep, name = first.partition("/")
    if sep and second is not None:
        raise UsageError(f"{verb}: give KIND/NAME or KIND NAME, not both ({first!r} {second!r})")
    if not sep:
        name = second
    kind = KINDS.get(kind_text.lower())
    if kind is None or (sep and not name) or (name_required and not name):
        shape = "role/NAME, user/NAME, connector/NAME, app/NAME or KIND NAME" \
            if name_required else "roles, users, connectors, apps, KIND/NAME or KIND NAME"
        got = first if second is None else f"{first} {second}"
        raise UsageError(f"{verb}: expected {shape}, got {got!r}")
    return kind, name or None


@attrs.frozen
class Planned:
    """One validated document of a `create -f` file."""

    kind: str
    name: str
    doc: dict
    roles: tuple[str, ...] = ()
    traits: dict = attrs.field(factory=dict)


# -- reading and validating `create -f` files --------------------------------------------


def read_documents(args: argparse.Namespace, io: Io) -> None:
    """Load and validate every document before storage is opened."""
    plan: list[Planned] = []
    seen: set[tuple[str, str]] = set()
    for number, doc in enumerate(load_yaml_documents(args.file), start=1):
        if doc is None:
            continue
        where = f"{args.file}: doc {number}"
        item = _validate(where, doc)
        if (item.kind, item.name) in seen:
            raise UsageError(f"{where}: {item.kind} {item.name!r} appears twice in the file")
        seen.add((item.kind, item.name))
        plan.append(item)
    if not plan:
        raise UsageError(f"{args.file}: no documents (expected kind: role, user, app or ldap)")
    args.plan = plan


def _validate(where: str, doc: Any) -> Planned:
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: expected a mapping with kind, metadata and spec")
    kind = doc.get("kind")
    if kind == "role":
        try:
            role = parse_role(doc)
        except RoleError as err:
            raise UsageError(f"{where}: {err}") from None
        return Planned("role", role.name, doc)
    if kind == "user":
        return _validate_user(where, doc)
    if kind in CONNECTOR_KINDS:
        try:
            spec = parse_connector(doc)
        except ConnectorError as err:
            raise UsageError(f"{where}: {err.message}") from None
        roles = tuple(dict.fromkeys(r for rule in spec.role_rules for r in rule.roles))
        return Planned(CONNECTOR, spec.name, doc, roles=roles)
    if kind == APP:
        try:
            app = app_from_resource(where, doc)
        except ConfigError as err:
            raise UsageError(err.one_line()) from None
        return Planned(APP, app.name, doc)
    raise UsageError(f"{where}: kind: expected role, user, app or {', '.join(CONNECTOR_KINDS)}, "
                     f"got {kind!r}")


def _check_keys(where: str, path: str, mapping: dict, allowed: tuple[str, ...]) -> None:
    for key in mapping:
        if key not in allowed:
            raise UsageError(f"{where}: {path}{key}: unknown key (expected one of "
                             f"{', '.join(allowed)})")


def _validate_user(where: str, doc: dict) -> Planned:
    """``kind: user`` with ``spec: {roles, traits}``; passwords never come from files."""
    _check_keys(where, "", doc, ("kind", "version", "metadata", "spec"))
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict):
        raise UsageError(f"{where}: metadata: expected a mapping with a name")
    _check_keys(where, "metadata.", metadata, ("name", "description"))
    name = metadata.get("name")
    if not isinstance(name, str) or not USER_NAME.match(name):
        raise UsageError(f"{where}: metadata.name: invalid user name {name!r}")
    spec = doc.get("spec") or {}
    if not isinstance(spec, dict):
        raise UsageError(f"{where}: spec: expected a mapping")
    _check_keys(where, "spec.", spec, ("roles", "traits"))
    roles = spec.get("roles") or []
    if not isinstance(roles, list):
        raise UsageError(f"{where}: spec.roles: expected a list of role names")
    for index, role in enumerate(roles):
        if not isinstance(role, str) or not ROLE_NAME.match(role):
            raise UsageError(f"{where}: spec.roles[{index}]: invalid role name {role!r}")
    raw_traits = spec.get("traits") or {}
    if not isinstance(raw_traits, dict):
        raise UsageError(f"{where}: spec.traits: expected a mapping of trait names to values")
    traits: dict[str, tuple[str, ...]] = {}
    for key, values in raw_traits.items():
        if not isinstance(key, str) or not TRAIT_NAME.match(key):
            raise UsageError(f"{where}: spec.traits: invalid trait name {key!r}")
        values = [values] if isinstance(values, str) else values
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise UsageError(f"{where}: spec.traits.{key}: expected a list of strings")
        traits[key] = tuple(values)
    return Planned("user", name, doc, roles=tuple(dict.fromkeys(roles)), traits=traits)


# -- verbs -------------------------------------------------------------------------------


async def _exists(admin: Admin, item: Planned) -> Any:
    if item.kind in STORED:
        return await admin.backend.get_resource(item.kind, item.name)
    return await admin.backend.get_user(item.name)


async def create_resources(admin: Admin, args: argparse.Namespace) -> int:
    planned_roles = frozenset(item.name for item in args.plan if item.kind == "role")
    for item in args.plan:
        if item.kind == "user":
            await require_roles(admin, item.roles, f"{args.file}: user {item.name!r}: spec.roles",
                                planned_roles)
        elif item.kind == CONNECTOR:
            await require_roles(admin, item.roles,
                                f"{args.file}: connector {item.name!r}: spec."
                                f"{parse_connector(item.doc).rules_key}",
                                planned_roles)
            _warn_unreadable(admin, item)
    existing = {}
    for item in args.plan:
        existing[(item.kind, item.name)] = current = await _exists(admin, item)
        if current is not None and not args.force:
            raise CliError(f"{item.kind} {item.name!r} already exists (use --force to replace it); "
                           "nothing was changed")
    for item in args.plan:
        current = existing[(item.kind, item.name)]
        verb = "replaced" if current is not None else "created"
        if item.kind in STORED:
            await ResourceAdmin(admin.services).store(admin.actor, item.kind, item.name,
                                                      item.doc, replaced=current is not None,
                                                      nudge=False)
        else:
            await _put_user(admin, item, current)
        admin.io.out(f"{item.kind} {clean(item.name)!r} {verb}\n")
    await admin.refresh_proxy()
    return 0


def _warn_unreadable(admin: Admin, item: Planned) -> None:
    """The proxy reads these files at sign-in; say now if this account cannot (the proxy's
    may still be able to, so it is a warning)."""
    for key in ("bind_password_file", "client_secret_file", "ca_file"):
        path = item.doc["spec"].get(key)
        if path is not None and not os.access(path, os.R_OK):
            admin.io.warn(f"connector {item.name!r}: spec.{key}: {path} is not readable "
                          "here; the proxy must be able to read it")


async def _put_user(admin: Admin, item: Planned, current: User | None) -> None:
    """Create or replace a user's roles and traits, keeping any password they have."""
    if current is None:
        await admin.backend.create_user(User(name=item.name, password_hash=None, roles=item.roles,
                                             traits=item.traits, created=admin.now()))
        admin.emit("user.create", item.name, roles=list(item.roles), traits=sorted(item.traits))
        admin.io.warn(f"user {item.name!r} has no password; set one with "
                      f"`apptunnel users set-password {item.name}`")
        return
    await admin.backend.update_user(User(name=item.name, password_hash=current.password_hash,
                                         roles=item.roles, traits=item.traits,
                                         created=current.created,
                                         connector=current.connector))
    admin.emit("user.update", item.name, changed=["roles", "traits"], roles=list(item.roles))


def _user_doc(user: User) -> dict:
    return {
        "kind": "user",
        "metadata": {"name": user.name},
        "spec": {"roles": list(user.roles),
                 "traits": {k: list(v) for k, v in sorted(user.traits.items())}},
    }


def _selector_text(rules: Any) -> str:
    labels = rules.get("app_labels") if isinstance(rules, dict) else None
    if not labels:
        return "-"
    parts = []
    for key, value in labels.items():
        values = value if isinstance(value, list) else [value]
        parts.append(f"{key}={'|'.join(str(v) for v in values)}")
    return " ".join(parts)


def _app_row(doc: dict) -> tuple[str, str, str, str]:
    metadata, spec = doc.get("metadata") or {}, doc.get("spec") or {}
    labels = metadata.get("labels") or {}
    return (str(metadata.get("name")), str(spec.get("uri", "-")),
            ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-",
            ",".join(sorted(spec.get("dynamic_labels") or {})) or "-")


def _connector_row(doc: dict) -> tuple[str, str, str, str]:
    spec = doc.get("spec") or {}
    rules = spec.get("groups_to_roles") or spec.get("claims_to_roles") \
        or spec.get("attributes_to_roles") or []
    roles = sorted({r for rule in rules for r in rule.get("roles", [])})
    where = spec.get("url") or spec.get("issuer_url") or spec.get("entity_descriptor_url") or "-"
    return doc["metadata"]["name"], doc.get("kind", "-"), str(where), ",".join(roles) or "-"


async def get_resources(admin: Admin, args: argparse.Namespace) -> int:
    kind, name = parse_ref("get", args.kind, args.name, name_required=False)
    if kind == CONNECTOR:
        if name is not None:
            found = await admin.backend.get_resource(CONNECTOR, name)
            if found is None:
                raise CliError(f"no connector named {name!r}")
            docs = [found.doc]
        else:
            docs = [r.doc for r in sorted(await admin.backend.list_resources(CONNECTOR),
                                          key=lambda r: r.name)]
        docs = [public_doc(d) for d in docs]   # never a secret on a terminal
    elif kind in ("role", APP):
        if name is not None:
            found = await admin.backend.get_resource(kind, name)
            if found is None:
                raise CliError(f"no {kind} named {name!r}")
            docs = [found.doc]
        else:
            docs = [r.doc for r in sorted(await admin.backend.list_resources(kind),
                                          key=lambda r: r.name)]
    else:
        if name is not None:
            user = await admin.backend.get_user(name)
            if user is None:
                raise CliError(f"no user named {name!r}")
            users = [user]
        else:
            users = sorted(await admin.backend.list_users(), key=lambda u: u.name)
        docs = [_user_doc(u) for u in users]

    if args.format == "yaml":
        admin.io.out(yaml_docs(docs))
    elif args.format == "json":
        admin.io.out(json_text(docs[0] if name is not None else docs))
    elif not docs:
        admin.io.out(f"No {kind}s.\n")
    elif kind == CONNECTOR:
        admin.io.out(table(("NAME", "KIND", "ADDRESS", "ROLES"), [_connector_row(d) for d in docs]))
    elif kind == APP:
        admin.io.out(table(("NAME", "URI", "LABELS", "DYNAMIC LABELS"), [_app_row(d) for d in docs]))
    elif kind == "role":
        admin.io.out(table(("NAME", "ALLOW", "DENY"), [
            (d["metadata"]["name"], _selector_text(d.get("spec", {}).get("allow")),
             _selector_text(d.get("spec", {}).get("deny")))
            for d in docs
        ]))
    else:
        admin.io.out(table(("NAME", "ROLES", "TRAITS", "CREATED"), [
            (u.name, ",".join(u.roles) or "-",
             " ".join(f"{k}={','.join(v)}" for k, v in sorted(u.traits.items())) or "-",
             iso(u.created))
            for u in users
        ]))
    return 0


async def remove_resource(admin: Admin, args: argparse.Namespace) -> int:
    kind, name = parse_ref("rm", args.kind, args.name, name_required=True)
    resources = ResourceAdmin(admin.services)
    if kind in STORED:
        try:
            await resources.delete(admin.actor, kind, name, nudge=False)
        except AdminError as err:
            raise cli_error(err) from None
    if kind == CONNECTOR:
        made = sorted(u.name for u in await admin.backend.list_users() if u.connector == name)
        if made:
            admin.io.warn(f"users who signed in through {name!r} keep their sessions and "
                          f"certificates until they expire (end them with `apptunnel users "
                          f"rm NAME` or a lock): {', '.join(made)}")
    elif kind == "role":
        holders = [u.name for u in await admin.backend.list_users() if name in u.roles]
        if holders:
            admin.io.warn(f"users still listing role {name!r}: {', '.join(sorted(holders))}")
    elif kind == "user":
        if not await admin.backend.delete_user(name):
            raise CliError(f"no user named {name!r}")
        admin.emit("user.delete", name)
    await admin.refresh_proxy()
    admin.io.out(f"{kind} {clean(name)!r} removed\n")
    return 0
