"""Join tokens for agents: created (the secret shown once, only its hash stored), listed,
removed. A token may limit what its agent announces (app names, labels) and how many
agents join with it."""

from __future__ import annotations

import re

from apptunnel.admin.context import CONFLICT, NOT_FOUND, Actor, AdminContext, AdminError
from apptunnel.admin.locks import iso_time
from apptunnel.auth.tokens import new_secret, secret_hash
from apptunnel.backend.records import JoinToken, Scope

MAX_TTL = 30 * 86400.0
MAX_USES = 10_000
SHOWN_HASH = 12
APP_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
LABEL_KEY = re.compile(r"[^=\s]{1,63}\Z")
LABEL_VALUE = re.compile(r"[^\x00-\x1f\x7f]{0,255}\Z")
_HASH_PREFIX = re.compile(r"[0-9a-f]{6,64}\Z")


def check_scope(apps, labels) -> Scope:
    """The apps (names) and labels (key -> value) a token's agent may announce."""
    apps = tuple(dict.fromkeys(apps or ()))
    for name in apps:
        if not isinstance(name, str) or not APP_NAME.match(name):
            raise AdminError(f"expected app names like a,b, got {name!r}", field="apps")
    pairs = []
    for key, value in (labels or {}).items():
        if not isinstance(key, str) or not LABEL_KEY.match(key) \
                or not isinstance(value, str) or not LABEL_VALUE.match(value):
            raise AdminError(f"expected KEY=VALUE, got {key!r}={value!r}", field="labels")
        pairs.append((key, value))
    return Scope(apps=apps or None, labels=tuple(sorted(pairs)))


class TokenAdmin:
    """Create, list and remove agents' join tokens; each change audited once."""

    def __init__(self, ctx: AdminContext) -> None:
        self._ctx = ctx

    async def create(self, actor: Actor, ttl: float, uses: int = 1, apps=None,
                     labels=None) -> tuple[str, JoinToken]:
        """(the secret, shown once; the stored token)."""
        if not 0 < ttl <= MAX_TTL:
            raise AdminError("must be more than 0 and at most 30d", field="ttl")
        if isinstance(uses, bool) or not isinstance(uses, int) or not 1 <= uses <= MAX_USES:
            raise AdminError(f"expected a number from 1 to {MAX_USES}", field="uses")
        scope = check_scope(apps, labels)
        secret, now = new_secret(), self._ctx.now()
        token = JoinToken(token_hash=secret_hash(secret), kind="app", expires=now + ttl,
                          created=now, uses_left=uses, scope=scope)
        await self._ctx.backend.add_token(token)
        self._ctx.emit(actor, "token.create", token.token_hash[:SHOWN_HASH], kind=token.kind,
                       expires=iso_time(token.expires), uses=token.uses_left,
                       scope=token.scope.to_json())
        return secret, token

    async def list(self) -> list[JoinToken]:
        return sorted(await self._ctx.backend.list_tokens(), key=lambda t: t.expires)

    async def remove(self, actor: Actor, given: str, by_secret: bool = True) -> JoinToken:
        """Remove by the secret itself or by an unambiguous prefix of its hash. The web
        passes ``by_secret`` False: a secret in a URL would reach logs and history."""
        given = given.strip()
        tokens = await self._ctx.backend.list_tokens()
        full = secret_hash(given)
        matches = [t for t in tokens if t.token_hash == full] if by_secret else []
        if not matches and _HASH_PREFIX.match(given.lower()):
            matches = [t for t in tokens if t.token_hash.startswith(given.lower())]
        if not matches:
            raise AdminError("no join token matches (give the token, or 6+ hex digits of its "
                             "hash from `apptunnel tokens ls`)", NOT_FOUND)
        if len(matches) > 1:
            raise AdminError(f"{len(matches)} tokens match that hash prefix; give more digits",
                             CONFLICT)
        token = matches[0]
        if not await self._ctx.backend.delete_token(token.token_hash):
            raise AdminError("the token was removed by someone else meanwhile", NOT_FOUND)
        self._ctx.emit(actor, "token.delete", token.token_hash[:SHOWN_HASH], kind=token.kind)
        return token
