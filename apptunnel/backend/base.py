"""The storage interface every backend implements, and its errors.

Callers depend on this Protocol only; SQLite and a later PostgreSQL backend are
interchangeable behind it. Methods are coroutines so either a thread pool or an
async driver can sit underneath.
"""

from __future__ import annotations

import typing
from collections.abc import Callable

from apptunnel.backend.records import (
    AccessRequest,
    Agent,
    AgentTunnel,
    AppSession,
    Bot,
    AuditEvent,
    AuthCode,
    JoinToken,
    KeyRecord,
    Lock,
    MfaDevice,
    ProxyRecord,
    Resource,
    SamlRequest,
    SignInState,
    User,
    UserLink,
    WebSession,
)
from apptunnel.errors import ApptunnelError

# The most events one search_audit call returns, whatever limit it asks for.
MAX_SEARCH_LIMIT = 100_000

# The Agent fields update_agent may set (its connection state); anything else is an error.
AGENT_STATE = frozenset({"cert_expires", "key_pin", "last_seen", "connected_since", "peer",
                         "proxy_id", "apps", "draining", "version"})


# How long a link stays stored after it expires, so a late visit still hears "expired".
LINK_KEEP = 7 * 86400.0


class BackendError(ApptunnelError):
    """Storage failed; the message says what, never with secrets in it."""


class StorageUnavailable(BackendError):
    """The backend could not be reached or did not answer (connection refused or lost,
    statement timeout, file locked or unreadable): nothing is wrong with the request, so
    it becomes a 503 with ``retry_after`` at every boundary, one log line, no traceback.
    Never raised for constraint errors (AlreadyExists) or bad records."""

    status = 503
    retry_after = 5
    message = "The proxy's storage is unavailable; try again in a moment."


class AlreadyExists(BackendError):
    """A record with the same key is already stored."""


class NotFound(BackendError):
    """An update named a record that is not stored."""


class Backend(typing.Protocol):
    async def create_user(self, user: User) -> None: ...   # AlreadyExists
    async def update_user(self, user: User) -> None: ...   # NotFound
    async def get_user(self, name: str) -> User | None: ...
    async def list_users(self) -> list[User]: ...
    async def delete_user(self, name: str) -> bool: ...

    async def put_resource(self, res: Resource) -> None: ...
    async def get_resource(self, kind: str, name: str) -> Resource | None: ...
    async def list_resources(self, kind: str) -> list[Resource]: ...
    async def delete_resource(self, kind: str, name: str) -> bool: ...

    async def add_token(self, token: JoinToken) -> None: ...
    async def get_token(self, token_hash: str) -> JoinToken | None: ...
    async def list_tokens(self) -> list[JoinToken]: ...
    async def delete_token(self, token_hash: str) -> bool: ...
    async def redeem_token(self, token_hash: str, now: float, agent: Agent) -> Agent | None: ...  # AlreadyExists

    # Bots (auth/bots.py): a bot and its one join token are created together; a token
    # use and a renewal each advance the bot's certificate generation atomically.
    async def create_bot(self, bot: Bot, token: JoinToken) -> None: ...   # AlreadyExists
    async def get_bot(self, name: str) -> Bot | None: ...
    async def list_bots(self) -> list[Bot]: ...
    async def delete_bot(self, name: str) -> bool: ...   # and its join tokens
    async def redeem_bot_token(self, token_hash: str, now: float,
                               cert_expires: float) -> Bot | None: ...
    async def advance_bot(self, name: str, generation: int,
                          cert_expires: float) -> Bot | None: ...

    async def put_agent(self, agent: Agent) -> None: ...
    async def get_agent(self, host_id: str) -> Agent | None: ...
    async def list_agents(self) -> list[Agent]: ...
    async def update_agent(self, host_id: str, **state) -> bool: ...

    async def put_web_session(self, s: WebSession) -> None: ...
    async def get_web_session(self, id_hash: str) -> WebSession | None: ...
    async def delete_web_session(self, id_hash: str) -> list[str]: ...
    async def put_app_session(self, s: AppSession) -> None: ...
    async def get_app_session(self, id_hash: str) -> AppSession | None: ...
    async def delete_app_session(self, id_hash: str) -> bool: ...
    async def delete_user_sessions(self, user: str) -> list[str]: ...
    async def list_user_web_sessions(self, user: str) -> list[WebSession]: ...
    async def delete_app_sessions(self, app: str, user: str | None = None) -> list[str]: ...

    async def put_auth_code(self, c: AuthCode) -> None: ...
    async def take_auth_code(self, code_hash: str) -> AuthCode | None: ...

    # Invite/reset links, second factors and recovery codes (auth/links.py, auth/mfa.py).
    async def put_user_link(self, link: UserLink) -> None: ...   # replaces the user's others
    async def get_user_link(self, token_hash: str) -> UserLink | None: ...
    async def use_user_link(self, token_hash: str, now: float) -> UserLink | None: ...
    async def add_mfa_device(self, device: MfaDevice) -> None: ...   # AlreadyExists
    async def list_mfa_devices(self, user: str) -> list[MfaDevice]: ...
    async def delete_mfa_device(self, user: str, name: str) -> bool: ...
    async def advance_mfa_counter(self, user: str, name: str, counter: int) -> bool: ...
    async def set_recovery_codes(self, user: str, code_hashes: list[str]) -> None: ...
    async def use_recovery_code(self, user: str, code_hash: str) -> bool: ...
    async def count_recovery_codes(self, user: str) -> int: ...

    # Outstanding SAML requests (auth/connectors/saml.py): each id is taken at most once.
    async def put_saml_request(self, r: SamlRequest) -> None: ...   # AlreadyExists
    async def take_saml_request(self, request_id: str, connector: str,
                                now: float) -> SamlRequest | None: ...
    # Pending sign-in steps: put bounded per kind; get/take only a live one of the kind.
    async def put_signin_state(self, s: SignInState, now: float, limit: int) -> None: ...
    async def get_signin_state(self, kind: str, key_hash: str,
                               now: float) -> SignInState | None: ...
    async def take_signin_state(self, kind: str, key_hash: str,
                                now: float) -> SignInState | None: ...

    async def put_lock(self, lock: Lock) -> None: ...
    async def list_locks(self, now: float) -> list[Lock]: ...
    async def delete_lock(self, id: str) -> bool: ...

    # Access requests (auth/access_requests.py). An update is a compare-and-set on the
    # stored state and review count, so of two racing reviews (or proxies) one wins.
    async def put_access_request(self, r: AccessRequest) -> None: ...   # AlreadyExists
    async def get_access_request(self, id: str) -> AccessRequest | None: ...
    async def list_access_requests(self, user: str | None = None,
                                   states: tuple[str, ...] | None = None
                                   ) -> list[AccessRequest]: ...   # oldest first
    async def update_access_request(self, r: AccessRequest, state: str,
                                    reviews: int) -> bool: ...

    async def append_audit(self, events: list[AuditEvent]) -> None:
        """Store events in order; an id already stored is skipped (retries and journal
        replay store each event once)."""
        ...
    async def search_audit(
        self,
        since: float | None = None,
        until: float | None = None,
        type: str | None = None,
        limit: int = 1000,
        *,
        actor: str | None = None,
        target: str | None = None,
        outcome: str | None = None,
        request_id: str | None = None,
        offset: int = 0,
        newest_first: bool = False,
    ) -> list[AuditEvent]:
        """Events with since <= time < until, oldest first (ties in insertion order; the
        reverse with `newest_first`), skipping `offset`, at most `limit`; each other
        argument given must equal the event's field exactly (`request_id` is the field of
        that name). Filtering happens in storage, so the limit counts matching events only."""
        ...

    async def get_audit_event(self, id: str) -> AuditEvent | None: ...

    # Cluster keys (auth/keystore.py). add_key inserts only when neither the (kind, id) nor,
    # for a `current` (or `next`) key, another current (next) key of that kind is stored: True if it did, so
    # proxies racing on an empty store end up with one key. set_key_states sets state,
    # material, activate_at and retire_at of several keys of one kind in one transaction, each only
    # if it is still in the state expected (compare-and-set: False, nothing changed).
    async def add_key(self, key: KeyRecord) -> bool: ...
    async def list_keys(self, kind: str | None = None) -> list[KeyRecord]: ...  # oldest first
    async def set_key_states(self, changes: list[tuple[str, KeyRecord]]) -> bool: ...
    async def delete_key(self, kind: str, id: str) -> bool: ...
    # Several proxies (proxy/peers.py): each upserts its row on every heartbeat and
    # deletes it on a clean stop; a row whose heartbeat is older than `since` is stale.
    # A proxy's agent_tunnels rows go with it: heartbeat_proxy deletes those recorded
    # before its `started` (an earlier run, killed), delete_proxy all of them, and
    # forget_proxies removes every proxy whose heartbeat is older than `before` with its
    # rows (one transaction each; forget_proxies returns the ids it removed).
    async def heartbeat_proxy(self, proxy: ProxyRecord) -> None: ...
    async def list_proxies(self, since: float) -> list[ProxyRecord]: ...   # by proxy_id
    async def delete_proxy(self, proxy_id: str) -> bool: ...
    async def forget_proxies(self, before: float) -> list[str]: ...   # sorted
    # Which proxies hold a tunnel of which agent: one row per (agent, proxy) pair.
    async def put_agent_tunnel(self, tunnel: AgentTunnel) -> None: ...   # upsert
    async def delete_agent_tunnel(self, host_id: str, proxy_id: str) -> bool: ...
    async def list_agent_tunnels(self) -> list[AgentTunnel]: ...   # by host_id, proxy_id
    # The per-proxy hash chain (audit/chain.py): a proxy's newest chained event, its
    # chained events in storage order (or the one numbered `seq`), events per proxy
    # ('' counts unchained ones).
    async def audit_chain_head(self, proxy_id: str) -> AuditEvent | None: ...
    async def audit_chain(self, proxy_id: str, offset: int = 0, limit: int = 1000,
                          *, seq: int | None = None) -> list[AuditEvent]: ...
    async def audit_chains(self) -> dict[str, int]: ...
    # A chain several processes extend (the admin CLI's, audit/__init__.py): in one write
    # transaction no other writer of `chain` can interleave (SQLite's write lock, a
    # PostgreSQL advisory lock), read its head, skip events whose id is stored (a retry)
    # and store the others as its next events, each made by `link(event, chain, seq,
    # prev)` (audit/chain.py); returns the events stored. Two writers never fork it.
    async def append_audit_chained(self, chain: str, events: list[AuditEvent],
                                   link: Callable[[AuditEvent, str, int, str], AuditEvent]
                                   ) -> list[AuditEvent]: ...

    async def delete_expired(self, now: float) -> int: ...
    async def close(self) -> None: ...
