"""One hand-over of a connection mid-stream (the edge after the first head, TCP access
after an HTTP app's upgrade): the transport is re-pointed and the owner gets what was read."""

from __future__ import annotations

from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport

from apptunnel.proxy.handover import hand_over
from apptunnel.proxy.http1 import RequestHeadPeek


class Recorder(Protocol):
    def __init__(self):
        self.data = []

    def dataReceived(self, data):
        self.data.append(data)


class Wrapper(StringTransport):
    """A ProtocolWrapper-like transport (TLS) that dispatches through wrappedProtocol."""

    def __init__(self, protocol):
        super().__init__()
        self.wrappedProtocol = protocol


def test_a_tcp_like_transport_is_repointed_and_the_owner_gets_the_early_bytes():
    old, new = Protocol(), Recorder()
    transport = StringTransport()
    transport.protocol = old
    assert hand_over(transport, old, new, b"GET / HTTP/1.1\r\n\r\nrest")
    assert transport.protocol is new and new.transport is transport
    assert new.data == [b"GET / HTTP/1.1\r\n\r\nrest"]


def test_a_wrapping_transport_is_repointed_through_wrapped_protocol():
    old, new = Protocol(), Recorder()
    transport = Wrapper(old)
    assert hand_over(transport, old, new)
    assert transport.wrappedProtocol is new and new.data == []


def test_a_transport_that_does_not_name_the_old_protocol_is_left_alone():
    """Then the old protocol keeps forwarding: hand_over says so."""
    old, new = Protocol(), Recorder()
    transport = StringTransport()
    assert not hand_over(transport, old, new, b"x")
    assert new.transport is transport and new.data == [b"x"]


def test_peek_gives_the_head_and_what_came_after_it_in_any_split():
    """The edge and TCP access read the first head the same way, a byte at a time too."""
    wire = b"\r\nGET /v1/tcp/db HTTP/1.1\r\nHost: a\r\n\r\nearly bytes"
    for step in (1, 3, len(wire)):
        peek = RequestHeadPeek()
        heads = [peek.receive(wire[i:i + step]) for i in range(0, len(wire), step)]
        found = [h for h in heads if h is not None]
        assert found and found[0].target == b"/v1/tcp/db"
        assert peek.after_head == b"early bytes"
    assert RequestHeadPeek().after_head == b""
