"""The installed `apptunnel` as a user runs it against a Cluster: a profile in its own
APPTUNNEL_HOME, `apptunnel login` with the CA pin, and `apptunnel proxy app` subprocesses
stopped by the PID we hold."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.support.cluster import BIN, Child, Cluster, wait_until


def user_env(home: Path) -> dict:
    """Our environment with the profile directory set to `home`."""
    return {**os.environ, "APPTUNNEL_HOME": str(home)}


def ca_pin(cluster: Cluster) -> str:
    """The cluster CA's pin, as an admin hands it out with a join token."""
    out = cluster.cli("tokens", "add", "--type", "app", "--ttl", "1m", "--format", "json").stdout
    return json.loads(out)["ca_pin"]


def log_in(cluster: Cluster, name: str, home: Path, password: str, pin: str, *extra: str) -> None:
    """Sign `name` in with the installed `apptunnel login` into its own home; must succeed."""
    result = subprocess.run(
        [str(BIN / "apptunnel"), "login", "--proxy", cluster.public_addr, "--user", name,
         "--password-stdin", "--ca-pin", pin, *extra], input=password + "\n",
        capture_output=True, text=True, timeout=60, env=user_env(home), cwd=str(home.parent))
    assert result.returncode == 0, result.stderr


class ProxyApp:
    """`apptunnel proxy app NAME --port SPEC` as a subprocess, ready once it prints its port."""

    def __init__(self, home: Path, name: str, spec: str, wait: bool = True,
                 extra: tuple[str, ...] = ()):
        self.log_path = home.parent / f"proxy-app-{name}-{spec.replace(':', '-')}.log"
        self.child = Child("proxy app", [str(BIN / "apptunnel"), "proxy", "app", name,
                                         "--port", spec, *extra], home.parent, self.log_path)
        if wait:
            wait_until(self._ready, 20, f"proxy app {name} to listen")

    def _ready(self) -> bool:
        if not self.child.alive():
            raise AssertionError("proxy app exited:\n" + self.child.log_tail())
        return "Proxying connections" in self.log_path.read_text()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.child.stop()


def start(home: Path, name: str, spec: str, wait: bool = True,
          extra: tuple[str, ...] = ()) -> ProxyApp:
    """A ProxyApp for the user whose profile is in `home`."""
    old = os.environ.get("APPTUNNEL_HOME")
    os.environ["APPTUNNEL_HOME"] = str(home)  # Child passes our environment on
    try:
        return ProxyApp(home, name, spec, wait, extra)
    finally:
        if old is None:
            del os.environ["APPTUNNEL_HOME"]
        else:
            os.environ["APPTUNNEL_HOME"] = old


def online_apps(home: Path) -> set[str]:
    """The apps the user of `home` sees online, by the installed `apptunnel apps ls`."""
    out = subprocess.run([str(BIN / "apptunnel"), "apps", "ls", "--format", "json"],
                         capture_output=True, text=True, timeout=30, env=user_env(home)).stdout
    return {a["name"] for a in json.loads(out)["apps"] if a["online"]} if out.strip() else set()
