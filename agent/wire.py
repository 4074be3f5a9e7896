"""The fleet wire contract: what a device and the controller both read off the broker.

Everything that crosses MQTT between `agent.link` (device) and `fleet` (controller) and that
either side branches on is named here once, so neither side copies strings from the other or
reaches into the other's internals (docs/fleet-protocol.md is the prose version):

    Topics            <prefix>/device/<id>/{state,cmd,event}
    CommandType       what a signed command asks for (agent/commands.py signs and checks it)
    Step              what a device reports in its events, per command (STEPS), which steps
                      end a command (TERMINAL_STEPS) and which one means it worked (SUCCESS)
    Health            the state document's `health.status`
    Reason            every `reason` a `failed` event (or `last_command.reason`) can carry; the
                      device's errors carry theirs as a class attribute `reason`

Only the standard library and `agent.errors` are imported: both packages can import this
module without pulling in MQTT, ONNX Runtime or each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from agent.errors import UsageError

PROTOCOL_VERSION = 1  # the `v` of every state, event and command envelope

# Buckets of the margin histograms a device reports (shadow counters, proxy metrics) and the
# controller's shadow gates read: margin = (score - threshold) / confidence_scale, 0 the
# decision boundary.
MARGIN_EDGES = (-8.0, -4.0, -2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

__all__ = [
    "CANCELLING",
    "COMMAND_TYPES",
    "DUPLICATE_REASONS",
    "HEALTH_STATUSES",
    "INSTALL_TYPES",
    "MARGIN_EDGES",
    "PROTOCOL_VERSION",
    "STEPS",
    "SUCCESS",
    "TERMINAL_STEPS",
    "CommandType",
    "Health",
    "Reason",
    "Step",
    "Topics",
    "is_terminal",
    "reason_of",
]


@dataclass(frozen=True)
class Topics:
    """Topic names under a prefix (one or more levels, no wildcards)."""

    prefix: str = "edgefleet"

    KINDS = ("state", "cmd", "event")

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "+#") or \
                self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise UsageError(f"topic prefix {self.prefix!r}: no wildcards, no leading or "
                             "trailing '/'")

    def state(self, device_id: str) -> str:
        return f"{self.prefix}/device/{device_id}/state"

    def cmd(self, device_id: str) -> str:
        return f"{self.prefix}/device/{device_id}/cmd"

    def event(self, device_id: str) -> str:
        return f"{self.prefix}/device/{device_id}/event"

    def all(self, kind: str) -> str:
        """Subscription filter for one kind (state, event, cmd) of every device."""
        return f"{self.prefix}/device/+/{kind}"

    def parse(self, topic: str) -> tuple[str, str] | None:
        """(device id, kind) for a topic under this prefix, else None. The device id is the
        one the *topic* names: with the broker's per-device ACL, the only device that can
        publish there (a consumer checks an event's `device_id` field against it)."""
        head = f"{self.prefix}/device/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head):].split("/")
        if len(parts) != 2 or parts[1] not in self.KINDS:
            return None
        return parts[0], parts[1]


class CommandType(StrEnum):
    INSTALL = "install"
    ROLLBACK = "rollback"
    REPORT_NOW = "report-now"
    SHADOW = "shadow"  # a candidate scores live traffic next to the live model
    SHADOW_STOP = "shadow-stop"


COMMAND_TYPES = tuple(t.value for t in CommandType)
INSTALL_TYPES = (CommandType.INSTALL.value, CommandType.SHADOW.value)  # carry an `install` spec


class Step(StrEnum):
    RECEIVED = "received"
    DOWNLOADING = "downloading"
    VERIFIED = "verified"
    INSTALLING = "installing"
    SELF_TEST = "self-test"
    LIVE = "live"
    ROLLED_BACK = "rolled-back"
    REPORTED = "reported"
    SHADOWING = "shadowing"
    SHADOW_STOPPED = "shadow-stopped"
    FAILED = "failed"


# The steps of each command, in order; the last one is its success. Any step may instead be
# followed by `failed` (with a Reason), which is terminal too.
STEPS: dict[str, tuple[str, ...]] = {
    CommandType.INSTALL: (Step.RECEIVED, Step.DOWNLOADING, Step.VERIFIED, Step.INSTALLING,
                          Step.SELF_TEST, Step.LIVE),
    CommandType.ROLLBACK: (Step.RECEIVED, Step.INSTALLING, Step.SELF_TEST, Step.ROLLED_BACK),
    CommandType.REPORT_NOW: (Step.RECEIVED, Step.REPORTED),
    CommandType.SHADOW: (Step.RECEIVED, Step.DOWNLOADING, Step.VERIFIED, Step.INSTALLING,
                         Step.SELF_TEST, Step.SHADOWING),
    CommandType.SHADOW_STOP: (Step.RECEIVED, Step.SHADOW_STOPPED),
}
SUCCESS: dict[str, str] = {ctype: steps[-1] for ctype, steps in STEPS.items()}
TERMINAL_STEPS = frozenset({*SUCCESS.values(), Step.FAILED})


def is_terminal(step: str | None) -> bool:
    """Does this event step end its command (no further event for that command id)?"""
    return step in TERMINAL_STEPS


class Health(StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    FALLBACK = "fallback"  # the rules answer instead of the model


HEALTH_STATUSES = tuple(h.value for h in Health)


class Reason(StrEnum):
    """Why a command failed: the `reason` of a `failed` event (docs/fleet-protocol.md)."""

    # refusals (agent/commands.py, in the order they are checked)
    REFUSED = "refused"
    MALFORMED = "malformed"
    UNSIGNED = "unsigned"
    UNTRUSTED_KEY = "untrusted-key"
    BAD_SIGNATURE = "bad-signature"
    WRONG_DEVICE = "wrong-device"
    NOT_YET_VALID = "not-yet-valid"
    EXPIRED = "expired"
    REPLAYED = "replayed"
    KEYRING = "keyring"  # the device's keyring could not be read: every command is refused
    # checked before any download
    DOWNGRADE = "downgrade"
    SEQUENCE_REUSED = "sequence-reused"  # this sequence was installed with other content
    UNSUPPORTED = "unsupported"  # this agent does not run that command type
    # download (agent/download.py)
    TOO_LARGE = "too-large"
    DIGEST_MISMATCH = "digest-mismatch"
    HTTP_ERROR = "http-error"
    REDIRECT_REFUSED = "redirect-refused"  # to another scheme, host or port
    DOWNLOAD_FAILED = "download-failed"
    TOO_SLOW = "too-slow"  # the download's deadline (minimum rate, command expiry) passed
    CANCELLED = "cancelled"  # by rollback, shadow-stop, a newer install, or shutdown
    # the bundle and the install (agent/bundle.py, agent/install.py, agent/engine.py)
    SEQUENCE_MISMATCH = "sequence-mismatch"
    BUNDLE_SIGNATURE = "bundle-signature"
    BUNDLE_CORRUPT = "bundle-corrupt"
    BUNDLE_EXPIRED = "bundle-expired"
    INCOMPATIBLE = "incompatible"
    LOAD_FAILED = "load-failed"
    SELF_TEST_FAILED = "self-test-failed"
    LATENCY_TOO_HIGH = "latency-too-high"
    INTEGRITY = "integrity"
    NO_ROLLBACK_TARGET = "no-rollback-target"
    INSTALL_BUSY = "install-busy"
    OS_ERROR = "os-error"
    INTERNAL = "internal"
    INTERRUPTED = "interrupted"  # the agent stopped while the command ran (`recovered: true`)


def reason_of(error: BaseException) -> str:
    """The wire reason for an error: the class attribute `reason` the device's errors carry,
    `os-error` for an OSError (disk full, permissions), else `internal` (a bug)."""
    reason = getattr(error, "reason", None)
    if isinstance(reason, str) and reason in Reason._value2member_map_:
        return reason
    return Reason.OS_ERROR if isinstance(error, OSError) else Reason.INTERNAL


# A `failed` event with one of these reasons refuses a *duplicate* delivery of a command: it
# says nothing about how the first delivery of that command id went.
DUPLICATE_REASONS = frozenset({Reason.REPLAYED})

# Commands that cancel a download in progress when they arrive (the download's command then
# fails with Reason.CANCELLED): a rollback cancels any, shadow-stop only a shadow's, and a new
# install or shadow supersedes the one still downloading.
CANCELLING: dict[str, tuple[str, ...]] = {
    CommandType.ROLLBACK: (CommandType.INSTALL, CommandType.SHADOW),
    CommandType.SHADOW_STOP: (CommandType.SHADOW,),
    CommandType.INSTALL: (CommandType.INSTALL, CommandType.SHADOW),
    CommandType.SHADOW: (CommandType.INSTALL, CommandType.SHADOW),
}
