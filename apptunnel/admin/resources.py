"""Roles, connectors and app resources as YAML documents: validated by the same parsers the proxy
loads them with (auth/rbac.py, auth/connectors/specs.py, config.app_from_resource), so a document stored here is
one the proxy will use, and a mistake comes back with its key path.

A connector's secrets are never shown (``****``, ``public_doc``); a document edited from
what was shown keeps the stored secret wherever it still says ``****``.
"""

from __future__ import annotations

from typing import Any

from apptunnel.admin.context import CONFLICT, NOT_FOUND, USAGE, Actor, AdminContext, AdminError
from apptunnel.auth.connectors.specs import KINDS as CONNECTOR_KINDS
from apptunnel.auth.connectors.specs import ConnectorError, parse_connector, public_doc
from apptunnel.auth.connectors.store import RESOURCE_KIND as CONNECTOR
from apptunnel.auth.rbac import RoleError, parse_role
from apptunnel.backend.records import Resource
from apptunnel.config import app_from_resource, load_yaml_text
from apptunnel.errors import ConfigError

HIDDEN = "****"
MAX_YAML = 64 * 1024
APP = "app"
EDITABLE = ("role", CONNECTOR, APP)


def check(kind: str, doc: Any) -> tuple[str, tuple[str, ...]]:
    """(name, roles it grants) of a valid ``kind`` document; AdminError with the key path."""
    try:
        if kind == "role":
            return parse_role(doc).name, ()
        if kind == APP:
            return app_from_resource("app", doc).name, ()
        if not isinstance(doc, dict) or doc.get("kind") not in CONNECTOR_KINDS:
            raise ConnectorError(f"kind: expected one of {', '.join(CONNECTOR_KINDS)}")
        spec = parse_connector(doc)
        return spec.name, tuple(dict.fromkeys(r for rule in spec.role_rules for r in rule.roles))
    except (RoleError, ConnectorError) as err:
        raise AdminError(err.message) from None
    except ConfigError as err:
        raise AdminError(str(err)) from None


def _keep_secrets(doc: Any, stored: Any) -> Any:
    """``doc`` with each ``****`` taken from the same place in ``stored``."""
    if isinstance(doc, dict) and isinstance(stored, dict):
        return {k: (stored[k] if v == HIDDEN and k in stored else _keep_secrets(v, stored.get(k)))
                for k, v in doc.items()}
    return doc


class ResourceAdmin:
    """Create, replace, read and remove roles, connectors and app resources; each change
    audited once."""

    def __init__(self, ctx: AdminContext) -> None:
        self._ctx = ctx

    async def list(self, kind: str) -> list[Resource]:
        return sorted(await self._ctx.backend.list_resources(kind), key=lambda r: r.name)

    async def get(self, kind: str, name: str) -> Resource:
        found = await self._ctx.backend.get_resource(kind, name)
        if found is None:
            raise AdminError(f"no {kind} named {name!r}", NOT_FOUND)
        return found

    @staticmethod
    def shown(resource: Resource) -> dict:
        """The document as anyone may see it: a connector's secrets as ``****``."""
        return public_doc(resource.doc) if resource.kind == CONNECTOR else resource.doc

    async def put_text(self, actor: Actor, kind: str, text: str, name: str | None = None,
                       replace: bool = False) -> Resource:
        """Parse one YAML document of ``kind`` and store it. ``name`` (the page or URL it
        was edited at) must be the document's; ``replace`` False refuses an existing one."""
        if kind not in EDITABLE:
            raise AdminError(f"cannot edit {kind} documents here", NOT_FOUND)
        if len(text) > MAX_YAML:
            raise AdminError(f"at most {MAX_YAML} bytes of YAML", field="yaml")
        try:
            docs = [d for d in load_yaml_text(kind, text) if d is not None]
        except ConfigError as err:
            raise AdminError(str(err)) from None
        if len(docs) != 1:
            raise AdminError(f"expected exactly one {kind} document, got {len(docs)}")
        doc = docs[0]
        current = None
        if kind == CONNECTOR and name is not None:
            current = await self._ctx.backend.get_resource(kind, name)
            if current is not None:
                doc = _keep_secrets(doc, current.doc)
        found, roles = check(kind, doc)
        if name is not None and found != name:
            raise AdminError(f"expected {name!r} (rename by creating a new {kind})",
                             field="metadata.name")
        missing = await self._ctx.missing_role(roles)
        if missing is not None:
            raise AdminError(f"role {missing!r} does not exist (create it first); nothing "
                             "was changed", USAGE)
        current = current or await self._ctx.backend.get_resource(kind, found)
        if current is not None and not replace:
            raise AdminError(f"{kind} {found!r} already exists", CONFLICT)
        if current is None and replace and name is not None:
            raise AdminError(f"no {kind} named {name!r}", NOT_FOUND)
        return await self.store(actor, kind, found, doc, replaced=current is not None)

    async def store(self, actor: Actor, kind: str, name: str, doc: dict,
                    replaced: bool, nudge: bool = True) -> Resource:
        """Store a document already validated; the audit event says which kind. ``nudge``
        False: the caller stores several and nudges once."""
        resource = Resource(kind=kind, name=name, doc=doc)
        await self._ctx.backend.put_resource(resource)
        self._ctx.emit(actor, "resource.create", f"{kind}/{name}",
                       kind=doc.get("kind", kind) if kind == CONNECTOR else kind,
                       name=name, replaced=replaced)
        if nudge:
            await self._ctx.nudge()
        return resource

    async def delete(self, actor: Actor, kind: str, name: str, nudge: bool = True) -> None:
        if not await self._ctx.backend.delete_resource(kind, name):
            raise AdminError(f"no {kind} named {name!r}", NOT_FOUND)
        self._ctx.emit(actor, "resource.delete", f"{kind}/{name}", kind=kind, name=name)
        if nudge:
            await self._ctx.nudge()
