"""The web UI's HTTP channel: a deadline on every request head, a Host check on every head."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import resource, server

from apptunnel.proxy.web_channel import WebSite

HEAD = b"GET / HTTP/1.1\r\nHost: apptunnel.localhost:3080\r\n\r\n"


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello"


def connect(head_timeout: float = 30.0):
    clock = Clock()
    site = WebSite(Hello(), head_timeout=head_timeout, reactor=clock)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return clock, channel, transport


def test_requests_in_time_are_answered_and_the_connection_kept():
    """Heads that arrive whole are answered; an idle keep-alive connection is not cut at 30 s."""
    clock, channel, transport = connect()
    channel.dataReceived(HEAD)
    channel.dataReceived(HEAD)
    assert transport.value().count(b"HTTP/1.1 200 OK") == 2
    clock.advance(45)  # more than the head deadline, less than twisted's idle timeout
    assert not transport.disconnecting


def test_first_head_sent_a_byte_at_a_time_is_cut_at_the_deadline():
    """Each byte used to restart twisted's timer; now the head must be whole in 30 s."""
    clock, channel, transport = connect()
    slow = b"GET / HTTP/1.1\r\nHost: apptunnel.localhost:3080\r\nX-Slow: " + b"a" * 100
    for byte in slow[:30]:
        channel.dataReceived(bytes([byte]))
        clock.advance(0.99)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.value().startswith(b"HTTP/1.1 408 ") and transport.disconnecting


def test_second_head_on_a_kept_alive_connection_has_its_own_deadline():
    """Slowloris after a first request: the second head's deadline runs from its first byte."""
    clock, channel, transport = connect()
    channel.dataReceived(HEAD)
    answered = len(transport.value())
    clock.advance(45)  # idle between requests: no head, no head deadline
    assert not transport.disconnecting
    for byte in HEAD[:-2]:
        channel.dataReceived(bytes([byte]))
        clock.advance(1)
        if transport.disconnecting:
            break
    assert transport.disconnecting
    assert transport.value()[answered:].startswith(b"HTTP/1.1 408 ")


def test_deadline_restarts_for_each_head():
    """Heads that each take 20 s (under the 30 s limit) are all answered."""
    clock, channel, transport = connect()
    for _ in range(3):
        half = len(HEAD) // 2
        channel.dataReceived(HEAD[:half])
        clock.advance(20)
        channel.dataReceived(HEAD[half:])
        clock.advance(20)
    assert transport.value().count(b"HTTP/1.1 200 OK") == 3
    assert not transport.disconnecting


def test_a_body_is_not_a_head():
    """A slow request body is not cut by the head deadline (only the head is timed)."""
    clock, channel, transport = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: apptunnel.localhost\r\nContent-Length: 50\r\n\r\n")
    for _ in range(49):
        channel.dataReceived(b"x")
        clock.advance(1)
    assert not transport.disconnecting


def test_small_head_timeout_for_tests():
    """head_timeout is a constructor parameter."""
    clock, channel, transport = connect(head_timeout=2)
    channel.dataReceived(b"GET / ")
    clock.advance(2.1)
    assert transport.disconnecting


@pytest.mark.parametrize("host", [b"apptunnel.localhost:@evil.com", b"apptunnel.localhost:80/x", b"a b"])
def test_malformed_host_is_400(host):
    """A Host that is not a name or IP literal with a numeric port is refused on the web UI too."""
    _, channel, transport = connect()
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nAccept: */*\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 ")
    assert b"hello" not in transport.value()
    assert transport.disconnecting


def test_unread_408_is_aborted_later():
    """A peer that never reads the 408 is aborted after abortTimeout."""
    clock, channel, transport = connect(head_timeout=1)
    aborted = []
    transport.abortConnection = lambda: aborted.append(True)
    channel.dataReceived(b"G")
    clock.advance(1)
    assert transport.disconnecting and not aborted
    clock.advance(channel.abortTimeout + 1)
    assert aborted


class Later(resource.Resource):
    """Answers only when the test says so, like an async Klein handler."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.pending = []

    def render_GET(self, request):
        self.pending.append(request)
        return server.NOT_DONE_YET


def test_head_buffered_while_answering_gets_its_deadline_after_the_answer():
    """Pipelined bytes held during a slow answer: a whole head is served, a partial one is timed
    from the answer's end, and nothing is timed when nothing is left."""
    clock = Clock()
    later = Later()
    site = WebSite(later, head_timeout=30, reactor=clock)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(HEAD + HEAD + b"GET / HT")
    clock.advance(40)  # the first answer takes longer than the head deadline
    assert not transport.disconnecting
    later.pending.pop(0).finish()  # the second head was whole: it is read at once
    assert len(later.pending) == 1
    later.pending.pop(0).finish()  # the third is partial: its deadline starts now
    clock.advance(29)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting and b"408 Request Timeout" in transport.value()


def test_nothing_left_after_an_answer_means_no_head_deadline():
    """Bytes of a whole pipelined request held during an answer do not start a deadline."""
    clock = Clock()
    later = Later()
    site = WebSite(later, head_timeout=30, reactor=clock)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(HEAD + HEAD)
    later.pending.pop(0).finish()
    later.pending.pop(0).finish()
    clock.advance(45)
    assert not transport.disconnecting


class Slow(resource.Resource):
    """Answers only when the test says so, like a page that waits for storage."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list = []

    def render_GET(self, request):
        self.waiting.append(request)
        return server.NOT_DONE_YET


def test_idle_only_between_requests():
    """The connection limits may shed a web UI connection only while no request is in it."""
    clock = Clock()
    slow = Slow()
    channel = WebSite(slow, reactor=clock).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    assert channel.is_idle()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: apptunnel.localhost\r\nContent-Length: 4\r\n\r\nab")
    assert not channel.is_idle()          # a body still coming
    channel.dataReceived(b"cd")
    assert channel.is_idle() and not slow.waiting  # no render_POST: answered (405) at once
    channel2 = WebSite(slow, reactor=clock).buildProtocol(None)
    transport2 = StringTransport()
    channel2.makeConnection(transport2)
    channel2.dataReceived(HEAD)
    assert slow.waiting and not channel2.is_idle()   # being answered
    request = slow.waiting.pop()
    request.write(b"late")
    request.finish()
    assert channel2.is_idle()             # kept alive, waiting for the next head
