"""The rollout state machine: every state a rollout, a stage and a device step can be in, and
the one table of how a rollout moves between states. The driver (fleet/driver.py) and the
operator actions (fleet/actions.py) both go through `next_state`; nothing else changes a
rollout's state.

Rollout states and every way out of them (`TRANSITIONS`):

    pending       start -> running; abort -> aborted; supersede -> superseded
    running       succeed -> succeeded          every targeted device runs the bundle (or
                                                allow_partial, the left-behind listed)
                  pause -> paused               budget exceeded / gate failed with policy
                                                pause, gates inconclusive, devices left
                                                behind, operator pause, driver stopped
                  rollback -> rolling-back      gate failed / budget exceeded with policy
                                                rollback, shadow gates failed, operator
                  abort -> aborted              operator (devices left as they are)
                  supersede -> superseded       a newer rollout of the same devices (--replace)
                  promote, retry -> running     operator: bake ends now / failed devices again
    paused        resume, promote, retry -> running
                  rollback -> rolling-back; abort -> aborted; supersede -> superseded
    rolling-back  rolled-back -> rolled-back    every moved device rolled back
                  fail -> failed                some did not, or a shadow stage failed
    succeeded     rollback -> rolling-back; retry -> running (a partial success)
    failed, aborted, superseded
                  rollback -> rolling-back      undo what it moved
    rolled-back   (final)

Within `running` the phase says what the driver does: `deploy` (commands out, outcomes in),
`bake` (gates judge the stage), `finish` (stop leftover shadows, then the final check). Within
`rolling-back`: `rollback` (ends rolled-back) or `shadow-stop` (a failed shadow stage: ends
failed).

Device steps: pending -> sending (committed before publishing) -> sent (the broker has it)
-> done | failed | timeout; a pending step may also end skipped (offline=skip) or done with
result `unchanged` (the device, freshly reported, already runs the bundle).
"""

from __future__ import annotations

from enum import StrEnum


class RolloutState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    ROLLING_BACK = "rolling-back"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"
    ABORTED = "aborted"
    SUPERSEDED = "superseded"


class Phase(StrEnum):
    DEPLOY = "deploy"
    BAKE = "bake"
    FINISH = "finish"
    ROLLBACK = "rollback"
    SHADOW_STOP = "shadow-stop"


class Trigger(StrEnum):
    START = "start"
    SUCCEED = "succeed"
    PAUSE = "pause"
    RESUME = "resume"
    ROLLBACK = "rollback"
    ABORT = "abort"
    SUPERSEDE = "supersede"
    PROMOTE = "promote"
    RETRY = "retry"
    ROLLED_BACK = "rolled-back"
    FAIL = "fail"


class StageState(StrEnum):
    PENDING = "pending"
    DEPLOYING = "deploying"
    BAKING = "baking"
    PASSED = "passed"
    PARTIAL = "partial"  # deployed and baked, but some of its devices failed or were skipped
    FAILED = "failed"
    PAUSED = "paused"
    MERGED = "merged"  # its devices went with the last stage (promote --full)


class StepStatus(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    DONE = "done"
    FAILED = "failed"
    TIMEOUT = "timeout"
    SKIPPED = "skipped"


S = RolloutState
T = Trigger

TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.ROLLED_BACK, S.ABORTED, S.SUPERSEDED})
DRIVEN = frozenset({S.PENDING, S.RUNNING, S.ROLLING_BACK})  # states a driver works on
STEP_FINAL = frozenset({StepStatus.DONE, StepStatus.FAILED, StepStatus.TIMEOUT,
                        StepStatus.SKIPPED})
STEP_BAD = frozenset({StepStatus.FAILED, StepStatus.TIMEOUT})
IN_FLIGHT = frozenset({StepStatus.SENDING, StepStatus.SENT})

TRANSITIONS: dict[tuple[RolloutState, Trigger], RolloutState] = {
    (S.PENDING, T.START): S.RUNNING,
    (S.PENDING, T.ABORT): S.ABORTED,
    (S.PENDING, T.SUPERSEDE): S.SUPERSEDED,
    (S.PENDING, T.PAUSE): S.PAUSED,
    (S.RUNNING, T.SUCCEED): S.SUCCEEDED,
    (S.RUNNING, T.PAUSE): S.PAUSED,
    (S.RUNNING, T.ROLLBACK): S.ROLLING_BACK,
    (S.RUNNING, T.ABORT): S.ABORTED,
    (S.RUNNING, T.SUPERSEDE): S.SUPERSEDED,
    (S.RUNNING, T.PROMOTE): S.RUNNING,
    (S.RUNNING, T.RETRY): S.RUNNING,
    (S.PAUSED, T.RESUME): S.RUNNING,
    (S.PAUSED, T.PROMOTE): S.RUNNING,
    (S.PAUSED, T.RETRY): S.RUNNING,
    (S.PAUSED, T.ROLLBACK): S.ROLLING_BACK,
    (S.PAUSED, T.ABORT): S.ABORTED,
    (S.PAUSED, T.SUPERSEDE): S.SUPERSEDED,
    (S.ROLLING_BACK, T.ROLLED_BACK): S.ROLLED_BACK,
    (S.ROLLING_BACK, T.FAIL): S.FAILED,
    (S.SUCCEEDED, T.ROLLBACK): S.ROLLING_BACK,
    (S.SUCCEEDED, T.RETRY): S.RUNNING,
    (S.FAILED, T.ROLLBACK): S.ROLLING_BACK,
    (S.ABORTED, T.ROLLBACK): S.ROLLING_BACK,
    (S.SUPERSEDED, T.ROLLBACK): S.ROLLING_BACK,
}

# what an operator may ask for (`rollout <action> ID`), each one trigger
OPERATOR_TRIGGERS = (T.PAUSE, T.RESUME, T.ABORT, T.ROLLBACK, T.PROMOTE, T.RETRY, T.SUPERSEDE)


def next_state(state: str, trigger: str) -> RolloutState | None:
    """The state `trigger` leads to from `state`, or None when the table has no such move."""
    return TRANSITIONS.get((RolloutState(state), Trigger(trigger)))


def allowed(state: str) -> list[str]:
    """The triggers accepted in `state` (for messages that say what can be done instead)."""
    return [t.value for (s, t) in TRANSITIONS if s == state]
