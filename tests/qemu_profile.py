"""pytest plugin for runs under qemu-user emulation (scripts/test-arm64.sh loads it with
`-p tests.qemu_profile`): emulated code runs several times slower, so Hypothesis gets no
per-example deadline and no too-slow health check. Nothing else changes."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "qemu", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile("qemu")
