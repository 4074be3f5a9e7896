"""What each fleet command does on the device: one handler per command type (`HANDLERS`).

The device link (agent/link.py) verifies a command, records it against replay, reports
`received`, cancels the download it supersedes (`agent.wire.CANCELLING`) and then calls
`HANDLERS[command.type](ctx)` on its control lane. A handler sees only the public
`agent.link.CommandContext`:

    ctx.command                  the verified command
    ctx.installer, ctx.shadow    the install state machine; the shadow host (or None)
    ctx.keyring()                the keyring as it is on disk now
    ctx.model("active")          the state document's model entry (or None)
    ctx.step(step, **extra)      a progress event
    ctx.fetch(spec, dest, then)  download on the transfer lane (deadline: the command's
                                 expiry and the minimum rate; cancellable), then run
                                 `then(path, seconds)` back on the control lane
    ctx.done(step, **extra)      the terminal success event and the state's `last_command`
    ctx.fail(reason, detail)     the terminal `failed` event (the box is as it was)

so commands other than the one downloading (`rollback`, `report-now`, ...) run while a
download is in progress. Every handler ends its command exactly once (`done` or `fail`, maybe
from its `then`); a handler that raises is failed with reason `internal` by the link.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.bundle import read_manifest_unverified
from agent.commands import InstallSpec
from agent.errors import EdgefleetError
from agent.wire import CommandType, Reason, Step, reason_of

if TYPE_CHECKING:
    from agent.link import CommandContext

Handler = Callable[["CommandContext"], None]

# install.State value -> the step it reports, and the order of the states a job goes through
_STATE_STEP = {"unpack": Step.VERIFIED, "load": Step.INSTALLING, "self_test": Step.SELF_TEST}
_STEP_ORDER = ("verify", "unpack", "load", "self_test", "commit")

__all__ = ["HANDLERS", "Handler", "sequence_refusal"]


def sequence_refusal(ctx: CommandContext, spec: InstallSpec) -> tuple[str, str] | None:
    """(reason, detail) if the command's sequence is refused before anything is downloaded:
    below the highest ever installed here (`downgrade`), or equal to it while the version that
    holds it, still on the box, is another bundle (`sequence-reused`)."""
    store = ctx.installer.store
    highest = store.highest_sequence()
    if highest is None or spec.sequence > highest:
        return None
    if spec.sequence < highest:
        return Reason.DOWNGRADE, (f"sequence {spec.sequence} is below the highest ever "
                                  f"installed here ({highest})")
    holder = store.highest_holder()
    if holder is None or not store.has_version(holder):
        return None  # not on the box any more: the installer's verify step still checks it
    digest = ctx.digest_of(holder)
    if digest is not None and digest != spec.sha256:
        return Reason.SEQUENCE_REUSED, (f"sequence {spec.sequence} was installed here as "
                                        f"{holder} (bundle sha256 {digest}), not {spec.sha256}")
    return None


def install(ctx: CommandContext) -> None:
    spec = ctx.command.install
    assert spec is not None
    refused = sequence_refusal(ctx, spec)
    if refused is not None:
        ctx.fail(*refused)
        return
    active = ctx.model("active")
    if (active or {}).get("digest") == spec.sha256:
        ctx.done(Step.LIVE, model=active, unchanged=True)
        return
    cached = ctx.shadow.cached(spec.sha256) if ctx.shadow is not None else None
    if cached is not None:  # promoting the shadow: its verified bundle is here already
        ctx.step(Step.DOWNLOADING, url=spec.url, size=spec.size, cached=True)
        _install_job(ctx, lambda **kw: ctx.installer.install(cached, **kw), Step.LIVE,
                     download_s=0.0)
        return
    dest = ctx.installer.store.download_path(f"{spec.sha256}.efb")
    ctx.fetch(spec, dest, then=lambda path, seconds: _install_downloaded(ctx, path, seconds))


def _install_downloaded(ctx: CommandContext, path: Path, seconds: float) -> None:
    spec = ctx.command.install
    assert spec is not None
    try:
        seq = read_manifest_unverified(path).sequence
    except EdgefleetError as e:
        path.unlink(missing_ok=True)
        ctx.fail(Reason.BUNDLE_CORRUPT, str(e))
        return
    if seq != spec.sequence:
        path.unlink(missing_ok=True)
        ctx.fail(Reason.SEQUENCE_MISMATCH,
                 f"the bundle's sequence is {seq}, the command says {spec.sequence}")
        return
    try:
        _install_job(ctx, lambda **kw: ctx.installer.install(path, **kw), Step.LIVE,
                     download_s=round(seconds, 3))
    finally:
        path.unlink(missing_ok=True)


def rollback(ctx: CommandContext) -> None:
    _install_job(ctx, lambda **kw: ctx.installer.rollback(**kw), Step.ROLLED_BACK)


def report_now(ctx: CommandContext) -> None:
    ctx.done(Step.REPORTED)  # and, as every terminal step, a fresh state


def shadow(ctx: CommandContext) -> None:
    if ctx.shadow is None:
        ctx.fail(Reason.UNSUPPORTED, "this agent does not run shadow models")
    else:
        ctx.shadow.run(ctx)


def shadow_stop(ctx: CommandContext) -> None:
    if ctx.shadow is None:
        ctx.fail(Reason.UNSUPPORTED, "this agent does not run shadow models")
    else:
        ctx.shadow.stop(ctx)


HANDLERS: dict[str, Handler] = {
    CommandType.INSTALL: install,
    CommandType.ROLLBACK: rollback,
    CommandType.REPORT_NOW: report_now,
    CommandType.SHADOW: shadow,
    CommandType.SHADOW_STOP: shadow_stop,
}


def _install_job(ctx: CommandContext, job: Callable[..., Any], success: str,
                 **extra: Any) -> None:
    """Run an install or rollback through the installer's state machine, reporting its states
    as steps (live, through `on_state`, when the installer offers it), then end the command."""
    reported: list[str] = []

    def on_state(state: str) -> None:
        step = _STATE_STEP.get(str(state))
        if step and step not in reported:
            reported.append(step)
            ctx.step(step)

    kwargs = {"on_state": on_state} if _accepts(ctx.installer, "on_state") else {}
    try:
        result = job(**kwargs)
    except EdgefleetError as e:
        failed_at = getattr(e, "state", None)
        if failed_at in _STEP_ORDER:  # report the steps that did complete
            done = _STEP_ORDER[:_STEP_ORDER.index(failed_at) + 1]  # entered, then failed
            for s in done[1:] if success == Step.LIVE else done[2:]:
                on_state(s)
        ctx.fail(reason_of(e), getattr(e, "detail", None) or str(e), state=failed_at, **extra)
        return
    for s in ("unpack", "load", "self_test") if success == Step.LIVE else ("load", "self_test"):
        on_state(s)  # no-op where on_state already reported them
    timings = getattr(result, "timings", None) or {}
    model = ctx.model("active")
    ctx.done(success, record={"model_id": model["id"] if model else None}, model=model,
             unchanged=getattr(result, "outcome", "") == "unchanged" or None,
             timings_s={k: round(v, 4) for k, v in timings.items()}, **extra)
    if success == Step.LIVE and ctx.shadow is not None:
        ctx.shadow.promoted((model or {}).get("digest"))  # the shadow of it is live now


def _accepts(installer: Any, name: str) -> bool:
    """Do the installer's install and rollback take keyword `name`? (`on_state` is optional:
    the simulator's failing installer does not.)"""
    for meth in ("install", "rollback"):
        fn = getattr(installer, meth, None)
        if fn is not None:
            try:
                if name not in inspect.signature(fn).parameters:
                    return False
            except (TypeError, ValueError):
                return False
    return True
