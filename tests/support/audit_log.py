"""AuditLog on the in-memory backend: `RecordingBackend` (notes batch sizes, fails the first
`fail` writes), the `backend` and `clock` fixtures and `capture` (the audit logger's
events). Shared by the unit tests of queueing and batches and the integration tests of the
JSON mirror, which writes on a thread; import the fixtures by name."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.logger import Logger

from apptunnel.audit import AuditLog
from apptunnel.backend.base import BackendError
from tests.support.memory import MemoryBackend
from tests.support.waiting import wait


class RecordingBackend(MemoryBackend):
    """The in-memory backend, noting batch sizes and failing the first `fail` writes."""

    def __init__(self, fail=0):
        super().__init__()
        self.batches: list[int] = []
        self.fail = fail

    async def append_audit(self, events):
        self.batches.append(len(events))
        if self.fail:
            self.fail -= 1
            raise BackendError("disk on fire")
        await super().append_audit(events)


@pytest_twisted.async_yield_fixture
async def backend(tmp_path):
    b = RecordingBackend()
    yield b
    await wait(b.close())


@pytest.fixture
def clock():
    c = Clock()
    c.advance(5000)
    return c


def capture(audit: AuditLog) -> list[dict]:
    events: list[dict] = []
    audit._log = Logger(namespace="audit-test", observer=events.append)
    return events
