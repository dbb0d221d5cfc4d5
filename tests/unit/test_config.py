"""Settings: precedence, validation, the documented file (pure, plus the CLI as a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import Config, ConfigError, example_toml, load_config, settings_table
from tests.conftest import ROOT, gateway_env


def test_defaults() -> None:
    cfg = load_config(None, env={})
    assert cfg == Config()
    assert cfg.listen_addrs == [("127.0.0.1", 8080), ("::1", 8080)]  # browsers try ::1 first for *.localhost
    assert cfg.embedded


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text('domains = ["file.dev"]\ncache_ttl = 7\nconnect_wait = 3.5\nlisten = ["127.0.0.1:1000"]\n')
    env = {"GATEWAY_DOMAINS": "env.dev,env2.dev", "GATEWAY_CACHE_TTL": "9", "GATEWAY_UNRELATED_X": None}
    env = {k: v for k, v in env.items() if v is not None}
    cfg = load_config(str(f), env=env, overrides={"domains": ("flag.dev",)})
    assert cfg.domains == ("flag.dev",)  # flag beats env and file
    assert cfg.cache_ttl == 9.0  # env beats file
    assert cfg.connect_wait == 3.5  # file beats default
    assert cfg.listen == ("127.0.0.1:1000",)
    assert load_config(str(f), env=env).domains == ("env.dev", "env2.dev")


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"GATEWAY_LISTEN": "nonsense"}, "listen"),
        ({"GATEWAY_LISTEN": ""}, "listen"),
        ({"GATEWAY_CACHE_TTL": "soon"}, "cache_ttl"),
        ({"GATEWAY_CACHE_TTL": "-1"}, "cache_ttl"),
        ({"GATEWAY_CONNECT_TIMEOUT": "0"}, "connect_timeout"),
        ({"GATEWAY_NODE_PORT": "70000"}, "node_port"),
        ({"GATEWAY_REDIS_URL": "http://x"}, "redis_url"),
        ({"GATEWAY_TRUSTED_PROXIES": "10.0.0.0/33"}, "trusted_proxies"),
        ({"GATEWAY_DOMAINS": "com"}, "domains"),
        ({"GATEWAY_DOMAINS": "bad domain"}, "domains"),
        ({"GATEWAY_LOG_LEVEL": "loud"}, "log_level"),
        ({"GATEWAY_NO_SUCH_SETTING": "1"}, "no_such_setting"),
        ({"GATEWAY_CACHE_TTL": "nan"}, "cache_ttl"),
        ({"GATEWAY_ACCESS_LINK_PARAM": "a&b"}, "access_link_param"),  # would split the query
        ({"GATEWAY_ACCESS_LINK_PARAM": ""}, "access_link_param"),
        ({"GATEWAY_ACCESS_COOKIE": "a;b"}, "access_cookie"),
        ({"GATEWAY_ACCESS_COOKIE": "a=b"}, "access_cookie"),
    ],
)
def test_bad_settings_name_the_setting(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, env=env)
    assert e.value.setting == setting


def test_bad_file(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text("cache_ttl = [1]\n")
    with pytest.raises(ConfigError, match="cache_ttl"):
        load_config(str(f), env={})
    f.write_text("unknown_thing = 1\n")
    with pytest.raises(ConfigError, match="unknown_thing"):
        load_config(str(f), env={})
    f.write_text("not toml = = 1\n")
    with pytest.raises(ConfigError, match="valid TOML"):
        load_config(str(f), env={})


def test_config_file_lists_every_setting_with_its_default() -> None:
    text = (ROOT / "config" / "gateway.toml").read_text()
    assert text == example_toml(), "regenerate with `make config`"
    for name, _, doc in settings_table():
        assert f"\n{name} = " in text and doc in text
    assert load_config(str(ROOT / "config" / "gateway.toml"), env={}) == Config()


def test_settings_page_lists_every_setting() -> None:
    from gateway.config import settings_markdown

    text = (ROOT / "docs" / "settings.md").read_text()
    assert text == settings_markdown(), "regenerate with `make config`"
    for name, _, _ in settings_table():
        assert f"| `{name}` |" in text


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = gateway_env() | (env or {})
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=e, timeout=60)


def test_cli_bad_setting_exits_2_with_one_line() -> None:
    r = run_cli("check-config", env={"GATEWAY_CONNECT_WAIT": "x"})
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "connect_wait" in r.stderr
    r = run_cli("serve", "--listen", "nope")
    assert r.returncode == 2 and "listen" in r.stderr


def test_cli_check_config_prints_the_effective_settings(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text('domains = ["file.dev"]\n')
    r = run_cli("check-config", "--config", str(f), "--domain", "flag.dev", env={"GATEWAY_CACHE_TTL": "4"})
    assert r.returncode == 0, r.stderr
    assert 'domains = ["flag.dev"]' in r.stdout and "cache_ttl = 4.0" in r.stdout
    r = run_cli("check-config", env={"GATEWAY_CONFIG": str(f)})
    assert 'domains = ["file.dev"]' in r.stdout
