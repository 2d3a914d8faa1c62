"""Secrets handed to clients, and how we store and compare them.

Only the SHA-256 of a secret is ever stored, so a copy of the database cannot be
replayed as sessions or join tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_secret() -> str:
    """32 random bytes, URL-safe base64: fits in cookies, URLs and headers as is.

    Never starting with ``-``, so it can be passed as a command-line argument
    (``apptunnel tokens rm TOKEN``) without being taken for an option."""
    while True:
        secret = secrets.token_urlsafe(32)
        if not secret.startswith("-"):
            return secret


def secret_hash(secret: str) -> str:
    """Hex SHA-256: the storage key of a secret (high-entropy, so no salt is needed)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def constant_time_equal(a: str | bytes, b: str | bytes) -> bool:
    """Compare secrets without leaking the matching prefix length through timing."""
    if isinstance(a, str):
        a = a.encode("utf-8", "surrogatepass")
    if isinstance(b, str):
        b = b.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(a, b)


def scope_refusal(scope, name: str, labels: dict[str, str]) -> str | None:
    """Why an agent whose join token had ``scope`` may not announce app ``name`` with
    ``labels``, or None when it may. Names and labels must both fit (deny by default)."""
    if scope.apps is not None and name not in scope.apps:
        return f"its join token allows only apps {', '.join(scope.apps) or '(none)'}"
    for key, value in scope.labels:
        if labels.get(key) != value:
            return f"its join token allows only apps labelled {key}={value}"
    return None


def describe_scope(scope) -> str:
    """``apps a,b; labels k=v`` or ``any app``, for listings."""
    parts = []
    if scope.apps is not None:
        parts.append("apps " + (",".join(scope.apps) or "(none)"))
    if scope.labels:
        parts.append("labels " + ",".join(f"{k}={v}" for k, v in scope.labels))
    return "; ".join(parts) or "any app"
