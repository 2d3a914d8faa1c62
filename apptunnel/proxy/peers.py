"""This proxy's place among several: its row in the backend, kept fresh by a heartbeat,
and the set of live proxies that agents are told about (``messages.Proxies``).

Every ``HEARTBEAT`` seconds of the reactor clock the proxy upserts its row (proxy_id,
advertise_tunnel_addr, version, started, heartbeat = now) and reads the rows whose
heartbeat is newer than ``STALE_AFTER`` seconds: a proxy that missed three beats (killed,
cut off from the database) drops out of the set, and agents stop dialling it once its
tunnel is down. A clean stop deletes the row at once. The clocks of the proxies must
agree to within a second or two (NTP), as they must for certificates and tokens.

The agent_tunnels rows a proxy records go with it (backend.base): its heartbeat deletes
those of an earlier run of the same proxy_id (killed with kill -9, then restarted), a clean
stop deletes them with its row, and every live proxy forgets a proxy silent for
``FORGET_AFTER`` (its row and its tunnel rows). Until then the listing (admin/inventory.py)
already leaves out the tunnels of a stale proxy; FORGET_AFTER is much longer than
STALE_AFTER so that a proxy cut off from the database for a while, whose tunnels are still
up, is listed again with them as soon as it beats again.

With SQLite there is one proxy: its own row, the same code. A proxy whose advertised port
is 0 (a test listening on an ephemeral port) cannot be dialled and is not registered.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from apptunnel.backend.base import BackendError
from apptunnel.backend.records import PROXY_STALE_AFTER, ProxyRecord
from apptunnel.net import split_host_port
from apptunnel.polling import Poll

__all__ = ["FORGET_AFTER", "HEARTBEAT", "STALE_AFTER", "Peers", "live_set"]

log = Logger()

HEARTBEAT = 3.0
STALE_AFTER = PROXY_STALE_AFTER
FORGET_AFTER = 600.0

PeerSet = tuple[tuple[str, str], ...]   # (proxy_id, tunnel address), sorted by proxy_id


def live_set(rows: list[ProxyRecord], now: float, stale_after: float = STALE_AFTER) -> PeerSet:
    """The proxies agents should keep a tunnel to: rows with a fresh heartbeat."""
    return tuple(sorted((r.proxy_id, r.tunnel_addr) for r in rows
                        if r.heartbeat >= now - stale_after))


class Peers:
    """Registers this proxy, beats its heartbeat, and tells listeners when the live set
    changes (the tunnel server sends it to every agent)."""

    def __init__(self, backend, clock: IReactorTime, proxy_id: str, tunnel_addr: str,
                 version: str, interval: float = HEARTBEAT,
                 stale_after: float = STALE_AFTER, forget_after: float = FORGET_AFTER) -> None:
        self._backend = backend
        self._clock = clock
        self.proxy_id = proxy_id
        self._addr = tunnel_addr
        self._version = version
        self._stale_after = stale_after
        self._forget_after = forget_after
        self._started = clock.seconds()
        self._registered = _port(tunnel_addr) != 0
        self._live: PeerSet = ((proxy_id, tunnel_addr),) if self._registered else ()
        self._listeners: list[Callable[[PeerSet], None]] = []
        self._poll = Poll(self.beat, clock, interval, "proxy heartbeat")

    def live(self) -> PeerSet:
        """The live proxies as last read (this one included once registered)."""
        return self._live

    def add_listener(self, listener: Callable[[PeerSet], None]) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[PeerSet], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def start(self) -> None:
        if not self._registered:
            log.info("advertise_tunnel_addr {addr} has port 0: this proxy is not registered "
                     "for agents of other proxies", addr=self._addr)
            return
        self._poll.start()

    async def stop(self) -> None:
        """Stop beating and delete our row, so agents forget us now, not in STALE_AFTER."""
        self._poll.stop()
        if self._registered:
            await self._backend.delete_proxy(self.proxy_id)

    async def beat(self) -> None:
        """One heartbeat; a backend that is down is one log line (the next beat retries,
        and the live set stays as it was meanwhile)."""
        now = self._clock.seconds()
        try:
            await self._backend.heartbeat_proxy(ProxyRecord(
                self.proxy_id, self._addr, self._version, self._started, now))
            rows = await self._backend.list_proxies(now - self._stale_after)
            forgotten = await self._backend.forget_proxies(now - self._forget_after)
        except BackendError as err:
            log.warn("proxy heartbeat failed (retrying): {error}", error=err)
            return
        for proxy_id in forgotten:
            log.info("forgot proxy {proxy_id} (no heartbeat for {seconds:.0f} s) and the "
                     "agent tunnels it recorded", proxy_id=proxy_id, seconds=self._forget_after)
        live = live_set(rows, now, self._stale_after)
        if live == self._live:
            return
        log.info("live proxies: {proxies}",
                 proxies=", ".join(f"{pid} at {addr}" for pid, addr in live) or "none")
        self._live = live
        for listener in list(self._listeners):
            try:
                listener(live)
            except Exception:
                log.failure("peer listener failed")


def _port(addr: str) -> int:
    try:
        return split_host_port(addr)[1]
    except ValueError:
        return 0
