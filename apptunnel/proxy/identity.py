"""This proxy's own id: stable across restarts, unique among the proxies of a cluster.

Several proxies share one backend, so each needs a name of its own for what it records:
the tunnels its agents hold, its registration and heartbeat, and its audit hash chain
(a chain must continue after a restart, so the id cannot be new each start). It is 16
random hex digits kept in ``DATA_DIR/proxy_id``; two data dirs never share one.
"""

from __future__ import annotations

import os
import re
import secrets

from apptunnel.files import write_file

__all__ = ["load_or_create_proxy_id", "PROXY_ID_FILE"]

PROXY_ID_FILE = "proxy_id"
_VALID = re.compile(r"[0-9a-f]{16}")


class ProxyIdError(ValueError):
    """The id file exists but is not one we wrote."""


def load_or_create_proxy_id(data_dir: str) -> str:
    """The id in ``data_dir`` (made on first start); a damaged file is an error, not replaced."""
    path = os.path.join(data_dir, PROXY_ID_FILE)
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read().strip()
    except FileNotFoundError:
        proxy_id = secrets.token_hex(8)
        write_file(path, proxy_id.encode() + b"\n", 0o600)
        return proxy_id
    if not _VALID.fullmatch(text):
        raise ProxyIdError(f"{path}: not a proxy id (16 hex digits); remove it to make a new one")
    return text
