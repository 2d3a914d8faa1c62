"""App resources (``kind: app`` in the backend) and which agent is sent which.

`AppResources` polls the backend's ``app`` resources every ``interval`` seconds (and at
once on the control socket's ``refresh``), keeps the documents that the agent config's
own parser accepts (``config.app_from_resource``; a document that does not parse is
logged once and served by nobody), and tells its listeners when the set changed. A
tunnel session asks `matching(selectors)` for the documents its agent's ``resources``
selectors match (a role's label rules, on the resource's ``metadata.labels``) and pushes
them over the tunnel; the agent announces what it then serves like any static app, so
the registry, the token scope and the one-definition rule apply unchanged.

`resource_refusal` is the other half of "an app resource's definition is THE
definition": an announcement of a resource's name must be that resource (same uri,
address, rewrites, claims, ports, static labels; only the resource's own dynamic label
keys may be added), whichever agent sends it.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from twisted.internet.defer import DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from apptunnel.auth.rbac import Selector, selector_matches
from apptunnel.config import AppConfig, ConfigError, app_from_resource
from apptunnel.messages import MAX_APPS
from apptunnel.polling import Poll

__all__ = ["AppResources", "RESOURCE_KIND", "resource_refusal"]

RESOURCE_KIND = "app"
MAX_PUSH_BYTES = 60 * 1024   # an app_resources message must fit a 64 KiB control frame

log = Logger()


class AppResources:
    """The valid app resources, by name; polled, with change listeners."""

    def __init__(self, backend, clock: IReactorTime, interval: float = 2.0) -> None:
        self._backend = backend
        self._clock = clock
        self._docs: dict[str, dict] = {}
        self._apps: dict[str, AppConfig] = {}
        self._bad: set[str] = set()          # (name + doc) already logged as unusable
        self._listeners: list[Callable[[], None]] = []
        self._mutex = DeferredLock()
        self._poll = Poll(self.refresh, clock, interval, "app resource watcher")

    def start(self) -> None:
        """Poll now and then every ``interval`` seconds until `stop`."""
        self._poll.start()

    def stop(self) -> None:
        self._poll.stop()

    def add_listener(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def app(self, name: str) -> AppConfig | None:
        """The parsed resource ``name``, or None."""
        return self._apps.get(name)

    def matching(self, selectors: tuple[Selector, ...]) -> list[dict]:
        """The documents (sorted by name) whose labels one of ``selectors`` matches,
        as many as fit one control message."""
        out, size = [], 0
        for name in sorted(self._docs):
            labels = self._apps[name].labels
            if not any(selector_matches(s, labels) for s in selectors):
                continue
            size += len(json.dumps(self._docs[name]))
            if size > MAX_PUSH_BYTES or len(out) >= MAX_APPS:
                log.warn("app resources matching an agent's selectors do not fit one message; "
                         "{name} and later ones are not sent", name=name)
                break
            out.append(self._docs[name])
        return out

    async def refresh(self) -> None:
        """Read the resources now; never raises (a failure is logged, the next poll retries)."""
        async with self._mutex:
            try:
                found = await self._backend.list_resources(RESOURCE_KIND)
            except Exception as err:  # noqa: BLE001 - the next poll retries
                log.warn("cannot read app resources: {error}", error=str(err))
                return
            docs, apps = {}, {}
            for res in found:
                try:
                    app = app_from_resource(f"app resource {res.name}", res.doc)
                    if app.name != res.name:
                        raise ConfigError(f"app resource {res.name}: metadata.name is {app.name}")
                except ConfigError as err:
                    key = f"{res.name}:{json.dumps(res.doc, sort_keys=True, default=str)}"
                    if key not in self._bad:
                        self._bad.add(key)
                        log.warn("ignoring app resource: {error}", error=err.one_line())
                    continue
                docs[res.name], apps[res.name] = res.doc, app
            if len(self._bad) > 10_000:
                self._bad.clear()
            if docs == self._docs:
                return
            self._docs, self._apps = docs, apps
        for fn in list(self._listeners):
            try:
                fn()
            except Exception:  # noqa: BLE001 - one bad listener must not stop the others
                log.failure("app resource listener failed")


def resource_refusal(resource: AppConfig, app, public_addr: str) -> str | None:
    """Why an announcement of ``resource``'s name is not that resource, or None.

    ``app`` is the registration the announcement asks for (a ``catalog.AppInfo``, its
    address already defaulted); ``public_addr`` the address the resource gets (its own
    ``public_addr``, or the proxy's default for the name). Dynamic labels are the one
    thing an agent adds: keys the resource declares, nothing else."""
    static = resource.labels
    dynamic = {label.key for label in resource.dynamic_labels}
    if (app.uri != resource.uri
            or app.public_addr.lower() != public_addr.lower()
            or tuple(app.rewrite_headers) != tuple(resource.rewrite_headers)
            or app.jwt_claims != resource.jwt_claims
            or tuple(app.tcp_ports) != tuple(resource.tcp_ports)
            or app.description != resource.description):
        return f"app {resource.name} is defined by an app resource, differently"
    for key, value in static.items():
        if app.labels.get(key) != value:
            return f"app {resource.name} is defined by an app resource: label {key} differs"
    extra = set(app.labels) - set(static) - dynamic
    if extra:
        return (f"app {resource.name} is defined by an app resource without label "
                f"{sorted(extra)[0]}")
    return None
