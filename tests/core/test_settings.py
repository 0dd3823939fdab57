"""Settings: flags > code values > LORAPLEX_* env > TOML file > defaults; bad values refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from loraplex.server.settings import load_settings

DIGEST = "ab" * 32


def test_sources_in_priority_order(tmp_path: Path, monkeypatch):
    adapter = tmp_path / "support"
    adapter.mkdir()
    config = tmp_path / "loraplex.toml"
    config.write_text(f'port = 1\nhost = "0.0.0.0"\nshutdown_grace_s = 5\n[engine]\nnum_slots = 3\nmax_rank = 16\n'
                      f'[[api_keys]]\nname = "ops"\nsha256 = "{DIGEST}"\nscopes = ["admin"]\n')
    monkeypatch.setenv("LORAPLEX_PORT", "2")
    monkeypatch.setenv("LORAPLEX_HOST", "10.0.0.1")
    monkeypatch.setenv("LORAPLEX_ENGINE__MAX_RANK", "8")
    monkeypatch.setenv("LORAPLEX_SCHEDULER__MAX_WAITING", "7")
    settings = load_settings(["--port", "4", "--adapter", f"support={adapter}"], config, port=3, host="::1")
    assert settings.port == 4  # flag over value over env over file
    assert settings.host == "::1"  # value over env
    assert settings.engine.max_rank == 8 and settings.engine.num_slots == 3  # env over file, file over default
    assert settings.scheduler.max_waiting == 7 and settings.scheduler.max_running == 64
    assert settings.shutdown_grace_s == 5
    assert settings.adapter == {"support": adapter}
    assert settings.api_keys[0].scopes == {"admin"} and settings.api_keys[0].adapters is None


@pytest.mark.parametrize(("args", "values", "message"), [
    (["--port", "70000"], {}, "port"),
    (["--engine.num_slots", "0"], {}, "engine.num_slots"),
    (["--scheduler.max_step_tokens", "0"], {}, "scheduler.max_step_tokens"),
    (["--adapter", "bad name=/tmp"], {}, "adapter name 'bad name'"),
    (["--adapter", "x=/does/not/exist"], {}, "/does/not/exist is not a folder"),
    ([], {"model": "/does/not/exist"}, "is neither a Hugging Face model folder"),
    (["--default_max_new_tokens", "10", "--max_new_tokens_limit", "5"], {}, "exceeds max_new_tokens_limit=5"),
    ([], {"api_keys": [{"name": "a", "sha256": DIGEST}, {"name": "b", "sha256": DIGEST}]}, "share a sha256"),
    ([], {"api_keys": [{"name": "a", "sha256": "short"}]}, "api_keys.0.sha256"),
    ([], {"api_keys": [{"name": "a", "sha256": DIGEST, "scopes": ["generate"]}]}, "api_keys.0.scopes"),
    ([], {"api_keys": [{"name": "a", "sha256": DIGEST, "scopes": []}]}, "api_keys.0.scopes"),
    (["--scheduler.max_step_adapters", "9", "--engine.num_slots", "8"], {},
     "scheduler.max_step_adapters=9 exceeds engine.num_slots=8"),
    ([], {"tls_cert_file": __file__}, "set both"),
    ([], {"tls_cert_file": "/does/not/exist.pem", "tls_key_file": __file__}, "tls_cert_file"),
    (["--shutdown_grace_s", "-1"], {}, "shutdown_grace_s"),
])
def test_bad_values_are_refused_by_name(args, values, message):
    with pytest.raises(ValidationError, match=message.replace(".", r"\.")):
        load_settings(args, **values)


def test_unknown_flag_and_missing_file_are_refused(tmp_path: Path):
    with pytest.raises(SettingsError, match="--bogus"):
        load_settings(["--bogus", "1"])
    with pytest.raises(FileNotFoundError, match=r"missing\.toml"):
        load_settings([], tmp_path / "missing.toml")


def test_defaults_and_scopes():
    settings = load_settings()
    assert (settings.host, settings.port, settings.allow_unauthenticated_remote) == ("0.0.0.0", 50051, False)
    assert load_settings(api_keys=[{"name": "a", "sha256": DIGEST}]).api_keys[0].scopes == {"inference"}


@pytest.mark.parametrize(("values", "listen_host"), [
    ({}, "127.0.0.1"),  # no keys: loopback only
    ({"host": "10.1.2.3"}, "127.0.0.1"),
    ({"host": "[::]"}, "127.0.0.1"),
    ({"host": "localhost"}, "localhost"),
    ({"host": "[::1]"}, "[::1]"),
    ({"host": "127.0.0.2"}, "127.0.0.2"),
    ({"allow_unauthenticated_remote": True}, "0.0.0.0"),
    ({"host": "10.1.2.3", "api_keys": [{"name": "a", "sha256": DIGEST}]}, "10.1.2.3"),
])
def test_listen_host_is_loopback_without_api_keys(values, listen_host):
    assert load_settings(**values).listen_host() == listen_host


def test_quotas_come_from_the_config_or_a_quotas_file_checked_against_the_api_keys(tmp_path: Path):
    key = {"name": "ci", "sha256": DIGEST}
    config = tmp_path / "loraplex.toml"
    config.write_text('[quotas.tenants.team-a]\nkeys = ["ci"]\nweight = 2\n[quotas.adapters.support]\nmax_queued = 4\n')
    settings = load_settings(config_file=config, api_keys=[key])
    quotas = settings.read_quotas()
    assert quotas.tenant_of("ci") == "team-a" and quotas.limits_of("team-a").weight == 2
    assert load_settings(quotas_file=config, api_keys=[key]).read_quotas() == quotas  # the same table, re-read
    with pytest.raises(ValidationError, match="tenant 'team-a' lists API keys that are not configured: ci"):
        load_settings(config_file=config)
    bad = tmp_path / "quotas.toml"
    bad.write_text("[quotas.default]\ntokens_per_minute = 0\n")
    with pytest.raises(ValidationError, match="tokens_per_minute"):
        load_settings(quotas_file=bad)
    assert load_settings(["--no-scheduler.fairness"]).scheduler.fairness is False
