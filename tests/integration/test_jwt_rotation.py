"""`apptunnel auth rotate --type jwt` with real processes: proxy, agent and the sample app
verifying every request's JWT against the proxy's JWKS (apptunnel/jwks.py), throughout
the rotation. No request may fail verification; afterwards tokens carry the new kid and
the old kid has left the JWKS once its tokens expired."""

from __future__ import annotations

import json
import re
import time

import requests
import yaml

from apptunnel.auth.keystore import PUBLISH_DELAY, RETIRE_MARGIN
from tests.support.cluster import BIN, Browser, Child, Cluster, free_port, wait_until
from tests.support.localhost import localhost_resolution

PASSWORD = "correct horse battery staple"
JWT_TTL = 4.0
VERIFIED = re.compile(r"signature verified with key (\S+) ")


def jwks_kids(cluster: Cluster) -> list[str]:
    with localhost_resolution():
        doc = requests.get(cluster.url(path="/.well-known/jwks.json"), verify=cluster.ca_file,
                           timeout=10).json()
    return [key["kid"] for key in doc["keys"]]


def test_no_request_fails_verification_through_a_jwt_rotation(tmp_path):
    app_port = free_port()
    cluster = Cluster([{"name": "hello", "uri": f"http://127.0.0.1:{app_port}",
                        "labels": {"team": "sre"}}], root=tmp_path)
    config = yaml.safe_load(cluster.proxy_config.read_text())
    config["jwt"] = {"ttl": f"{int(JWT_TTL)}s"}
    cluster.proxy_config.write_text(yaml.safe_dump(config))
    app = None
    try:
        cluster.start_proxy()
        app = Child("app", [str(BIN / "python"), "-m", "apptunnel.sample_app",
                            "--listen", f"127.0.0.1:{app_port}",
                            "--jwks-url", cluster.url(path="/.well-known/jwks.json"),
                            "--ca-file", cluster.ca_file,
                            "--audience", cluster.url("hello").rstrip("/")],
                    tmp_path, tmp_path / "app.log")
        cluster.add_role({"kind": "role", "metadata": {"name": "sre"},
                          "spec": {"allow": {"app_labels": {"team": "sre"}}}})
        cluster.add_user("alice", ["sre"], PASSWORD)
        cluster.start_agent()
        browser = Browser(cluster)
        landed = wait_until(
            lambda: (lambda r: r if r.status_code == 200 else None)(
                browser.login_through(cluster.url("hello", "/api/whoami"), "alice", PASSWORD)),
            30, "alice to reach the sample app")
        [old] = jwks_kids(cluster)
        assert json.loads(landed.text)["identity"]["verified"] is True

        def whoami() -> str:
            r = browser.get(cluster.url("hello", "/api/whoami"))
            assert r.status_code == 200, r.text
            identity = r.json()["identity"]
            assert identity["verified"] is True, identity     # NONE may fail
            return VERIFIED.search(identity["reason"]).group(1)

        plan = json.loads(cluster.cli("auth", "rotate", "--type", "jwt", "--format",
                                      "json").stdout)
        new = plan["new_key"]
        assert plan["old_key"] == old and new != old
        # The local proxy was nudged through the control socket: published at once.
        assert jwks_kids(cluster) == [old, new]
        seen: list[str] = []
        deadline = time.monotonic() + PUBLISH_DELAY + JWT_TTL + RETIRE_MARGIN + 20
        while time.monotonic() < deadline and old in jwks_kids(cluster):
            seen.append(whoami())
            time.sleep(0.2)
        assert old not in jwks_kids(cluster), "the old key never left the JWKS"
        assert seen[0] == old and seen[-1] == new
        # Switched once, never back: each proxy decides by the same stored time.
        assert seen == sorted(seen, key=lambda kid: kid == new), seen
        assert len(seen) > 50, len(seen)
        assert jwks_kids(cluster) == [new] and whoami() == new
        status = json.loads(cluster.cli("auth", "status", "--format", "json").stdout)
        assert [(k["id"], k["state"]) for k in status if k["kind"] == "jwt"] == [
            (new, "current")]
        events = json.loads(cluster.cli("audit", "search", "--type", "auth.rotate",
                                         "--format", "json").stdout)
        assert [e["outcome"] for e in events] == ["success"]
    finally:
        if app is not None:
            app.stop()
        cluster.stop()
