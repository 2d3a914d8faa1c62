"""apptunnel-bot without a network: bot.yaml parsing (one file:key error per bad file),
renewal timing and retries on a Clock with fake proxy calls, and the identity output."""

from __future__ import annotations

import os
import threading

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet import defer, task

from apptunnel.auth.ca import ClusterCA
from apptunnel.bot.client import BotCallFailed
from apptunnel.bot.config import AppProxyOutput, IdentityOutput, load_bot_config
from apptunnel.bot.outputs import write_identity
from apptunnel.bot.renewal import renew_delay, retry_delay
from apptunnel.bot.service import BotService
from apptunnel.config import ConfigError

PIN = "sha256:" + "ab" * 32
NOW = 1_800_000_000.0


def write(tmp_path, text: str) -> str:
    path = tmp_path / "bot.yaml"
    path.write_text(text)
    return str(path)


GOOD = f"""\
data_dir: ./state
proxy_addr: proxy.example.com:443
join: {{token: secret, ca_pin: "{PIN}"}}
certificate_ttl: 10m
outputs:
  - {{type: identity, path: ./out}}
  - {{type: app-proxy, app: "grafana", listen: "127.0.0.1:8080"}}
  - {{type: app-proxy, app: "db:5432", listen: "localhost:15432"}}
"""


def test_a_good_file(tmp_path):
    config = load_bot_config(write(tmp_path, GOOD))
    assert config.data_dir == str(tmp_path / "state")
    assert (config.join_token, config.ca_pin, config.certificate_ttl) == ("secret", PIN, 600.0)
    assert config.outputs == (IdentityOutput(str(tmp_path / "out")),
                              AppProxyOutput("grafana", "127.0.0.1", 8080),
                              AppProxyOutput("db", "127.0.0.1", 15432, 5432))


@pytest.mark.parametrize("change, key", [
    (("certificate_ttl: 10m", "certificate_ttl: 2h"), "certificate_ttl"),
    (("certificate_ttl: 10m", "certificate_ttl: soon"), "certificate_ttl"),
    (("proxy_addr: proxy.example.com:443", "proxy_addr: 'a b:x'"), "proxy_addr"),
    ((f'ca_pin: "{PIN}"', 'ca_pin: "md5:00"'), "join.ca_pin"),
    ((f', ca_pin: "{PIN}"', ""), "join.ca_pin"),
    (("type: identity", "type: files"), "outputs[0].type"),
    (("path: ./out", "path: ./out, mode: 644"), "outputs[0].mode"),
    (('listen: "127.0.0.1:8080"', 'listen: "0.0.0.0:8080"'), "outputs[1].listen"),
    (('listen: "localhost:15432"', 'listen: "127.0.0.1:8080"'), "outputs[2].listen"),
    (('app: "grafana"', 'app: "Bad App"'), "outputs[1].app"),
    (("data_dir: ./state", "data_dir: ./state\ntoken: x"), "token"),
])
def test_a_bad_file_is_one_line_naming_the_key(tmp_path, change, key):
    """Each mistake is a ConfigError of one line: file: key: problem."""
    with pytest.raises(ConfigError) as info:
        load_bot_config(write(tmp_path, GOOD.replace(*change)))
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(tmp_path / "bot.yaml")), text
    assert f" {key}: " in text or f":{key}:" in text or f" {key} " in text, text


def test_required_keys(tmp_path):
    with pytest.raises(ConfigError, match="data_dir"):
        load_bot_config(write(tmp_path, "proxy_addr: p:443\n"))


def test_renewal_is_due_with_a_third_of_the_life_left_and_retries_back_off():
    assert renew_delay(not_after=1200.0, lifetime=1200.0, now=0.0) == 800.0
    assert renew_delay(not_after=10.0, lifetime=1200.0, now=50.0) == 0.0
    delays = [retry_delay(n, not_after=1000.0, now=0.0) for n in range(1, 9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    assert retry_delay(6, not_after=10.0, now=2.0) == 2.0      # a quarter of what is left
    assert retry_delay(3, not_after=5.0, now=9.0) == 4.0       # expired: plain backoff


class FakeProxy:
    """join/renew as the bot's client module offers them, issuing real bot certificates
    from a CA on the test's Clock; `fail` makes the next renewals fail."""

    def __init__(self, ca: ClusterCA):
        self.ca = ca
        self.joins = self.renewals = self.fail = 0
        self.generation = 0

    def _issue(self, public_key: str, ttl: float):
        self.generation += 1
        return self.ca.issue_bot_cert(public_key, "ci", ("r",), self.generation, ttl), \
            self.ca.cert_pem

    def join(self, proxy, pin, token, public_key, ttl, now):
        self.joins += 1
        return self._issue(public_key, ttl)

    def renew(self, proxy, ca_pem, cert_pem, key_pem, public_key, ttl):
        if self.fail:
            self.fail -= 1
            raise BotCallFailed("cannot reach the proxy")
        self.renewals += 1
        return self._issue(public_key, ttl)


@pytest.fixture
def bot(tmp_path):
    clock = task.Clock()
    clock.advance(NOW)
    ca = ClusterCA.load_or_create(str(tmp_path / "ca"), "unit", clock)
    proxy = FakeProxy(ca)
    path = write(tmp_path, GOOD.replace("certificate_ttl: 10m", "certificate_ttl: 60s")
                 .replace('  - {type: app-proxy, app: "grafana", listen: "127.0.0.1:8080"}\n', "")
                 .replace('  - {type: app-proxy, app: "db:5432", listen: "localhost:15432"}\n', ""))

    def make():
        service = BotService(load_bot_config(path), clock, calls=proxy,
                             run=lambda f, *a: defer.maybeDeferred(f, *a))
        service.startService()
        return service

    return clock, proxy, make, tmp_path


def not_after(service) -> float:
    return x509.load_pem_x509_certificate(service.identity.cert_pem) \
        .not_valid_after_utc.timestamp()


def test_joins_once_then_renews_at_two_thirds_of_each_lifetime(bot):
    """60 s certificates: renewed at 40 s, 80 s, 120 s...; the token is used once."""
    clock, proxy, make, tmp_path = bot
    service = make()
    assert (proxy.joins, proxy.renewals) == (1, 0)
    clock.advance(39.9)
    assert proxy.renewals == 0
    clock.advance(0.2)
    assert proxy.renewals == 1
    for expected in (2, 3, 4):
        clock.advance(40)
        assert proxy.renewals == expected
    assert proxy.joins == 1
    assert not_after(service) == pytest.approx(clock.seconds() + 60, abs=1)
    assert oct(os.stat(tmp_path / "state" / "bot.key").st_mode & 0o777) == "0o600"
    assert oct(os.stat(tmp_path / "state").st_mode & 0o777) == "0o700"
    out = tmp_path / "out"
    assert (out / "tls.crt").read_bytes() == service.identity.cert_pem
    service.stopService()


def test_a_restart_takes_the_stored_identity(bot):
    clock, proxy, make, _ = bot
    make().stopService()
    make().stopService()
    assert proxy.joins == 1


def test_failed_renewals_are_retried_with_backoff_until_one_works(bot):
    """Three failures (1 s, 2 s, 4 s apart) then a success: the certificate never lapses."""
    clock, proxy, make, _ = bot
    service = make()
    proxy.fail = 3
    clock.advance(40.1)                       # due: fails
    assert proxy.renewals == 0
    for step in (1, 2):
        clock.advance(step)
        assert proxy.renewals == 0
    clock.advance(4)
    assert proxy.renewals == 1
    assert not_after(service) > clock.seconds() + 55
    service.stopService()


def test_an_expired_certificate_stops_renewing(bot):
    """Once the certificate has expired with renewals failing, the bot stops asking."""
    clock, proxy, make, _ = bot
    service = make()
    proxy.fail = 10_000
    for _ in range(200):
        clock.advance(1)
    calls_before = 10_000 - proxy.fail
    for _ in range(100):
        clock.advance(1)
    assert 10_000 - proxy.fail == calls_before
    assert not clock.getDelayedCalls()
    service.stopService()


def test_identity_output_is_replaced_whole_and_private(tmp_path):
    """0700 directory, 0600 files, and a reader holding the old file still reads all of
    it while the new one replaces it (a rename, never an in-place rewrite)."""
    out = tmp_path / "id"
    write_identity(str(out), b"C" * 5000, b"K" * 300, b"A" * 700)
    assert oct(out.stat().st_mode & 0o777) == "0o700"
    for name in ("tls.crt", "tls.key", "ca.crt"):
        assert oct((out / name).stat().st_mode & 0o777) == "0o600"
    reader = open(out / "tls.crt", "rb")
    seen, stop = [], threading.Event()

    def read_all():
        while not stop.is_set():
            with open(out / "tls.crt", "rb") as f:
                seen.append(f.read())

    thread = threading.Thread(target=read_all)
    thread.start()
    try:
        for n in range(50):
            write_identity(str(out), bytes([65 + n % 26]) * 5000, b"K" * 300, b"A" * 700)
    finally:
        stop.set()
        thread.join(5)
    assert reader.read() == b"C" * 5000
    reader.close()
    assert seen and all(len(data) == 5000 and len(set(data)) == 1 for data in seen)
    assert sorted(os.listdir(out)) == ["ca.crt", "tls.crt", "tls.key"]


def test_the_examples_in_etc_are_valid():
    """etc/bot.yaml loads (its join block commented out, as for a joined bot), and the
    systemd unit runs the bot plugin with the hardening of the others."""
    root = os.path.join(os.path.dirname(__file__), "..", "..", "etc")
    config = load_bot_config(os.path.join(root, "bot.yaml"))
    assert config.certificate_ttl == 1200.0 and len(config.outputs) == 2
    unit = open(os.path.join(root, "apptunnel-bot.service")).read()
    for line in ("apptunnel-bot --config", "LimitNOFILE=", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "UMask=0077"):
        assert line in unit


def test_a_join_is_retried_while_the_proxy_is_away_and_fatal_when_refused(bot):
    """Unreachable: retried with backoff (1 s, 2 s); refused (final): the bot stops."""
    clock, proxy, make, _ = bot
    attempts = []
    real_join = proxy.join

    def flaky(*args):
        attempts.append(clock.seconds())
        if len(attempts) < 3:
            raise BotCallFailed("cannot reach the proxy")
        return real_join(*args)

    proxy.join = flaky
    service = make()
    assert service.identity is None
    clock.advance(1)
    clock.advance(2)
    assert service.identity is not None
    assert [round(t - attempts[0]) for t in attempts] == [0, 1, 3]
    service.stopService()


def test_a_refused_join_stops_the_bot(bot, monkeypatch):
    clock, proxy, make, _ = bot
    stopped = []
    monkeypatch.setattr("apptunnel.bot.service.fatal", lambda reactor, line: stopped.append(line))

    def refused(*args):
        raise BotCallFailed("the proxy refused: invalid or expired join token", final=True)

    proxy.join = refused
    make()
    assert stopped == ["apptunnel-bot: join failed: the proxy refused: invalid or expired "
                       "join token"]
