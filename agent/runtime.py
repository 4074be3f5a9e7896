"""What the agent is serving right now, and the seam where the model store plugs in.

`Runtime` holds one reference, the active `Predictor` snapshot. A request reads it once
(`active()`) and finishes on that snapshot, so `swap()` is a single reference assignment: new
requests see the new model at once, requests in flight finish on the old one, and nothing waits.
Writers (swap, unload, enter/leave fallback) are serialized by a lock; readers never take it.

The model store (agent/store.py) drives it:

    engine = Engine(model_dir / "model.onnx", manifest)   # after verify, unpack, self-test
    runtime.swap(engine, manifest)                        # the new model answers from now on
    go_live = runtime.prepare(engine, manifest)           # or: build the snapshot ahead ...
    go_live()                                             # ... and only flip the reference
    runtime.enter_fallback("install failed self-test")    # rules only, model kept loaded
    runtime.unload("model removed")                       # rules only, model dropped

and can watch every change with `add_listener(fn)`, called with the new snapshot.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

from agent.calibration import CalibrationHub
from agent.engine import Engine
from agent.fallback import RuleSet
from agent.manifest import Manifest
from agent.predictor import Limits, Predictor

log = logging.getLogger("edgefleet.agent")

Listener = Callable[[Predictor], None]


class Runtime:
    """The active predictor, swappable at run time. Starts with no model (rules only, or
    unable to answer when there are no rules either)."""

    def __init__(self, limits: Limits | None = None, rules: RuleSet | None = None,
                 model: tuple[Engine, Manifest] | None = None,
                 calibration: CalibrationHub | None = None) -> None:
        self.limits = limits or Limits()
        # per-tester calibration, one per model (agent.calibration); None: fixed thresholds
        self.calibration = calibration
        self.rules = rules  # standalone rules file; a bundle's own rules take precedence
        self.started = time.monotonic()
        self.swaps = 0
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._active = self._build(None, None, None)
        if model is not None:
            self.swap(*model)

    def log_state(self) -> None:
        """Say once, at start-up, what answers requests (after the store loaded its model)."""
        p = self._active
        if p.engine is not None:
            return  # `swap` said which model serves
        if p.rules is None:
            log.warning("no model and no fallback rules: requests are refused until a model "
                        "is installed")
        elif p.manifest is None:
            log.warning("no model installed: screening with %d fallback rules (%s) until one "
                        "is", p.rules.count, p.rules.version)

    def active(self) -> Predictor:
        """The snapshot to answer one request with. Read it once per request."""
        return self._active

    def add_listener(self, fn: Listener) -> None:
        """Call `fn(predictor)` after every change of the active snapshot."""
        self._listeners.append(fn)

    def swap(self, engine: Engine, manifest: Manifest | None = None) -> Predictor:
        """Serve `engine` from the next request on; return the previous snapshot. The engine
        must be verified and self-tested already (the store's job). `prepare(...)()` in one."""
        return self.prepare(engine, manifest)()

    def prepare(self, engine: Engine, manifest: Manifest | None = None
                ) -> Callable[[], Predictor]:
        """Build the snapshot that serves `engine` without making it visible; calling the
        result makes it serve (and returns the previous snapshot), as `swap` would.

        The build is most of a swap's work: warming the engine up (so the first request does
        not pay for lazy allocations), the bundle digest (agent.digest's cache, else the
        version's files re-read), the drift monitor and the rules. The store runs it while it
        loads the model, before the commit point (agent/install.py `on_prepare`), so that the
        commit itself only moves a reference: ~2 ms of the installing thread's CPU, all of it
        competing for the GIL with the serving thread, used to sit right at the switch (issue
        15). A prepared snapshot that is never called is simply dropped."""
        manifest = manifest or engine.manifest
        try:
            engine.warm_up()
        except Exception as e:  # a model that cannot run one row still goes live; rules cover it
            log.warning("warm-up of %s %s failed: %s", manifest.name, manifest.version, e)
        return functools.partial(self._go_live, self._build(engine, manifest, None))

    def _go_live(self, new: Predictor) -> Predictor:
        old = self._set(new)
        self.swaps += 1
        m = new.manifest
        assert m is not None
        log.info("serving model %s %s (sequence %d, sha256 %s...)", m.name, m.version,
                 m.sequence, m.model_digest[:12])
        return old

    def unload(self, reason: str) -> Predictor:
        """Drop the model; answer with the rules (the standalone file's) from now on."""
        old = self._set(self._build(None, None, None))
        log.warning("entering fallback: model unloaded: %s", reason)
        return old

    def rules_of(self, manifest: Manifest, reason: str) -> Predictor:
        """Answer with `manifest`'s fallback rules and no engine: a box whose model is damaged
        on disk, with no previous version to go back to, keeps screening with that model's
        rules (the manifest itself is intact) instead of refusing every die."""
        old = self._set(self._build(None, manifest, reason))
        log.warning("entering fallback: %s; screening with the rules of %s %s", reason,
                    manifest.name, manifest.version)
        return old

    def enter_fallback(self, reason: str) -> Predictor:
        """Answer with the rules while keeping the model loaded (`leave_fallback` resumes)."""
        cur = self._active
        new = self._build(cur.engine, cur.manifest, reason, drift=cur.drift)
        old = self._set(new)
        log.warning("entering fallback: %s", reason)
        return old

    def leave_fallback(self) -> Predictor:
        """Undo `enter_fallback`: the loaded model answers again (no-op without a model)."""
        cur = self._active
        new = self._build(cur.engine, cur.manifest, None, drift=cur.drift)
        old = self._set(new)
        if cur.forced_reason and cur.engine is not None:
            log.info("leaving fallback: model %s answers again", cur.version)
        return old

    def uptime(self) -> float:
        return time.monotonic() - self.started

    # --

    def _build(self, engine: Engine | None, manifest: Manifest | None, forced: str | None,
               drift=None) -> Predictor:
        cal = self.calibration.for_manifest(manifest) if self.calibration is not None else None
        return Predictor(engine, manifest, self.rules, self.limits, forced_reason=forced,
                         on_health_change=self._notify_current, drift=drift, calibration=cal)

    def _set(self, new: Predictor) -> Predictor:
        with self._lock:
            old, self._active = self._active, new
        self._notify(new)
        return old

    def _notify_current(self) -> None:
        self._notify(self._active)

    def _notify(self, p: Predictor) -> None:
        for fn in self._listeners:
            try:
                fn(p)
            except Exception:
                log.exception("runtime listener failed")
