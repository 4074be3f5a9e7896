"""The wire contract (agent/wire.py): every device error names a reason the contract knows, and
the step tables agree with each other."""

from __future__ import annotations

import inspect

import pytest

from agent import bundle, commands, download, engine, install, manifest
from agent.errors import EdgefleetError
from agent.wire import (
    COMMAND_TYPES,
    STEPS,
    SUCCESS,
    TERMINAL_STEPS,
    CommandType,
    Reason,
    Step,
    is_terminal,
    reason_of,
)


def _errors():
    for mod in (bundle, commands, download, engine, install, manifest):
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, EdgefleetError) and cls.__module__ == mod.__name__ \
                    and "reason" in vars(cls):
                yield cls


@pytest.mark.parametrize("cls", sorted(_errors(), key=lambda c: c.__qualname__),
                         ids=lambda c: c.__qualname__)
def test_every_device_error_reason_is_a_wire_reason(cls):
    assert cls.reason in set(Reason)


def test_reason_of_maps_errors_os_errors_and_bugs():
    assert reason_of(bundle.SignatureError("x")) == "bundle-signature"
    assert reason_of(engine.SelfTestError("x")) == "self-test-failed"
    assert reason_of(install.LatencyTooHigh("x")) == "latency-too-high"  # subclass wins
    assert reason_of(OSError(28, "No space left on device")) == "os-error"
    assert reason_of(KeyError("x")) == "internal"
    failed = install.InstallFailed("install", "1-a-0", "verify", "Downgrade", "too old",
                                   Reason.DOWNGRADE)
    assert reason_of(failed) == "downgrade" and failed.detail == "too old"


def test_steps_tables_agree():
    assert set(STEPS) == set(COMMAND_TYPES) == set(CommandType)
    assert all(steps[0] == Step.RECEIVED for steps in STEPS.values())
    assert {*SUCCESS.values(), Step.FAILED} == TERMINAL_STEPS
    assert all(is_terminal(s) for s in ("live", "failed", "rolled-back", "shadow-stopped"))
    assert not any(is_terminal(s) for s in ("received", "downloading", "self-test", None))
