"""The bench's pure parts: ratios to ssh -R, added latency, CPU per 10k requests, fairness,
the printed table, the JSON, and the parsers of the tools' output. No tool is run here:
the bench tools are not test dependencies (bench/ is importable from the repo root)."""

from __future__ import annotations

import json
import math

import pytest

from bench import bulk, idle, procs, report, tcp, wrk
from bench.report import Measurement


def _http(path: str, req_s: float, p50: float, p99: float = 10.0) -> Measurement:
    return Measurement("http", path, {"req_s": req_s, "p50_ms": p50, "p99_ms": p99, "errors": 0})


ROWS = [
    _http("direct", 80_000, 0.5),
    _http("ssh", 20_000, 1.0, 40.0),
    _http("nginx-tls", 19_000, 1.3),
    _http("apptunnel", 5_000, 5.0, 20.0),
    Measurement("iperf3-up", "ssh", {"gbps": 4.0}),
    Measurement("iperf3-up", "apptunnel", {"gbps": 1.0}),
]


def test_ratios_are_to_the_ssh_row_of_the_same_test():
    """Every metric of every row is divided by the ssh -R row's value in the same test."""
    found = report.ratios(ROWS)
    assert found[("http", "apptunnel")]["req_s"] == pytest.approx(0.25)
    assert found[("http", "apptunnel")]["p99_ms"] == pytest.approx(0.5)
    assert found[("http", "ssh")]["req_s"] == 1.0
    assert found[("iperf3-up", "apptunnel")]["gbps"] == pytest.approx(0.25)
    assert "errors" not in found[("http", "apptunnel")]     # 0 / 0 has no ratio


def test_no_ratio_without_a_working_ssh_row():
    """A failed ssh -R row gives the other rows no ratio rather than a wrong one."""
    rows = [Measurement("http", "ssh", error="failed: sshd not installed"),
            _http("apptunnel", 5_000, 5.0)]
    assert report.ratios(rows) == {}
    assert report.ratio(1.0, 0.0) is None
    assert report.ratio(None, 2.0) is None
    assert report.ratio(math.inf, 2.0) is None


def test_added_latency_is_p50_minus_direct():
    """The 1-connection rows get p50 minus the direct row's p50; other tests are untouched."""
    rows = [Measurement("http-1", "direct", {"p50_ms": 0.2}),
            Measurement("http-1", "apptunnel", {"p50_ms": 0.9}), ROWS[0]]
    out = report.added_latency(rows)
    assert out[1].values["added_p50_ms"] == pytest.approx(0.7)
    assert out[0].values["added_p50_ms"] == 0.0
    assert "added_p50_ms" not in out[2].values
    assert report.added_latency(rows[1:2]) == rows[1:2]     # no direct row: unchanged


def test_cpu_per_10k_requests_and_fairness():
    """CPU seconds scale to 10,000 requests; max/min is inf when a stream got nothing."""
    assert report.per_10k(1.6, 100_000) == pytest.approx(0.16)
    assert report.per_10k(1.0, 0) is None
    assert report.per_gib(3.0, 2 * 2**30) == pytest.approx(1.5)
    assert report.per_gib(1.0, 0) is None
    assert report.max_over_min([10.0, 20.0, 15.0]) == 2.0
    assert report.max_over_min([10.0, 0.0]) == math.inf
    assert report.max_over_min([]) is None


def test_table_has_a_section_per_test_and_the_ratio_column():
    """One table: a titled section per test, a row per path in a fixed order, x ssh -R."""
    rows = [*ROWS, Measurement("fairness", "apptunnel", error="failed: boom")]
    text = report.format_table(rows, {"http": "wrk -t2 -c32"})
    lines = text.splitlines()
    assert lines[0] == "HTTP keep-alive, wrk (wrk -t2 -c32)"
    assert "x ssh -R (req/s)" in lines[1]
    http = [line for line in lines[2:6]]
    assert [line.split()[0] for line in http] == ["direct", "ssh", "nginx", "apptunnel"]
    assert http[3].rstrip().endswith("x0.25")
    assert any(line.startswith("apptunnel") and "failed: boom" in line for line in lines)
    assert "instr/req" not in text          # a column no row has is left out


def test_json_is_strict_and_carries_ratios():
    """to_json: meta kept, each row with values, ratios and error; inf written as "inf"."""
    rows = [*ROWS, Measurement("fairness", "apptunnel", {"max_over_min": math.inf})]
    data = report.to_json(rows, {"when": "now"})
    text = json.dumps(data, allow_nan=False)        # raises on a bare inf
    back = json.loads(text)
    assert back["when"] == "now" and back["baseline"] == "ssh"
    app = next(m for m in back["measurements"] if m["test"] == "http" and m["path"] == "apptunnel")
    assert app["ratio_to_ssh"]["req_s"] == pytest.approx(0.25)
    assert app["label"] == "apptunnel" and app["error"] is None
    assert back["measurements"][-1]["values"]["max_over_min"] == "inf"


def test_chart_bars_skip_the_baseline_and_follow_table_order():
    """The chart shows each non-ssh row's headline ratio, grouped by test."""
    bars = report.chart_bars(list(reversed(ROWS)))
    assert [b[:2] for b in bars] == [("http (req/s)", "direct"), ("http (req/s)", "nginx TLS -> ssh -R"),
                                     ("http (req/s)", "apptunnel"), ("iperf3-up (Gbit/s)", "apptunnel")]


def test_idle_kib_per_held_connection():
    """Per-connection memory divides the RSS growth by the connections actually held."""
    result = {"held_count": 100, "before": {"server": 1000, "agent": 500},
              "held": {"server": 5000, "agent": 900}}
    assert idle.per_connection_kib(result) == {"server": 40.0, "agent": 4.0}
    assert idle.per_connection_kib({**result, "held_count": 0}) == {}


WRK_OUTPUT = """Running 1s test @ http://127.0.0.1:1/
  2 threads and 32 connections
  Latency Distribution
     50%  460.00us
     75%  600.00us
     90%    1.00ms
     99%    3.10ms
  89749 requests in 1.10s, 10.00MB read
  Non-2xx or 3xx responses: 3
Requests/sec:  81585.12
"""


def test_tool_output_parsers():
    """wrk, iperf3, curl -w and perf stat -x, output become numbers; garbage is an error."""
    r = wrk.parse(WRK_OUTPUT)
    assert (r.requests, r.errors, r.p50_ms, r.p99_ms) == (89749, 3, pytest.approx(0.46), 3.1)
    with pytest.raises(wrk.WrkError):
        wrk.parse("nothing")
    iperf = tcp.parse(json.dumps({"end": {"sum_sent": {"bits_per_second": 2e9, "retransmits": 1},
                                          "sum_received": {"bits_per_second": 1.5e9, "seconds": 3}}}))
    assert iperf.receiver_gbps == 1.5
    with pytest.raises(tcp.IperfError):
        tcp.parse('{"error": "the server is busy"}')
    t = bulk.parse("200 1073741824 0 4.0", 1 << 30)
    assert t.gbps == pytest.approx(2.147, rel=1e-3)
    with pytest.raises(bulk.CurlError):
        bulk.parse("200 100 0 1.0", 1 << 30)        # moved less than asked
    with pytest.raises(bulk.CurlError):
        bulk.parse("502 1073741824 0 1.0", 1 << 30)
    assert procs.parse_perf_instructions("123456,,instructions,1000,100.00,,\n") == 123456
    assert procs.parse_perf_instructions("<not supported>,,instructions,0,100.00,,\n") is None


def test_upload_sink_reads_thebody_kind_from_the_head():
    """The upload sink knows a body by Content-Length or chunked encoding."""
    assert bulk.body_kind(b"POST /upload HTTP/1.1\r\nContent-Length: 42\r\n\r\n") == ("length", 42)
    assert bulk.body_kind(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n") == ("chunked", 0)
    assert bulk.body_kind(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == ("none", 0)


def test_profile_top_frames_from_collapsed_stacks():
    """py-spy's collapsed stacks: self = on top, total = anywhere; line numbers merged."""
    from bench import profile

    collapsed = ("run (a/reactor.py:10);doRead (t/tcp.py:5);parse (x/http1.py:40) 6\n"
                 "run (a/reactor.py:10);doRead (t/tcp.py:5);parse (x/http1.py:41) 2\n"
                 "run (a/reactor.py:10);write (t/tls.py:7) 2\n"
                 "garbage line\n")
    frames, samples = profile.top_frames(collapsed, n=2)
    assert samples == 10
    assert frames[0] == profile.Frame("parse (http1.py)", 0.8, 0.8)
    assert frames[1] == profile.Frame("write (tls.py)", 0.2, 0.2)
    assert "80.0%" in profile.format_frames(frames, samples)
    assert profile.top_frames("") == ([], 0)


def test_rows_the_chart_cannot_draw_are_named():
    """A failed row, an infinite max/min and a row without an ssh -R row are listed."""
    rows = [*ROWS, Measurement("fairness", "ssh", {"max_over_min": 1.0}),
            Measurement("fairness", "apptunnel", {"max_over_min": math.inf}),
            Measurement("curl-up", "apptunnel", error="failed: boom"),
            Measurement("idle-agent", "apptunnel", {"agent_kib": 4.5})]
    assert report.undrawn(rows) == [
        "fairness apptunnel: max/min inf", "curl-up apptunnel: failed: boom",
        "idle-agent apptunnel: agent 4.5KiB, no ssh -R row"]
