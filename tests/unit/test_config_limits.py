"""The `limits:` and `auth.throttle:` sections of proxy.yaml: defaults, values, one-line errors."""

from pathlib import Path

import pytest

from apptunnel.config import ConfigError, LimitsConfig, ThrottleConfig, load_proxy_config

BASE = """\
data_dir: data
public_addr: apptunnel.localhost:3080
"""


def load(tmp_path: Path, extra: str):
    path = tmp_path / "proxy.yaml"
    path.write_text(BASE + extra)
    return load_proxy_config(str(path))


def test_defaults_without_the_sections(tmp_path):
    """No sections: a 10 s handshake, 10000 / 256 connections, 5 / 20 failures in 5 minutes."""
    config = load(tmp_path, "")
    assert config.limits == LimitsConfig(10.0, 10_000, 256)
    assert config.throttle == ThrottleConfig(5, 20, 300.0, 10_000, 2, 32)


def test_values_are_read(tmp_path):
    """Every key of both sections is read (and each is enforced by the proxy)."""
    config = load(tmp_path, """\
limits: {handshake_timeout: 1500ms, max_connections: 50, max_connections_per_ip: 20}
auth:
  throttle: {max_failures_per_user: 3, max_failures_per_address: 9, window: 1m,
             max_tracked: 100, concurrent_hashes: 1, queued_hashes: 4}
""")
    assert config.limits == LimitsConfig(1.5, 50, 20)
    assert config.throttle == ThrottleConfig(3, 9, 60.0, 100, 1, 4)


def test_per_ip_default_never_exceeds_a_small_total(tmp_path):
    """A total below the per-address default lowers the per-address cap with it."""
    assert load(tmp_path, "limits: {max_connections: 100}\n").limits.max_connections_per_ip == 100


@pytest.mark.parametrize("extra, message", [
    ("limits: {max_connections: 0}\n", "proxy.yaml:3: limits.max_connections: must be from 1"),
    ("limits: {max_connections: 5, max_connections_per_ip: 6}\n",
     "limits.max_connections_per_ip: must not exceed max_connections (5)"),
    ("limits: {handshake_timeout: 0s}\n", "limits.handshake_timeout: must be longer than zero"),
    ("limits: {max_conections: 5}\n", "limits.max_conections: unknown key (did you mean"),
    ("auth: {throttle: {window: soon}}\n", "auth.throttle.window: expected a duration"),
    ("auth: {throttle: {queued_hashes: 1.5}}\n", "auth.throttle.queued_hashes: expected a whole number"),
    ("auth: {throttle: {max_failures_per_user: true}}\n", "expected a whole number, got True"),
    ("auth: {throtle: {}}\n", "auth.throtle: unknown key (did you mean 'throttle'?)"),
    ("auth: [1]\n", "auth: expected a mapping"),
])
def test_mistakes_are_one_line(tmp_path, extra, message):
    """Each mistake is one line naming the file, line and key."""
    with pytest.raises(ConfigError) as err:
        load(tmp_path, extra)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("value, setting", [
    ("", "off"), ("auth: {second_factor: off}\n", "off"), ("auth: {second_factor: on}\n", "on"),
    ("auth: {second_factor: 'off'}\n", "off"), ("auth: {second_factor: otp}\n", "otp"),
    ("auth: {second_factor: webauthn}\n", "webauthn"),
    ("auth: {second_factor: optional}\n", "optional"),
])
def test_second_factor_setting(tmp_path, value, setting):
    """auth.second_factor defaults to off; YAML's bare off/on (false/true) are understood."""
    assert load(tmp_path, value).second_factor == setting


def test_second_factor_mistake_is_one_line(tmp_path):
    """An unknown setting is one line naming the choices."""
    with pytest.raises(ConfigError) as err:
        load(tmp_path, "auth: {second_factor: sms}\n")
    assert "auth.second_factor: expected one of off, otp, webauthn, on, optional, got 'sms'" \
        in str(err.value)
