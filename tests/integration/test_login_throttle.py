"""Password guessing against the installed proxy: throttled, and a flood costs it no memory.

The proxy runs with a short throttle window (12 s) so a test can wait it out. Loopback has a
whole /8: requests bound to 127.0.0.x come from different client addresses.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
import yaml

from tests.support.cli_user import ca_pin, user_env
from tests.support.cluster import BIN, Cluster, audit, post_from as post, wait_until

PASSWORD = "the right password"
WINDOW = 12.0   # long enough that five refused logins fit in it on a loaded machine
FLOOD = 100
RSS_BOUND_MIB = 250      # two argon2 checks at once are 2 x 64 MiB; ten were 640 MiB


@pytest.fixture(scope="module")
def cluster():
    c = Cluster([])
    config = yaml.safe_load(c.proxy_config.read_text())
    config["auth"] = {"throttle": {"window": f"{WINDOW:g}s"}}
    c.proxy_config.write_text(yaml.safe_dump(config))
    try:
        c.start_proxy()
        # issue 9: a user may only name roles that exist
        c.add_role({"kind": "role", "metadata": {"name": "access"}, "spec": {"allow": {}}})
        c.add_user("alice", ["access"], PASSWORD)
        c.add_user("erin", ["access"], PASSWORD)
        c.add_user("frank", ["access"], PASSWORD)
        yield c
    finally:
        c.stop()


def api_login(cluster, user, password, source="127.0.0.1"):
    return post(cluster, "/v1/sessions", {"username": user, "password": password}, source)


def test_six_wrong_passwords_then_429_even_for_the_right_one(cluster):
    """After 5 failures the name is refused with 429 + Retry-After, right password included."""
    for _ in range(5):
        assert api_login(cluster, "alice", "wrong", "127.0.0.2")[0] == 401
    status, headers, body = api_login(cluster, "alice", PASSWORD, "127.0.0.3")
    assert status == 429, body
    assert 1 <= int(headers["Retry-After"]) <= WINDOW
    assert json.loads(body)["error"].startswith("too many sign-in attempts; try again in ")
    # The web form gives the same refusal, on the sign-in page.
    status, headers, body = post(cluster, "/web/login",
                                 f"username=alice&password={PASSWORD.replace(' ', '+')}&next=/",
                                 "127.0.0.4")
    assert status == 429 and "Retry-After" in headers and "too many sign-in attempts" in body
    wait_until(lambda: api_login(cluster, "alice", PASSWORD, "127.0.0.5")[0] == 200,
               WINDOW + 5, "the throttle window to pass", interval=0.5)
    reasons = [e.get("fields", e).get("reason") for e in audit(cluster, "user.login")
               if e.get("actor") == "alice" and e.get("outcome") == "failure"]
    assert "throttled" in reasons and "invalid credentials" in reasons


def test_unknown_users_get_the_same_429(cluster):
    """A name that does not exist is throttled exactly like one that does."""
    answers = []
    for name in ("erin", "nobody-at-all"):
        for _ in range(5):
            assert api_login(cluster, name, "wrong", "127.0.0.6")[0] == 401
        status, headers, body = api_login(cluster, name, "wrong", "127.0.0.7")
        answers.append((status, json.loads(body)["error"].split(" in ")[0]))
    assert answers[0] == answers[1] == (429, "too many sign-in attempts; try again")


def test_cli_login_prints_the_429_on_one_line(cluster, tmp_path):
    """`apptunnel login` reports the throttle in one line, with how long to wait."""
    for _ in range(5):
        api_login(cluster, "frank", "wrong", "127.0.0.8")
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run(
        [str(BIN / "apptunnel"), "login", "--proxy", cluster.public_addr, "--user", "frank",
         "--password-stdin", "--ca-pin", ca_pin(cluster)], input=PASSWORD + "\n",
        capture_output=True, text=True, timeout=60, env=user_env(home), cwd=str(tmp_path))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "too many sign-in attempts; try again in" in lines[0], result.stderr


def test_a_flood_costs_no_memory_and_a_real_user_still_signs_in(cluster):
    """100 parallel wrong logins: RSS stays bounded and a real login finishes within 2 s."""
    wait_until(lambda: api_login(cluster, "erin", PASSWORD, "127.0.0.9")[0] == 200,
               WINDOW + 5, "erin's window to pass", interval=0.5)
    before = cluster.proxy.rss_kib()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], cluster.proxy.rss_kib())
            time.sleep(0.02)

    def guess(i):
        try:
            post(cluster, "/v1/sessions", {"username": f"victim{i % 7}", "password": f"g{i}"},
                 f"127.0.1.{i % 5 + 1}", timeout=60)
        except OSError:
            pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    flood = [threading.Thread(target=guess, args=(i,), daemon=True) for i in range(FLOOD)]
    for t in flood:
        t.start()
    time.sleep(0.5)              # the flood is in the queue now
    started = time.monotonic()
    status, _, body = api_login(cluster, "erin", PASSWORD, "127.0.0.10")
    took = time.monotonic() - started
    for t in flood:
        t.join(60)
    done.set()
    sampler.join(5)
    assert status == 200, body
    assert took < 2.0, f"a real login took {took:.2f}s during the flood"
    grew = (peak[0] - before) / 1024
    assert grew < RSS_BOUND_MIB, f"RSS grew by {grew:.0f} MiB during the flood"
    assert cluster.proxy.alive()
