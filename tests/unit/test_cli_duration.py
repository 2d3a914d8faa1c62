"""duration_arg: every CLI duration option (--ttl, --timeout) is read by one function."""

from __future__ import annotations

import pytest

from apptunnel.cli.context import UsageError, duration_arg


@pytest.mark.parametrize("text, expected", [("90s", 90.0), ("2h", 7200.0), ("1m30s", 90.0)])
def test_durations_in_seconds(text, expected):
    assert duration_arg("--ttl", text) == expected


def test_absent_is_none():
    assert duration_arg("--ttl", None) is None


@pytest.mark.parametrize("text, problem", [
    ("0s", "--ttl: must be more than 0 and at most 30d, got '0s'"),
    ("31d", "--ttl: must be more than 0 and at most 30d, got '31d'"),
    ("soon", "--ttl: "),
])
def test_bad_durations_name_the_flag(text, problem):
    with pytest.raises(UsageError) as caught:
        duration_arg("--ttl", text, 30 * 86400.0, "30d")
    assert str(caught.value).startswith(problem)
    assert caught.value.code == 2
