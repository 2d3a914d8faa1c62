"""Connector resources as the proxy reads them: from storage, parsed, cached briefly.

Stored as ``Resource(kind="connector", name, doc)`` whatever their ``kind:`` (so one name
is one connector, as ``apptunnel login --auth NAME`` and ``rm connector/NAME`` need). A
stored document that no longer parses (written by a newer apptunnel, edited by hand)
is logged once and treated as absent: nobody signs in through a connector we cannot
read in full.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from apptunnel.auth.connectors.specs import Connector, ConnectorError, LdapSpec, OidcSpec, \
    SamlSpec, parse_connector
from apptunnel.backend.base import Backend

RESOURCE_KIND = "connector"


class ConnectorStore:
    """Parsed connectors, re-read from storage at most every ``ttl`` seconds."""

    _log = Logger()

    def __init__(self, backend: Backend, clock: IReactorTime, ttl: float = 5.0) -> None:
        self._backend = backend
        self._clock = clock
        self._ttl = ttl
        self._until = float("-inf")
        self._specs: dict[str, Connector] = {}
        self._reported: set[tuple[str, str]] = set()

    async def ldap(self, name: str) -> LdapSpec | None:
        """The LDAP connector of that name, or None."""
        spec = (await self._all()).get(name)
        return spec if isinstance(spec, LdapSpec) else None

    async def ldap_names(self) -> list[str]:
        """Names of the LDAP connectors, sorted: the sign-in form's choice."""
        return sorted(n for n, s in (await self._all()).items() if isinstance(s, LdapSpec))

    async def saml(self, name: str) -> SamlSpec | None:
        """The SAML connector of that name, or None."""
        spec = (await self._all()).get(name)
        return spec if isinstance(spec, SamlSpec) else None

    async def oidc(self, name: str) -> OidcSpec | None:
        """The OIDC connector of that name, or None."""
        spec = (await self._all()).get(name)
        return spec if isinstance(spec, OidcSpec) else None

    async def get(self, name: str) -> Connector | None:
        """The connector of that name, whatever its kind, or None."""
        return (await self._all()).get(name)

    async def browser(self) -> list[Connector]:
        """The connectors signed in at through the browser (all but LDAP, which is a choice
        on the password form), sorted by name: one button each on the sign-in page."""
        return [spec for _, spec in sorted((await self._all()).items()) if spec.kind != "ldap"]

    def invalidate(self) -> None:
        self._until = float("-inf")

    async def _all(self) -> dict[str, Connector]:
        now = self._clock.seconds()
        if now < self._until:
            return self._specs
        try:
            resources = await self._backend.list_resources(RESOURCE_KIND)
        except Exception as err:
            self._log.warn("cannot read connectors (keeping the last known): {error}",
                           error=str(err))
            return self._specs
        specs = {}
        for resource in resources:
            try:
                specs[resource.name] = parse_connector(resource.doc)
            except ConnectorError as err:
                if (resource.name, err.message) not in self._reported:
                    self._reported.add((resource.name, err.message))
                    self._log.error("stored connector {name!r} is invalid and not used: "
                                    "{problem}", name=resource.name, problem=err.message)
        self._specs, self._until = specs, now + self._ttl
        return specs
