"""apptunnel.config: YAML files -> config objects, one clear error line for every mistake."""

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apptunnel.config import (
    AgentConfig,
    ConfigError,
    ProxyConfig,
    load_agent_config,
    load_proxy_config,
    load_yaml_documents,
    parse_duration,
)
from tests.support.config_files import PROXY_OK, write

ETC = Path(__file__).resolve().parents[2] / "etc"

AGENT_OK = """\
data_dir: agent-data
proxy_addr: 127.0.0.1:3024
apps:
  - name: grafana
    uri: http://127.0.0.1:3000
"""

PIN = "sha256:" + "ab" * 32


def test_example_proxy_yaml_parses():
    """etc/proxy.yaml is a valid proxy config for a local try-out."""
    config = load_proxy_config(str(ETC / "proxy.yaml"))
    assert isinstance(config, ProxyConfig)
    assert config.public_host == "apptunnel.localhost"
    assert config.public_port == 3080
    assert (config.web_listen_host, config.web_listen_port) == ("127.0.0.1", 3080)
    assert (config.tunnel_listen_host, config.tunnel_listen_port) == ("127.0.0.1", 3024)
    assert config.backend_type == "sqlite"
    assert config.data_dir.startswith("/var/lib/apptunnel")


def test_example_agent_yaml_parses():
    """etc/agent.yaml is a valid agent config: HTTP apps, a TCP app and a multi-port one."""
    config = load_agent_config(str(ETC / "agent.yaml"))
    assert isinstance(config, AgentConfig)
    assert config.proxy_addr == "127.0.0.1:3024"
    assert [app.name for app in config.apps] == ["grafana", "dev-wiki", "pg", "cache"]
    assert config.apps[0].rewrite_headers == (("X-Webauth-Team", "sre"),)
    assert config.apps[1].insecure_skip_verify is True
    assert [app.kind for app in config.apps] == ["http", "http", "tcp", "tcp"]
    assert config.apps[3].tcp_ports == ((6379, 6379), (8000, 8010))


def test_proxy_defaults(tmp_path):
    """A minimal proxy config gets the documented defaults."""
    config = load_proxy_config(write(tmp_path, PROXY_OK))
    assert config.path == str(tmp_path / "config.yaml")
    assert config.data_dir == str(tmp_path / "data")
    assert config.backend_path == str(tmp_path / "data" / "apptunnel.db")
    assert config.tls_cert_file is None and config.tls_key_file is None
    assert config.jwt_header == "Apptunnel-Jwt-Assertion"
    assert config.jwt_algorithm == "RS256"
    assert config.jwt_ttl == 300.0
    assert config.session_ttl == 43200.0
    assert (config.keepalive_interval, config.keepalive_timeout) == (5.0, 15.0)
    assert config.audit_file is None


def test_proxy_full(tmp_path):
    """Every proxy key is read, with durations parsed and relative paths resolved."""
    path = write(tmp_path, PROXY_OK + """\
backend: {type: sqlite, path: db/main.db}
tls: {cert_file: tls/cert.pem, key_file: /etc/key.pem}
jwt: {header: Teleport-Jwt-Assertion, algorithm: ES256, ttl: 2m}
session_ttl: 2h30m
keepalive: {interval: 2s, timeout: 6}
audit: {file: audit.jsonl}
""")
    config = load_proxy_config(path)
    assert config.backend_path == str(tmp_path / "db" / "main.db")
    assert config.tls_cert_file == str(tmp_path / "tls" / "cert.pem")
    assert config.tls_key_file == "/etc/key.pem"
    assert (config.jwt_header, config.jwt_algorithm, config.jwt_ttl) == (
        "Teleport-Jwt-Assertion", "ES256", 120.0)
    assert config.session_ttl == 9000.0
    assert (config.keepalive_interval, config.keepalive_timeout) == (2.0, 6.0)
    assert config.audit_file == str(tmp_path / "audit.jsonl")


def test_relative_paths_use_config_directory_not_cwd(tmp_path, monkeypatch):
    """Relative paths mean the same thing whatever directory the process starts in."""
    (tmp_path / "conf").mkdir()
    path = write(tmp_path / "conf", PROXY_OK)
    monkeypatch.chdir("/")
    assert load_proxy_config(path).data_dir == str(tmp_path / "conf" / "data")
    agent = load_agent_config(write(tmp_path / "conf", AGENT_OK, "agent.yaml"))
    assert agent.data_dir == str(tmp_path / "conf" / "agent-data")


def test_cluster_name_defaults_to_public_host(tmp_path):
    """Without cluster_name, the public host names the cluster."""
    text = PROXY_OK.replace("cluster_name: test\n", "")
    assert load_proxy_config(write(tmp_path, text)).cluster_name == "apptunnel.localhost"


def test_public_addr_port_defaults_to_443_and_listen_port_zero_allowed(tmp_path):
    """public_addr without a port means 443; listeners may ask for an ephemeral port."""
    text = PROXY_OK.replace("apptunnel.localhost:3080", "proxy.example.com").replace(
        "127.0.0.1:3080", "127.0.0.1:0").replace("127.0.0.1:3024", "\"[::1]:0\"")
    config = load_proxy_config(write(tmp_path, text))
    assert (config.public_host, config.public_port) == ("proxy.example.com", 443)
    assert config.web_listen_port == 0
    assert (config.tunnel_listen_host, config.tunnel_listen_port) == ("::1", 0)


def test_agent_full(tmp_path):
    """Every agent and app key is read into AppConfig records."""
    path = write(tmp_path, f"""\
data_dir: /var/lib/agent
proxy_addr: proxy.example.com:3024
join: {{token: abc123, ca_pin: "{PIN}"}}
keepalive: {{interval: 1s, timeout: 3s}}
apps:
  - name: grafana
    uri: https://grafana.internal:3000/
    labels: {{team: sre, env: "1"}}
    public_addr: grafana.example.com
    insecure_skip_verify: true
    rewrite:
      headers:
        - "X-Forwarded-Team: sre"
        - "X-Empty:"
    jwt_claims: [sub, roles, sub]
  - name: wiki
    uri: http://10.0.0.5
""")
    config = load_agent_config(path)
    assert (config.join_token, config.ca_pin) == ("abc123", PIN)
    assert (config.proxy_host, config.proxy_port) == ("proxy.example.com", 3024)
    assert (config.keepalive_interval, config.keepalive_timeout) == (1.0, 3.0)
    grafana, wiki = config.apps
    assert grafana.labels == {"team": "sre", "env": "1"}
    assert type(grafana.labels) is dict
    assert grafana.public_addr == "grafana.example.com"
    assert grafana.insecure_skip_verify is True
    assert grafana.rewrite_headers == (("X-Forwarded-Team", "sre"), ("X-Empty", ""))
    assert grafana.jwt_claims == ("sub", "roles")
    assert (wiki.labels, wiki.public_addr, wiki.jwt_claims, wiki.rewrite_headers) == (
        {}, None, None, ())


def test_app_description_is_one_line_for_the_catalogue(tmp_path):
    """An app may carry a description; it reaches the hello and back (absent: empty)."""
    from apptunnel.messages import AppAnnouncement, MessageError
    config = load_agent_config(write(tmp_path, AGENT_OK + "    description: Team handbook\n"))
    assert config.apps[0].description == "Team handbook"
    sent = AppAnnouncement("wiki", "http://x", description="Team handbook")
    assert AppAnnouncement.parse(sent.to_dict(), "apps[0]") == sent
    assert "description" not in AppAnnouncement("wiki", "http://x").to_dict()
    for bad in ("a\nb", "x" * 201, 5):
        with pytest.raises(MessageError):
            AppAnnouncement.parse({"name": "wiki", "uri": "http://x", "description": bad}, "a")


def test_agent_join_is_optional(tmp_path):
    """An agent that already joined needs no join section."""
    config = load_agent_config(write(tmp_path, AGENT_OK))
    assert config.join_token is None and config.ca_pin is None


# (file kind, YAML text, expected line, expected key, fragment of the problem)
BAD = [
    ("proxy", PROXY_OK.replace("127.0.0.1:3080", "abc"), 4, "web_listen_addr",
     "expected host:port, got 'abc'"),
    ("proxy", PROXY_OK.replace("127.0.0.1:3024", "127.0.0.1:99999"), 5, "tunnel_listen_addr",
     "port must be 1-65535"),
    ("proxy", PROXY_OK.replace("127.0.0.1:3024", "::1:3024"), 5, "tunnel_listen_addr",
     "IPv6"),
    ("proxy", PROXY_OK.replace("127.0.0.1:3024", "\"[nope]:3024\""), 5, "tunnel_listen_addr",
     "expected host:port"),
    ("proxy", PROXY_OK.replace("apptunnel.localhost:3080", "apptunnel.localhost:0"), 3,
     "public_addr", "port must be 1-65535"),
    ("proxy", PROXY_OK + "web_listen_adr: 1.2.3.4:5\n", 6, "web_listen_adr",
     "did you mean 'web_listen_addr'"),
    ("proxy", PROXY_OK + "colour: blue\n", 6, "colour", "unknown key (valid keys: cluster_name"),
    ("proxy", PROXY_OK.replace("data_dir: data\n", ""), 1, "data_dir", "required key is missing"),
    ("proxy", PROXY_OK.replace("data_dir: data", "data_dir:"), 2, "data_dir", "must not be empty"),
    ("proxy", PROXY_OK.replace("data_dir: data", "data_dir: [a]"), 2, "data_dir",
     "expected a string, got a list"),
    ("proxy", PROXY_OK + "backend:\n  type: postgres\n  dsn: host=h password=x\n", 8,
     "backend.dsn", "must not contain a password"),
    ("proxy", PROXY_OK + "backend:\n  type: postgres\n  dsn: postgresql://u:x@h/d\n", 8,
     "backend.dsn", "must not contain a password"),
    ("proxy", PROXY_OK + "backend:\n  type: sqlite\n  dsn: host=h\n", 8,
     "backend.dsn", "only for backend type postgres"),
    ("proxy", PROXY_OK + "backend:\n  type: postgres\n  dsn: host=h\n  path: x.db\n", 9,
     "backend.path", "only for backend type sqlite"),
    ("proxy", PROXY_OK + "backend:\n  type: postgres\n  dsn: host=h\n  encryption_key_file: k\n",
     9, "backend.encryption_key_file", "cannot read"),
    ("proxy", PROXY_OK + "backend:\n  type: mysql\n", 7, "backend.type",
     "expected one of sqlite, postgres, got 'mysql'"),
    ("proxy", PROXY_OK + "backend:\n  tpye: sqlite\n", 7, "backend.tpye", "did you mean 'type'"),
    ("proxy", PROXY_OK + "backend: sqlite\n", 6, "backend", "expected a mapping, got a string"),
    ("proxy", PROXY_OK + "tls:\n  cert_file: a.pem\n", 6, "tls.key_file",
     "required when tls.cert_file is set"),
    ("proxy", PROXY_OK + "jwt:\n  algorithm: HS256\n", 7, "jwt.algorithm",
     "expected one of RS256, ES256, EdDSA"),
    ("proxy", PROXY_OK + "jwt:\n  header: 'Bad Header'\n", 7, "jwt.header",
     "not a valid HTTP header name"),
    ("proxy", PROXY_OK + "jwt:\n  header: X_Identity\n", 7, "jwt.header", "must not contain '_'"),
    ("proxy", PROXY_OK + "jwt:\n  ttl: 0s\n", 7, "jwt.ttl", "longer than zero"),
    ("proxy", PROXY_OK + "session_ttl: forever\n", 6, "session_ttl",
     "expected a duration like 90s"),
    ("proxy", PROXY_OK + "session_ttl: -5\n", 6, "session_ttl", "non-negative"),
    ("proxy", PROXY_OK + "keepalive:\n  interval: 10s\n  timeout: 5s\n", 8, "keepalive.timeout",
     "longer than keepalive.interval"),
    ("proxy", PROXY_OK + "keepalive:\n  interval: yes\n", 7, "keepalive.interval",
     "expected a duration"),
    ("proxy", PROXY_OK + "cluster_name: again\n", 6, None, "duplicate key 'cluster_name'"),
    ("agent", AGENT_OK.replace("proxy_addr: 127.0.0.1:3024\n", ""), 1, "proxy_addr",
     "required key is missing"),
    ("agent", AGENT_OK.replace("127.0.0.1:3024", "proxy.example.com"), 2, "proxy_addr",
     "expected host:port"),
    ("agent", AGENT_OK + "  - name: Grafana_2\n    uri: http://x\n", 6, "apps[1].name",
     "expected a DNS label"),
    ("agent", AGENT_OK + "  - name: grafana\n    uri: http://x\n", 6, "apps[1].name",
     "duplicate app name 'grafana' (first at line 4)"),
    ("agent", AGENT_OK.replace("http://127.0.0.1:3000", "ftp://127.0.0.1"), 5, "apps[0].uri",
     "expected an http:// or https:// URL"),
    ("agent", AGENT_OK.replace("http://127.0.0.1:3000", "http:///path"), 5, "apps[0].uri",
     "URL has no host"),
    ("agent", AGENT_OK.replace("http://127.0.0.1:3000", "http://h:99999"), 5, "apps[0].uri",
     "not a valid URL"),
    ("agent", AGENT_OK.replace("    uri: http://127.0.0.1:3000\n", ""), 4, "apps[0].uri",
     "required key is missing"),
    ("agent", AGENT_OK + "    lables: {a: b}\n", 6, "apps[0].lables", "did you mean 'labels'"),
    ("agent", AGENT_OK + "    labels: {a: 1}\n", 6, "apps[0].labels.a",
     "expected a string, got a number 1 (quote it)"),
    ("agent", AGENT_OK + "    labels: [a]\n", 6, "apps[0].labels", "expected a mapping"),
    ("agent", AGENT_OK + "    insecure_skip_verify: maybe\n", 6, "apps[0].insecure_skip_verify",
     "expected true or false"),
    ("agent", AGENT_OK + "    rewrite:\n      headers:\n        - 'no colon'\n", 8,
     "apps[0].rewrite.headers[0]", 'expected "Name: value"'),
    ("agent", AGENT_OK + "    rewrite:\n      headers:\n        - 'Bad Name: v'\n", 8,
     "apps[0].rewrite.headers[0]", "not a valid HTTP header name"),
    ("agent", AGENT_OK + "    rewrite:\n      headers:\n        - 'Content-Length: 0'\n", 8,
     "apps[0].rewrite.headers[0]", "only the proxy sets it"),
    ("agent", AGENT_OK + "    rewrite:\n      headers:\n        - 'transfer-encoding: chunked'\n", 8,
     "apps[0].rewrite.headers[0]", "only the proxy sets it"),
    ("agent", AGENT_OK + "    jwt_claims: [sub, password]\n", 6, "apps[0].jwt_claims[1]",
     "unknown claim 'password'"),
    ("agent", AGENT_OK + "    public_addr: 'a b'\n", 6, "apps[0].public_addr",
     "expected host:port"),
    ("agent", AGENT_OK.replace("apps:\n", "apps:\n  - just-a-name\n"), 4, "apps[0]",
     "expected a mapping with name and uri"),
    ("agent", AGENT_OK + "join:\n  token: abc\n", 6, "join.ca_pin", "required with join.token"),
    ("agent", AGENT_OK + "join:\n  token: abc\n  ca_pin: sha256:1234\n", 8, "join.ca_pin",
     "64 lowercase hex"),
    ("agent", AGENT_OK + "apps2: []\n", 6, "apps2", "did you mean 'apps'"),
    ("agent", AGENT_OK + "    description: " + "x" * 201 + "\n", 6, "apps[0].description",
     "at most 200 characters"),
    ("agent", AGENT_OK + "    description: [a]\n", 6, "apps[0].description",
     "expected a string"),
]


@pytest.mark.parametrize("kind,text,line,key,problem", BAD)
def test_bad_config_is_one_line_naming_file_line_and_key(tmp_path, kind, text, line, key, problem):
    """Each mistake gives exactly one line: file:line: key: problem."""
    path = write(tmp_path, text)
    loader = load_proxy_config if kind == "proxy" else load_agent_config
    with pytest.raises(ConfigError) as info:
        loader(path)
    message = str(info.value)
    assert "\n" not in message
    prefix = f"{path}:{line}: " + (f"{key}: " if key else "")
    assert message.startswith(prefix), message
    assert problem in message, message
    assert (info.value.file, info.value.line, info.value.key) == (path, line, key)


@pytest.mark.parametrize("content,problem", [
    (b"", "config file is empty"),
    (b"# only a comment\n", "config file is empty"),
    (b"- a\n- b\n", "expected a mapping of settings at the top, got a list"),
    (b"just text\n", "expected a mapping of settings at the top, got a string"),
    (b"a: [1, 2\n", "invalid YAML"),
    (b"a: b\n---\nc: d\n", "invalid YAML"),
    (b"\xff\xfe\x00bad", "not UTF-8"),
    (b"a: !!python/object:os.system {}\n", "invalid YAML"),
    (b"{[1]: 2}\n", "invalid YAML"),
])
def test_unreadable_yaml_is_one_line(tmp_path, content, problem):
    """Syntax errors, odd top levels and unsafe tags are one ConfigError line."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    for loader in (load_proxy_config, load_agent_config):
        with pytest.raises(ConfigError) as info:
            loader(str(path))
        assert str(info.value).startswith(str(path) + ":")
        assert problem in str(info.value)
        assert "\n" not in str(info.value)


def test_yaml_syntax_error_names_the_line(tmp_path):
    """A YAML syntax error reports the line where the parser stopped."""
    path = write(tmp_path, "data_dir: x\npublic_addr: [oops\nweb_listen_addr: y\n")
    with pytest.raises(ConfigError) as info:
        load_proxy_config(path)
    assert info.value.line in (2, 3, 4)
    assert str(info.value).startswith(f"{path}:{info.value.line}: invalid YAML")


def test_missing_file_and_directory(tmp_path):
    """A missing file or a directory is one line, not an OSError."""
    for path in (str(tmp_path / "nope.yaml"), str(tmp_path)):
        with pytest.raises(ConfigError) as info:
            load_proxy_config(path)
        assert str(info.value).startswith(f"{path}: cannot read file: ")


def test_huge_file_is_refused(tmp_path):
    """A config file over 1 MiB is refused before parsing."""
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (1024 * 1024 + 10))
    with pytest.raises(ConfigError, match="larger than"):
        load_agent_config(str(path))


@pytest.mark.parametrize("text,seconds", [
    ("90s", 90.0), ("15m", 900.0), ("1h", 3600.0), ("2h30m", 9000.0), ("7d", 604800.0),
    ("500ms", 0.5), ("1.5h", 5400.0), ("30", 30.0), (" 5m ", 300.0), (0, 0.0), (12, 12.0),
    (2.5, 2.5), ("1d2h3m4s", 93784.0),
])
def test_parse_duration_forms(text, seconds):
    """parse_duration reads the documented forms; a bare number is seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "", "h", "1x", "1h-5m", "-5s", -1, "1 h", "one hour", True, None, [1], "nan", float("nan"),
    float("inf"),
])
def test_parse_duration_rejects(text):
    """Malformed or negative durations raise ValueError, nothing else."""
    with pytest.raises(ValueError):
        parse_duration(text)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=20), st.integers(), st.floats(), st.none(), st.booleans()))
def test_parse_duration_never_raises_anything_but_value_error(value):
    """Arbitrary input either parses to a non-negative float or raises ValueError."""
    try:
        result = parse_duration(value)
    except ValueError:
        return
    assert isinstance(result, float) and result >= 0.0


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_file_content_only_raises_config_error(tmp_path_factory, text):
    """Whatever the file holds, loading gives a config or a one-line ConfigError."""
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    for loader in (load_proxy_config, load_agent_config):
        try:
            loader(str(path))
        except ConfigError as err:
            assert "\n" not in str(err)


def test_config_files_are_not_modified(tmp_path):
    """Loading is read-only: the file and its directory are left as they were."""
    path = write(tmp_path, PROXY_OK)
    before = os.stat(path).st_mtime_ns, sorted(os.listdir(tmp_path))
    load_proxy_config(path)
    assert (os.stat(path).st_mtime_ns, sorted(os.listdir(tmp_path))) == before


def test_load_yaml_documents_gives_plain_values(tmp_path):
    """Multi-document files load as plain dicts/lists, empty documents as None."""
    path = write(tmp_path, "kind: role\nspec: {a: [1, 2]}\n---\n---\nkind: user\n")
    docs = load_yaml_documents(path)
    assert docs == [{"kind": "role", "spec": {"a": [1, 2]}}, None, {"kind": "user"}]
    assert type(docs[0]) is dict and type(docs[0]["spec"]["a"]) is list


def test_load_yaml_documents_refuses_duplicate_keys(tmp_path):
    """A repeated key (e.g. a second deny:) is an error with its line, not a silent overwrite."""
    path = write(tmp_path, "kind: role\n---\nspec:\n  deny: {a: b}\n  deny: {}\n")
    with pytest.raises(ConfigError) as info:
        load_yaml_documents(path)
    assert str(info.value) == f"{path}:5: invalid YAML: duplicate key 'deny'"


def test_config_error_forms():
    """ConfigError renders file:line: key: problem, or a ready-made line, always one line."""
    assert str(ConfigError("a.yaml", "bad", key="k", line=3)) == "a.yaml:3: k: bad"
    assert str(ConfigError("a.yaml", "bad")) == "a.yaml: bad"
    assert str(ConfigError("a.yaml: tls: cannot read\nx")) == "a.yaml: tls: cannot read x"


def test_load_yaml_documents_refuses_alias_bombs(tmp_path):
    """Nested aliases that would expand to billions of values are refused quickly."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    path = write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="aliases expanding"):
        load_yaml_documents(path)
