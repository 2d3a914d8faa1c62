"""Walk every stored chain (each proxy's, and the admin CLI's) through the backend
(``apptunnel audit verify``).

Reads page by page in storage order, so memory stays bounded by one page however long the
trail; a gap in seq is told apart from a moved event by asking storage for the missing
seq. The newest events of a chain cannot be checked against anything stored after them:
a deleted tail shows only against an exported copy (docs/operator.rst).
"""

from __future__ import annotations

import attrs

from apptunnel.audit.chain import ChainWalk, Problem
from apptunnel.backend.base import Backend

PAGE = 1000


@attrs.frozen
class ChainReport:
    proxy_id: str
    events: int                 # checked before the first problem (or all)
    problem: Problem | None


@attrs.frozen
class VerifyReport:
    chains: list[ChainReport]
    unchained: int              # events stored before the chains existed

    @property
    def intact(self) -> bool:
        return all(c.problem is None for c in self.chains)


async def verify_chain(backend: Backend, proxy_id: str, page: int = PAGE) -> ChainReport:
    walk = ChainWalk(proxy_id)
    offset = 0
    while True:
        events = await backend.audit_chain(proxy_id, offset=offset, limit=page)
        for e in events:
            moved = None
            if e.seq > walk.last_seq + 1:
                found = await backend.audit_chain(proxy_id, limit=1, seq=walk.last_seq + 1)
                moved = found[0] if found else None
            if not walk.feed(e, moved):
                return ChainReport(proxy_id, walk.count, walk.problem)
        if len(events) < page:
            return ChainReport(proxy_id, walk.count, None)
        offset += len(events)


async def verify_all(backend: Backend, proxy_id: str | None = None) -> VerifyReport:
    counts = await backend.audit_chains()
    proxies = [proxy_id] if proxy_id is not None else sorted(p for p in counts if p)
    chains = [await verify_chain(backend, p) for p in proxies]
    return VerifyReport(chains, counts.get("", 0))
