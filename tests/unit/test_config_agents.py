"""proxy.yaml keys for agent trust: agent_cert_ttl, app_grace_period, allowed_public_addrs."""

from __future__ import annotations

import pytest

from apptunnel.config import ConfigError, load_proxy_config
from tests.support.config_files import PROXY_OK, write


def test_defaults(tmp_path):
    """3 days, 2 minutes, nothing allowed outside *.PUBLIC_HOST."""
    config = load_proxy_config(write(tmp_path, PROXY_OK))
    assert (config.agent_cert_ttl, config.app_grace_period) == (3 * 86400.0, 120.0)
    assert config.allowed_public_addrs == ()


def test_values_are_parsed_and_normalised(tmp_path):
    """Durations parse; allow-list entries are lower-cased, trailing dot dropped."""
    config = load_proxy_config(write(tmp_path, PROXY_OK + (
        "agent_cert_ttl: 12h\napp_grace_period: 30s\n"
        "allowed_public_addrs: [Localhost:8443, '*.Apps.Example.', 127.0.0.1]\n")))
    assert (config.agent_cert_ttl, config.app_grace_period) == (43200.0, 30.0)
    assert config.allowed_public_addrs == ("localhost:8443", "*.apps.example", "127.0.0.1")


@pytest.mark.parametrize("text, key", [
    ("agent_cert_ttl: 5s\n", "agent_cert_ttl"),
    ("agent_cert_ttl: 365d\n", "agent_cert_ttl"),
    ("app_grace_period: soon\n", "app_grace_period"),
    ("allowed_public_addrs: localhost\n", "allowed_public_addrs"),
    ("allowed_public_addrs: [5]\n", "allowed_public_addrs[0]"),
    ("allowed_public_addrs: ['*.x.example:443']\n", "allowed_public_addrs[0]"),
    ("allowed_public_addrs: ['a b']\n", "allowed_public_addrs[0]"),
    ("ca_min_grace_period: 0s\n", "ca_min_grace_period"),
    ("ca_min_grace_period: soon\n", "ca_min_grace_period"),
])
def test_bad_values_are_one_line_naming_the_key(tmp_path, text, key):
    """Each problem is one `file:line: key: problem` line."""
    with pytest.raises(ConfigError) as info:
        load_proxy_config(write(tmp_path, PROXY_OK + text))
    assert f": {key}: " in str(info.value) and "\n" not in str(info.value)


def test_ca_min_grace_period_defaults_to_an_hour_and_can_be_lowered(tmp_path):
    """The floor `auth rotate --type user-ca|host-ca` enforces on --grace-period."""
    assert load_proxy_config(write(tmp_path, PROXY_OK)).ca_min_grace_period == 3600.0
    lowered = load_proxy_config(write(tmp_path, PROXY_OK + "ca_min_grace_period: 2s\n"))
    assert lowered.ca_min_grace_period == 2.0
