"""Config files as tests write them: `write` puts dedented YAML under tmp_path and returns
its path; `PROXY_OK` is a minimal valid proxy.yaml that tests extend. Shared by the
proxy.yaml test modules."""

from __future__ import annotations

import textwrap
from pathlib import Path

PROXY_OK = """\
cluster_name: test
data_dir: data
public_addr: apptunnel.localhost:3080
web_listen_addr: 127.0.0.1:3080
tunnel_listen_addr: 127.0.0.1:3024
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)
