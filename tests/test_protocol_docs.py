"""docs/protocol.md says what the code does: its hex examples are what the encoder writes, and
its table of limits is the agent's settings, with their defaults, flags in `serve --help` and
`EDGEFLEET_AGENT_*` names that take effect."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.config import AgentConfig, load_config
from agent.protocol import ErrorCode, ProtocolError, encode_error_frame, encode_predict

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "protocol.md").read_text()


def _hex_block(after: str) -> bytes:
    """The bytes of the first ``` block after the text `after` (hex pairs before 3 spaces)."""
    start = DOC.index("```", DOC.index(after)) + 3
    block = DOC[start:DOC.index("```", start)]
    out = b""
    for line in block.strip().splitlines():
        out += bytes.fromhex(re.split(r"\s{3,}", line.strip())[0])
    return out


def test_the_predict_example_is_what_the_encoder_writes():
    x = np.array([[0.5, np.nan, 2.0]], np.float32)
    assert _hex_block("One die (`die_id` 1234") == encode_predict(x, np.array([1234]), tag=7)


def test_the_error_frame_example_is_what_the_agent_writes():
    err = ProtocolError(ErrorCode.BAD_WIDTH, "columns: expected 3 float32 values per row, "
                        "found 2")
    assert _hex_block("refused as a whole") == encode_error_frame(err, tag=7)


def _limits_table() -> dict[str, tuple[str, str]]:
    section = DOC[DOC.index("## Limits and timeouts"):DOC.index("## Client sketch")]
    rows = re.findall(r"^\| (\w+) \| `(--[\w-]+)` \| ([\d.]+)", section, re.M)
    return {name: (flag, default) for name, flag, default in rows}


def test_every_limit_in_the_doc_is_a_setting_with_that_default_flag_and_env_name():
    table = _limits_table()
    assert {"max_connections", "max_connections_per_peer", "idle_timeout_s",
            "message_timeout_s", "io_timeout_s", "max_line_bytes", "max_frame_bytes"} <= set(table)
    defaults = AgentConfig()
    help_text = subprocess.run([sys.executable, "-m", "edgefleet", "agent", "serve", "--help"],
                               capture_output=True, text=True, cwd=REPO, timeout=60,
                               env={"COLUMNS": "200", "PATH": "/usr/bin:/bin",
                                    "PYTHONPATH": str(REPO)}).stdout
    for name, (flag, default) in table.items():
        assert float(default) == getattr(defaults, name), name
        assert flag in help_text, f"{flag} is not in serve --help"
        assert f"({default})" in help_text, f"{flag}: default ({default}) not shown"
        value = type(getattr(defaults, name))(2 * float(default) or 1)
        env = {f"EDGEFLEET_AGENT_{name.upper()}": str(value)}
        assert getattr(load_config(env=env), name) == value, name


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(AgentConfig)
                                   if f.name.startswith(("max_", "idle_", "message_", "io_"))])
def test_every_limit_setting_is_in_the_doc(field):
    assert field in _limits_table()
