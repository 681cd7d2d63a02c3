"""Settings: YAML < environment < overrides, typed, with clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from inference_worker.settings import Settings, SettingsError, load_settings

REPO = Path(__file__).resolve().parents[2]


def test_shipped_worker_yaml_documents_every_default() -> None:
    # config/worker.yaml claims to show every key with its default: hold it to that.
    text = (REPO / "config" / "worker.yaml").read_text()
    assert load_settings(REPO / "config" / "worker.yaml") == Settings()
    for section in dataclasses.fields(Settings):
        for key in dataclasses.fields(getattr(Settings(), section.name)):
            assert f"  {key.name}:" in text, f"{section.name}.{key.name} missing from worker.yaml"


def test_env_overrides_yaml_and_overrides_env(tmp_path: Path) -> None:
    cfg = tmp_path / "w.yaml"
    cfg.write_text("broker:\n  url: mqtt://a:1883\nstate:\n  lease_ms: 100\n")
    env = {"IW_BROKER__URL": "mqtt://b:1883", "IW_STATE__MAX_ATTEMPTS": "7", "OTHER": "x"}
    s = load_settings(cfg, env=env, overrides={"broker": {"url": "mqtt://c:1883"}})
    assert s.broker.url == "mqtt://c:1883"
    assert s.state.lease_ms == 100
    assert s.state.max_attempts == 7
    s2 = load_settings(cfg, env=env)
    assert s2.broker.url == "mqtt://b:1883"


def test_types_are_coerced() -> None:
    env = {
        "IW_LOGGING__JSON": "false",
        "IW_STATE__RECONNECT_BACKOFF_S": "1.5",
        "IW_BROKER__REPLY_TO_ALLOWED": "response_message, replies/#",
        "IW_MODELS__NAMES": "digits",
    }
    s = load_settings(env=env)
    assert s.logging.json is False
    assert s.state.reconnect_backoff_s == 1.5
    assert s.broker.reply_to_allowed == ("response_message", "replies/#")
    assert s.models.names == ("digits",)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"IW_BROKER__NOPE": "1"}, "unknown setting 'nope'"),
        ({"IW_NOPE__URL": "1"}, "unknown section 'nope'"),
        ({"IW_STATE__LEASE_MS": "soon"}, "expected an integer"),
        ({"IW_LOGGING__JSON": "maybe"}, "expected true/false"),
    ],
)
def test_errors_name_the_source(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment) as info:
        load_settings(env=env)
    assert "environment" in str(info.value)


def test_bad_yaml_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SettingsError, match="mapping of sections"):
        load_settings(bad)
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")


def test_limits_map_to_protocol_limits() -> None:
    limits = load_settings(env={"IW_LIMITS__MAX_COMPRESSED_BYTES": "1024"}).limits.to_limits()
    assert limits.max_compressed_bytes == 1024
