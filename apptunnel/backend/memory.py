"""In-memory backend: the Backend protocol on plain dicts, for tests and embedding.

It behaves as ``SqliteBackend`` does, call for call (tests/unit/test_backend_contract.py
runs one suite against both), but with no thread and no file: every coroutine finishes
before it returns, so a test on a ``Clock`` never waits on the wall clock.

Records go in and come out through the same JSON encoding SQLite stores, so callers see
what they would see from SQLite: fresh dicts with sorted keys, tuples for roles, trait
values and agent apps, lists inside documents, floats for times, and one BackendError for
a record that cannot be encoded.

Not a ``proxy.yaml`` option: state (users, tokens, audit) would vanish on restart and the
CLI could not reach it, so it would only ever be a trap for an operator.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs

from apptunnel.audit.chain import GENESIS
from apptunnel.backend.base import (
    AGENT_STATE,
    LINK_KEEP,
    MAX_SEARCH_LIMIT,
    AlreadyExists,
    BackendError,
    NotFound,
    StorageUnavailable,
)
from apptunnel.backend.records import (
    AccessRequest,
    Agent,
    AgentTunnel,
    AppSession,
    AuditEvent,
    AuthCode,
    Bot,
    JoinToken,
    KeyRecord,
    Lock,
    MfaDevice,
    ProxyRecord,
    Resource,
    Review,
    SamlRequest,
    SignInState,
    Scope,
    User,
    UserLink,
    WebSession,
)

def _json(value: Any) -> Any:
    """What SQLite's JSON columns give back: a fresh, key-sorted copy, or BackendError."""
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as err:
        raise BackendError(f"memory backend: cannot encode record: {err}") from None
    return json.loads(text)


def _real(value: float | None) -> float | None:
    """A REAL column: numbers come back as floats, NULL as None."""
    return None if value is None else float(value)


def _traits(traits: dict) -> dict[str, tuple[str, ...]]:
    return {k: tuple(v) for k, v in _json(traits).items()}


def _scope(scope: Scope) -> Scope:
    return Scope.from_json(_json(scope.to_json()))


def _user(u: User) -> User:
    return User(u.name, u.password_hash, tuple(_json(list(u.roles))), _traits(u.traits),
                _real(u.created), str(u.connector))


def _resource(r: Resource) -> Resource:
    return Resource(r.kind, r.name, _json(r.doc))


def _web_session(s: WebSession) -> WebSession:
    return WebSession(s.id_hash, s.user, tuple(_json(list(s.roles))), _traits(s.traits),
                      _real(s.created), _real(s.expires), bool(s.enroll_only),
                      tuple(_json(list(s.requests))), str(s.method))


def _access_request(r: AccessRequest) -> AccessRequest:
    return attrs.evolve(r, roles=tuple(_json(list(r.roles))), apps=tuple(_json(list(r.apps))),
                        created=_real(r.created), ttl=_real(r.ttl), expires=_real(r.expires),
                        reviews=tuple(Review(str(v.author), bool(v.approve), str(v.reason),
                                             _real(v.created)) for v in r.reviews))


def _app_session(s: AppSession) -> AppSession:
    return attrs.evolve(s, created=_real(s.created), expires=_real(s.expires),
                        mfa_verified=bool(s.mfa_verified))


def _token(t: JoinToken) -> JoinToken:
    uses = None if t.uses_left is None else int(t.uses_left)
    return JoinToken(t.token_hash, t.kind, _real(t.expires), _real(t.created), uses,
                     _scope(t.scope), str(t.bot))


def _bot(b: Bot) -> Bot:
    return Bot(b.name, tuple(_json(list(b.roles))), _real(b.created), int(b.generation),
               _real(b.cert_expires))


def _agent(a: Agent) -> Agent:
    return attrs.evolve(a, scope=_scope(a.scope), joined=_real(a.joined),
                        cert_expires=_real(a.cert_expires), last_seen=_real(a.last_seen),
                        connected_since=_real(a.connected_since),
                        apps=tuple(_json(list(a.apps))))


def _lock(lock: Lock) -> Lock:
    return attrs.evolve(lock, created=_real(lock.created), expires=_real(lock.expires))


def _event(e: AuditEvent) -> AuditEvent:
    return attrs.evolve(e, time=_real(e.time), fields=_json(e.fields))


class MemoryBackend:
    """The Backend protocol on dicts. Records are normalised on the way in, and those with
    a dict inside (users, resources, web sessions, audit events) are copied on the way out,
    so a caller who changes what it got changes nothing stored, as with a fresh SQL row."""

    def __init__(self) -> None:
        self._users: dict[str, User] = {}
        self._resources: dict[tuple[str, str], Resource] = {}
        self._tokens: dict[str, JoinToken] = {}
        self._agents: dict[str, Agent] = {}
        self._proxies: dict[str, ProxyRecord] = {}
        self._agent_tunnels: dict[tuple[str, str], AgentTunnel] = {}
        self._bots: dict[str, Bot] = {}
        self._web_sessions: dict[str, WebSession] = {}
        self._app_sessions: dict[str, AppSession] = {}
        self._auth_codes: dict[str, AuthCode] = {}
        self._saml_requests: dict[str, SamlRequest] = {}
        self._signin_states: dict[str, SignInState] = {}
        self._locks: dict[str, Lock] = {}
        self._requests: dict[str, AccessRequest] = {}
        self._links: dict[str, UserLink] = {}
        self._devices: dict[tuple[str, str], MfaDevice] = {}
        self._recovery: dict[str, set[str]] = {}
        self._audit: list[AuditEvent] = []      # insertion order: ties in time keep it
        self._audit_ids: set[str] = set()
        self._keys: dict[tuple[str, str], KeyRecord] = {}
        self._closed = False
        # Set by tests: every call fails as with a database that is down.
        self.unreachable = False

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("memory backend is closed")
        if self.unreachable:
            raise StorageUnavailable("memory backend: unreachable (set by a test)")

    async def close(self) -> None:
        self._closed = True

    # -- users ------------------------------------------------------------------

    async def create_user(self, user: User) -> None:
        self._check_open()
        stored = _user(user)
        if user.name in self._users:
            raise AlreadyExists(f"user {user.name!r} already exists")
        self._users[user.name] = stored

    async def update_user(self, user: User) -> None:
        self._check_open()
        stored = _user(user)
        old = self._users.get(user.name)
        if old is None:
            raise NotFound(f"user {user.name!r} does not exist")
        self._users[user.name] = attrs.evolve(stored, created=old.created)

    async def get_user(self, name: str) -> User | None:
        self._check_open()
        found = self._users.get(name)
        return _user(found) if found else None

    async def list_users(self) -> list[User]:
        self._check_open()
        return [_user(self._users[name]) for name in sorted(self._users)]

    async def delete_user(self, name: str) -> bool:
        """Remove the user and every session and pending hand-off that belongs to them."""
        self._check_open()
        self._end_user_sessions(name)
        self._drop(self._links, lambda link: link.user == name)
        self._drop(self._devices, lambda d: d.user == name)
        self._recovery.pop(name, None)
        return self._users.pop(name, None) is not None

    # -- resources --------------------------------------------------------------

    async def put_resource(self, res: Resource) -> None:
        self._check_open()
        self._resources[(res.kind, res.name)] = _resource(res)

    async def get_resource(self, kind: str, name: str) -> Resource | None:
        self._check_open()
        found = self._resources.get((kind, name))
        return _resource(found) if found else None

    async def list_resources(self, kind: str) -> list[Resource]:
        self._check_open()
        return [_resource(r) for (k, _), r in sorted(self._resources.items()) if k == kind]

    async def delete_resource(self, kind: str, name: str) -> bool:
        self._check_open()
        return self._resources.pop((kind, name), None) is not None

    # -- join tokens ------------------------------------------------------------

    async def add_token(self, token: JoinToken) -> None:
        self._check_open()
        stored = _token(token)
        if token.token_hash in self._tokens:
            raise AlreadyExists("join token already exists")
        self._tokens[token.token_hash] = stored

    async def get_token(self, token_hash: str) -> JoinToken | None:
        self._check_open()
        return self._tokens.get(token_hash)

    async def list_tokens(self) -> list[JoinToken]:
        self._check_open()
        return sorted(self._tokens.values(), key=lambda t: (t.created, t.token_hash))

    async def delete_token(self, token_hash: str) -> bool:
        self._check_open()
        return self._tokens.pop(token_hash, None) is not None

    async def redeem_token(self, token_hash: str, now: float, agent: Agent) -> Agent | None:
        """Take one use of a live token and store ``agent`` with the token's scope. None
        when the token is unknown, expired or used up; AlreadyExists (and no use taken)
        when the host id is recorded with another key. Atomic: nothing awaits in between."""
        self._check_open()
        known = self._agents.get(agent.host_id)
        if known is not None and known.key_pin != agent.key_pin:
            raise AlreadyExists(f"agent {agent.host_id} is recorded with another key")
        token = self._tokens.get(token_hash)
        if token is None or not token.expires > now or (
                token.uses_left is not None and token.uses_left <= 0):
            return None
        stored = _agent(attrs.evolve(agent, scope=token.scope))
        if token.uses_left is not None:
            self._tokens[token_hash] = attrs.evolve(token, uses_left=token.uses_left - 1)
        self._agents[agent.host_id] = stored
        return stored

    # -- bots -------------------------------------------------------------------

    async def create_bot(self, bot: Bot, token: JoinToken) -> None:
        self._check_open()
        stored, stored_token = _bot(bot), _token(token)
        if bot.name in self._bots:
            raise AlreadyExists(f"bot {bot.name} already exists")
        if token.token_hash in self._tokens:
            raise AlreadyExists("join token already exists")
        self._bots[bot.name] = stored
        self._tokens[token.token_hash] = stored_token

    async def get_bot(self, name: str) -> Bot | None:
        self._check_open()
        return self._bots.get(name)

    async def list_bots(self) -> list[Bot]:
        self._check_open()
        return [self._bots[n] for n in sorted(self._bots)]

    async def delete_bot(self, name: str) -> bool:
        self._check_open()
        self._drop(self._tokens, lambda t: t.kind == "bot" and t.bot == name)
        return self._bots.pop(name, None) is not None

    async def redeem_bot_token(self, token_hash: str, now: float,
                               cert_expires: float) -> Bot | None:
        """Take one use of a live bot token and advance its bot's generation. None when
        the token is unknown, expired, used up, not a bot's, or its bot is gone."""
        self._check_open()
        token = self._tokens.get(token_hash)
        if token is None or token.kind != "bot" or not token.expires > now or (
                token.uses_left is not None and token.uses_left <= 0):
            return None
        bot = self._bots.get(token.bot)
        if bot is None:
            return None
        if token.uses_left is not None:
            self._tokens[token_hash] = attrs.evolve(token, uses_left=token.uses_left - 1)
        bot = self._bots[bot.name] = _bot(attrs.evolve(
            bot, generation=bot.generation + 1, cert_expires=cert_expires))
        return bot

    async def advance_bot(self, name: str, generation: int,
                          cert_expires: float) -> Bot | None:
        """Generation + 1 if it is ``generation`` now (compare and set); None otherwise."""
        self._check_open()
        bot = self._bots.get(name)
        if bot is None or bot.generation != generation:
            return None
        bot = self._bots[name] = _bot(attrs.evolve(
            bot, generation=generation + 1, cert_expires=cert_expires))
        return bot

    # -- agents -----------------------------------------------------------------

    async def put_agent(self, agent: Agent) -> None:
        self._check_open()
        self._agents[agent.host_id] = _agent(agent)

    async def get_agent(self, host_id: str) -> Agent | None:
        self._check_open()
        return self._agents.get(host_id)

    async def list_agents(self) -> list[Agent]:
        self._check_open()
        return [self._agents[h] for h in sorted(self._agents)]

    async def update_agent(self, host_id: str, **state: Any) -> bool:
        """Set some of the agent's state fields; False if unknown. ``only_proxy``: change
        nothing unless the record still names that proxy."""
        only_proxy = state.pop("only_proxy", None)
        if not state or not set(state) <= AGENT_STATE:
            raise BackendError(f"update_agent: unknown fields {sorted(set(state) - AGENT_STATE)}")
        self._check_open()
        known = self._agents.get(host_id)
        if known is None or (only_proxy is not None and known.proxy_id != only_proxy):
            return False
        self._agents[host_id] = _agent(attrs.evolve(known, **state))
        return True

    # -- sessions ---------------------------------------------------------------

    async def put_web_session(self, s: WebSession) -> None:
        self._check_open()
        self._web_sessions[s.id_hash] = _web_session(s)

    async def get_web_session(self, id_hash: str) -> WebSession | None:
        self._check_open()
        found = self._web_sessions.get(id_hash)
        return _web_session(found) if found else None

    async def list_user_web_sessions(self, user: str) -> list[WebSession]:
        self._check_open()
        found = [_web_session(s) for s in self._web_sessions.values() if s.user == user]
        return sorted(found, key=lambda s: s.created)[:1000]

    async def delete_web_session(self, id_hash: str) -> list[str]:
        """End the web session with its app sessions and hand-offs; return the app hashes."""
        self._check_open()
        ended = self._drop(self._app_sessions, lambda s: s.web_session == id_hash)
        self._drop(self._auth_codes, lambda c: c.web_session == id_hash)
        self._web_sessions.pop(id_hash, None)
        return ended

    async def put_app_session(self, s: AppSession) -> None:
        self._check_open()
        self._app_sessions[s.id_hash] = _app_session(s)

    async def get_app_session(self, id_hash: str) -> AppSession | None:
        self._check_open()
        return self._app_sessions.get(id_hash)

    async def delete_app_session(self, id_hash: str) -> bool:
        self._check_open()
        return self._app_sessions.pop(id_hash, None) is not None

    async def delete_user_sessions(self, user: str) -> list[str]:
        """End every web session of ``user`` with its app sessions and hand-offs (a lock)."""
        self._check_open()
        return self._end_user_sessions(user)

    async def delete_app_sessions(self, app: str, user: str | None = None) -> list[str]:
        """End the app sessions (and pending hand-offs) on ``app``, of one user or everyone."""
        self._check_open()
        webs = {h for h, s in self._web_sessions.items() if user is None or s.user == user}
        self._drop(self._auth_codes, lambda c: c.app == app and (user is None
                                                                 or c.web_session in webs))
        return self._drop(self._app_sessions,
                          lambda s: s.app == app and (user is None or s.user == user))

    def _end_user_sessions(self, user: str) -> list[str]:
        webs = {h for h, s in self._web_sessions.items() if s.user == user}
        self._drop(self._auth_codes, lambda c: c.web_session in webs)
        ended = self._drop(self._app_sessions, lambda s: s.user == user)
        self._drop(self._web_sessions, lambda s: s.user == user)
        return ended

    @staticmethod
    def _drop(table: dict, doomed) -> list[str]:
        """Delete the records ``doomed`` picks; return their keys."""
        keys = [key for key, record in table.items() if doomed(record)]
        for key in keys:
            del table[key]
        return keys

    # -- auth codes -------------------------------------------------------------

    async def put_auth_code(self, c: AuthCode) -> None:
        self._check_open()
        if c.code_hash in self._auth_codes:
            raise AlreadyExists("auth code already exists")
        self._auth_codes[c.code_hash] = attrs.evolve(c, expires=_real(c.expires),
                                                     mfa_verified=bool(c.mfa_verified))

    async def take_auth_code(self, code_hash: str) -> AuthCode | None:
        """Read and delete at once, so a code can be redeemed at most once."""
        self._check_open()
        return self._auth_codes.pop(code_hash, None)

    # -- outstanding SAML requests ------------------------------------------------

    async def put_saml_request(self, r: SamlRequest) -> None:
        self._check_open()
        if r.request_id in self._saml_requests:
            raise AlreadyExists("SAML request already exists")
        self._saml_requests[r.request_id] = attrs.evolve(r, expires=_real(r.expires))

    async def take_saml_request(self, request_id: str, connector: str,
                                now: float) -> SamlRequest | None:
        """Delete and return it if it is the connector's and not expired: at most once."""
        self._check_open()
        found = self._saml_requests.pop(request_id, None)
        if found is None or found.connector != connector or found.expires <= now:
            return None
        return found

    # -- pending sign-in steps ------------------------------------------------------

    async def put_signin_state(self, s: SignInState, now: float, limit: int) -> None:
        self._check_open()
        if s.key_hash in self._signin_states:
            raise AlreadyExists("sign-in step already exists")
        same = sorted((st.expires, st.key_hash) for st in self._signin_states.values()
                      if st.kind == s.kind)
        if len(same) >= limit:
            live = [(e, k) for e, k in same if e > now]
            for _, key in [x for x in same if x[0] <= now] + live[:max(0, len(live) - limit + 1)]:
                del self._signin_states[key]
        self._signin_states[s.key_hash] = attrs.evolve(s, expires=_real(s.expires))

    async def get_signin_state(self, kind: str, key_hash: str,
                               now: float) -> SignInState | None:
        self._check_open()
        found = self._signin_states.get(key_hash)
        return found if found is not None and found.kind == kind and found.expires > now \
            else None

    async def take_signin_state(self, kind: str, key_hash: str,
                                now: float) -> SignInState | None:
        self._check_open()
        found = self._signin_states.get(key_hash)
        if found is None or found.kind != kind:
            return None
        del self._signin_states[key_hash]
        return found if found.expires > now else None

    # -- invite/reset links, second factors, recovery codes ----------------------

    async def put_user_link(self, link: UserLink) -> None:
        """Store a link; every other link of the same user stops working."""
        self._check_open()
        self._drop(self._links, lambda old: old.user == link.user)
        self._links[link.token_hash] = attrs.evolve(
            link, created=_real(link.created), expires=_real(link.expires),
            used=_real(link.used))

    async def get_user_link(self, token_hash: str) -> UserLink | None:
        self._check_open()
        return self._links.get(token_hash)

    async def use_user_link(self, token_hash: str, now: float) -> UserLink | None:
        """Mark a live, unused link used and return it; None when it is not (atomic)."""
        self._check_open()
        link = self._links.get(token_hash)
        if link is None or link.used is not None or not link.expires > now:
            return None
        self._links[token_hash] = used = attrs.evolve(link, used=_real(now))
        return used

    async def add_mfa_device(self, device: MfaDevice) -> None:
        self._check_open()
        key = (device.user, device.name)
        if key in self._devices:
            raise AlreadyExists(f"device {device.name!r} already exists")
        self._devices[key] = attrs.evolve(device, counter=int(device.counter),
                                          created=_real(device.created))

    async def list_mfa_devices(self, user: str) -> list[MfaDevice]:
        self._check_open()
        return [d for (u, _), d in sorted(self._devices.items()) if u == user]

    async def delete_mfa_device(self, user: str, name: str) -> bool:
        self._check_open()
        return self._devices.pop((user, name), None) is not None

    async def advance_mfa_counter(self, user: str, name: str, counter: int) -> bool:
        """Raise the device's counter to ``counter`` if it is lower; False otherwise
        (a replayed code or a cloned authenticator). Atomic."""
        self._check_open()
        device = self._devices.get((user, name))
        if device is None or not counter > device.counter:
            return False
        self._devices[(user, name)] = attrs.evolve(device, counter=int(counter))
        return True

    async def set_recovery_codes(self, user: str, code_hashes: list[str]) -> None:
        """Replace the user's recovery codes."""
        self._check_open()
        self._recovery[user] = set(code_hashes)

    async def use_recovery_code(self, user: str, code_hash: str) -> bool:
        """Delete the code and say whether it was there: each works once."""
        self._check_open()
        codes = self._recovery.get(user, set())
        if code_hash not in codes:
            return False
        codes.discard(code_hash)
        return True

    async def count_recovery_codes(self, user: str) -> int:
        self._check_open()
        return len(self._recovery.get(user, ()))

    # -- locks ------------------------------------------------------------------

    async def put_lock(self, lock: Lock) -> None:
        """Store a lock (replacing one with the same id)."""
        if lock.user is None and lock.app is None and lock.agent is None:
            raise BackendError("a lock needs a user, an app, or both (or an agent)")
        self._check_open()
        self._locks[lock.id] = _lock(lock)

    async def list_locks(self, now: float) -> list[Lock]:
        """Locks still in force at ``now``, oldest first."""
        self._check_open()
        live = [x for x in self._locks.values() if x.expires is None or x.expires > now]
        return sorted(live, key=lambda x: (x.created, x.id))

    async def delete_lock(self, id: str) -> bool:
        self._check_open()
        return self._locks.pop(id, None) is not None

    # -- access requests ------------------------------------------------------------

    async def put_access_request(self, r: AccessRequest) -> None:
        self._check_open()
        if r.id in self._requests:
            raise AlreadyExists("access request already exists")
        self._requests[r.id] = _access_request(r)

    async def get_access_request(self, id: str) -> AccessRequest | None:
        self._check_open()
        return self._requests.get(id)

    async def list_access_requests(self, user: str | None = None,
                                   states: tuple[str, ...] | None = None
                                   ) -> list[AccessRequest]:
        self._check_open()
        found = [r for r in self._requests.values()
                 if (user is None or r.user == user) and (states is None or r.state in states)]
        return sorted(found, key=lambda r: (r.created, r.id))

    async def update_access_request(self, r: AccessRequest, state: str, reviews: int) -> bool:
        self._check_open()
        stored = self._requests.get(r.id)
        if stored is None or stored.state != state or len(stored.reviews) != reviews:
            return False
        self._requests[r.id] = _access_request(r)
        return True

    # -- audit ------------------------------------------------------------------

    async def append_audit(self, events: list[AuditEvent]) -> None:
        """Ids already stored (or repeated in the batch) are skipped, as INSERT OR IGNORE."""
        self._check_open()
        stored = [_event(e) for e in events]     # all or nothing: encode every one first
        for e in stored:
            if e.id not in self._audit_ids:
                self._audit.append(e)
                self._audit_ids.add(e.id)

    async def append_audit_chained(self, chain: str, events: list[AuditEvent],
                                   link: Callable[[AuditEvent, str, int, str], AuditEvent]
                                   ) -> list[AuditEvent]:
        self._check_open()
        head = await self.audit_chain_head(chain)
        seq, prev = (head.seq, head.digest) if head is not None else (0, GENESIS)
        stored = []
        for e in events:
            if e.id in self._audit_ids or any(s.id == e.id for s in stored):
                continue
            seq += 1
            chained = link(_event(e), chain, seq, prev)
            prev = chained.digest
            stored.append(chained)
        await self.append_audit(stored)
        return stored

    async def audit_chain_head(self, proxy_id: str) -> AuditEvent | None:
        self._check_open()
        chained = [e for e in self._audit if e.proxy_id == proxy_id and e.seq]
        return _event(max(chained, key=lambda e: e.seq)) if chained else None

    async def audit_chain(self, proxy_id: str, offset: int = 0, limit: int = 1000,
                          *, seq: int | None = None) -> list[AuditEvent]:
        self._check_open()
        found = [e for e in self._audit if e.proxy_id == proxy_id and e.seq
                 and (seq is None or e.seq == seq)]
        offset, limit = max(0, int(offset)), max(0, min(int(limit), MAX_SEARCH_LIMIT))
        return [_event(e) for e in found[offset:offset + limit]]

    async def audit_chains(self) -> dict[str, int]:
        self._check_open()
        counts: dict[str, int] = {}
        for e in self._audit:
            key = e.proxy_id if e.proxy_id and e.seq else ""
            counts[key] = counts.get(key, 0) + 1
        return counts

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
        reverse with ``newest_first``); type, actor, target, outcome and the request_id
        field, when given, match exactly (the limit counts matches, after ``offset``)."""
        self._check_open()
        limit = max(0, min(int(limit), MAX_SEARCH_LIMIT))
        offset = max(0, int(offset))
        exact = [(name, value) for name, value in
                 (("type", type), ("actor", actor), ("target", target), ("outcome", outcome))
                 if value is not None]
        found = [
            e for e in self._audit
            if (since is None or e.time >= float(since))
            and (until is None or e.time < float(until))
            and all(getattr(e, name) == value for name, value in exact)
            and (request_id is None or e.fields.get("request_id") == request_id)
        ]
        found.sort(key=lambda e: e.time)   # stable: ties stay in insertion order
        if newest_first:
            found.reverse()
        return [_event(e) for e in found[offset:offset + limit]]

    async def get_audit_event(self, id: str) -> AuditEvent | None:
        self._check_open()
        for e in self._audit:
            if e.id == id:
                return _event(e)
        return None

    # -- cluster keys -----------------------------------------------------------

    def _has(self, kind: str, state: str) -> bool:
        return any(k.kind == kind and k.state == state for k in self._keys.values())

    async def add_key(self, key: KeyRecord) -> bool:
        self._check_open()
        stored = attrs.evolve(key, created=_real(key.created),
                              activate_at=_real(key.activate_at), retire_at=_real(key.retire_at))
        if (key.kind, key.id) in self._keys or (
                key.state in ("current", "next") and self._has(key.kind, key.state)):
            return False
        self._keys[(key.kind, key.id)] = stored
        return True

    async def list_keys(self, kind: str | None = None) -> list[KeyRecord]:
        self._check_open()
        found = [k for k in self._keys.values() if kind is None or k.kind == kind]
        return sorted(found, key=lambda k: (k.created, k.id))

    async def set_key_states(self, changes: list[tuple[str, KeyRecord]]) -> bool:
        self._check_open()
        keys = dict(self._keys)
        for expected, key in changes:
            old = keys.get((key.kind, key.id))
            if old is None or old.state != expected:
                return False
            keys[(key.kind, key.id)] = attrs.evolve(
                old, state=key.state, material=key.material, activate_at=_real(key.activate_at),
                retire_at=_real(key.retire_at))
            if key.state in ("current", "next") and sum(
                    1 for k in keys.values() if k.kind == key.kind and k.state == key.state) > 1:
                raise AlreadyExists(f"memory backend: two {key.state} keys of one kind")
        self._keys = keys
        return True

    async def delete_key(self, kind: str, id: str) -> bool:
        self._check_open()
        return self._keys.pop((kind, id), None) is not None

    # -- several proxies --------------------------------------------------------

    async def heartbeat_proxy(self, proxy: ProxyRecord) -> None:
        self._check_open()
        self._proxies[proxy.proxy_id] = attrs.evolve(
            proxy, started=_real(proxy.started), heartbeat=_real(proxy.heartbeat))
        self._drop_tunnels(proxy.proxy_id, before=_real(proxy.started))

    async def list_proxies(self, since: float) -> list[ProxyRecord]:
        self._check_open()
        return [p for _, p in sorted(self._proxies.items()) if p.heartbeat >= since]

    async def delete_proxy(self, proxy_id: str) -> bool:
        self._check_open()
        self._drop_tunnels(proxy_id)
        return self._proxies.pop(proxy_id, None) is not None

    async def forget_proxies(self, before: float) -> list[str]:
        self._check_open()
        gone = sorted(pid for pid, p in self._proxies.items() if p.heartbeat < before)
        for pid in gone:
            del self._proxies[pid]
            self._drop_tunnels(pid)
        return gone

    def _drop_tunnels(self, proxy_id: str, before: float | None = None) -> None:
        for key, tunnel in list(self._agent_tunnels.items()):
            if tunnel.proxy_id == proxy_id and (before is None or tunnel.since < before):
                del self._agent_tunnels[key]

    async def put_agent_tunnel(self, tunnel: AgentTunnel) -> None:
        self._check_open()
        self._agent_tunnels[(tunnel.host_id, tunnel.proxy_id)] = attrs.evolve(
            tunnel, since=_real(tunnel.since))

    async def delete_agent_tunnel(self, host_id: str, proxy_id: str) -> bool:
        self._check_open()
        return self._agent_tunnels.pop((host_id, proxy_id), None) is not None

    async def list_agent_tunnels(self) -> list[AgentTunnel]:
        self._check_open()
        return [t for _, t in sorted(self._agent_tunnels.items())]

    # -- housekeeping -----------------------------------------------------------

    async def delete_expired(self, now: float) -> int:
        """Drop expired sessions, hand-offs, join tokens and locks; return how many went."""
        self._check_open()
        removed = 0
        for table in (self._auth_codes, self._app_sessions, self._web_sessions, self._tokens,
                      self._saml_requests, self._signin_states):
            removed += len(self._drop(table, lambda r: r.expires <= now))
        removed += len(self._drop(self._locks,
                                  lambda x: x.expires is not None and x.expires <= now))
        removed += len(self._drop(self._links, lambda x: x.expires + LINK_KEEP <= now))
        removed += len(self._drop(self._requests, lambda r: r.state in ("denied", "expired")
                                  and r.expires + LINK_KEEP <= now))
        return removed
