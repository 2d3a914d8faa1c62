"""Fields of JSON API bodies that several routes take, checked the same way everywhere.

A certificate request (``/v1/certs``, ``/v1/certs/app``, ``/v1/bots/*``, an access
request's certificate) names a public key and may ask for a shorter ``ttl``; an access
request may ask for its elevation's ``ttl``. Garbage in any of them is a 400 before any
work is done.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization

from apptunnel.auth.errors import AuthError

MAX_PUBLIC_KEY = 4 * 1024


def public_key_field(value: Any) -> bytes:
    """The PEM public key of a certificate request, parsed here so garbage is a 400."""
    if not isinstance(value, str) or not value or len(value) > MAX_PUBLIC_KEY:
        raise AuthError(400, "public_key (a PEM public key) is required")
    pem = value.encode("utf-8", "replace")
    try:
        serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise AuthError(400, "public_key is not a valid PEM public key") from None
    return pem


def ttl_field(value: Any) -> float | None:
    """An optional ``ttl`` in seconds (None when absent); a positive number or a 400."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise AuthError(400, "ttl must be a positive number of seconds")
    return float(value)
