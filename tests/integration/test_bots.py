"""Bots end to end: the installed proxy, agent, CLI and `twistd apptunnel-bot` with real
upstream apps. The proxy allows bot certificates down to 2 s (`bots:
min_certificate_ttl: 2s`, an operator setting), so several renewals happen in seconds;
locks and the user directory are polled every 2 s, so cut-offs are awaited for at most
LOCK_WAIT seconds.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support.bots import BotKey, BotProcess, add_bot, call, curl, not_after
from tests.support.cluster import (
    BIN, PUBLIC_HOST, Child, Cluster, app_jwt_claims, audit, wait_until,
)
from tests.support.upstream import HttpUpstream

LOCK_WAIT = 8


@pytest.fixture(scope="module")
def cluster():
    upstream = HttpUpstream()
    c = Cluster([{"name": "hello", "uri": upstream.uri, "labels": {"env": "ci"}},
                 {"name": "secret", "uri": upstream.uri, "labels": {"env": "prod"}}])
    config = yaml.safe_load(c.proxy_config.read_text())
    config["bots"] = {"min_certificate_ttl": "2s"}
    c.proxy_config.write_text(yaml.safe_dump(config))
    try:
        c.start_proxy()
        c.add_role({"kind": "role", "metadata": {"name": "ci-apps"},
                    "spec": {"allow": {"app_labels": {"env": "ci"}}}})
        c.start_agent()
        yield c
    finally:
        c.stop()
        upstream.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_url(cluster: Cluster, app: str, path: str = "/echo") -> str:
    return f"https://{app}.{PUBLIC_HOST}:{cluster.web_port}{path}"


def with_identity(directory, cluster: Cluster) -> list[str]:
    return ["--cacert", str(directory / "ca.crt"), "--cert", str(directory / "tls.crt"),
            "--key", str(directory / "tls.key")]


def ok_through(port: int) -> bool:
    result = curl(f"http://127.0.0.1:{port}/echo")
    return result.stdout.endswith("\n200")


def open_keepalive(port: int) -> socket.socket:
    """A live HTTP connection through the bot's app-proxy port, after one good answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in sock.recv(65536)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(0.5)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


def test_bot_renews_across_lifetimes_while_curl_keeps_working(cluster, tmp_path):
    """A 3 s certificate renewed several times: the app-proxy port and curl --cert with the
    identity output keep working throughout; audit and JWT name bot:ci, bot: true."""
    joined = add_bot(cluster, "ci", "ci-apps")
    port, identity = free_port(), tmp_path / "identity"
    bot = BotProcess(cluster, "ci", joined, ttl="3s", outputs=[
        {"type": "identity", "path": str(identity)},
        {"type": "app-proxy", "app": "hello", "listen": f"127.0.0.1:{port}"}])
    try:
        wait_until(lambda: ok_through(port), 20, "the app through the bot's port")
        first_cert = (identity / "tls.crt").read_text()
        assert oct((identity / "tls.key").stat().st_mode & 0o777) == "0o600"
        assert oct(identity.stat().st_mode & 0o777) == "0o700"
        deadline, failures, requests_made = time.monotonic() + 10, [], 0
        while time.monotonic() < deadline:   # > 3 certificate lifetimes
            via_port = curl(f"http://127.0.0.1:{port}/echo")
            via_cert = curl(*with_identity(identity, cluster), app_url(cluster, "hello"))
            requests_made += 2
            for result in (via_port, via_cert):
                if not result.stdout.endswith("\n200"):
                    failures.append(result.stdout[-200:])
            time.sleep(0.3)
        assert requests_made >= 10 and failures == []
        assert bot.renewals() >= 3, bot.log()
        assert (identity / "tls.crt").read_text() != first_cert
        echo = json.loads(curl(f"http://127.0.0.1:{port}/echo").stdout.rsplit("\n", 1)[0])
        claims = app_jwt_claims(cluster, echo, "hello")
        assert claims["bot"] is True and claims["username"] == "bot:ci" == claims["sub"]
        assert claims["roles"] == ["ci-apps"]
        joins = [e for e in audit(cluster, "bot.join") if e["actor"] == "bot:ci"]
        renews = [e for e in audit(cluster, "bot.renew") if e["actor"] == "bot:ci"]
        assert len(joins) == 1 and len(renews) >= 3
        assert joins[0]["code"] == "T3200I" and renews[0]["code"] == "T3201I"
        sessions = audit(cluster, "app.request") + audit(cluster, "tcp.session.start")
        assert any(e["actor"] == "bot:ci" for e in sessions), sessions[-3:]
        assert "valid " in cluster.cli("bots", "ls").stdout
        listed = json.loads(cluster.cli("bots", "ls", "--format", "json").stdout)
        assert [b["name"] for b in listed if b["joined"]] == ["ci"]
    finally:
        bot.stop()


def test_a_restarted_bot_uses_its_stored_identity_not_the_token(cluster, tmp_path):
    """After a restart the bot renews from data_dir; its one-time token stays spent."""
    joined = add_bot(cluster, "restarts", "ci-apps")
    bot = BotProcess(cluster, "restarts", joined, ttl="3s")
    bot.stop()
    again = BotProcess(cluster, "restarts", joined, ttl="3s")
    try:
        assert "using the stored identity" in again.log()
        wait_until(lambda: again.renewals() >= 1, 10, "a renewal after the restart")
    finally:
        again.stop()
    assert len([e for e in audit(cluster, "bot.join") if e["actor"] == "bot:restarts"]) == 1


def renew_with_stored(cluster: Cluster, bot: BotProcess):
    """The bot's own stored certificate and key presented to /v1/bots/renew."""
    data = bot.root / "data"
    return call(cluster, "/v1/bots/renew", {"public_key": BotKey(bot.root / "k").public},
                data / "bot.crt", data / "bot.key")


def test_lock_on_the_bot_cuts_its_live_connection_and_renewal(cluster, tmp_path):
    """`apptunnel lock --bot` ends the bot's open connection within the poll interval
    (its certificate has most of a minute left), refuses new ones and its renewal."""
    joined = add_bot(cluster, "locked", "ci-apps")
    port = free_port()
    bot = BotProcess(cluster, "locked", joined, ttl="1m", outputs=[
        {"type": "app-proxy", "app": "hello", "listen": f"127.0.0.1:{port}"}])
    try:
        wait_until(lambda: ok_through(port), 20, "the app through the bot's port")
        live = open_keepalive(port)
        cluster.cli("lock", "--bot", "locked", "--message", "compromised runner")
        assert closed_within(live, LOCK_WAIT), "the live connection outlived the lock"
        refused = curl(f"http://127.0.0.1:{port}/echo")
        assert not refused.stdout.endswith("\n200")
        renewal = renew_with_stored(cluster, bot)
        assert renewal.status_code == 403 and "locked" in renewal.json()["error"]
        wait_until(lambda: any("locked" in e["fields"].get("reason", "")
                               for e in audit(cluster, "bot.renew")
                               if e["outcome"] == "failure" and e["actor"] == "bot:locked"),
                   5, "the refused renewal in the audit")
        locks = cluster.cli("locks", "ls").stdout
        assert "bot:locked" in locks
    finally:
        bot.stop()


def test_bots_rm_cuts_the_bot_off(cluster, tmp_path):
    """`apptunnel bots rm` ends the bot's live connection within the poll interval and
    refuses it (requests and renewal) from then on."""
    joined = add_bot(cluster, "removed", "ci-apps")
    port = free_port()
    bot = BotProcess(cluster, "removed", joined, ttl="1m", outputs=[
        {"type": "app-proxy", "app": "hello", "listen": f"127.0.0.1:{port}"}])
    try:
        wait_until(lambda: ok_through(port), 20, "the app through the bot's port")
        live = open_keepalive(port)
        cluster.cli("bots", "rm", "removed")
        assert closed_within(live, LOCK_WAIT), "the live connection outlived bots rm"
        assert not curl(f"http://127.0.0.1:{port}/echo").stdout.endswith("\n200")
        renewal = renew_with_stored(cluster, bot)
        assert renewal.status_code == 403 and "no longer exists" in renewal.json()["error"]
    finally:
        bot.stop()


def test_join_tokens_are_single_use_and_kind_bound(cluster, tmp_path):
    """A bot token joins once; it cannot join an agent, an agent token cannot join a bot,
    and `tokens add --type bot` points to `bots add`."""
    joined = add_bot(cluster, "once", "ci-apps")
    key = BotKey(tmp_path / "once")
    first = call(cluster, "/v1/bots/join", {"token": joined["token"], "public_key": key.public,
                                            "ttl": 60})
    assert first.status_code == 200 and first.json()["bot"] == "once"
    again = call(cluster, "/v1/bots/join", {"token": joined["token"], "public_key": key.public,
                                            "ttl": 60})
    assert again.status_code == 403 and "token" not in again.json()
    agent_token = json.loads(cluster.cli("tokens", "add", "--format", "json").stdout)["token"]
    wrong = call(cluster, "/v1/bots/join", {"token": agent_token, "public_key": key.public})
    assert wrong.status_code == 403 and "cannot be used to join a bot" in wrong.json()["error"]
    refused = cluster.cli("tokens", "add", "--type", "bot", check=False)
    assert refused.returncode == 2 and "bots add" in refused.stderr

    bot_token = add_bot(cluster, "not-an-agent", "ci-apps")
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "agent"), "proxy_addr": f"127.0.0.1:{cluster.tunnel_port}",
        "diag_addr": "127.0.0.1:0", "join": {"token": bot_token["token"], "ca_pin": bot_token["ca_pin"]},
        "apps": [{"name": "intruder", "uri": "http://127.0.0.1:9"}]}))
    agent = Child("agent", [str(BIN / "twistd"), "-n", "--pidfile=", "apptunnel-agent",
                            "--config", str(config)], tmp_path, tmp_path / "agent.log")
    try:
        wait_until(lambda: "cannot be used to join an agent" in
                   (tmp_path / "agent.log").read_text(), 20, "the agent's join to be refused")
    finally:
        agent.stop()
    # The refused agent join took nothing: the bot still joins with its token.
    ok = call(cluster, "/v1/bots/join", {"token": bot_token["token"], "public_key": key.public,
                                         "ttl": 60})
    assert ok.status_code == 200


def test_renewal_needs_the_current_unexpired_certificate(cluster, tmp_path):
    """Only the newest certificate renews (a copied older one is refused), an expired one
    never does, and neither a token nor a user certificate can stand in for it."""
    joined = add_bot(cluster, "renewer", "ci-apps")
    key = BotKey(tmp_path / "renewer")
    answer = call(cluster, "/v1/bots/join", {"token": joined["token"], "public_key": key.public,
                                             "ttl": 2}).json()
    first = key.save_cert(answer["cert"], "first.pem")
    no_cert = call(cluster, "/v1/bots/renew", {"public_key": key.public, "ttl": 2,
                                               "token": joined["token"]})
    assert no_cert.status_code == 403
    renewed = call(cluster, "/v1/bots/renew", {"public_key": key.public, "ttl": 2},
                   first, key.key_path)
    assert renewed.status_code == 200, renewed.text
    replay = call(cluster, "/v1/bots/renew", {"public_key": key.public, "ttl": 2},
                  first, key.key_path)
    assert replay.status_code == 403 and "already renewed" in replay.json()["error"]
    second = key.save_cert(renewed.json()["cert"], "second.pem")
    time.sleep(max(0.0, not_after(renewed.json()["cert"]) - time.time()) + 1.2)
    try:
        expired = call(cluster, "/v1/bots/renew", {"public_key": key.public, "ttl": 2},
                       second, key.key_path)
    except Exception as err:   # the TLS handshake itself refuses an expired certificate
        assert "certificate" in str(err).lower() or "ssl" in str(err).lower(), err
    else:
        assert expired.status_code in (401, 403), expired.text
    refused = [e for e in audit(cluster, "bot.renew") if e["outcome"] == "failure"]
    assert any("generation" in e["fields"].get("reason", "") for e in refused)


def test_a_bot_certificate_opens_only_its_roles_apps(cluster, tmp_path):
    """curl --cert with the bot's identity is refused on an app outside its roles, and
    its app-proxy port for that app answers the proxy's refusal."""
    joined = add_bot(cluster, "narrow", "ci-apps")
    port, identity = free_port(), tmp_path / "identity"
    bot = BotProcess(cluster, "narrow", joined, ttl="1m", outputs=[
        {"type": "identity", "path": str(identity)},
        {"type": "app-proxy", "app": "secret", "listen": f"127.0.0.1:{port}"}])
    try:
        wait_until(lambda: curl(*with_identity(identity, cluster), app_url(cluster, "hello")
                                ).stdout.endswith("\n200"), 20, "hello with the bot's cert")
        denied = curl(*with_identity(identity, cluster), app_url(cluster, "secret"))
        assert denied.stdout.endswith("\n403"), denied.stdout[-200:]
        assert not curl(f"http://127.0.0.1:{port}/echo").stdout.endswith("\n200")
        assert "app-proxy secret" in bot.log()
        refusals = wait_until(lambda: [e for e in audit(cluster, "access.denied")
                                       if e["actor"] == "bot:narrow"], 5, "the audited refusal")
        assert all(e["target"] == "secret" for e in refusals)
        # The JSON API: the bot may list its apps, and nothing a person does.
        api = f"https://{PUBLIC_HOST}:{cluster.web_port}"
        public_key = x509.load_pem_x509_certificate((identity / "tls.crt").read_bytes()).public_key(
        ).public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        listed = curl(*with_identity(identity, cluster), f"{api}/v1/apps")
        assert listed.stdout.endswith("\n200"), listed.stdout[-200:]
        assert [a["name"] for a in json.loads(listed.stdout.rsplit("\n", 1)[0])["apps"]] == ["hello"]
        for method, path, body in [("POST", "/v1/access-requests", '{"roles": ["ci-apps"]}'),
                                   ("POST", "/v1/certs/app", json.dumps(
                                       {"app": "hello", "public_key": public_key.decode()})),
                                   ("DELETE", "/v1/mfa/devices/key", "")]:
            answer = curl(*with_identity(identity, cluster), "-X", method, "-H",
                          "Content-Type: application/json", "--data", body, f"{api}{path}")
            assert answer.stdout.endswith("\n403"), (path, answer.stdout[-200:])
    finally:
        bot.stop()
