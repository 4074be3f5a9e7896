"""The Hypothesis profiles of tests/conftest.py: "ci" by default, derandomized (the same
examples every run), and "dev", loaded by hand as README.md shows, random and ten times
longer. README's two commands run here on this file's profile check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import REPO, examples


def _asked_for(config: pytest.Config) -> str:
    if config.pluginmanager.has_plugin("tests.qemu_profile"):
        return "qemu"  # scripts/test-arm64.sh: "ci" with one more health check off
    return (config.getoption("--hypothesis-profile")
            or os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def test_the_loaded_profile_is_the_one_asked_for(request: pytest.FixtureRequest):
    name = _asked_for(request.config)
    assert settings.get_current_profile_name() == name
    current = settings.default
    if name == "dev":
        assert not current.derandomize and examples(40) == 400
    else:
        assert current.derandomize and current.database is None and current.deadline is None
        assert HealthCheck.too_slow in current.suppress_health_check
        assert examples(40) == 40


def _draws(profile: str) -> list[tuple[int, str]]:
    """What a property test is given under `profile` (no example database, to see the draws
    alone)."""
    seen: list[tuple[int, str]] = []

    @settings(settings.get_profile(profile), max_examples=20, database=None)
    @given(st.integers(), st.text(max_size=5))
    def prop(n: int, s: str) -> None:
        seen.append((n, s))

    prop()
    return seen


def test_ci_repeats_its_examples_and_dev_draws_new_ones():
    assert _draws("ci") == _draws("ci")  # derandomized: the same examples, run after run
    assert _draws("dev") != _draws("dev")  # random: each run its own


@pytest.mark.parametrize("how", [{"env": "dev"}, {"flag": "dev"}], ids=["env", "flag"])
def test_readme_s_commands_load_the_dev_profile(how: dict[str, str]):
    env = {k: v for k, v in os.environ.items() if k != "HYPOTHESIS_PROFILE"}
    if "env" in how:
        env["HYPOTHESIS_PROFILE"] = how["env"]
    flag = [f"--hypothesis-profile={how['flag']}"] if "flag" in how else []
    test = f"{Path(__file__).relative_to(REPO)}::test_the_loaded_profile_is_the_one_asked_for"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *flag,
                        test], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr
