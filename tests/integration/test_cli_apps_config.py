"""`apptunnel apps config NAME` against an in-process TLS web app, after a real login."""

from __future__ import annotations

import json
import os
import shlex

import pytest
import pytest_twisted

from tests.support.cli_in_process import cli, login, serve
from tests.support.waiting import in_thread

URL = "https://grafana.apptunnel.localhost:3080/"


@pytest.fixture
def env(web_env):
    """The tests here run against the shared web app environment."""
    return web_env


@pytest_twisted.ensureDeferred
async def test_apps_config_curl_text_and_json(env, home):
    """The three formats name the app's public URL and the profile's CA, cert and key."""
    port, proxy = await serve(env)
    try:
        assert (await login(env, home, proxy, "--ca-pin", env.ca.pin)).code == 0
        curl = await in_thread(cli, home, "apps", "config", "grafana")
        text = await in_thread(cli, home, "apps", "config", "grafana", "--format", "text")
        data = await in_thread(cli, home, "apps", "config", "grafana", "--format", "json")
    finally:
        await port.stopListening()
    files = {name: os.path.join(str(home), f) for name, f in
             [("ca", "ca.crt"), ("cert", "user.crt"), ("key", "user.key")]}
    assert curl.code == 0, curl.err
    assert len(curl.out.splitlines()) == 1
    assert shlex.split(curl.out) == ["curl", "--cacert", files["ca"], "--cert", files["cert"],
                                     "--key", files["key"], URL]
    assert text.code == 0 and URL in text.out and all(path in text.out for path in files.values())
    config = json.loads(data.out)
    assert {k: config[k] for k in ("name", "url", "ca", "cert", "key", "insecure")} == {
        "name": "grafana", "url": URL, **files, "insecure": False}


@pytest_twisted.ensureDeferred
async def test_apps_config_unknown_or_denied_app(env, home):
    """An app that does not exist or that the roles deny is one error line, exit 1."""
    port, proxy = await serve(env)
    try:
        assert (await login(env, home, proxy, "--ca-pin", env.ca.pin)).code == 0
        runs = [await in_thread(cli, home, "apps", "config", name) for name in ("nope", "wiki")]
    finally:
        await port.stopListening()
    for run, name in zip(runs, ("nope", "wiki")):
        assert run.code == 1 and run.out == ""
        assert run.err == (f"apptunnel: error: no app named {name!r} that you may open "
                           "(see apptunnel apps ls)\n")


def test_apps_config_not_logged_in(home):
    """Without a profile the error says to log in."""
    run = cli(home, "apps", "config", "grafana")
    assert run.code == 1 and run.err == "apptunnel: error: not logged in: run apptunnel login\n"
