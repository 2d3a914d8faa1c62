"""More agent processes for a `Cluster`, each in its own data dir, and what they serve.

`Agent` starts the installed `twistd apptunnel-agent` with any config (``apps``,
``resources`` selectors) and, optionally, a different view of one host name: an agent
whose ``app.failover.test`` resolves to an address where nothing listens stands for an
agent on another machine whose local instance of the app is down (the same uri, another
host). That is done with a ``sitecustomize`` on the agent's PYTHONPATH, so the agent's
own code runs unchanged.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import yaml

from tests.support.cluster import BIN, Child, Cluster

FAILOVER_HOST = "app.failover.test"

_SITECUSTOMIZE = '''\
import socket

_real = socket.getaddrinfo


def _getaddrinfo(host, *args, **kwargs):
    if isinstance(host, (bytes, str)) and (host.decode() if isinstance(host, bytes) else host) == {host!r}:
        host = {address!r}
    return _real(host, *args, **kwargs)


socket.getaddrinfo = _getaddrinfo
'''


def token(cluster: Cluster, *args: str) -> dict:
    """A new agent join token (``tokens add --type app``), as JSON."""
    return json.loads(cluster.cli("tokens", "add", "--type", "app", "--ttl", "1h",
                                  "--format", "json", *args).stdout)


def agents(cluster: Cluster) -> dict[str, dict]:
    return {a["id"]: a for a in json.loads(cluster.cli("agents", "ls", "--format", "json").stdout)}


def serving(cluster: Cluster) -> dict[str, set[str]]:
    """app -> ids of the agents connected and serving it (`agents ls`)."""
    out: dict[str, set[str]] = {}
    for agent in agents(cluster).values():
        if agent["connected_since"]:
            for app in agent["apps"]:
                out.setdefault(app, set()).add(agent["id"])
    return out


class Agent:
    """One more agent of the cluster; ``resolve``: FAILOVER_HOST -> this address for it."""

    def __init__(self, cluster: Cluster, name: str, config: dict, token: dict | None,
                 resolve: str | None = None):
        self.cluster, self.name, self.extra = cluster, name, config
        self.data_dir = cluster.root / name
        self.config = cluster.root / f"{name}.yaml"
        self.env = dict(os.environ)
        if resolve is not None:
            site = cluster.root / f"{name}-site"
            site.mkdir(exist_ok=True)
            (site / "sitecustomize.py").write_text(
                _SITECUSTOMIZE.format(host=FAILOVER_HOST, address=resolve))
            self.env["PYTHONPATH"] = str(site)
        self.child: Child | None = None
        self.start(token)

    def start(self, token: dict | None = None) -> None:
        config = {
            "data_dir": str(self.data_dir),
            "proxy_addr": f"127.0.0.1:{self.cluster.tunnel_port}",
            "diag_addr": "127.0.0.1:0",     # a free port: agents and clusters run side by side
            "keepalive": {"interval": "1s", "timeout": "3s"},
            **self.extra,
        }
        if token is not None:
            config["join"] = {"token": token["token"], "ca_pin": token["ca_pin"]}
        self.config.write_text(yaml.safe_dump(config))
        self.child = Child(self.name, [str(BIN / "twistd"), "-n", "--pidfile=", "apptunnel-agent",
                                       "--config", str(self.config)],
                           self.cluster.root, self.cluster.root / f"{self.name}.log",
                           env=self.env)

    @property
    def host_id(self) -> str:
        return (self.data_dir / "host_id").read_text().strip()

    def log(self) -> str:
        return self.child.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """``kill -9``: no go-away, no clean close."""
        self.child.proc.send_signal(signal.SIGKILL)
        self.child.proc.wait(10)

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


def write_app(cluster: Cluster, name: str, doc: dict) -> Path:
    path = cluster.root / f"app-{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path
