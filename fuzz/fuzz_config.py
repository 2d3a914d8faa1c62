"""Fuzz the config loaders with arbitrary YAML text written to a file.

Input layout: one byte picks the loader (proxy, agent, multi-document resources), the rest
is the file's content.  Invariants: nothing but ``ConfigError`` leaves a loader; its text
is one line; and the loaders' last-resort net (``cannot load config: ...``) never catches
a ``TypeError``, which would be a validation bug hidden behind a vague message.

Run: ``python fuzz/fuzz_config.py -atheris_runs=20000`` (any libFuzzer flag works).
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import FuzzFailure, run  # noqa: E402

from apptunnel import config as C  # noqa: E402

NAME = "config"
LOADERS = (C.load_proxy_config, C.load_agent_config, C.load_yaml_documents)
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_dir: str | None = None


def _path() -> str:
    """One scratch file per process, rewritten for every input."""
    global _dir
    if _dir is None:
        _dir = tempfile.mkdtemp(prefix="apptunnel-fuzz-config-")
    return os.path.join(_dir, "input.yaml")


def TestOneInput(data: bytes) -> None:  # noqa: N802 - the name atheris looks for
    if not data:
        return
    loader = LOADERS[data[0] % len(LOADERS)]
    path = _path()
    with open(path, "wb") as f:
        f.write(data[1:])
    try:
        loader(path)
    except C.ConfigError as e:
        text = str(e)
        if "\n" in text or "\r" in text:
            raise FuzzFailure(f"ConfigError spans lines: {text!r}") from None
        if isinstance(e.__context__, TypeError):
            raise FuzzFailure(f"TypeError behind {text!r}") from e.__context__


def seeds() -> list[bytes]:
    """The example configs and roles, one per loader."""
    out = []
    for index, name in ((0, "etc/proxy.yaml"), (1, "etc/agent.yaml"),
                        (2, "etc/roles/sre-apps.yaml"), (2, "etc/roles/prod-apps.yaml")):
        with open(os.path.join(_REPO, name), "rb") as f:
            out.append(bytes([index]) + f.read())
    out.append(b"\x00public_addr: a.localhost:3080\ndata_dir: d\nkeepalive: {interval: 1s}\n")
    out.append(b"\x01data_dir: d\nproxy_addr: 127.0.0.1:3024\napps:\n"
               b"  - {name: pg, uri: 'tcp://127.0.0.1', tcp_ports: [5432, 8000-8001]}\n")
    out.append(b"\x02kind: role\n---\nkind: role\nmetadata: {name: &a x}\nspec: *a\n")
    return out


def main() -> None:
    run(NAME, TestOneInput, seeds)


if __name__ == "__main__":
    main()
