"""The `audit:` section of proxy.yaml: on_failure, block_timeout, journal_max_bytes (issue
13 item 4): defaults, values, one-line file:key errors, unknown keys refused."""

from pathlib import Path

import pytest

from apptunnel.config import AuditConfig, ConfigError, load_proxy_config

BASE = """\
data_dir: data
public_addr: apptunnel.localhost:3080
"""


def load(tmp_path: Path, extra: str):
    path = tmp_path / "proxy.yaml"
    path.write_text(BASE + extra)
    return load_proxy_config(str(path))


def test_defaults_refuse_with_a_64_mib_journal(tmp_path):
    assert load(tmp_path, "").audit == AuditConfig("refuse", 10.0, 64 * 1024 * 1024)
    assert load(tmp_path, "audit: {file: a.jsonl}\n").audit == AuditConfig()


def test_values_are_read(tmp_path):
    config = load(tmp_path, "audit: {on_failure: block, block_timeout: 30s, "
                            "journal_max_bytes: 1048576, file: a.jsonl}\n")
    assert config.audit == AuditConfig("block", 30.0, 1048576)
    assert config.audit_file == str(tmp_path / "a.jsonl")


@pytest.mark.parametrize("extra, message", [
    ("audit: {on_failure: drop}\n",
     "proxy.yaml:3: audit.on_failure: expected one of refuse, block, got 'drop'"),
    ("audit: {block_timeout: 0s}\n", "audit.block_timeout: must be longer than zero"),
    ("audit: {block_timeout: 1h}\n", "audit.block_timeout: must be at most 5m"),
    ("audit: {journal_max_bytes: 100}\n", "audit.journal_max_bytes: must be at least 4096"),
    ("audit: {journal_max_bytes: 1.5}\n", "audit.journal_max_bytes: expected a whole number"),
    ("audit: {journal_max_bytes: true}\n", "expected a whole number, got True"),
    ("audit: {on_falure: block}\n", "audit.on_falure: unknown key (did you mean 'on_failure'?)"),
])
def test_mistakes_are_one_line(tmp_path, extra, message):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, extra)
    text = str(err.value)
    assert message in text and "\n" not in text
