"""The proxy id survives restarts and a damaged id file is refused, not silently replaced."""

import os
import stat

import pytest

from apptunnel.proxy.identity import PROXY_ID_FILE, ProxyIdError, load_or_create_proxy_id


def test_id_is_made_once_and_kept(tmp_path):
    first = load_or_create_proxy_id(str(tmp_path))
    assert len(first) == 16 and int(first, 16) >= 0
    assert load_or_create_proxy_id(str(tmp_path)) == first
    assert stat.S_IMODE(os.stat(tmp_path / PROXY_ID_FILE).st_mode) == 0o600


def test_two_data_dirs_get_two_ids(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert load_or_create_proxy_id(str(tmp_path / "a")) != load_or_create_proxy_id(str(tmp_path / "b"))


@pytest.mark.parametrize("content", [b"", b"xyz\n", b"0123456789abcdef0\n", b"\xff\xfe"])
def test_damaged_file_is_refused(tmp_path, content):
    (tmp_path / PROXY_ID_FILE).write_bytes(content)
    with pytest.raises(ProxyIdError, match="16 hex digits"):
        load_or_create_proxy_id(str(tmp_path))
    assert (tmp_path / PROXY_ID_FILE).read_bytes() == content
