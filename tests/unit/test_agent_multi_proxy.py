"""An agent keeps one tunnel to every live proxy (issue 13 item 2): learning proxies from
the ``proxies`` message, deduplicating by proxy_id, forgetting proxies that left."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from apptunnel.agent.service import AgentService
from tests.support.agent_world import ca, config, connected, saved_identity  # noqa: F401

PROXIES = {"type": "proxies", "proxies": [
    {"proxy_id": "p1", "addr": "127.0.0.1:4001"},
    {"proxy_id": "p2", "addr": "127.0.0.2:4002"},
    {"proxy_id": "p3", "addr": "127.0.0.3:4003"}]}


def started(tmp_path, ca):  # noqa: F811
    saved_identity(tmp_path, ca)
    reactor = MemoryReactorClock()
    service = AgentService(config(tmp_path, addr="127.0.0.1:3999"), reactor)
    service.startService()
    return service, reactor


def dialled(reactor) -> list[tuple[str, int]]:
    return [(host, port) for host, port, *_ in reactor.tcpClients]


def up(service, link, proxy_id):
    handler, tunnel = connected(service, link)
    handler.control_received(tunnel, {"type": "hello_ok", "proxy_id": proxy_id})
    return handler, tunnel


def test_the_agent_dials_every_proxy_it_is_told_of_once(tmp_path, ca):  # noqa: F811
    """Through the seed (a balancer) it lands on p1; told of p1..p3 it dials each of them
    on its own link (p1 too: the seed's tunnel is given up once the direct one is up)."""
    service, reactor = started(tmp_path, ca)
    seed = service.links["127.0.0.1:3999"]
    handler, _ = up(service, seed, "p1")
    handler.control_received(handler.tunnel, PROXIES)
    assert [port for _, port in dialled(reactor)] == [3999, 4001, 4002, 4003]
    assert set(service.links) == {"127.0.0.1:3999", "127.0.0.1:4001", "127.0.0.2:4002",
                                  "127.0.0.3:4003"}
    handler.control_received(handler.tunnel, PROXIES)   # the same list again: nothing new
    assert len(reactor.tcpClients) == 4
    direct, direct_tunnel = up(service, service.links["127.0.0.1:4001"], "p1")
    assert handler.tunnel.closed and not direct_tunnel.closed and seed.paused
    handler.tunnel_lost(handler.tunnel, Failure(ConnectionError("went away")))
    assert not seed.running


def test_the_seed_tunnel_is_closed_when_it_duplicates_a_direct_one(tmp_path, ca):  # noqa: F811
    """Seed lands on p2, direct to p2 already up: the seed tunnel is closed, the direct kept."""
    service, reactor = started(tmp_path, ca)
    seed = service.links["127.0.0.1:3999"]
    first, _ = up(service, seed, "p1")
    first.control_received(first.tunnel, PROXIES)
    direct_handler, direct_tunnel = up(service, service.links["127.0.0.2:4002"], "p2")
    seed_handler, seed_tunnel = up(service, seed, "p2")
    assert seed_tunnel.closed and not direct_tunnel.closed and seed.paused
    seed_handler.tunnel_lost(seed_tunnel, Failure(ConnectionError("went away")))
    assert not seed.running


def test_with_no_tunnel_up_the_seed_dials_again(tmp_path, ca):  # noqa: F811
    """All tunnels lost: the paused seed starts again, so the balancer finds a live proxy."""
    service, reactor = started(tmp_path, ca)
    seed = service.links["127.0.0.1:3999"]
    first, _ = up(service, seed, "p1")
    first.control_received(first.tunnel, PROXIES)
    direct, _ = up(service, service.links["127.0.0.2:4002"], "p2")
    dup, _ = up(service, seed, "p2")
    assert seed.paused
    first.tunnel_lost(first.tunnel, Failure(ConnectionError("gone")))
    dup.tunnel_lost(dup.tunnel, Failure(ConnectionError("closed")))
    assert not seed.running
    direct.tunnel_lost(direct.tunnel, Failure(ConnectionError("gone")))
    assert seed.running


def test_a_proxy_gone_from_the_list_is_forgotten_once_its_tunnel_is_down(tmp_path, ca):  # noqa: F811
    """p3 leaves the list: its link (tunnel down) is stopped and forgotten; p2 leaves the
    list while its tunnel is up: kept until that tunnel ends, then forgotten."""
    service, reactor = started(tmp_path, ca)
    first, _ = up(service, service.links["127.0.0.1:3999"], "p1")
    first.control_received(first.tunnel, PROXIES)
    p2, _ = up(service, service.links["127.0.0.2:4002"], "p2")
    first.control_received(first.tunnel, {"type": "proxies", "proxies": [
        {"proxy_id": "p1", "addr": "127.0.0.1:4001"}]})
    assert set(service.links) == {"127.0.0.1:3999", "127.0.0.1:4001", "127.0.0.2:4002"}
    p2.tunnel_lost(p2.tunnel, Failure(ConnectionError("gone")))
    assert set(service.links) == {"127.0.0.1:3999", "127.0.0.1:4001"}


def test_a_malformed_proxies_message_is_ignored_with_one_line(tmp_path, ca):  # noqa: F811
    """A proxies message with a bad address dials nothing (one warning, no traceback)."""
    service, reactor = started(tmp_path, ca)
    first, _ = up(service, service.links["127.0.0.1:3999"], "p1")
    first.control_received(first.tunnel, {"type": "proxies", "proxies": [
        {"proxy_id": "p9", "addr": "evil.example.com"}]})
    first.control_received(first.tunnel, {"type": "proxies", "proxies": "x"})
    assert len(reactor.tcpClients) == 1


def test_each_link_backs_off_on_its_own(tmp_path, ca):  # noqa: F811
    """Refused hellos on one link lengthen that link's delay only."""
    service, reactor = started(tmp_path, ca)
    first, _ = up(service, service.links["127.0.0.1:3999"], "p1")
    first.control_received(first.tunnel, PROXIES)
    p2, p3 = service.links["127.0.0.2:4002"], service.links["127.0.0.3:4003"]
    for _ in range(3):
        handler, tunnel = connected(service, p2)
        handler.tunnel_lost(tunnel, Failure(ConnectionError("reset")))
    assert p2.failures == 3 and p3.failures == 0
    assert p2._retry_delay(0) > p3._retry_delay(0)
