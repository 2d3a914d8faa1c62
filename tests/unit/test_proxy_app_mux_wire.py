"""The two small wire conventions of multiplexed `proxy app` runs: a dry run's offer and a
refused stream's status."""

from hypothesis import given, strategies as st

from apptunnel.local_proxy import Answer
from apptunnel.tunnel.errors import status_of, with_status


def _answer(*headers: bytes) -> Answer:
    head = b"\r\n".join([b"HTTP/1.1 200 OK", *headers])
    return Answer(200, head + b"\r\n\r\ntcp\n")


def test_only_the_proxys_header_offers_mux():
    assert _answer(b"Content-Length: 4", b"Apptunnel-Mux: 1").offers_mux()
    assert _answer(b"apptunnel-mux: 1").offers_mux()
    assert not _answer(b"Content-Length: 4").offers_mux()          # an older proxy
    assert not _answer(b"Apptunnel-Mux: 0").offers_mux()
    assert not _answer(b"X-Apptunnel-Mux: 1").offers_mux()
    # The body is not the head: an app's text cannot switch the mode.
    assert not Answer(200, b"HTTP/1.1 200 OK\r\n\r\napptunnel-mux: 1\r\n").offers_mux()


@given(st.integers(100, 599), st.text(max_size=80))
def test_status_survives_the_reason(status, message):
    assert status_of(with_status(status, message), 502) == (status, message)


@given(st.text(max_size=80))
def test_a_reason_without_a_status_keeps_the_default(reason):
    status, message = status_of(reason, 502)
    head = reason.partition(" ")[0]
    if not (len(head) == 3 and head.isascii() and head.isdigit() and 100 <= int(head) <= 599):
        assert (status, message) == (502, reason)
