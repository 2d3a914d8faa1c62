"""What a user, role or trait name may be: one rule each, for the CLI and for sign-in.

Names reach log lines, audit events, certificates and JWTs, so they are short and plain.
A connector's user (an LDAP ``uid``) must be a valid user name too, or it cannot sign in.
"""

from __future__ import annotations

import re

USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}\Z")
ROLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
TRAIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}\Z")
# A bot's name: it becomes the principal ``bot:NAME`` (auth/bots.py), which no user name
# can be (``:`` is not allowed in USER_NAME), so a bot can never be taken for a user.
BOT_NAME = re.compile(r"[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?\Z")
