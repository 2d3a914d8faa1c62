"""The identity output: ``tls.crt``, ``tls.key`` and ``ca.crt`` for ``curl --cert``.

Each file is replaced atomically and is 0600 from its first byte (apptunnel/files.py),
so a script reading them never sees half a file; the directory is created 0700. The key
never changes (the bot keeps its key), so a reader that takes the new certificate with
the old key still has a matching pair.
"""

from __future__ import annotations

import os

from apptunnel.files import write_file


def write_identity(path: str, cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    write_file(os.path.join(path, "tls.key"), key_pem, 0o600)
    write_file(os.path.join(path, "ca.crt"), ca_pem, 0o600)
    write_file(os.path.join(path, "tls.crt"), cert_pem, 0o600)
