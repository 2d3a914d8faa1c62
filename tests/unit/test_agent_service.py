"""AgentService wiring on a MemoryReactorClock, and the agent's twistd options."""

from __future__ import annotations

import attrs
import pytest
from cryptography import x509
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from apptunnel.agent import tap
from apptunnel.agent.service import AgentService
from apptunnel.config import ConfigError
from tests.support.agent_world import (  # noqa: F401 - ca is a fixture
    APPS, ca, config, connected, saved_identity, seed_link)


def test_no_identity_no_token_is_config_error(tmp_path):
    """Without a saved identity or a token the agent refuses to start, saying why."""
    with pytest.raises(ConfigError, match="join.token"):
        AgentService(config(tmp_path), MemoryReactorClock())


def test_saved_identity_dials_proxy_on_loopback(tmp_path, ca):
    """With a saved identity the agent dials proxy_addr (localhost mapped to 127.0.0.1)."""
    saved_identity(tmp_path, ca)
    reactor = MemoryReactorClock()
    service = AgentService(config(tmp_path), reactor)
    service.startService()
    host, port = reactor.tcpClients[0][:2]
    assert (host, port) == ("127.0.0.1", 3024)
    [seed] = service.links.values()
    assert seed.running and seed.seed


def test_stale_identity_rejoins_with_token(tmp_path, ca):
    """A saved identity from another CA than join.ca_pin is replaced by a new join."""
    saved_identity(tmp_path, ca)
    reactor = MemoryReactorClock()
    service = AgentService(config(tmp_path, token="t", pin="sha256:" + "2" * 64), reactor)
    service.startService()
    assert not service.links  # joining first, tunnel afterwards
    assert service._joining is not None and not service._joining.called


def test_hello_lists_configured_apps(tmp_path, ca):
    """hello names the host and every configured app with its announced fields."""
    saved_identity(tmp_path, ca)
    hello = AgentService(config(tmp_path), MemoryReactorClock()).hello_message()
    assert hello["type"] == "hello" and hello["host_id"] == "host-1"
    assert hello["apps"] == [
        {"name": "grafana", "uri": "http://127.0.0.1:3000", "labels": {"env": "dev"},
         "public_addr": None, "rewrite_headers": [["X-A", "b"]], "jwt_claims": ["sub"]},
        {"name": "wiki", "uri": "https://wiki.internal", "labels": {}, "public_addr":
         "docs.example.com", "rewrite_headers": [], "jwt_claims": None},
    ]


def test_tap_requires_config():
    """`twistd apptunnel-agent` without --config is one error line (no twistd usage block)."""
    with pytest.raises(SystemExit, match="--config is required"):
        tap.Options().parseOptions([])


def test_tap_bad_config_is_one_line(tmp_path):
    """A bad config file becomes one error line while twistd parses options (issue 9:
    a SystemExit, not a UsageError, so twistd prints no `Options:` block above it)."""
    path = tmp_path / "agent.yaml"
    path.write_text("data_dir: x\nproxy_addr: nonsense\n")
    options = tap.Options()
    with pytest.raises(SystemExit) as info:
        options.parseOptions(["--config", str(path)])
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_tap_builds_agent_service(tmp_path, ca):
    """A valid config with a saved identity builds an AgentService."""
    saved_identity(tmp_path, ca)
    path = tmp_path / "agent.yaml"
    path.write_text(f"data_dir: {tmp_path / 'agent'}\nproxy_addr: 127.0.0.1:3024\napps: []\n")
    options = tap.Options()
    options.parseOptions(["--config", str(path)])
    assert isinstance(tap.makeService(options), AgentService)


# -- refused hellos and renewal (issue 8, findings 1 and 13) -------------------------------

def test_refused_hello_is_one_error_line_and_backs_off(tmp_path, ca):
    """hello_error: one error line with the proxy's reason, the tunnel closed, and each
    refusal in a row makes the next reconnect wait longer (up to the cap)."""
    from twisted.logger import LogLevel, globalLogPublisher

    saved_identity(tmp_path, ca)
    service = AgentService(config(tmp_path), MemoryReactorClock())
    seed_link(service)._backoff = lambda attempt: 0.5 * 2 ** attempt
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        delays = []
        for _ in range(3):
            handler, tunnel = connected(service)
            handler.control_received(tunnel, {"type": "hello_error", "message": "this agent is locked"})
            handler.tunnel_lost(tunnel, Failure(ConnectionError("closed")))
            assert tunnel.closed
            delays.append(seed_link(service)._retry_delay(0))   # ClientService saw a made connection
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert delays == [1.0, 2.0, 4.0]
    errors = [e for e in events if e.get("log_level") == LogLevel.error]
    assert len(errors) == 3 and all(e["reason"] == "this agent is locked" for e in errors)
    assert not [e for e in events if "log_failure" in e]
    handler, tunnel = connected(service)
    handler.control_received(tunnel, {"type": "hello_ok", "proxy_id": "p"})
    assert seed_link(service)._retry_delay(0) == 0.5    # accepted: back to the first delay


def test_a_refused_proxy_certificate_is_one_warning_naming_the_verdict(tmp_path, ca):
    """The tunnel's TLS refused the proxy's certificate: one line, the agent's, with the
    check's verdict (the TLS layer logs nothing of its own on a client)."""
    import ssl

    from twisted.logger import LogLevel, globalLogPublisher

    saved_identity(tmp_path, ca)
    service = AgentService(config(tmp_path), MemoryReactorClock())
    err = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    err.verify_message = "self-signed certificate in certificate chain"
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        handler, tunnel = connected(service)
        handler.tunnel_lost(tunnel, Failure(err))
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e.get("log_level") >= LogLevel.warn]
    assert len(warnings) == 1
    assert warnings[0]["reason"] == ("the proxy's certificate was refused: "
                                     "self-signed certificate in certificate chain")


def test_refused_apps_are_logged_and_renewal_is_scheduled(tmp_path, ca):
    """hello_ok listing refused apps logs one line each; a renewal is asked for at two
    thirds of the certificate's remaining life with a CSR for the same key, and the
    answer replaces agent.crt."""
    from cryptography.hazmat.primitives import serialization as ser
    from twisted.logger import globalLogPublisher

    identity = saved_identity(tmp_path, ca)
    reactor = MemoryReactorClock()
    reactor.advance(ca.clock.seconds())
    service = AgentService(config(tmp_path), reactor)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        handler, tunnel = connected(service)
        handler.control_received(tunnel, {"type": "hello_ok", "proxy_id": "p", "refused": [
            {"app": "wiki", "reason": "its join token allows only apps grafana"}]})
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e["app"] for e in events if "app" in e and "reason" in e] == ["wiki"]
    remaining = identity.not_after - reactor.seconds()
    reactor.advance(remaining * 2 / 3 + 1)
    renew = tunnel.sent[-1]
    assert renew["type"] == "renew"
    csr = x509.load_pem_x509_csr(renew["csr"].encode())
    key = ser.load_pem_private_key(identity.key_pem, None)
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()
    new_cert = ca.sign_agent_csr(renew["csr"], "host-1", 86400)
    handler.control_received(tunnel, {"type": "renew_ok", "cert": new_cert.decode()})
    assert (tmp_path / "agent" / "agent.crt").read_bytes() == new_cert
    assert service.identity.cert_pem == new_cert
    other = ca.sign_agent_csr(renew["csr"], "someone-else", 86400)
    handler.control_received(tunnel, {"type": "renew_ok", "cert": other.decode()})
    assert service.identity.cert_pem == new_cert   # another agent's name: not taken


def test_expired_certificate_without_token_is_one_line(tmp_path, ca):
    """An expired saved certificate and no join token: one line saying to join again."""
    from apptunnel.agent.join import JoinError

    saved_identity(tmp_path, ca)
    reactor = MemoryReactorClock()
    reactor.advance(ca.clock.seconds() + 2 * 86400)
    with pytest.raises(JoinError) as info:
        AgentService(config(tmp_path), reactor)
    assert "expired" in str(info.value) and "new token" in str(info.value)
    assert "\n" not in str(info.value)


# -- app resources (issue 11) --------------------------------------------------------------

def test_app_resources_are_served_and_announced_and_a_removed_one_is_not(tmp_path, ca):
    """The hello carries the selectors and only static apps; app_resources makes the agent
    dial those apps too and announce the whole set; a later push without one removes it
    (new streams get "no such app"); a resource named like a static app is ignored."""
    from apptunnel.tunnel.errors import StreamRefused

    saved_identity(tmp_path, ca)
    cfg = attrs.evolve(config(tmp_path), resources=({"env": ["dev"]},))
    service = AgentService(cfg, MemoryReactorClock())
    handler, tunnel = connected(service)
    assert tunnel.sent[0]["resources"] == [{"env": ["dev"]}]
    assert [a["name"] for a in tunnel.sent[0]["apps"]] == ["grafana", "wiki"]
    handler.control_received(tunnel, {"type": "hello_ok", "proxy_id": "p"})
    doc = {"kind": "app", "metadata": {"name": "res", "labels": {"env": "dev"}},
           "spec": {"uri": "http://127.0.0.1:9"}}
    clash = {"kind": "app", "metadata": {"name": "grafana"}, "spec": {"uri": "http://10.0.0.1"}}
    handler.control_received(tunnel, {"type": "app_resources", "resources": [doc, clash]})
    announce = tunnel.sent[-1]
    assert announce["type"] == "announce"
    assert [a["name"] for a in announce["apps"]] == ["grafana", "wiki", "res"]
    assert announce["apps"][0]["uri"] == "http://127.0.0.1:3000"      # the static one
    sent = len(tunnel.sent)
    handler.control_received(tunnel, {"type": "app_resources", "resources": [doc, clash]})
    assert len(tunnel.sent) == sent                                  # nothing new to say
    handler.control_received(tunnel, {"type": "app_resources", "resources": []})
    assert [a["name"] for a in tunnel.sent[-1]["apps"]] == ["grafana", "wiki"]
    failures = []
    service.dialer.stream_requested(tunnel, {"app": "res"}).addErrback(failures.append)
    assert failures[0].check(StreamRefused) and "no such app" in failures[0].value.reason


def test_apps_with_dynamic_labels_wait_for_their_first_value(tmp_path, ca):
    """An app is announced only once each dynamic label has a value (no spawn happens on
    a MemoryReactorClock, so here it never has one)."""
    from apptunnel.config import DynamicLabel

    saved_identity(tmp_path, ca)
    dynamic = attrs.evolve(APPS[0], dynamic_labels=(DynamicLabel("commit", ("git",), 60, 10),))
    cfg = attrs.evolve(config(tmp_path), apps=(dynamic, APPS[1]))
    service = AgentService(cfg, MemoryReactorClock())
    assert [a["name"] for a in service.hello_message()["apps"]] == ["wiki"]


def test_a_refused_announcement_is_sent_again_with_backoff(tmp_path, ca):
    """announce_ok with refusals: the same apps are announced again after 5 s, then 10 s;
    a clean answer stops it."""
    saved_identity(tmp_path, ca)
    reactor = MemoryReactorClock()
    service = AgentService(config(tmp_path), reactor)
    handler, tunnel = connected(service)
    handler.control_received(tunnel, {"type": "hello_ok", "proxy_id": "p"})
    refused = {"type": "announce_ok", "refused": [{"app": "wiki", "reason": "defined differently"}]}
    sent = len(tunnel.sent)
    handler.control_received(tunnel, refused)
    reactor.advance(4.9)
    assert len(tunnel.sent) == sent
    reactor.advance(0.2)
    assert tunnel.sent[-1]["type"] == "announce" and len(tunnel.sent) == sent + 1
    handler.control_received(tunnel, refused)
    reactor.advance(9.9)
    assert len(tunnel.sent) == sent + 1
    reactor.advance(0.2)
    assert len(tunnel.sent) == sent + 2
    handler.control_received(tunnel, {"type": "announce_ok", "refused": []})
    reactor.advance(600)
    assert len(tunnel.sent) == sent + 2 or all(m["type"] == "renew" for m in tunnel.sent[sent + 2:])


def test_pushed_resources_outside_our_selectors_are_not_served(tmp_path, ca):
    """Deny by default: an agent serves only what its own selectors match, whatever the
    proxy sends (an agent without selectors serves no resource at all)."""
    saved_identity(tmp_path, ca)
    doc = {"kind": "app", "metadata": {"name": "prod", "labels": {"env": "prod"}},
           "spec": {"uri": "http://10.0.0.1:22"}}
    for resources in ((), ({"env": ["dev"]},)):
        service = AgentService(attrs.evolve(config(tmp_path), resources=resources),
                               MemoryReactorClock())
        handler, tunnel = connected(service)
        handler.control_received(tunnel, {"type": "hello_ok", "proxy_id": "p"})
        handler.control_received(tunnel, {"type": "app_resources", "resources": [doc]})
        assert service.resource_apps == []
        assert all(m["type"] != "announce" for m in tunnel.sent)
