"""pytest plugin for runs under qemu-user emulation (scripts/test-arm64.sh loads it with
`-p tests.qemu_profile`): emulated code runs several times slower, so on top of the suite's
"ci" Hypothesis profile (tests/conftest.py: derandomized, no deadline, no too-slow check) the
data-too-large health check is off too. Nothing else changes."""

from __future__ import annotations

from hypothesis import HealthCheck, settings


def pytest_configure(config) -> None:
    """Runs after tests/conftest.py registered and loaded "ci" (and before any test module is
    imported), so "qemu" derives from it and stays loaded."""
    settings.register_profile(
        "qemu", settings.get_profile("ci"),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile("qemu")
