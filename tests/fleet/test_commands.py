"""Signed fleet commands: who may sign, for whom, for how long, and only once."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.commands import (
    BadSignature,
    Command,
    CommandError,
    Expired,
    InstallSpec,
    Malformed,
    NotYetValid,
    Replayed,
    ReplayGuard,
    Unsigned,
    UntrustedKey,
    WrongDevice,
    sign_command,
    verify_command,
)
from agent.keys import (
    Keyring,
    generate_keypair,
    key_id,
    load_private_key,
    revoke_key,
    trust_key,
)
from agent.manifest import utc_now
from tests.conftest import examples

SHA = "ab" * 32


@pytest.fixture
def fleet_keys(tmp_path: Path):
    """A fleet key and a release key, both trusted in one keyring, each for its own role."""
    fleet = generate_keypair(tmp_path / "keys", "fleet")
    release = generate_keypair(tmp_path / "keys", "release")
    ring = tmp_path / "keyring"
    trust_key(ring, fleet.public_path, "fleet")
    trust_key(ring, release.public_path, "release")
    return load_private_key(fleet.private_path), load_private_key(release.private_path), ring


def _install(device: str = "box-1", **kw) -> Command:
    return Command.new("install", device, id=kw.pop("id", "cmd-1"), rollout_id="r-1",
                       install=InstallSpec("http://a/sha256/" + SHA, SHA, 1234, 7), **kw)


def test_signed_install_verifies_to_the_same_command(fleet_keys):
    key, _, ring = fleet_keys
    cmd = _install()
    got = verify_command(sign_command(cmd, key), Keyring.load(ring), device_id="box-1")
    assert got == cmd
    assert got.install == InstallSpec("http://a/sha256/" + SHA, SHA, 1234, 7)


def test_a_key_id_given_to_the_signer_is_the_only_shortcut(fleet_keys):
    """A controller passes its key's id, computed once: the payload is byte for byte the
    one signed without it, and a wrong id is refused by the device like any untrusted key."""
    key, _, ring = fleet_keys
    cmd = _install()
    kid = key_id(key.public_key())
    assert sign_command(cmd, key, kid=kid) == sign_command(cmd, key)
    with pytest.raises(UntrustedKey):
        verify_command(sign_command(cmd, key, kid="0" * 16), Keyring.load(ring),
                       device_id="box-1")


def test_release_key_cannot_sign_commands(fleet_keys):
    _, release, ring = fleet_keys
    with pytest.raises(UntrustedKey, match="role 'release', not for 'fleet'") as e:
        verify_command(sign_command(_install(), release), Keyring.load(ring), device_id="box-1")
    assert e.value.reason == "untrusted-key" and e.value.command_id == "cmd-1"


def test_unknown_and_revoked_keys_are_refused(fleet_keys, tmp_path: Path):
    key, _, ring = fleet_keys
    other = load_private_key(generate_keypair(tmp_path / "other", "fleet").private_path)
    with pytest.raises(UntrustedKey, match="not in keyring"):
        verify_command(sign_command(_install(), other), Keyring.load(ring), device_id="box-1")
    revoke_key(ring, key_id(key.public_key()))
    with pytest.raises(UntrustedKey, match="revoked"):
        verify_command(sign_command(_install(), key), Keyring.load(ring), device_id="box-1")


def test_unsigned_command_is_refused(fleet_keys):
    _, _, ring = fleet_keys
    env = json.loads(sign_command(_install(), fleet_keys[0]))
    del env["sig"]
    with pytest.raises(Unsigned) as e:
        verify_command(json.dumps(env).encode(), Keyring.load(ring), device_id="box-1")
    assert e.value.command_id == "cmd-1"


def test_altered_body_breaks_the_signature(fleet_keys):
    key, _, ring = fleet_keys
    env = json.loads(sign_command(_install(), key))
    env["body"] = env["body"].replace('"sequence":7', '"sequence":8')
    with pytest.raises(BadSignature, match="does not match"):
        verify_command(json.dumps(env).encode(), Keyring.load(ring), device_id="box-1")


def test_command_for_another_device_is_refused(fleet_keys):
    key, _, ring = fleet_keys
    with pytest.raises(WrongDevice, match="addressed to device 'box-2'"):
        verify_command(sign_command(_install("box-2"), key), Keyring.load(ring),
                       device_id="box-1")


def test_expired_future_and_overlong_commands_are_refused(fleet_keys):
    key, _, ring = fleet_keys
    kr = Keyring.load(ring)
    old = _install(now=utc_now() - timedelta(hours=2), ttl=timedelta(hours=1))
    with pytest.raises(Expired, match="expired at"):
        verify_command(sign_command(old, key), kr, device_id="box-1")
    future = _install(now=utc_now() + timedelta(hours=1))
    with pytest.raises(NotYetValid, match="in the future"):
        verify_command(sign_command(future, key), kr, device_id="box-1")
    forever = _install(ttl=timedelta(days=365))
    with pytest.raises(Expired, match="longer than the allowed"):
        verify_command(sign_command(forever, key), kr, device_id="box-1")


def test_malformed_bodies_are_refused_before_signing():
    with pytest.raises(Malformed, match="install.sha256"):
        Command.new("install", "box-1", id="c", rollout_id="r",
                    install=InstallSpec("http://x/y", "XYZ", 1, 1))
    with pytest.raises(Malformed, match="device id"):
        Command.new("rollback", "box/#", id="c", rollout_id="r")
    with pytest.raises(Malformed, match="type"):
        Command.new("reboot", "box-1", id="c", rollout_id="r")


def test_replay_guard_runs_each_id_once_across_restarts(fleet_keys, tmp_path: Path):
    key, _, ring = fleet_keys
    path = tmp_path / "seen.json"
    guard = ReplayGuard(path)
    cmd = verify_command(sign_command(_install(), key), Keyring.load(ring), device_id="box-1")
    guard.record(cmd)
    with pytest.raises(Replayed, match="already received"):
        guard.record(cmd)
    with pytest.raises(Replayed):
        ReplayGuard(path).check(cmd)  # a restarted agent still remembers


def test_replay_guard_is_bounded_and_raises_a_floor(tmp_path: Path):
    guard = ReplayGuard(tmp_path / "seen.json", capacity=3)
    t0 = utc_now()
    cmds = [Command.new("report-now", "box-1", id=f"c{i}", rollout_id="r",
                        now=t0 + timedelta(seconds=i)) for i in range(5)]
    for c in cmds:
        guard.record(c)
    assert len(json.loads((tmp_path / "seen.json").read_text())["seen"]) == 3
    for c in cmds:  # forgotten ones are below the floor, so still refused
        with pytest.raises(Replayed):
            guard.check(c)
    fresh = Command.new("report-now", "box-1", id="c9", rollout_id="r",
                        now=t0 + timedelta(seconds=10))
    guard.check(fresh)


@settings(max_examples=examples(300), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_corruption_of_a_signed_command_is_accepted_as_another(fleet_keys, data):
    key, _, ring = fleet_keys
    cmd = _install()
    payload = bytearray(sign_command(cmd, key))
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    pos = data.draw(st.integers(0, len(payload) - 1))
    if kind == "flip":
        payload[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del payload[pos:]
    else:
        payload[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        got = verify_command(bytes(payload), Keyring.load(ring), device_id="box-1")
    except CommandError:
        return
    assert got == cmd  # only unsigned envelope whitespace may change; the command may not


def test_a_clock_jump_ahead_then_back_cannot_reopen_a_replay_window(fleet_keys, tmp_path: Path):
    """The device clock jumps two days ahead, a long-lived command arrives and the short-lived
    rollback recorded before is forgotten as expired; once the clock is corrected, that
    rollback's window is open again, and a captured copy of it must still be refused."""
    key, _, ring = fleet_keys
    t0 = utc_now().replace(microsecond=0)
    clock = [t0]
    path = tmp_path / "seen.json"
    guard = ReplayGuard(path, clock=lambda: clock[0])

    def receive(payload: bytes) -> Command:
        cmd = verify_command(payload, Keyring.load(ring), device_id="box-1", now=clock[0])
        guard.record(cmd)
        return cmd

    rollback = sign_command(Command.new("rollback", "box-1", id="rb-1", rollout_id="r",
                                        now=t0, ttl=timedelta(hours=1)), key)
    receive(rollback)
    clock[0] = t0 + timedelta(days=2)  # NTP glitch
    receive(sign_command(Command.new("report-now", "box-1", id="long", rollout_id="r",
                                     now=t0 + timedelta(seconds=5), ttl=timedelta(days=30)),
                         key))
    assert "rb-1" not in guard  # forgotten: it had expired by the (wrong) clock
    clock[0] = t0 + timedelta(minutes=2)  # corrected: rb-1's window is open again
    with pytest.raises(Replayed, match="replay floor"):
        receive(rollback)
    with pytest.raises(Replayed):  # and after a restart
        ReplayGuard(path, clock=lambda: clock[0]).check(
            verify_command(rollback, Keyring.load(ring), device_id="box-1", now=clock[0]))
    receive(sign_command(Command.new("report-now", "box-1", id="new", rollout_id="r",
                                     now=clock[0]), key))  # newer commands still run


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 30), st.integers(-50, 50)),
                      min_size=1, max_size=30))
def test_the_replay_floor_never_drops_and_no_id_runs_twice(tmp_path: Path, steps):
    """Any mix of issue times, lifetimes and device clock jumps (minutes), with a tiny capacity
    so that both ways of forgetting happen: the floor never goes down, even across reloads, and
    an id accepted once is refused for ever after."""
    t0 = utc_now().replace(microsecond=0)
    path = tmp_path / f"seen-{len(list(tmp_path.iterdir()))}.json"
    accepted: dict[str, Command] = {}
    floor = float("-inf")
    for i, (issued, ttl, clock) in enumerate(steps):
        now = t0 + timedelta(minutes=clock)
        guard = ReplayGuard(path, capacity=3, clock=lambda now=now: now)  # a restart each step
        assert guard.floor >= floor
        for old in accepted.values():
            with pytest.raises(Replayed):
                guard.check(old)
        cmd = Command.new("report-now", "box-1", id=f"c{i}", rollout_id="r",
                          now=t0 + timedelta(minutes=issued), ttl=timedelta(minutes=ttl))
        try:
            guard.record(cmd)
        except Replayed:
            assert cmd.issued.timestamp() <= guard.floor
        else:
            accepted[cmd.id] = cmd
        assert guard.floor >= floor
        floor = guard.floor
