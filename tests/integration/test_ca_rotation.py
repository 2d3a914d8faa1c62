"""`apptunnel auth rotate --type user-ca` with real processes: the installed proxy, an
agent with an upstream app, a bot renewing every few seconds and users of the installed
CLI. The proxy lowers the grace floor (`ca_min_grace_period: 1s`, a documented setting),
so a whole rotation (publish delay, grace, retirement) takes seconds."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from apptunnel.auth.keystore import CA_PUBLISH_DELAY, KEY_POLL_INTERVAL
from tests.support.bots import BotProcess, add_bot, curl
from tests.support.cli_user import ca_pin, log_in, online_apps
from tests.support.cluster import PUBLIC_HOST, Cluster, audit, wait_until
from tests.support.upstream import HttpUpstream

PASSWORD = "correct horse battery staple"
GRACE = 6.0         # host-CA test: nothing is checked "still inside the grace" late
USER_GRACE = 10.0   # user-CA test: old certificates are checked inside it after a login


def issued_by(cert_pem: str | bytes, ca_pem: bytes) -> bool:
    cert_pem = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    try:
        x509.load_pem_x509_certificate(cert_pem).verify_directly_issued_by(
            x509.load_pem_x509_certificate(ca_pem))
    except (ValueError, InvalidSignature):
        return False
    return True


def through_app(cluster: Cluster, cert, key, ca) -> str:
    """The status curl got from the app with this client certificate ('000': refused)."""
    result = curl("--cacert", str(ca), "--cert", str(cert), "--key", str(key),
                  f"https://hello.{PUBLIC_HOST}:{cluster.web_port}/echo", timeout=5)
    return result.stdout.rsplit("\n", 1)[-1]


@pytest.fixture
def cluster(tmp_path):
    upstream = HttpUpstream()
    c = Cluster([{"name": "hello", "uri": upstream.uri, "labels": {"env": "ci"}}],
                root=tmp_path)
    config = yaml.safe_load(c.proxy_config.read_text())
    config["ca_min_grace_period"] = "1s"
    config["bots"] = {"min_certificate_ttl": "2s"}
    c.proxy_config.write_text(yaml.safe_dump(config))
    try:
        c.start_proxy()
        c.add_role({"kind": "role", "metadata": {"name": "ci-apps"},
                    "spec": {"allow": {"app_labels": {"env": "ci"}}}})
        c.add_user("alice", ["ci-apps"], PASSWORD)
        c.start_agent()
        yield c
    finally:
        c.stop()
        upstream.stop()


def test_user_ca_rotation_old_certificates_work_until_the_grace_ends(cluster, tmp_path):
    """After `auth rotate --type user-ca`: an old CLI certificate keeps working, new CLI and
    bot certificates come from the new CA (the bot renews onto it on its own), and once
    the grace is over the old certificate is refused while the new ones work."""
    pin = ca_pin(cluster)
    old_home = tmp_path / "old" / ".apptunnel"
    old_home.parent.mkdir()
    log_in(cluster, "alice", old_home, PASSWORD, pin)
    wait_until(lambda: "hello" in online_apps(old_home), 30, "hello online for alice")
    host_ca = (old_home / "ca.crt").read_bytes()      # what the CLI pinned
    old_cert = old_home / "user.crt"
    assert issued_by(old_cert.read_bytes(), host_ca)  # before: one CA for both roles
    assert through_app(cluster, old_cert, old_home / "user.key", old_home / "ca.crt") == "200"
    identity = tmp_path / "identity"
    bot = BotProcess(cluster, "ci", add_bot(cluster, "ci", "ci-apps"), ttl="3s",
                     outputs=[{"type": "identity", "path": str(identity)}])
    try:
        wait_until(lambda: (identity / "tls.crt").exists(), 10, "the bot's identity output")

        plan = json.loads(cluster.cli("auth", "rotate", "--type", "user-ca", "--grace-period",
                                      f"{int(USER_GRACE)}s", "--format", "json").stdout)
        rotated = time.monotonic()
        assert plan["old_key"] == pin and plan["new_key"] != pin
        # In the publish delay and then the grace, the old certificate keeps working.
        assert "hello" in online_apps(old_home)
        new_home = tmp_path / "new" / ".apptunnel"
        new_home.parent.mkdir()
        new_cert = new_home / "user.crt"

        def logged_in_under_the_new_ca() -> bool:
            if time.monotonic() - rotated < CA_PUBLISH_DELAY:
                return False
            log_in(cluster, "alice", new_home, PASSWORD, pin)   # same pin: host CA unchanged
            return not issued_by(new_cert.read_bytes(), host_ca)

        # The new user CA signs once its time has come and the proxy polled (<= 2 s).
        wait_until(logged_in_under_the_new_ca, CA_PUBLISH_DELAY + 20,
                   "a login to get a certificate of the new user CA", interval=0.5)
        # Still inside the grace (checked first: the cheapest call): the old one works too.
        assert through_app(cluster, old_cert, old_home / "user.key", old_home / "ca.crt") == "200"
        assert (new_home / "ca.crt").read_bytes() == host_ca
        assert "hello" in online_apps(new_home)
        # The bot renews onto the new CA by itself; curl with its identity keeps working.
        wait_until(lambda: not issued_by((identity / "tls.crt").read_bytes(), host_ca), 20,
                   "the bot renewed onto the new user CA")
        assert (identity / "ca.crt").read_bytes() == host_ca
        assert through_app(cluster, identity / "tls.crt", identity / "tls.key",
                           identity / "ca.crt") == "200"

        # Grace over (plus a poll): the old certificate is refused, the new ones work.
        wait_until(lambda: time.monotonic() - rotated
                   > CA_PUBLISH_DELAY + USER_GRACE + KEY_POLL_INTERVAL + 0.5, 30, "the grace to end")
        wait_until(lambda: through_app(cluster, old_cert, old_home / "user.key",
                                       old_home / "ca.crt") != "200", 15,
                   "the old user certificate to be refused")
        assert "hello" not in online_apps(old_home)
        assert "hello" in online_apps(new_home)
        assert through_app(cluster, new_cert, new_home / "user.key", new_home / "ca.crt") == "200"
        assert through_app(cluster, identity / "tls.crt", identity / "tls.key",
                           identity / "ca.crt") == "200"
        assert "Traceback" not in bot.log()
    finally:
        bot.stop()
    # The agent (host CA) never noticed: its app stayed online throughout.
    assert "hello" in online_apps(new_home)
    status = json.loads(cluster.cli("auth", "status", "--format", "json").stdout)
    assert [(k["id"], k["state"]) for k in status if k["kind"] == "user_ca"] == [
        (plan["new_key"], "current")]
    assert [k["id"] for k in status if k["kind"] == "host_ca"] == [pin]
    events = [e for e in audit(cluster, "auth.rotate")]
    assert [(e["target"], e["outcome"]) for e in events] == [("user-ca", "success")]
    assert "Traceback" not in (cluster.root / "proxy.log").read_text()


def test_host_ca_rotation_agent_serves_throughout_and_trusts_the_proxy_after(cluster, tmp_path):
    """After `auth rotate --type host-ca`: the running agent keeps serving, learns the new
    CA, renews onto it; a CLI that logged in during the grace follows the switch; after the
    grace the proxy presents the new CA and, restarted, still accepts the agent, which
    still trusts it."""
    pin = ca_pin(cluster)
    old_ca = (cluster.root / "proxy" / "ca.crt").read_bytes()
    agent_cert = cluster.root / "agent" / "agent.crt"
    home = tmp_path / "alice" / ".apptunnel"
    home.parent.mkdir()
    log_in(cluster, "alice", home, PASSWORD, pin)
    wait_until(lambda: "hello" in online_apps(home), 30, "hello online for alice")
    assert issued_by(agent_cert.read_bytes(), old_ca)
    identity = tmp_path / "identity"
    bot = BotProcess(cluster, "ci", add_bot(cluster, "ci", "ci-apps"), ttl="3s",
                     outputs=[{"type": "identity", "path": str(identity)}])
    wait_until(lambda: (identity / "tls.crt").exists(), 10, "the bot's identity output")
    try:
        plan = json.loads(cluster.cli("auth", "rotate", "--type", "host-ca", "--grace-period",
                                      f"{int(GRACE)}s", "--format", "json").stdout)
        rotated = time.monotonic()
        assert plan["old_key"] == pin
        # Told at once (the control socket's refresh pushes `trust`): the agent keeps both.
        wait_until(lambda: (cluster.root / "agent" / "trusted_cas.pem").exists(), 15,
                   "the agent to store the host-CA set")
        log_in(cluster, "alice", home, PASSWORD, pin)     # during the grace: still the old pin
        assert len((home / "ca.crt").read_text().split("BEGIN CERTIFICATE")) == 3   # old + new
        statuses = []

        def serving() -> str:
            code = through_app(cluster, home / "user.crt", home / "user.key", home / "ca.crt")
            statuses.append(code)
            return code

        # The agent renews onto the new CA once it issues, and keeps serving meanwhile.
        wait_until(lambda: serving() == "200" and not issued_by(agent_cert.read_bytes(), old_ca),
                   CA_PUBLISH_DELAY + 15, "the agent to renew onto the new host CA", interval=0.3)
        assert "renewing" in (cluster.root / "agent.log").read_text()
        # Grace over (plus a poll): the proxy presents a certificate of the new host CA.
        wait_until(lambda: serving() == "200" and time.monotonic() - rotated
                   > CA_PUBLISH_DELAY + GRACE + KEY_POLL_INTERVAL + 0.5, 30, "the grace to end",
                   interval=0.3)
        wait_until(lambda: (cluster.root / "proxy" / "ca.crt").read_bytes() != old_ca, 15,
                   "the proxy to present the new host CA")
        new_ca = (cluster.root / "proxy" / "ca.crt").read_bytes()
        assert issued_by(agent_cert.read_bytes(), new_ca)
        assert statuses.count("200") == len(statuses), statuses      # none failed throughout
        assert serving() == "200"          # the CLI's stored set follows the switch
        # The bot renewed during the grace and kept both CAs: it follows the switch too.
        wait_until(lambda: through_app(cluster, identity / "tls.crt", identity / "tls.key",
                                       identity / "ca.crt") == "200", 10,
                       "the bot after the switch")
        assert "Traceback" not in bot.log()

        # A restarted proxy (new server certificate only) accepts the agent, which trusts it.
        cluster.proxy.stop()
        cluster.start_proxy()
        wait_until(lambda: "hello" in online_apps(home), 30, "the agent back after the restart")
        assert serving() == "200"
        assert ca_pin(cluster) == plan["new_key"]        # new join tokens pin the new CA
        status = json.loads(cluster.cli("auth", "status", "--format", "json").stdout)
        assert [(k["id"], k["state"]) for k in status if k["kind"] == "host_ca"] == [
            (plan["new_key"], "current")]
        assert [k["id"] for k in status if k["kind"] == "user_ca"] == [pin]
        assert [(e["target"], e["outcome"]) for e in audit(cluster, "auth.rotate")] == [
            ("host-ca", "success")]
        for log in ("proxy.log", "agent.log"):
            assert "Traceback" not in (cluster.root / log).read_text(), log
    finally:
        bot.stop()
