"""Frozen records that cross the storage boundary.

Every backend returns and accepts exactly these shapes, so SQL never leaks out of
``backend/`` and a PostgreSQL backend can be dropped in behind the same interface.
Times are float epoch seconds taken from the caller's clock.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class User:
    name: str
    password_hash: str | None           # None for users who only sign in through SSO
    roles: tuple[str, ...]
    traits: dict[str, tuple[str, ...]]
    created: float


@attrs.frozen
class Resource:
    """A YAML document (role, connector, ...) stored as a whole under (kind, name)."""

    kind: str
    name: str
    doc: dict


@attrs.frozen
class JoinToken:
    token_hash: str                     # hex sha256 of the secret; the secret is never stored
    kind: str
    expires: float
    created: float


@attrs.frozen
class WebSession:
    id_hash: str
    user: str
    roles: tuple[str, ...]
    traits: dict
    created: float
    expires: float


@attrs.frozen
class AppSession:
    id_hash: str
    web_session: str                    # the parent web session's id_hash
    user: str
    app: str
    created: float
    expires: float


@attrs.frozen
class AuthCode:
    """One-time hand-off from the proxy host to an app host, bound to a browser state."""

    code_hash: str
    web_session: str
    app: str
    path: str
    state_hash: str
    expires: float


@attrs.frozen
class Lock:
    """Refuses a user, an app, or one user on one app, until removed or expired.

    ``user`` and ``app`` are never both None; ``expires`` None means until removed.
    """

    id: str
    user: str | None
    app: str | None
    message: str
    created: float
    expires: float | None
    created_by: str


@attrs.frozen
class AuditEvent:
    id: str
    time: float
    type: str
    code: str
    actor: str
    target: str
    outcome: str
    fields: dict
