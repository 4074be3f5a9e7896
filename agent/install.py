"""Installing a model: a state machine whose current state is on disk (after Mender's client).

Every operation that changes the serving model is a *job* driven through named states. Before a
state's step runs, the job record is written to `<store>/install.json` (temp file, fsync,
rename, fsync dir), so a crash or power cut at any point leaves a record that start-up recovery
finishes or undoes. The pointer move in `commit` is the one commit point: before it the box
still serves the old version, after it the new one.

    state       step                                                  next
    ---------   ---------------------------------------------------   ---------------------
    verify      signature, digests, expiry, sequence >= highest ever   unpack
                installed (and, equal, the same version), input width  (idle: already active)
                == running model's (or force)
    unpack      files to staging/<id>, fsync, rename to versions/<id>  load
    load        new ONNX Runtime session (a retained version's files   self_test
                are re-hashed first); with `on_prepare`, the serving
                snapshot built from it, not yet visible
    self_test   golden vectors within the manifest's tolerance,        commit
                median latency <= max_latency_s
    commit      move `active` (durable), then swap the engine in       cleanup
                memory (the prepared snapshot, else on_commit), then
                `previous` and the history
    cleanup     quarantine, garbage collection, staging                idle
    rollback    restore `active` and `previous`, drop staging and the  idle
                new version, record why
    any step of verify..commit that raises                           -> rollback

Three jobs use the machine: `install` (verify -> ... -> idle), local `rollback` to a retained
version (load -> ... -> idle; no download, no sequence check, since the version was verified when
it was installed) and `integrity` (the active version changed on disk: load the previous one,
commit, quarantine the damaged one).

Start-up (`recover`, a loop over the record):

    verify, unpack, load, self_test    -> rollback -> idle
    commit  and `active` is the new    -> commit finished (previous, history) -> cleanup -> idle
    commit  and `active` is the old    -> rollback -> idle
    cleanup                            -> cleanup -> idle
    rollback                           -> rollback -> idle     (every step is idempotent)

Revoked keys and installed models. A model serves only while its manifest's signature
verifies against the keyring as it is on disk when the model *starts* serving. From the moment
a release key's id is in `revoked.txt`:
 1. no bundle it signed is installed or shadowed (reason `bundle-signature`);
 2. no retained version it signed becomes active again: a rollback to it is refused, and the
    agent does not switch to it when the active version fails its integrity check;
 3. at the next agent start, an active version it signed does not load: the previous version
    serves if it verifies, else the rule fallback;
 4. a version it signed that is serving keeps serving until one of the above replaces it:
    revocation alone never swaps a running model. To take boxes off it, roll out a bundle
    signed by a trusted key. Rotate before you revoke.
A revoked fleet key's commands are refused from the next command on (`untrusted-key`).

Wiring into the agent (start-up, before the serving socket opens):

    installer = Installer.open(store_dir, keyring_dir, InstallConfig.from_env())
    start = installer.start()        # recover, check, load, self-test (or previous, or rules)
    if start.engine is not None:
        runtime.swap(start.engine, start.manifest)
    installer.attach(on_commit=runtime.swap, on_fallback=runtime.enter_fallback,
                     on_prepare=runtime.prepare)
    IntegrityMonitor(installer).start()

For fault tests, `EDGEFLEET_CRASH_AT=<point>` (one of `CRASH_POINTS`) makes the process SIGKILL
itself right after persisting that state (or at the named point inside a step).
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

import orjson

from agent.bundle import Incompatible, unpack_bundle, verify_bundle, verify_unpacked
from agent.digest import remember as remember_digest
from agent.engine import Engine, SelfTestError
from agent.errors import EdgefleetError
from agent.fsio import atomic_write
from agent.keys import Keyring, LiveKeyring
from agent.manifest import Manifest
from agent.store import Store, StoreError, version_id
from agent.wire import Reason, reason_of

log = logging.getLogger("edgefleet.agent")
CRASH_ENV = "EDGEFLEET_CRASH_AT"
RECORD_NAME = "install.json"

__all__ = [
    "CRASH_POINTS",
    "InstallBusy",
    "InstallConfig",
    "InstallError",
    "InstallFailed",
    "InstallResult",
    "Installer",
    "IntegrityError",
    "IntegrityMonitor",
    "IntegrityReport",
    "LatencyTooHigh",
    "NoRollbackTarget",
    "Startup",
    "State",
]


class State(StrEnum):
    IDLE = "idle"
    VERIFY = "verify"
    UNPACK = "unpack"
    LOAD = "load"
    SELF_TEST = "self_test"
    COMMIT = "commit"
    CLEANUP = "cleanup"
    ROLLBACK = "rollback"


_BEFORE_COMMIT = (State.VERIFY, State.UNPACK, State.LOAD, State.SELF_TEST)

# Where EDGEFLEET_CRASH_AT can kill the process: after each state is persisted, plus points
# inside steps where a crash leaves something half done on disk.
CRASH_POINTS = (
    "verify", "unpack", "unpack.staged", "load", "self_test", "commit", "commit.pointer",
    "commit.swapped", "cleanup", "rollback", "idle",
)


class InstallError(EdgefleetError):
    """An install, rollback or recovery could not be carried out."""


class InstallFailed(InstallError):
    """A job failed and was rolled back: the box is as it was before. `state` is where it
    failed, `kind` the error class (e.g. "Downgrade", "SelfTestError"), `reason` the wire
    reason code of that error (agent/wire.py), `detail` its message."""

    def __init__(self, op: str, vid: str | None, state: str, kind: str, detail: str,
                 reason: str | None = None) -> None:
        what = f"{op} of {vid}" if vid else op
        super().__init__(f"{what} failed at {state} and was rolled back: {detail}")
        self.op, self.id, self.state, self.kind = op, vid, state, kind
        if reason is None:  # a caller that names only the error class (e.g. "OSError")
            cls = getattr(builtins, kind, None)
            oserror = isinstance(cls, type) and issubclass(cls, OSError)
            reason = Reason.OS_ERROR if oserror else Reason.INTERNAL
        self.detail, self.reason = detail, reason


class InstallBusy(InstallError):
    """Another install or rollback is running."""

    reason = Reason.INSTALL_BUSY


class NoRollbackTarget(InstallError):
    """There is no retained version to roll back to."""

    reason = Reason.NO_ROLLBACK_TARGET


class LatencyTooHigh(SelfTestError):
    """The model answers, correctly, but slower than the configured limit."""

    reason = Reason.LATENCY_TOO_HIGH


class IntegrityError(StoreError):
    """A stored version no longer matches its manifest."""

    reason = Reason.INTEGRITY


@dataclass(frozen=True)
class InstallConfig:
    """Settings of the store and installer (env: EDGEFLEET_STORE_KEEP, EDGEFLEET_MAX_LATENCY_MS,
    EDGEFLEET_LATENCY_ROWS, EDGEFLEET_INTEGRITY_INTERVAL_S)."""

    keep: int = 1  # versions kept besides the active one (>= 1: the previous)
    latency_rows: int = 100  # single-row runs for the latency check
    max_latency_s: float | None = 0.1  # median single-row latency limit; None: no limit
    engine_threads: int = 1
    integrity_interval_s: float = 3600.0  # how often the active model's digests are checked

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> InstallConfig:
        """Defaults, then `EDGEFLEET_*` environment, then explicit overrides (CLI flags)."""
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        if "EDGEFLEET_STORE_KEEP" in env:
            values["keep"] = int(env["EDGEFLEET_STORE_KEEP"])
        if "EDGEFLEET_MAX_LATENCY_MS" in env:
            ms = float(env["EDGEFLEET_MAX_LATENCY_MS"])
            values["max_latency_s"] = ms / 1000 if ms > 0 else None
        if "EDGEFLEET_LATENCY_ROWS" in env:
            values["latency_rows"] = int(env["EDGEFLEET_LATENCY_ROWS"])
        if "EDGEFLEET_INTEGRITY_INTERVAL_S" in env:
            values["integrity_interval_s"] = float(env["EDGEFLEET_INTEGRITY_INTERVAL_S"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


OnCommit = Callable[[Engine, Manifest], object]  # e.g. slot.swap(engine, manifest)
# e.g. slot.prepare(engine, manifest): builds what serves the engine, returns the call that
# makes it serve (the commit then runs that instead of on_commit)
OnPrepare = Callable[[Engine, Manifest], Callable[[], object]]
OnFallback = Callable[[str], object]  # e.g. slot.enter_fallback(reason)
OnState = Callable[[str], object]  # progress: the state just persisted


@dataclass
class _Job:
    """One install, rollback or integrity switch; everything but `engine`/`manifest` is
    persisted in install.json."""

    op: str  # install | rollback | integrity
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    state: State = State.IDLE
    bundle: str | None = None
    force: bool = False
    id: str | None = None  # the version that is to go live
    from_id: str | None = None  # active when the job started (None: no model)
    previous_before: str | None = None
    previous_after: str | None = None
    sequence: int | None = None  # raises the highest sequence on commit (install only)
    quarantine: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    failed_at: str | None = None
    reason: str | None = None
    kind: str | None = None
    code: str | None = None  # the wire reason of the failure (agent/wire.py)
    # in memory only
    manifest: Manifest | None = None
    engine: Engine | None = None
    on_commit: OnCommit | None = None
    on_prepare: OnPrepare | None = None
    go_live: Callable[[], object] | None = None  # what on_prepare returned
    retired: object = None  # what the switch returned (the old snapshot), dropped at the end
    on_state: OnState | None = None
    committed: bool = False
    outcome: str = "committed"
    timings: dict[str, float] = field(default_factory=dict)
    golden_max_diff: float | None = None
    latency_s: float | None = None

    _PERSISTED = ("op", "token", "state", "bundle", "force", "id", "from_id", "previous_before",
                  "previous_after", "sequence", "quarantine", "started", "failed_at", "reason",
                  "kind", "code")

    def to_record(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._PERSISTED}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> _Job:
        job = cls(**{k: rec[k] for k in cls._PERSISTED if k in rec})
        job.state = State(job.state)
        return job


@dataclass(frozen=True)
class InstallResult:
    op: str
    outcome: str  # committed | unchanged
    id: str | None
    from_id: str | None
    sequence: int | None
    timings: dict[str, float]  # seconds spent per state
    total_s: float
    golden_max_diff: float | None
    latency_s: float | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class IntegrityReport:
    """The latest check of the active model at rest; the server shows it in health/metrics."""

    ok: bool
    checked_at: float
    active: str | None  # the version checked
    problems: tuple[str, ...] = ()
    action: str = "none"  # none | previous (switched to it) | fallback (rules serve)
    now_active: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["problems"] = list(self.problems)
        return d


@dataclass
class Startup:
    """What `Installer.start` hands the server: the engine to serve with (None: serve the rule
    fallback), its manifest, and what recovery and the integrity check did."""

    engine: Engine | None
    manifest: Manifest | None  # the serving model's, or the damaged one's if its rules are intact
    recovered: dict[str, Any] | None  # the interrupted job recovery finished or undid
    integrity: IntegrityReport
    fallback_reason: str | None = None


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class Installer:
    """Owns a model store: installs, rolls back, recovers and checks integrity, one job at a
    time. Plug into the server with `attach(on_commit=slot.swap, on_fallback=slot.enter_fallback)`
    after `start()`."""

    def __init__(
        self,
        store: Store,
        keyring: Keyring | Path,
        config: InstallConfig = InstallConfig(),
        *,
        on_commit: OnCommit | None = None,
        on_fallback: OnFallback | None = None,
        on_prepare: OnPrepare | None = None,
    ) -> None:
        self.store = store
        self.keyring = LiveKeyring(keyring)  # re-read when the directory changes
        self.config = config
        self.on_commit = on_commit
        self.on_fallback = on_fallback
        self.on_prepare = on_prepare
        self.record_path = store.root / RECORD_NAME
        self.integrity = IntegrityReport(True, 0.0, None)
        self.fallback_reason: str | None = None
        # (op, outcome) -> jobs finished by this process, for edgefleet_installs_total
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()
        store.lock()

    @classmethod
    def open(cls, root: Path, keyring: Keyring | Path, config: InstallConfig = InstallConfig(),
             **callbacks: Any) -> Installer:
        return cls(Store(root, keep=config.keep), keyring, config, **callbacks)

    def attach(self, on_commit: OnCommit | None = None,
               on_fallback: OnFallback | None = None,
               on_prepare: OnPrepare | None = None) -> None:
        """Connect the serving side: `on_commit(engine, manifest)` makes a committed engine
        serve (the old one is released by the caller once its requests finish);
        `on_fallback(reason)` makes the rule fallback serve. `on_prepare(engine, manifest)`,
        if given, is called in the load step and returns the call that makes the engine serve:
        the commit runs that instead of `on_commit`, so the snapshot is built before the
        commit point and the switch itself is cheap (the runtime's `prepare`)."""
        self.on_commit, self.on_fallback = on_commit, on_fallback
        self.on_prepare = on_prepare

    def close(self) -> None:
        self.store.unlock()

    # -- public operations --------------------------------------------------------------------

    def install(self, bundle: Path, *, force: bool = False,
                on_state: OnState | None = None) -> InstallResult:
        """Verify, unpack, load, self-test and commit a bundle. Raises `InstallFailed` (the box
        is as before) with the reason; `force` skips the input-width check only. `on_state`
        is called with each state's name once it is persisted (progress reports)."""
        with self._exclusive():
            s = self.store
            job = _Job("install", bundle=str(Path(bundle).resolve()), force=force,
                       from_id=s.pointer_target("active"),
                       previous_before=s.pointer_target("previous"), on_state=on_state)
            job.previous_after = job.from_id
            return self._run(job, State.VERIFY)

    def rollback(self, to: str | None = None, *,
                 on_state: OnState | None = None) -> InstallResult:
        """Make a retained version active again (default: `previous`), without a download and
        regardless of its sequence; the version it replaces becomes `previous`."""
        with self._exclusive():
            s = self.store
            target = to or s.previous()
            if target is None or not s.has_version(target):
                raise NoRollbackTarget(
                    f"no version {target} in {s.versions_dir}" if target
                    else f"no previous version in {s.root} to roll back to",
                    hint="see: edgefleet agent models",
                )
            active = s.pointer_target("active")
            if target == active:
                raise NoRollbackTarget(f"{target} is already active")
            job = _Job("rollback", id=target, from_id=active, on_state=on_state,
                       previous_before=s.pointer_target("previous"), previous_after=active)
            return self._run(job, State.LOAD)

    def start(self) -> Startup:
        """Call once before serving: finish or undo an interrupted job, then load the active
        version (integrity, session, self-test). If it is unusable, switch to the previous one;
        if that fails too, report the rule fallback."""
        with self._lock:
            recovered = self._recover(wipe_staging=True)
            loaded: list[tuple[Engine, Manifest]] = []
            report = self._check_active(
                load=True, on_commit=lambda e, m: loaded.append((e, m)), notify=False)
        self.integrity = report
        if loaded:
            engine, manifest = loaded[-1]
            return Startup(engine, manifest, recovered, report)
        active = self.store.pointer_target("active")
        manifest = self.store.trusted_manifest(active) if active else None
        return Startup(None, manifest, recovered, report, self.fallback_reason)

    def recover(self) -> dict[str, Any] | None:
        """Finish or undo the job the record on disk describes (see the module docstring);
        returns that record, or None if the store was idle. Wipes staging."""
        with self._lock:
            return self._recover(wipe_staging=True)

    def check_integrity(self) -> IntegrityReport:
        """Check the active version's files against its manifest. If they changed, switch to
        the previous version (checked, loaded and self-tested first) via `on_commit`, or, if
        there is none that works, call `on_fallback`. Skipped while an install runs."""
        if not self._lock.acquire(blocking=False):
            return self.integrity
        try:
            self.integrity = self._check_active(load=False, on_commit=self.on_commit)
        finally:
            self._lock.release()
        return self.integrity

    def status(self) -> dict[str, Any]:
        """For `models`, health and metrics: pointers, versions, the last job, integrity."""
        s, rec = self.store, self._read_record()
        return {
            "active": s.active(),
            "previous": s.previous(),
            "highest_sequence": s.highest_sequence(),
            "versions": [v.to_json() for v in s.list_versions()],
            "state": rec.get("state", State.IDLE.value),
            "last": rec.get("last"),
            "integrity": self.integrity.to_json(),
            "fallback": self.fallback_reason,
        }

    # -- the machine --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the job lock; first finish a job an earlier failure in this process left half
        done (its record is not idle), so every new job starts from a settled store."""
        if not self._lock.acquire(blocking=False):
            raise InstallBusy("another install or rollback is running", hint="try again later")
        try:
            self._recover(wipe_staging=False)
            yield
        finally:
            self._lock.release()

    def _run(self, job: _Job, first: State) -> InstallResult:
        """Drive a new job to idle (lock held); raise `InstallFailed` if it was rolled back."""
        job.on_commit, job.on_prepare = self.on_commit, self.on_prepare
        t0 = time.perf_counter()
        try:
            self._drive(job, first, self._STEPS)
        finally:
            job.engine = job.go_live = job.retired = None
        self.outcomes[job.op, "rolled_back" if job.failed_at else job.outcome or "unknown"] += 1
        if job.failed_at is not None:
            raise InstallFailed(job.op, job.id, job.failed_at, job.kind or "", job.reason or "",
                                job.code or Reason.INTERNAL)
        if job.outcome == "committed":
            self.fallback_reason = None
        return InstallResult(job.op, job.outcome, job.id, job.from_id, job.sequence,
                             job.timings, time.perf_counter() - t0, job.golden_max_diff,
                             job.latency_s)

    def _drive(self, job: _Job, state: State, steps: dict[State, Callable]) -> None:
        """Persist the state, run its step, go where it says; a failing step before the commit
        point goes to rollback. This loop is the whole machine."""
        while state is not State.IDLE:
            job.state = state
            self._persist(job, best_effort=state is State.ROLLBACK)
            _crash_point(state.value)
            if job.on_state is not None:
                with contextlib.suppress(Exception):  # a progress report never stops a job
                    job.on_state(state.value)
            t0 = time.perf_counter()
            try:
                state = steps[state](self, job)
            except Exception as e:
                if state in (State.ROLLBACK, State.CLEANUP) or job.committed:
                    # Past the commit point, or undoing: leave the record; `_recover` (next
                    # job or next start) finishes it.
                    raise InstallError(
                        f"{job.op} of {job.id}: {state} did not finish ({e}); "
                        "it is completed at the next operation or start-up"
                    ) from e
                job.failed_at, job.kind, job.reason = state.value, type(e).__name__, str(e)
                job.code = reason_of(e)
                state = State.ROLLBACK
            job.timings[job.state.value] = time.perf_counter() - t0
        job.state = State.IDLE
        self._persist(job, last=True)
        _crash_point(State.IDLE.value)
        if job.failed_at is not None:
            log.warning("%s of %s failed at %s and was rolled back: %s", job.op, job.id,
                        job.failed_at, job.reason)
        elif job.outcome == "committed":
            log.info("%s: %s is active (was %s)", job.op, job.id, job.from_id or "none")

    def _verify(self, job: _Job) -> State:
        keyring = self._keyring()
        m = verify_bundle(Path(job.bundle or ""), keyring,
                          min_sequence=self.store.highest_sequence(),
                          sequence_holder=self.store.highest_holder())
        job.manifest, job.id, job.sequence = m, version_id(m), m.sequence
        running = self.store.trusted_manifest(job.from_id) if job.from_id else None
        if running is not None and not job.force and running.input.n_features != m.input.n_features:
            raise Incompatible(
                f"{job.bundle}: input width {m.input.n_features}, the running model "
                f"{job.from_id} takes {running.input.n_features}",
                hint="every client must change too; pass --force if they have",
            )
        if job.id == job.from_id and not self.store.check_integrity(job.id):
            job.outcome = "unchanged"
            return State.IDLE
        return State.UNPACK

    def _unpack(self, job: _Job) -> State:
        assert job.id is not None and job.manifest is not None
        if self.store.has_version(job.id) and not self.store.check_integrity(job.id):
            return State.LOAD  # installed before and intact (e.g. the previous version)
        staging = self.store.new_staging(job.id)
        digest = unpack_bundle(Path(job.bundle or ""), job.manifest, staging)
        _crash_point("unpack.staged")
        self.store.promote(job.id)
        # the bundle digest of the bytes just written: the serving snapshot names the model
        # by it without reading the files again (agent.digest)
        remember_digest(self.store.version_dir(job.id), digest)
        return State.LOAD

    def _load(self, job: _Job) -> State:
        assert job.id is not None
        if job.op != "install":
            # A retained version (rollback, or the previous one after an integrity failure):
            # unchanged at rest, and signed by a release key the keyring trusts *now*.
            problems = self.store.check_integrity(job.id)
            if problems:
                raise IntegrityError(f"{job.id}: " + "; ".join(problems))
            job.manifest = verify_unpacked(self.store.version_dir(job.id), self._keyring(),
                                           files=False)
        assert job.manifest is not None
        job.engine = Engine(self.store.model_path(job.id), job.manifest,
                            threads=self.config.engine_threads)
        if job.on_prepare is not None:
            # what serves the engine is built now, while the old model still serves, so the
            # commit only switches to it (issue 15); a failure here rolls back like any other
            job.go_live = job.on_prepare(job.engine, job.manifest)
        return State.SELF_TEST

    def _self_test(self, job: _Job) -> State:
        assert job.engine is not None
        job.golden_max_diff = job.engine.self_test()
        job.latency_s = job.engine.latency_check(self.config.latency_rows)
        limit = self.config.max_latency_s
        if limit is not None and job.latency_s > limit:
            raise LatencyTooHigh(
                f"{job.id}: median single-row latency {job.latency_s * 1000:.2f} ms, "
                f"limit {limit * 1000:.2f} ms"
            )
        return State.COMMIT

    def _commit(self, job: _Job) -> State:
        assert job.id is not None and job.manifest is not None
        self.store.set_active(job.id)  # the commit point, durable before anything serves it
        _crash_point("commit.pointer")
        engine, job.engine = job.engine, None
        go_live, job.go_live = job.go_live, None
        # new requests go to the new engine from here. What the switch returns (the runtime's
        # previous snapshot) is kept until the job ends, so that releasing the old engine and
        # ONNX Runtime session (~0.2 ms with the GIL held) happens after the cleanup, not at
        # the switch, and on this thread rather than on a serving thread that finished the
        # last request on it
        if go_live is not None:
            job.retired = go_live()
        elif job.on_commit is not None and engine is not None:
            job.retired = job.on_commit(engine, job.manifest)  # the same, built now
        del engine, go_live
        job.committed = True
        _crash_point("commit.swapped")
        self._finish_commit(job)
        return State.CLEANUP

    def _finish_commit(self, job: _Job) -> None:
        """After the pointer moved: `previous`, highest sequence, history. Idempotent."""
        s = self.store
        after = job.previous_after if job.previous_after != job.id else job.previous_before
        if after == job.id or (after is not None and not s.has_version(after)):
            after = None
        if s.pointer_target("previous") != after:
            s.set_previous(after)
        if not any(ev.get("token") == job.token for ev in s.history()):
            s.record_event({"event": job.op, "token": job.token, "id": job.id,
                            "from": job.from_id, "reason": job.reason},
                           sequence=job.sequence if job.op == "install" else None)

    def _cleanup(self, job: _Job) -> State:
        s = self.store
        for vid in job.quarantine:
            if s.has_version(vid) and vid not in (s.active(), s.previous()):
                s.quarantine(vid)
        if job.id:
            s.discard_staging(job.id)
        self._drop_staged_bundle(job)
        s.gc()
        return State.IDLE

    def _rollback(self, job: _Job) -> State:
        """Put both pointers back where they were, drop what this job added, record why."""
        job.engine = job.go_live = None
        s = self.store
        for name, before in (("active", job.from_id), ("previous", job.previous_before)):
            if s.pointer_target(name) != before:
                target = before if before is not None and s.has_version(before) else None
                (s.set_active if name == "active" else s.set_previous)(target)
        if job.id:
            s.discard_staging(job.id)
        self._drop_staged_bundle(job)
        s.gc()
        if not any(ev.get("token") == job.token for ev in s.history()):
            s.record_event({"event": f"{job.op}_failed", "token": job.token, "id": job.id,
                            "from": job.from_id, "state": job.failed_at or "interrupted",
                            "reason": job.reason or "interrupted (crash or power loss)"})
        job.outcome = "rolled_back"
        return State.IDLE

    def _drop_staged_bundle(self, job: _Job) -> None:
        """A bundle downloaded into staging is removed once its job is over."""
        if job.bundle and Path(job.bundle).parent == self.store.staging_dir.resolve():
            self.store.discard_staging(Path(job.bundle).name)

    _STEPS: ClassVar[dict[State, Callable[[Installer, _Job], State]]] = {
        State.VERIFY: _verify,
        State.UNPACK: _unpack,
        State.LOAD: _load,
        State.SELF_TEST: _self_test,
        State.COMMIT: _commit,
        State.CLEANUP: _cleanup,
        State.ROLLBACK: _rollback,
    }

    # -- recovery -----------------------------------------------------------------------------

    def _resume_commit(self, job: _Job) -> State:
        if job.id is not None and self.store.pointer_target("active") == job.id \
                and self.store.has_version(job.id):
            self._finish_commit(job)  # the pointer moved: the install happened; finish it
            return State.CLEANUP
        return State.ROLLBACK

    _RESUME: ClassVar[dict[State, Callable[[Installer, _Job], State]]] = {
        **{s: (lambda self, job: State.ROLLBACK) for s in _BEFORE_COMMIT},
        State.COMMIT: _resume_commit,
        State.CLEANUP: _cleanup,
        State.ROLLBACK: _rollback,
    }

    def _recover(self, *, wipe_staging: bool) -> dict[str, Any] | None:
        """The start-up loop: resume the recorded job from its state through `_RESUME`."""
        rec = self._read_record()
        interrupted = None
        if rec.get("state", State.IDLE) != State.IDLE:
            job = _Job.from_record(rec["job"])
            interrupted = job.to_record()
            log.warning("recovering an interrupted %s of %s (state %s)", job.op, job.id,
                        job.state)
            job.reason = job.reason or f"interrupted at {job.state} (crash or power loss)"
            self._drive(job, job.state, self._RESUME)
        if wipe_staging:
            self.store.gc(wipe_staging=True)
        return interrupted

    # -- integrity ----------------------------------------------------------------------------

    def _check_active(self, *, load: bool, on_commit: OnCommit | None,
                      notify: bool = True) -> IntegrityReport:
        """Check (and with `load`, load and self-test) the active version; if it is unusable,
        run an `integrity` job to the previous version, else fall back to the rules."""
        s = self.store
        active = s.pointer_target("active")
        now = time.time()
        if active is None:
            return IntegrityReport(True, now, None)
        problems = s.check_integrity(active)
        if not problems and load:
            try:
                # At start-up the signature is checked again too: a manifest edited on disk
                # (a threshold, say) or one signed by a key revoked since must not serve.
                verify_unpacked(s.version_dir(active), self._keyring(), files=False)
                manifest = s.manifest(active)
                engine = Engine(s.model_path(active), manifest,
                                threads=self.config.engine_threads)
                engine.self_test()
                if on_commit is not None:
                    on_commit(engine, manifest)
            except EdgefleetError as e:
                problems = [f"{active}: {e}"]
        if not problems:
            return IntegrityReport(True, now, active, now_active=active)
        previous = s.previous()
        if previous is not None and previous != active:
            job = _Job("integrity", id=previous, from_id=active, previous_before=previous,
                       previous_after=None, quarantine=[active], reason="; ".join(problems))
            job.on_commit = on_commit
            # the serving side's prepared switch only when the switch goes to the serving side
            job.on_prepare = self.on_prepare if on_commit is self.on_commit else None
            self._drive(job, State.LOAD, self._STEPS)
            if job.failed_at is None:
                self.fallback_reason = None
                return IntegrityReport(False, now, active, tuple(problems), "previous", previous)
            problems.append(f"previous version {previous}: {job.reason}")
        reason = f"active model {active} unusable: " + "; ".join(problems)
        if self.fallback_reason is None and self.on_fallback is not None and notify:
            self.on_fallback(reason)
        self.fallback_reason = reason
        return IntegrityReport(False, now, active, tuple(problems), "fallback", None)

    def _keyring(self) -> Keyring:
        """The keyring as it is on disk now, for every verification: a key trusted or revoked
        since start applies at once (a keyring given as a loaded `Keyring` is followed to its
        directory)."""
        return self.keyring.current()

    # -- the record ---------------------------------------------------------------------------

    def _read_record(self) -> dict[str, Any]:
        try:
            return json.loads(self.record_path.read_bytes())
        except FileNotFoundError:
            return {"state": State.IDLE.value}
        except ValueError as e:
            raise InstallError(f"{self.record_path}: not valid JSON: {e}") from None

    def _persist(self, job: _Job, *, best_effort: bool = False, last: bool = False) -> None:
        rec: dict[str, Any] = {"state": job.state.value, "job": job.to_record()}
        prior = self._read_record().get("last")
        if last:
            prior = {"op": job.op, "id": job.id, "outcome": job.outcome, "state": job.failed_at,
                     "kind": job.kind, "reason": job.reason, "time": time.time()}
        rec["last"] = prior
        try:
            # orjson: json.dumps with an indent runs the pure-Python encoder, whose closures
            # form reference cycles (~130 objects per write, 6 writes an install) that only a
            # garbage collection frees, holding the GIL while it looks (issue 15)
            atomic_write(self.record_path, orjson.dumps(rec, option=orjson.OPT_INDENT_2))
        except OSError:
            if not best_effort:
                raise
            # Disk full: every state before commit already recovers by rolling back, so the
            # rollback runs now and is recorded once it has freed the space.


class IntegrityMonitor:
    """Runs `installer.check_integrity()` every `interval_s` seconds in a daemon thread."""

    def __init__(self, installer: Installer, interval_s: float | None = None) -> None:
        self.installer = installer
        self.interval_s = interval_s or installer.config.integrity_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="integrity", daemon=True)

    def start(self) -> IntegrityMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(EdgefleetError, OSError):  # the next round reports it
                self.installer.check_integrity()
