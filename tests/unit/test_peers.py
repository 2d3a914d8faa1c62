"""Several proxies (issue 13 item 2): registration, heartbeat and the live set on a Clock
and the memory backend; advertise_tunnel_addr in the config."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from apptunnel.backend.memory import MemoryBackend
from apptunnel.backend.records import ProxyRecord
from apptunnel.config import ConfigError, load_proxy_config
from apptunnel.proxy.peers import HEARTBEAT, STALE_AFTER, Peers, live_set
from tests.support.config_files import PROXY_OK, write
from tests.support.waiting import wait


def test_live_set_drops_rows_that_missed_their_beats():
    """A row older than STALE_AFTER is not live; the set is sorted by proxy id."""
    rows = [ProxyRecord("b", "h2:1", "v", 0.0, 95.0), ProxyRecord("a", "h1:1", "v", 0.0, 99.0),
            ProxyRecord("c", "h3:1", "v", 0.0, 100.0 - STALE_AFTER - 0.1)]
    assert live_set(rows, 100.0) == (("a", "h1:1"), ("b", "h2:1"))


@pytest_twisted.ensureDeferred
async def test_proxies_see_each_other_and_a_dead_one_drops_out():
    """Two proxies on one backend: each beat registers, both see both; when one stops
    beating (kill -9) it leaves the other's set within STALE_AFTER plus a beat; a clean
    stop removes the row at once; listeners hear each change once."""
    clock, backend = Clock(), MemoryBackend()
    clock.advance(1000)
    a = Peers(backend, clock, "pa", "10.0.0.1:3024", "1")
    b = Peers(backend, clock, "pb", "10.0.0.2:3024", "1")
    heard = []
    a.add_listener(heard.append)
    await wait(a.beat())
    await wait(b.beat())
    await wait(a.beat())
    assert a.live() == (("pa", "10.0.0.1:3024"), ("pb", "10.0.0.2:3024")) == heard[-1]
    assert len(heard) == 1
    for _ in range(int(STALE_AFTER / HEARTBEAT) + 1):   # b is killed: only a beats
        clock.advance(HEARTBEAT)
        await wait(a.beat())
    assert a.live() == (("pa", "10.0.0.1:3024"),) == heard[-1]
    await wait(b.beat())           # b is back
    await wait(a.beat())
    assert [pid for pid, _ in a.live()] == ["pa", "pb"]
    await wait(b.stop())           # clean stop: gone at the next beat, not after STALE_AFTER
    await wait(a.beat())
    assert a.live() == (("pa", "10.0.0.1:3024"),)


@pytest_twisted.ensureDeferred
async def test_the_heartbeat_runs_on_the_clock_and_stop_deletes_the_row():
    """start() beats now and every HEARTBEAT seconds of the given clock; stop() ends it."""
    clock, backend = Clock(), MemoryBackend()
    peers = Peers(backend, clock, "pa", "10.0.0.1:3024", "1")
    peers.start()
    clock.advance(HEARTBEAT * 2)
    [row] = await wait(backend.list_proxies(0.0))
    assert row.heartbeat == HEARTBEAT * 2 and row.started == 0.0
    await wait(peers.stop())
    assert await wait(backend.list_proxies(0.0)) == []


def test_a_proxy_on_port_zero_is_not_registered():
    """An ephemeral tunnel port cannot be dialled: no row, no proxies message."""
    peers = Peers(MemoryBackend(), Clock(), "pa", "127.0.0.1:0", "1")
    peers.start()
    assert peers.live() == ()


def test_advertise_tunnel_addr_defaults(tmp_path):
    """Default: tunnel_listen_addr; on a wildcard address, public_host with the port."""
    config = load_proxy_config(write(tmp_path, PROXY_OK))
    assert config.advertise_tunnel_addr == config.tunnel_listen_addr
    text = PROXY_OK.replace("127.0.0.1:3024", "0.0.0.0:3024")
    config = load_proxy_config(write(tmp_path, text))
    assert config.advertise_tunnel_addr == f"{config.public_host}:3024"
    config = load_proxy_config(write(tmp_path, PROXY_OK + "advertise_tunnel_addr: p1.internal:443\n"))
    assert config.advertise_tunnel_addr == "p1.internal:443"


@pytest.mark.parametrize("value", ["p1.internal", "p1.internal:0", "[nope]:1", "a b:3"])
def test_a_bad_advertise_tunnel_addr_is_one_line_naming_file_and_key(tmp_path, value):
    path = write(tmp_path, PROXY_OK + f"advertise_tunnel_addr: \"{value}\"\n")
    with pytest.raises(ConfigError) as err:
        load_proxy_config(path)
    line = err.value.one_line()
    assert path in line and "advertise_tunnel_addr" in line and "\n" not in line


def test_debounced_runs_once_per_burst_and_once_more_after_a_poke_during_a_run():
    """A burst of change notices is one refresh; a notice while it runs is one more."""
    from twisted.internet import defer

    from apptunnel.backend.notify import Debounced

    clock, runs, pending = Clock(), [], []

    def action():
        runs.append(clock.seconds())
        pending.append(defer.Deferred())
        return pending[-1]

    debounced = Debounced(action, clock, delay=0.05)
    for _ in range(5):
        debounced.poke()
    clock.advance(0.05)
    assert len(runs) == 1
    debounced.poke()
    debounced.poke()
    pending[0].callback(None)
    clock.advance(0.05)
    assert len(runs) == 2
    pending[1].errback(RuntimeError("backend down"))   # logged, not raised
    clock.advance(1)
    assert len(runs) == 2


def test_an_agent_is_listed_with_every_proxy_holding_a_live_tunnel_of_it():
    """agents ls: the proxies with a live tunnel of the agent, oldest tunnel first as
    connected_since; a killed proxy's (stale heartbeat) rows do not count; a proxy that
    never registered (one proxy, ephemeral port) is believed."""
    from apptunnel.admin.inventory import with_tunnels
    from apptunnel.backend.records import Agent, AgentTunnel, Scope

    agent = Agent("h1", Scope(), 1.0, 1e9, connected_since=50.0, proxy_id="p3")
    proxies = [ProxyRecord("p1", "a:1", "v", 0, 99.0), ProxyRecord("p2", "b:1", "v", 0, 99.0),
               ProxyRecord("p3", "c:1", "v", 0, 80.0)]
    tunnels = [AgentTunnel("h1", "p2", "x", 30.0), AgentTunnel("h1", "p1", "x", 40.0),
               AgentTunnel("h1", "p3", "x", 10.0), AgentTunnel("h2", "p1", "x", 5.0)]
    seen = with_tunnels(agent, tunnels, proxies, now=100.0)
    assert (seen.proxy_id, seen.connected_since) == ("p1,p2", 30.0)
    gone = with_tunnels(agent, [t for t in tunnels if t.proxy_id == "p3"], proxies, 100.0)
    assert gone.connected_since is None
    restarted = [attrs_evolve(p, started=35.0) if p.proxy_id == "p2" else p for p in proxies]
    again = with_tunnels(agent, tunnels, restarted, now=100.0)
    assert again.proxy_id == "p1"   # p2's row is from its run before the restart
    single = with_tunnels(attrs_evolve(agent, proxy_id="solo"),
                          [AgentTunnel("h1", "solo", "x", 7.0)], [], 100.0)
    assert (single.proxy_id, single.connected_since) == ("solo", 7.0)


def attrs_evolve(record, **changes):
    import attrs

    return attrs.evolve(record, **changes)


@pytest_twisted.ensureDeferred
async def test_a_dead_proxys_tunnel_rows_are_deleted_and_a_restart_clears_its_own():
    """agent_tunnels of a proxy killed with kill -9 (issue 13): the survivors forget it
    with its rows once it has been silent FORGET_AFTER (not before: a proxy cut off from
    the database for a while keeps its rows); restarted with the same id, its first beat
    deletes the rows its earlier run recorded and keeps those of the new run."""
    from apptunnel.backend.records import AgentTunnel
    from apptunnel.proxy.peers import FORGET_AFTER

    clock, backend = Clock(), MemoryBackend()
    clock.advance(1000)
    a = Peers(backend, clock, "pa", "10.0.0.1:3024", "1")
    b = Peers(backend, clock, "pb", "10.0.0.2:3024", "1")
    c = Peers(backend, clock, "pc", "10.0.0.3:3024", "1")
    for peers in (a, b, c):
        await wait(peers.beat())
    for host in ("h1", "h2"):
        for proxy in ("pa", "pb", "pc"):
            await wait(backend.put_agent_tunnel(AgentTunnel(host, proxy, "x:1", clock.seconds())))
    # b and c are killed; a beats on. Stale is not forgotten:
    clock.advance(STALE_AFTER * 3)
    await wait(a.beat())
    assert {t.proxy_id for t in await wait(backend.list_agent_tunnels())} == {"pa", "pb", "pc"}
    # c restarts (same id): its earlier run's rows go at its first beat; h1 reconnects.
    c = Peers(backend, clock, "pc", "10.0.0.3:3024", "1")
    await wait(backend.put_agent_tunnel(AgentTunnel("h1", "pc", "x:2", clock.seconds())))
    await wait(c.beat())
    rows = {(t.host_id, t.proxy_id) for t in await wait(backend.list_agent_tunnels())}
    assert rows == {("h1", "pa"), ("h2", "pa"), ("h1", "pb"), ("h2", "pb"), ("h1", "pc")}
    # b never comes back: forgotten FORGET_AFTER after its last beat, with its rows.
    clock.advance(FORGET_AFTER)
    await wait(c.beat())
    await wait(a.beat())
    rows = {(t.host_id, t.proxy_id) for t in await wait(backend.list_agent_tunnels())}
    assert rows == {("h1", "pa"), ("h2", "pa"), ("h1", "pc")}
    assert [p.proxy_id for p in await wait(backend.list_proxies(0.0))] == ["pa", "pc"]
