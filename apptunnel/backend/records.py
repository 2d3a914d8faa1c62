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
    # "" for local users; else the connector (kind: ldap ...) whose sign-in made the
    # record, which only that connector's sign-ins update (auth/connectors/signin.py).
    connector: str = ""


@attrs.frozen
class Resource:
    """A YAML document (role, connector, ...) stored as a whole under (kind, name)."""

    kind: str
    name: str
    doc: dict


@attrs.frozen
class Scope:
    """Which apps an agent may announce: names (None = any name) and labels every
    announced app must carry. The default scope is unlimited (tokens made before scopes
    existed); ``apptunnel tokens add`` narrows it. ``auth.tokens.scope_refusal`` decides."""

    apps: tuple[str, ...] | None = None
    labels: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict:
        return {"apps": list(self.apps) if self.apps is not None else None,
                "labels": {k: v for k, v in self.labels}}

    @classmethod
    def from_json(cls, doc: dict) -> "Scope":
        apps = doc.get("apps")
        return cls(apps=tuple(apps) if apps is not None else None,
                   labels=tuple(sorted((doc.get("labels") or {}).items())))


@attrs.frozen
class JoinToken:
    token_hash: str                     # hex sha256 of the secret; the secret is never stored
    kind: str
    expires: float
    created: float
    uses_left: int | None = None        # None: unlimited (tokens made before uses existed)
    scope: Scope = Scope()
    bot: str = ""                       # kind "bot": the bot it joins ('' for agent tokens)


@attrs.frozen
class Bot:
    """A machine identity (``apptunnel bots add``): its roles, and which certificate may
    renew. ``generation`` advances with each certificate issued (it starts at random);
    only the holder of the newest one may renew, so a copied older certificate is useless
    for renewal. ``cert_expires`` is None until the bot joined."""

    name: str
    roles: tuple[str, ...]
    created: float
    generation: int = 0
    cert_expires: float | None = None


@attrs.frozen
class Agent:
    """An agent that joined: what its token allowed, and what the proxies last saw of it.

    ``connected_since`` is None while no proxy holds a tunnel of it."""

    host_id: str
    scope: Scope
    joined: float
    cert_expires: float
    key_pin: str = ""                   # spki_pin of the key its certificate was issued for
    last_seen: float | None = None
    connected_since: float | None = None
    peer: str = ""
    proxy_id: str = ""
    apps: tuple[str, ...] = ()
    draining: bool = False              # its tunnel is going away (the agent shuts down)
    version: str = ""                   # what its last hello said it runs


@attrs.frozen
class WebSession:
    id_hash: str
    user: str
    roles: tuple[str, ...]
    traits: dict
    created: float
    expires: float
    # Signed in with the password only while a second factor is required and the user
    # has none yet: the session may enroll a device and nothing else (auth/mfa.py).
    enroll_only: bool = False
    # Access requests this session assumed (auth/access_requests.py): their roles count
    # only while each is approved and unexpired (auth/access.py).
    requests: tuple[str, ...] = ()
    # How the user signed in (the account page): "password", "password+otp",
    # "ldap:NAME", "oidc:NAME", "saml:NAME"; "" for sessions from before it was kept.
    method: str = ""


@attrs.frozen
class AppSession:
    id_hash: str
    web_session: str                    # the parent web session's id_hash
    user: str
    app: str
    created: float
    expires: float
    # Started after a fresh second factor for this app (per-session MFA, auth/access.py).
    mfa_verified: bool = False


@attrs.frozen
class AuthCode:
    """One-time hand-off from the proxy host to an app host, bound to a browser state."""

    code_hash: str
    web_session: str
    app: str
    path: str
    state_hash: str
    expires: float
    mfa_verified: bool = False          # the launch passed the per-session MFA prompt


@attrs.frozen
class SignInState:
    """A pending step of a sign-in (auth/signin_states.py) kept in storage, so that any
    proxy or worker can finish it: a second-factor ticket, a WebAuthn challenge, an OIDC
    flow. Keyed by the hash of the step's secret, read by kind, taken at most once."""

    key_hash: str
    kind: str
    body: str            # JSON object
    expires: float


@attrs.frozen
class Lock:
    """Refuses a user, an app, or one user on one app, until removed or expired; or,
    with ``agent`` (and no user or app), one agent's hello, renewals and tunnels.

    ``user``, ``app`` and ``agent`` are never all None; ``expires`` None means until removed.
    """

    id: str
    user: str | None
    app: str | None
    message: str
    created: float
    expires: float | None
    created_by: str
    agent: str | None = None


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
    # The per-proxy hash chain (audit/chain.py); "" / 0 on events stored before it existed.
    proxy_id: str = ""
    seq: int = 0
    prev: str = ""
    digest: str = ""
    # ``fields`` as stored (compact JSON, sorted keys), when the chain already encoded it
    # (audit/chain.py link_line): the store writes it instead of encoding the fields again
    # on every request. "" = encode when storing. Not part of the record: no eq, no repr.
    # Evolving an event to other fields must pass fields_json="" too (a stale text would
    # be stored, and fail ``audit verify`` as altered: the digest covers the fields).
    fields_json: str = attrs.field(default="", eq=False, repr=False)


@attrs.frozen
class UserLink:
    """A one-time invite or reset link (auth/links.py); only the token's hash is stored.

    ``used`` is when it was redeemed (None while it is still good), kept so a second
    visit can say "already used" rather than "unknown"."""

    token_hash: str
    user: str
    kind: str                           # "invite" | "reset"
    created: float
    expires: float
    used: float | None = None


@attrs.frozen
class MfaDevice:
    """A user's second factor (auth/mfa.py). ``secret`` is the TOTP key (base32) or the
    WebAuthn credential (JSON); it never leaves the proxy after enrollment. ``counter`` only
    grows: the last TOTP time step used, or the authenticator's sign count."""

    user: str
    name: str
    kind: str                           # "totp" | "webauthn"
    secret: str
    counter: int
    created: float


@attrs.frozen
class SamlRequest:
    """An outstanding SAML AuthnRequest: its id is accepted once, by its connector, until
    ``expires`` (auth/connectors/saml.py). ``target`` is where the user lands after;
    ``cli`` is where ``apptunnel login --auth`` waits when it started the sign-in
    ("PORT STATE CHALLENGE", '' for a browser's sign-in)."""

    request_id: str
    connector: str
    target: str
    expires: float
    cli: str = ""


@attrs.frozen
class Review:
    """One reviewer's verdict on an access request (auth/access_requests.py)."""

    author: str
    approve: bool
    reason: str
    created: float


@attrs.frozen
class AccessRequest:
    """A user's request for more roles (auth/access_requests.py decides every step).

    ``id`` is random (128 bits, never sequential). ``apps`` is non-empty when the
    request was made for those apps (``--app``): the roles then open those apps only.
    ``ttl`` is how long the elevation lasts once approved; ``expires`` is when a pending
    request lapses, or, once approved, when the elevation ends. ``approve``/``deny`` are
    the counts of reviews that decide it (the requester's roles' thresholds).
    """

    id: str
    user: str
    roles: tuple[str, ...]
    apps: tuple[str, ...]
    reason: str
    state: str                          # pending | approved | denied | expired
    created: float
    ttl: float
    expires: float
    approve: int = 1
    deny: int = 1
    reviews: tuple[Review, ...] = ()


@attrs.frozen
class KeyRecord:
    """One key of the cluster (auth/keystore.py): a CA, a JWT signing key, the SAML SP key.

    ``material`` is the private key, PEM or sealed (``enc:v1:...``, auth/keystore.py);
    ``public`` is what may be shown (a certificate PEM, or the JWT algorithm). ``state``
    is ``current`` (at most one per kind, enforced by storage), ``next`` (published, not
    yet signing) or ``retired`` (published until ``retire_at``).
    """

    kind: str
    id: str
    state: str
    material: str
    public: str
    created: float
    activate_at: float | None = None
    retire_at: float | None = None


# A proxy whose heartbeat is older than this (three missed 3 s beats) is dead: not a peer
# for agents (proxy/peers.py), and the tunnels it recorded are not live (admin/inventory.py).
PROXY_STALE_AFTER = 10.0


@attrs.frozen
class ProxyRecord:
    """One running proxy of the cluster (proxy/peers.py): where agents reach its tunnel
    listener, what it runs, and when it last said it is alive (its heartbeat)."""

    proxy_id: str
    tunnel_addr: str
    version: str
    started: float
    heartbeat: float


@attrs.frozen
class AgentTunnel:
    """One live tunnel of an agent to one proxy (an agent keeps one to every proxy)."""

    host_id: str
    proxy_id: str
    peer: str
    since: float
