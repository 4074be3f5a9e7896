"""Agent configuration: flags over environment over file over defaults, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import AgentConfig, load_config
from agent.errors import UsageError


def test_defaults_without_any_source():
    cfg = load_config(None, env={})
    assert cfg.socket_mode == 0o660 and cfg.metrics_addr == "127.0.0.1:9464"
    assert cfg.max_missing_share == 0.2 and cfg.threads == 1


def test_flags_beat_environment_beat_file(tmp_path):
    f = tmp_path / "agent.toml"
    f.write_text('socket = "/run/a.sock"\nsocket_mode = "0640"\nthreads = 2\n'
                 'max_missing_share = 0.1\nmetrics_addr = "0.0.0.0:9000"\n')
    env = {"EDGEFLEET_AGENT_THREADS": "3", "EDGEFLEET_AGENT_MAX_MISSING_SHARE": "0.3"}
    cfg = load_config(f, env=env, max_missing_share=0.05, socket=None)
    assert cfg.socket == Path("/run/a.sock") and cfg.socket_mode == 0o640
    assert cfg.threads == 3 and cfg.max_missing_share == 0.05
    assert cfg.metrics_host_port() == ("0.0.0.0", 9000)


@pytest.mark.parametrize(("text", "needle"), [
    ("sockett = 1\n", "unknown key 'sockett'"),
    ("threads = 'many'\n", "threads: cannot use 'many'"),
    ("max_missing_share = 1.5\n", "max_missing_share must be in 0..1"),
    ('metrics_addr = "9464"\n', "expected HOST:PORT"),
    ("threads = [\n", "not valid TOML"),
    ('predlog_tap = "fast"\n', "predlog_tap must be auto, c or python, found 'fast'"),
])
def test_a_bad_config_file_is_a_usage_error_naming_the_key(tmp_path, text, needle):
    f = tmp_path / "agent.toml"
    f.write_text(text)
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        load_config(f, env={})


def test_the_serving_process_gets_exactly_the_merged_config():
    cfg = load_config(None, env={}, socket="/tmp/a.sock", socket_mode="0600", rules="/r.json",
                      metrics_addr="")
    assert AgentConfig.from_json(cfg.to_json()) == cfg


def test_a_compiled_tap_asked_for_and_missing_stops_the_agent_with_what_to_do(monkeypatch):
    """PREDLOG_TAP=c where agent/_tapfast.c is not built: a usage error naming the build
    script, not an agent that quietly runs the slower tap (auto does that)."""
    import agent.predlog_tap as tap

    monkeypatch.setattr(tap, "_compiled", None)
    monkeypatch.setattr(tap, "_COMPILED_WHY", "not built (test)")
    with pytest.raises(UsageError, match="scripts/build-tap.sh"):
        load_config(None, env={"EDGEFLEET_AGENT_PREDLOG_TAP": "c"})
    assert load_config(None, env={"EDGEFLEET_AGENT_PREDLOG_TAP": "auto"}).predlog_tap == "auto"
    assert load_config(None, env={"EDGEFLEET_AGENT_PREDLOG_TAP": "c",
                                  "EDGEFLEET_AGENT_PREDLOG": "off"}).predlog == "off"
