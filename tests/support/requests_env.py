"""The web environment with access requests wired in (tests/support/web_env.py plus the
access-request service): alice (dev) may request billing-access, bob reviews it."""

from __future__ import annotations

import attrs
import pytest

from apptunnel.auth.access import AccessPolicy
from apptunnel.auth.policy import RoleCache
from apptunnel.auth.request_service import AccessRequestService, RequestNotices
from apptunnel.auth.request_watch import RequestWatcher
from apptunnel.backend.records import Resource
from apptunnel.web.access_requests import AccessRequestApi
from apptunnel.web.routes import WebApp
from tests.support.web_env import running_web_env

ROLES = [
    {"kind": "role", "metadata": {"name": "dev"}, "spec": {
        "allow": {"app_labels": {"env": "staging"},
                  "request": {"roles": ["billing-access"], "max_duration": "1h"}}}},
    {"kind": "role", "metadata": {"name": "billing-access"},
     "spec": {"allow": {"app_labels": {"env": "prod"}}}},
    {"kind": "role", "metadata": {"name": "reviewer"},
     "spec": {"allow": {"review_requests": {"roles": ["billing-access"]}}}},
]


@pytest.fixture
def env(tmp_path):
    holder = {}

    async def start():
        cm = running_web_env(tmp_path)
        e = await cm.__aenter__()
        for doc in ROLES:
            await e.backend.put_resource(Resource("role", doc["metadata"]["name"], doc))
        bob = await e.backend.get_user("bob")
        await e.backend.update_user(attrs.evolve(bob, roles=("reviewer",)))
        roles = RoleCache(e.backend, e.clock)
        watcher = RequestWatcher(e.backend, e.clock)
        notices = RequestNotices(e.audit, e.clock)
        service = AccessRequestService(backend=e.backend, roles=roles, notices=notices,
                                       watcher=watcher, clock=e.clock,
                                       find_app=e.registry.app, default_ttl=3600.0,
                                       users=e.users)
        access = AccessPolicy(roles=roles, audit=e.audit, clock=e.clock, locks=e.locks,
                              users=e.users, requests=watcher)
        e.web = WebApp(e.config, e.sessions, roles, e.registry, e.audit, e.jwt_keys, e.ca,
                       e.clock, locks=e.locks, users=e.users, access=access,
                       backend=e.backend,
                       access_requests=AccessRequestApi(service, e.sessions, e.ca, e.audit,
                                                        e.clock))
        holder["cm"] = cm
        return e

    return start
