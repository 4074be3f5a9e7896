"""The rollout's rules as millisecond tests of the pure decision core (fleet/decide.py) with
the time passed in: budgets, timeouts, offline devices, fresh state before "already there",
health grace, gates, which events count, the honest end, what a rollback undoes; and the
transition table (fleet/machine.py) the driver and every operator action go through."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet import decide as D
from fleet import gates as G
from fleet.machine import (
    OPERATOR_TRIGGERS,
    TERMINAL,
    TRANSITIONS,
    RolloutState,
    StepStatus,
    Trigger,
    next_state,
)
from fleet.plan import Plan

NEW, OLD = "n" * 64, "o" * 64
T0 = 1_000_000.0  # the rollout began here


def ctx(**plan) -> D.Ctx:
    base = dict(step_timeout_s=60, health_grace_s=10, offline_wait_s=30, max_parallel=2,
                max_failures="0")
    base.update(plan)
    return D.Ctx(Plan(**base), NEW, T0)


def dev(active=OLD, *, online=True, health="ok", received=T0 + 1, shadow=None, last=None,
        busy=None) -> D.DeviceView:
    return D.DeviceView(online=online, active=active, shadow=shadow, health=health,
                        received=received, last_command=last or {}, busy=busy or {})


def step(d="d1", status=StepStatus.PENDING, kind="install", sent=None, result=None,
         resend_after=None) -> D.StepView:
    return D.StepView(d, kind, f"r:{d}:{kind}", status, result, sent, resend_after)


def ev(step_name, d="d1", kind="install", **kw) -> dict:
    return {"command_id": f"r:{d}:{kind}", "device_id": d, "step": step_name, **kw}


# -- one step --------------------------------------------------------------------------------


def test_an_install_is_done_only_when_the_state_shows_the_new_model_live_and_healthy():
    c = ctx()
    s = step(status=StepStatus.SENT, sent=T0)
    seen = D.Seen()
    D.fold_event(seen, ev("live"))
    assert D.resolve_step(s, dev(NEW), seen, c, T0 + 1).status == StepStatus.DONE
    # live reported, state still shows the old model: wait, then fail after the grace
    assert D.resolve_step(s, dev(OLD), seen, c, T0 + 1) is None
    late = D.resolve_step(s, dev(OLD), seen, c, T0 + 12)
    assert (late.status, late.reason) == (StepStatus.FAILED, "unhealthy")
    assert "shows model " + OLD in late.detail
    seen = D.Seen()
    D.fold_event(seen, ev("live"))
    sick = dev(NEW, health="fallback")
    assert D.resolve_step(s, sick, seen, c, T0 + 5) is None
    out = D.resolve_step(s, sick, seen, c, T0 + 16)
    assert out.status == StepStatus.FAILED and "health is fallback" in out.detail


def test_a_step_with_no_final_answer_times_out_and_a_failure_keeps_its_reason():
    c = ctx()
    s = step(status=StepStatus.SENT, sent=T0, result="downloading")
    assert D.resolve_step(s, dev(), None, c, T0 + 59) is None
    out = D.resolve_step(s, dev(), None, c, T0 + 61)
    assert (out.status, out.reason) == (StepStatus.TIMEOUT, "timeout")
    assert "no final step within 60 s (last step: downloading)" in out.detail
    seen = D.Seen()
    D.fold_event(seen, ev("failed", reason="os-error", detail="disk full"))
    out = D.resolve_step(s, dev(), seen, c, T0 + 1)
    assert (out.status, out.reason, out.detail) == (StepStatus.FAILED, "os-error", "disk full")
    seen = D.Seen()
    D.fold_event(seen, ev("rolled-back"))  # an agent that does not know the command
    assert D.resolve_step(s, dev(), seen, c, T0 + 1).reason == "unsupported"


def test_a_sending_step_becomes_sent_when_the_device_shows_it_and_progress_is_recorded():
    c = ctx()
    s = step(status=StepStatus.SENDING, sent=T0)
    busy = {"command_id": "r:d1:install", "step": "downloading"}
    out = D.resolve_step(s, dev(busy=busy), None, c, T0 + 1)
    assert (out.status, out.result) == (StepStatus.SENT, "downloading")
    last = {"id": "r:d1:install", "result": "live"}  # finished while we were away
    assert D.resolve_step(s, dev(NEW, last=last), None, c, T0 + 1).status == StepStatus.DONE


def test_after_a_restart_a_sending_step_is_resent_only_without_a_sign_past_the_grace():
    c = ctx()
    s = step(status=StepStatus.SENDING, sent=T0, resend_after=T0 + 5)
    assert D.resolve_step(s, dev(), None, c, T0 + 4) is None
    assert D.resolve_step(s, dev(), None, c, T0 + 6).resend
    assert D.resolve_step(s, dev(online=False), None, c, T0 + 6) is None  # broker holds it
    busy = {"command_id": "r:d1:install", "step": "received"}
    assert not D.resolve_step(s, dev(busy=busy), None, c, T0 + 6).resend
    mine = step(status=StepStatus.SENDING, sent=T0)  # published by this process: never
    assert D.resolve_step(mine, dev(), None, c, T0 + 30) is None


def test_only_the_commanded_device_can_answer_its_command():
    """Issue 14: a device publishing on its own event topic with another device's command
    id must not decide that device's step."""
    assert D.accept_event("d1", "d1", ev("live"))
    assert not D.accept_event("d1", "evil", ev("failed", reason="os-error"))
    assert not D.accept_event(None, "d1", ev("live"))
    # a refusal of a duplicate delivery says nothing about the first one
    assert not D.accept_event("d1", "d1", ev("failed", reason="replayed"))


# -- a stage's deploy ------------------------------------------------------------------------


def test_deploy_sends_at_most_max_parallel_and_finishes_when_every_step_is_final():
    c = ctx(max_parallel=2)
    steps = [step(f"d{i}") for i in range(5)]
    devices = {f"d{i}": dev() for i in range(5)}
    out = D.decide_deploy(steps, devices, c, T0, stage_started=T0)
    assert out.send == ["d0", "d1"] and not out.deployed
    steps = [step("d0", StepStatus.SENT), *steps[1:]]
    assert D.decide_deploy(steps, devices, c, T0, stage_started=T0).send == ["d1"]
    assert D.decide_deploy(steps, devices, c, T0, stage_started=T0,
                           connected=False).send == []
    final = [step(f"d{i}", StepStatus.DONE) for i in range(5)]
    assert D.decide_deploy(final, devices, c, T0, stage_started=T0).deployed


@pytest.mark.parametrize("share,n,expect", [("5%", 60, 3), ("5%", 28, 1), ("0", 10, 0),
                                             ("2", 10, 2), ("50%", 3, 1)])
def test_budget_is_the_share_rounded_down(share, n, expect):
    assert D.budget(Plan(max_failures=share), n) == expect
    assert D.budget(Plan(max_failures=share), n, accepted=2) == expect + 2


def test_over_budget_lets_what_is_in_flight_finish_first():
    c = ctx(max_failures="1")
    devices = {f"d{i}": dev() for i in range(4)}
    steps = [step("d0", StepStatus.FAILED), step("d1", StepStatus.TIMEOUT),
             step("d2", StepStatus.SENT), step("d3")]
    out = D.decide_deploy(steps, devices, c, T0, stage_started=T0)
    assert not out.over_budget and out.send == []  # no new command once over budget
    steps[2] = step("d2", StepStatus.DONE)
    assert D.decide_deploy(steps, devices, c, T0, stage_started=T0).over_budget
    # failures an operator accepted (resume) do not count again
    assert not D.decide_deploy(steps, devices, c, T0, stage_started=T0,
                               accepted=1).over_budget


def test_offline_devices_are_skipped_or_waited_for_then_failed():
    devices = {"d0": dev(online=False)}
    out = D.decide_deploy([step("d0")], devices, ctx(offline="skip"), T0, stage_started=T0)
    assert out.finish["d0"].status == StepStatus.SKIPPED
    c = ctx(offline="wait", offline_wait_s=30)
    assert D.decide_deploy([step("d0")], devices, c, T0 + 29, stage_started=T0).finish == {}
    out = D.decide_deploy([step("d0")], devices, c, T0 + 31, stage_started=T0)
    assert (out.finish["d0"].status, out.finish["d0"].reason) == (StepStatus.FAILED,
                                                                   "offline")
    back = {"d0": dev()}
    assert D.decide_deploy([step("d0")], back, c, T0 + 31, stage_started=T0).send == ["d0"]


def test_a_device_is_taken_as_already_there_only_on_a_fresh_report():
    """Issue 14: a device rolled back by hand 2 s before the rollout was recorded "already
    there" from its retained state. Stale (retained, or reported before the rollout began):
    ask it to report; fresh: skip it; asked and still stale: command it."""
    c = ctx()
    stale = {"d0": dev(NEW, received=None)}
    out = D.decide_deploy([step("d0")], stale, c, T0, stage_started=T0)
    assert out.report == ["d0"] and out.send == [] and out.finish == {}
    before = {"d0": dev(NEW, received=T0 - 2)}
    assert D.decide_deploy([step("d0")], before, c, T0, stage_started=T0).report == ["d0"]
    asked = D.decide_deploy([step("d0")], stale, c, T0, stage_started=T0,
                            reports={"d0": StepStatus.SENT})
    assert asked.report == [] and asked.send == []  # waiting for the report
    fresh = {"d0": dev(NEW, received=T0 + 1)}
    out = D.decide_deploy([step("d0")], fresh, c, T0, stage_started=T0,
                          reports={"d0": StepStatus.DONE})
    assert out.finish["d0"].result == "unchanged"
    out = D.decide_deploy([step("d0")], stale, c, T0, stage_started=T0,
                          reports={"d0": StepStatus.TIMEOUT})
    assert out.send == ["d0"]


# -- bake ------------------------------------------------------------------------------------


def _verdict(v: str) -> G.Verdict:
    return G.Verdict(v, (G.GateResult("error_rate<=0.01", v, 0.0),))


def test_bake_fails_at_once_passes_only_at_its_end_and_is_never_passed_inconclusive():
    assert D.decide_bake(False, T0, 60, None, T0 + 100) == D.BakeOutcome.CONTINUE
    assert D.decide_bake(False, T0, 60, _verdict(G.FAIL), T0 + 1) == D.BakeOutcome.FAIL
    assert D.decide_bake(False, T0, 60, _verdict(G.PASS), T0 + 59) == D.BakeOutcome.CONTINUE
    assert D.decide_bake(False, T0, 60, _verdict(G.PASS), T0 + 60) == D.BakeOutcome.PASS
    assert D.decide_bake(False, T0, 60, _verdict(G.INCONCLUSIVE), T0 + 60) == \
        D.BakeOutcome.INCONCLUSIVE
    # a shadow stage passes as soon as the evidence is in
    assert D.decide_bake(True, T0, 600, _verdict(G.PASS), T0 + 1) == D.BakeOutcome.PASS


def test_bake_times_per_stage():
    p = Plan(bake_s=300, wave_bake_s=60, shadow_timeout_s=600)
    kinds = ["shadow", "install", "install", "install"]
    assert [D.bake_time(p, kinds, i) for i in range(4)] == [600, 300, 60, 0]


def test_bake_evidence_splits_moved_devices_from_the_rest():
    targets = {"a": {"baseline": {"requests": 5}}, "b": {}, "c": {}}
    states = {"a": {"online": True, "model": {"active": {"digest": NEW}},
                    "summary": {"requests": 9}, "health": {"status": "ok"}},
              "b": {"online": True, "model": {"active": {"digest": OLD}}, "summary": {}},
              "c": {"online": False}}
    new, old, base = D.bake_inputs(targets, {"a"}, states, NEW)
    assert [s["requests"] for s in new] == [9] and len(old) == 1 and base == [{"requests": 5}]


_BAKE_GATES = [G.parse_gate(t, G.BAKE_METRICS) for t in (
    "error_rate<=0.01", "fail_rate_delta<=0.05", "p99_ratio<=1.5", "max_psi<=0.2",
    "unhealthy<=0")]
_summary = st.fixed_dictionaries({}, optional={
    "requests": st.integers(0, 500), "errors": st.integers(0, 5),
    "fail_rate": st.sampled_from([0.0, 0.01, 0.03, 0.1, float("nan")]),
    "p99_ms": st.sampled_from([1.0, 2.5, 4.0, None]), "max_psi": st.sampled_from([0.01, 0.3])})
_state = st.one_of(st.none(), st.builds(
    lambda online, new, health, summary: {
        "online": online, "model": {"active": {"digest": NEW if new else OLD}},
        "health": {"status": health}, "summary": summary},
    st.booleans(), st.booleans(), st.sampled_from(["ok", "degraded"]), _summary))
_change = st.tuples(st.sampled_from("abcdef"), st.booleans(), _state)


@settings(max_examples=60)
@given(st.lists(_change, max_size=25))
def test_bake_evidence_kept_per_device_judges_as_a_fresh_read(changes):
    """The driver's incremental evidence (updated per device as states and install steps
    change) gives the verdict and evidence a fresh read of every state gives."""
    targets = {d: {"baseline": {"requests": 100, "fail_rate": 0.02, "p99_ms": 2.0}}
               for d in "abcdef"}
    states: dict = {"a": {"online": True, "model": {"active": {"digest": OLD}},
                          "summary": {"requests": 50, "fail_rate": 0.02}}}
    moved: set[str] = set()
    ev = D.BakeEvidence(targets, moved, states, NEW)
    for d, install_done, state in changes:
        (moved.add if install_done else moved.discard)(d)
        states[d] = state
        ev.update(d, d in moved, state)
    new, old, base = D.bake_inputs(targets, moved, states, NEW)
    fresh = G.evaluate_bake(_BAKE_GATES, new, old, min_requests=100, baseline=base)
    kept = ev.verdict(_BAKE_GATES, 100)
    assert kept.to_json() == fresh.to_json()


# -- the end, and undoing it -----------------------------------------------------------------


def test_success_needs_every_targeted_device_on_the_bundle():
    steps = {("a", "install"): step("a", StepStatus.DONE),
             ("b", "install"): step("b", StepStatus.FAILED, result="failed"),
             ("c", "install"): step("c", StepStatus.SKIPPED),
             ("d", "install"): step("d", StepStatus.DONE)}
    devices = {"a": dev(NEW), "b": dev(OLD), "c": dev(OLD), "d": dev(OLD)}
    behind = dict(D.left_behind(["a", "b", "c", "d"], steps, devices, NEW))
    assert set(behind) == {"b", "c", "d"}  # d: done once, but rolled back by hand since
    assert behind["b"] == "failed: failed" and behind["c"] == "skipped"
    assert "shows model" in behind["d"]


def test_rollback_undoes_what_this_rollout_moved_and_nothing_else():
    steps = {("a", "install"): step("a", StepStatus.DONE, result="live"),
             ("b", "install"): step("b", StepStatus.DONE, result="unchanged"),
             ("c", "shadow"): step("c", StepStatus.DONE, kind="shadow"),
             ("d", "install"): step("d", StepStatus.FAILED)}
    devices = {"a": dev(NEW), "b": dev(NEW), "c": dev(OLD, shadow=NEW), "d": dev(OLD)}
    assert D.rollback_steps(["a", "b", "c", "d"], steps, devices, NEW) == [
        ("a", "rollback"), ("c", "shadow-stop")]


# -- the transition table ----------------------------------------------------------------------


def test_final_states_are_left_only_by_rollback_and_rolled_back_by_nothing():
    for s in TERMINAL:
        outs = {t for (st, t) in TRANSITIONS if st == s}
        assert outs <= {Trigger.ROLLBACK, Trigger.RETRY}, (s, outs)
    assert {t for (st, t) in TRANSITIONS if st == RolloutState.ROLLED_BACK} == set()
    assert next_state("superseded", "rollback") == RolloutState.ROLLING_BACK
    assert next_state("rolled-back", "resume") is None


@pytest.mark.parametrize("trigger", OPERATOR_TRIGGERS)
def test_every_operator_action_is_accepted_from_some_state(trigger):
    froms = [s for (s, t) in TRANSITIONS if t == trigger]
    assert froms
    for s in froms:
        assert next_state(s, trigger) in RolloutState
