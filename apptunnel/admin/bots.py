"""Bots (auth/bots.py): added with their one-time join token (the only way to get a token
of kind ``bot``; the secret shown once), listed, removed (cut off at once)."""

from __future__ import annotations

import secrets

from apptunnel.admin.context import CONFLICT, NOT_FOUND, Actor, AdminContext, AdminError
from apptunnel.admin.locks import iso_time
from apptunnel.admin.tokens import MAX_TTL
from apptunnel.admin.users import check_roles
from apptunnel.auth.bots import BOT_PREFIX
from apptunnel.auth.names import BOT_NAME
from apptunnel.auth.tokens import new_secret, secret_hash
from apptunnel.backend.base import AlreadyExists
from apptunnel.backend.records import Bot, JoinToken


def check_bot_name(name: object) -> str:
    if not isinstance(name, str) or not BOT_NAME.match(name):
        shown = name if isinstance(name, str) else repr(name)
        shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                        for c in shown)
        raise AdminError(f"not a valid bot name (lowercase letters, digits, '.', '_', '-'): "
                         f"{shown!r}")
    return name


class BotAdmin:
    """Add, list and remove bots; each change audited once."""

    def __init__(self, ctx: AdminContext) -> None:
        self._ctx = ctx

    async def add(self, actor: Actor, name: str, roles, ttl: float) -> tuple[str, JoinToken]:
        """(the join token's secret, shown once; the stored token)."""
        name = check_bot_name(name)
        roles = check_roles(roles)
        if not 0 < ttl <= MAX_TTL:
            raise AdminError("must be more than 0 and at most 30d", field="ttl")
        missing = await self._ctx.missing_role(roles)
        if missing is not None:
            raise AdminError(f"role {missing!r} does not exist (create it first with "
                             "`apptunnel create -f ROLE.yaml`; `apptunnel get roles` lists "
                             "them); nothing was changed", field="roles")
        secret, now = new_secret(), self._ctx.now()
        token = JoinToken(token_hash=secret_hash(secret), kind="bot", expires=now + ttl,
                          created=now, uses_left=1, bot=name)
        try:
            # The generation starts at random: a certificate of an earlier bot of the same
            # name (removed, then added again) can never match the new one's for a renewal.
            await self._ctx.backend.create_bot(Bot(name, roles, now, secrets.randbelow(2**31)),
                                               token)
        except AlreadyExists:
            raise AdminError(f"bot {name!r} already exists (to join it again, `apptunnel bots "
                             f"rm {name}` and add it anew)", CONFLICT) from None
        self._ctx.emit(actor, "bot.create", BOT_PREFIX + name, roles=list(roles),
                       expires=iso_time(token.expires))
        self._ctx.emit(actor, "token.create", token.token_hash[:12], kind="bot", bot=name,
                       expires=iso_time(token.expires), uses=1)
        return secret, token

    async def list(self) -> list[Bot]:
        return await self._ctx.backend.list_bots()

    async def remove(self, actor: Actor, name: str) -> None:
        name = check_bot_name(name)
        if not await self._ctx.backend.delete_bot(name):
            raise AdminError(f"no bot named {name!r}", NOT_FOUND)
        await self._ctx.nudge()   # the local proxy cuts it off before we answer
        self._ctx.emit(actor, "bot.delete", BOT_PREFIX + name)
