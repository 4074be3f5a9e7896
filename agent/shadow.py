"""Shadow scoring: a candidate model scores the same live dies *after* the answer has gone out,
off the hot path, and never changes a decision. Its counters tell the fleet controller how the
candidate would have decided on real traffic (docs/rollouts.md, "Shadow stage").

    shadow = ShadowScorer()                         # one per agent, idle until attached
    shadow.attach(engine, manifest, digest=sha256)  # a verified, self-tested candidate
    # request path (agent/dispatch.py), rows the live model answered: a copy into a ring
    shadow.offer_one(v, live_score, live_manifest)   # or offer(x, live_scores, ...) for batches
    shadow.summary()    # -> the health summary's "shadow" block, see below
    shadow.detach()     # at promotion (the candidate goes live) or shadow-stop

The request path only copies the rows and the live scores into a bounded ring buffer, under a
rate cap; a daemon thread scores them in batches every `interval_s` (0.5 s) with the
candidate's own ONNX Runtime session at idle CPU priority, so the live answer waits for
nothing. Rows that do not fit are dropped, rows over the cap skipped (both counted), never
queued without bound. The simulator calls `score(...)` inline instead (`threaded=False`).
`ShadowHost` (below) runs the link's `shadow` and `shadow-stop` commands.

Counters, cumulative since `attach` (`summary()`):

    dies          rows scored by both models
    agree         rows both models decided alike (pass/pass or fail/fail)
    live_fail     rows the live model failed;  shadow_fail: rows the candidate failed
    errors        rows the candidate could not score (raised, or a non-finite score)
    dropped       rows not scored because the queue was full, or the live model changed
                  while they waited
    skipped       rows not offered to the candidate because of the rate cap (a sample is
                  enough evidence; the cap bounds the CPU shadowing takes from serving)
    live_hist, shadow_hist   per model, counts of the score's *margin* from its own threshold,
                  (score - threshold) / confidence_scale, in MARGIN_EDGES buckets: two models
                  with different score scales are compared where it matters, at the boundary
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.bundle import Incompatible, unpack_bundle, verify_bundle
from agent.engine import Engine
from agent.errors import EdgefleetError
from agent.handlers import sequence_refusal
from agent.manifest import Manifest, format_time, utc_now
from agent.store import version_id
from agent.wire import MARGIN_EDGES, Step, reason_of

if TYPE_CHECKING:
    from agent.link import CommandContext

log = logging.getLogger("edgefleet.agent")

_monotonic = time.monotonic
_EDGES = np.array(MARGIN_EDGES)

__all__ = ["MARGIN_EDGES", "ShadowCounters", "ShadowHost", "ShadowScorer"]


class ShadowCounters:
    """Agreement counters and margin histograms; `add` takes whole batches (numpy)."""

    def __init__(self) -> None:
        self.dies = self.agree = self.live_fail = self.shadow_fail = 0
        self.errors = self.dropped = self.skipped = 0
        self.live_hist = np.zeros(len(MARGIN_EDGES) + 1, dtype=np.int64)
        self.shadow_hist = np.zeros(len(MARGIN_EDGES) + 1, dtype=np.int64)

    def add(self, live: np.ndarray, shadow: np.ndarray, live_m: Manifest,
            shadow_m: Manifest) -> None:
        """`live`, `shadow`: (rows,) scores of the same dies by each model."""
        live = np.asarray(live, dtype=np.float64).reshape(-1)
        shadow = np.asarray(shadow, dtype=np.float64).reshape(-1)
        ok = np.isfinite(shadow) & np.isfinite(live)
        self.errors += int((~ok).sum())
        live, shadow = live[ok], shadow[ok]
        if not live.size:
            return
        lf = live > live_m.threshold  # (rows,) the live decision: fail?
        sf = shadow > shadow_m.threshold
        self.dies += int(live.size)
        self.agree += int((lf == sf).sum())
        self.live_fail += int(lf.sum())
        self.shadow_fail += int(sf.sum())
        lm = (live - live_m.threshold) / live_m.confidence_scale
        sm = (shadow - shadow_m.threshold) / shadow_m.confidence_scale
        self.live_hist += np.bincount(np.searchsorted(_EDGES, lm, side="left"),
                                      minlength=len(self.live_hist))
        self.shadow_hist += np.bincount(np.searchsorted(_EDGES, sm, side="left"),
                                        minlength=len(self.shadow_hist))

    def to_json(self) -> dict[str, Any]:
        return {"dies": self.dies, "agree": self.agree, "live_fail": self.live_fail,
                "shadow_fail": self.shadow_fail, "errors": self.errors,
                "dropped": self.dropped, "skipped": self.skipped,
                "live_hist": self.live_hist.tolist(),
                "shadow_hist": self.shadow_hist.tolist()}


class _Candidate:
    def __init__(self, engine: Any, manifest: Manifest, digest: str, model_id: str | None,
                 extra: dict[str, Any]) -> None:
        self.engine, self.manifest, self.digest, self.model_id = engine, manifest, digest, model_id
        self.extra = extra
        self.since = format_time(utc_now())
        self.counters = ShadowCounters()


class ShadowScorer:
    """At most one candidate at a time (see the module docstring).

    The request path writes into a ring buffer (`capacity_rows` rows of the live model's
    width, allocated at `attach`): one lock, one row copy, two integers. The scorer thread
    reads contiguous runs of it in place (no concatenation), so the only work it does holding
    the GIL is a few numpy calls per batch; ONNX Runtime releases the GIL while it runs, on
    one intra-op thread. The thread runs under SCHED_IDLE (Linux; else nice +10): a serving
    thread that wakes up preempts it at once, so on a busy box scoring only uses idle CPU.
    Batches are large and rare (every `interval_s`) because the GIL-holding part of a batch
    costs about the same for 10 rows as for 500. `max_rows_per_s` caps the rows scored per
    second, in 0.1 s slices (the rest are counted as `skipped`): shadow evidence is a sample,
    the live answer is not."""

    def __init__(self, *, threaded: bool = True, capacity_rows: int = 8192,
                 batch_rows: int = 1024, interval_s: float = 0.5,
                 max_rows_per_s: float | None = 500.0, nice: int = 10) -> None:
        self.threaded = threaded
        self.capacity = capacity_rows
        self.batch_rows = batch_rows
        self.interval_s = interval_s
        self.max_rows_per_s = max_rows_per_s
        self.nice = nice
        self._cand: _Candidate | None = None
        self._lock = threading.Lock()
        self._x: np.ndarray | None = None  # (capacity, n_features) float32
        self._s = np.empty(0, dtype=np.float32)  # (capacity,) live scores
        self._w = self._r = 0  # rows written / consumed, ever (positions mod capacity)
        self._gen = 0  # bumped when the buffer is emptied under the reader's feet
        self._live_m: Manifest | None = None
        self._rate_t, self._rate_n = 0.0, 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.scoring_s = 0.0  # time the scorer thread spent scoring (for the benchmark)

    # -- control (link worker) ------------------------------------------------------------------

    def attach(self, engine: Any, manifest: Manifest, *, digest: str,
               model_id: str | None = None, **extra: Any) -> None:
        """Start shadowing with a loaded, self-tested engine (replaces any other candidate)."""
        with self._lock:
            self._cand = _Candidate(engine, manifest, digest, model_id, extra)
            self._x = np.empty((self.capacity, manifest.input.n_features), dtype=np.float32)
            self._s = np.empty(self.capacity, dtype=np.float32)
            self._w = self._r = 0
            self._gen += 1
            self._live_m = None
        if self.threaded and (self._thread is None or not self._thread.is_alive()):
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="shadow-scorer", daemon=True)
            self._thread.start()
        log.info("shadow scoring with %s %s (sha256 %s...)", manifest.name, manifest.version,
                 digest[:12])

    def detach(self) -> dict[str, Any] | None:
        """Stop shadowing; returns the final counters (None if nothing was attached)."""
        with self._lock:
            cand, self._cand = self._cand, None
            self._x = None
            self._w = self._r = 0
            self._gen += 1
        if cand is None:
            return None
        log.warning("shadow scoring of %s %s stopped: %s", cand.manifest.name,
                    cand.manifest.version, cand.counters.to_json())
        return cand.counters.to_json()

    def close(self) -> None:
        self.detach()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(2)

    @property
    def active(self) -> bool:
        return self._cand is not None

    @property
    def digest(self) -> str | None:
        cand = self._cand
        return cand.digest if cand else None

    def info(self) -> dict[str, Any] | None:
        """The state's `model.shadow` entry, or None."""
        cand = self._cand
        if cand is None:
            return None
        m = cand.manifest
        return {"id": cand.model_id, "name": m.name, "version": m.version,
                "sequence": m.sequence, "digest": cand.digest, "model_sha256": m.model_digest,
                "since": cand.since, **cand.extra}

    def summary(self) -> dict[str, Any] | None:
        """The health summary's `shadow` block, or None."""
        cand = self._cand
        if cand is None:
            return None
        with self._lock:
            doc = cand.counters.to_json()
            pending = self._w - self._r
        doc.update(digest=cand.digest, model_id=cand.model_id, since=cand.since,
                   pending=pending)
        return doc

    # -- the request path -------------------------------------------------------------------

    def offer(self, x: np.ndarray, live_scores: np.ndarray, live_manifest: Manifest | None,
              *, _rated: bool = False) -> None:
        """Queue rows (rows, n) the live model just answered, with its scores. Copies them:
        the caller's buffers are reused by the next request. Never blocks on scoring."""
        cand = self._cand
        if cand is None or live_manifest is None:
            return
        n = len(live_scores)
        with self._lock:
            x_buf = self._x
            if self._cand is not cand or x_buf is None or n == 0:
                return
            if live_manifest is not self._live_m:  # the live model changed: start over
                cand.counters.dropped += self._w - self._r
                self._r = self._w
                self._gen += 1
                self._live_m = live_manifest
            if self.max_rows_per_s is not None and not _rated:
                # Take what this 0.1 s slice still allows: a batch bigger than a whole slice
                # (256 rows against 50 at 500 rows/s) must still contribute, not be skipped.
                allowed = self._take(n)
                if allowed < n:
                    cand.counters.skipped += n - allowed
                    x, live_scores, n = x[:allowed], live_scores[:allowed], allowed
                if n == 0:
                    return
            if self._w - self._r + n > self.capacity:
                cand.counters.dropped += n
                return
            i = self._w % self.capacity
            first = min(n, self.capacity - i)
            x_buf[i:i + first] = x[:first]
            self._s[i:i + first] = live_scores[:first]
            if first < n:
                x_buf[:n - first] = x[first:]
                self._s[:n - first] = live_scores[first:]
            self._w += n
            if not self.threaded or self._w - self._r < self.batch_rows:
                return
        self._wake.set()

    def offer_one(self, v: np.ndarray, live_score: float, live_manifest: Manifest | None
                  ) -> None:
        """`offer` for one row (n,) and its score: the single-die request path."""
        cand = self._cand
        if cand is None or live_manifest is None:
            return
        with self._lock:
            x_buf = self._x
            if self._cand is not cand or x_buf is None:
                return
            if self.max_rows_per_s is not None and not self._take(1):
                cand.counters.skipped += 1
                return
            if live_manifest is not self._live_m or self._w - self._r >= self.capacity:
                slow = True
            else:
                i = self._w % self.capacity
                x_buf[i] = v
                self._s[i] = live_score
                self._w += 1
                if not self.threaded or self._w - self._r < self.batch_rows:
                    return
                slow = False
        if slow:
            self.offer(np.asarray(v).reshape(1, -1), np.array([live_score], np.float32),
                       live_manifest, _rated=True)
        else:
            self._wake.set()

    def _take(self, n: int) -> int:
        """Rate cap, in 0.1 s slices (lock held): how many of `n` rows this slice still takes."""
        now = _monotonic()
        if now - self._rate_t >= 0.1:
            self._rate_t, self._rate_n = now, 0
        taken = max(0, min(n, int(self.max_rows_per_s * 0.1) - self._rate_n))  # type: ignore[operator]
        self._rate_n += taken
        return taken

    # -- scoring ----------------------------------------------------------------------------

    def score(self, x: np.ndarray, live_scores: np.ndarray, live_manifest: Manifest) -> None:
        """Score rows with the candidate now, in the caller's thread (the simulator)."""
        cand = self._cand
        if cand is None:
            return
        self._score(cand, np.ascontiguousarray(x, dtype=np.float32), live_scores,
                    live_manifest)

    def _score(self, cand: _Candidate, x: np.ndarray, live: np.ndarray,
               live_m: Manifest) -> None:
        try:
            shadow = cand.engine.predict(x).score
        except Exception as e:  # a candidate that raises is counted, never propagated
            with self._lock:
                cand.counters.errors += len(live)
            log.debug("shadow model raised: %s", e)
            return
        with self._lock:
            if self._cand is cand:
                cand.counters.add(live, shadow, live_m, cand.manifest)

    def drain(self) -> int:
        """Score what is queued (the scorer thread's work; callable directly in tests)."""
        done = 0
        while True:
            with self._lock:
                cand, x_buf, gen, live_m = self._cand, self._x, self._gen, self._live_m
                r, w = self._r, self._w
                if cand is None or x_buf is None or w == r or live_m is None:
                    return done
                i = r % self.capacity
                n = min(w - r, self.batch_rows, self.capacity - i)
                x, live = x_buf[i:i + n], self._s[i:i + n].copy()
            # writers never touch [r, w) until _r moves past it: scoring the view is safe
            self._score(cand, x, live, live_m)
            with self._lock:
                if self._gen == gen and self._r == r:
                    self._r = r + n
            done += n

    def _run(self) -> None:
        _lower_priority(self.nice)
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._cand is None:
                continue
            t0 = time.perf_counter()
            if self.drain():
                self.scoring_s += time.perf_counter() - t0


def _lower_priority(nice: int) -> None:
    """The calling thread yields the CPU to everything else: SCHED_IDLE, or failing that
    `nice` (Linux applies both per thread)."""
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, tid, nice)


# -- the device link's side: shadow and shadow-stop commands ----------------------------------


class ShadowHost:
    """Runs the `shadow` and `shadow-stop` commands (agent/handlers.py hands it the public
    `agent.link.CommandContext`) and keeps the candidate's files in `directory` (the link's
    data directory):

        <dir>/<sha256>.efb      the verified bundle, kept so that promoting it (an `install`
                                command naming the same SHA-256) needs no second download
        <dir>/model/            the unpacked candidate the scorer's session was loaded from

    A `shadow` command: download (size-capped, hashed), `verify_bundle` against the device
    keyring (signature, digests, expiry, sequence >= highest installed), same input width as
    the live model, unpack, load, self-test on the golden vectors, attach to the scorer. Steps:
    received, downloading, verified, installing, self-test, **shadowing**. `shadow-stop`:
    received, **shadow-stopped**. Promotion is a normal `install` (the install state machine,
    atomic at its commit); once it is live the shadow is dropped.

    The shadow does not survive an agent restart (the candidate is re-sent by the controller
    if it still wants it); the kept bundle is removed at start."""

    def __init__(self, scorer: ShadowScorer, directory: Path, *, engine_threads: int = 1
                 ) -> None:
        self.scorer = scorer
        self.dir = Path(directory)
        self.engine_threads = engine_threads
        self.dir.mkdir(parents=True, exist_ok=True)
        for p in self.dir.glob("*.efb*"):  # a previous run's candidate: not attached any more
            p.unlink(missing_ok=True)
        shutil.rmtree(self.dir / "model", ignore_errors=True)

    def cached(self, sha256: str) -> Path | None:
        """The kept bundle with this SHA-256, if the device shadows it."""
        p = self.dir / f"{sha256}.efb"
        return p if p.is_file() and self.scorer.digest == sha256 else None

    def promoted(self, active_digest: str | None) -> None:
        """After an install went live: the shadow of that same bundle is not a shadow now."""
        if active_digest is not None and self.scorer.digest == active_digest:
            self._drop()

    def model_info(self) -> dict[str, Any] | None:
        return self.scorer.info()

    def summary(self) -> dict[str, Any] | None:
        return self.scorer.summary()

    def _drop(self) -> dict[str, Any] | None:
        counters = self.scorer.detach()
        for p in self.dir.glob("*.efb*"):
            p.unlink(missing_ok=True)
        shutil.rmtree(self.dir / "model", ignore_errors=True)
        return counters

    def stop(self, ctx: CommandContext) -> None:
        """`shadow-stop` (a shadow still downloading was cancelled by the link already)."""
        ctx.done(Step.SHADOW_STOPPED, counters=self._drop())

    def run(self, ctx: CommandContext) -> None:
        """`shadow`: checks before downloading, then the download (transfer lane), then
        `_attach` (control lane)."""
        spec = ctx.command.install
        refused = sequence_refusal(ctx, spec)
        if refused is not None:
            ctx.fail(*refused)
            return
        active = ctx.model("active")
        if (active or {}).get("digest") == spec.sha256 or self.scorer.digest == spec.sha256:
            ctx.done(Step.SHADOWING, record={"unchanged": True},
                     model=self.scorer.info() or active, unchanged=True)
            return
        self._drop()
        ctx.fetch(spec, self.dir / f"{spec.sha256}.efb.part",
                  then=lambda path, seconds: self._attach(ctx, path))

    def _attach(self, ctx: CommandContext, part: Path) -> None:
        spec = ctx.command.install
        store = ctx.installer.store
        state = "verify"
        try:
            manifest = verify_bundle(part, ctx.keyring(), min_sequence=store.highest_sequence(),
                                     sequence_holder=store.highest_holder())
            active = ctx.model("active")
            running = store.trusted_manifest(active["id"]) if active and active.get("id") \
                else None
            if running is not None and running.input.n_features != manifest.input.n_features:
                raise Incompatible(f"input width {manifest.input.n_features}, the live model "
                                   f"takes {running.input.n_features}: it cannot score the "
                                   "same dies")
            ctx.step(Step.VERIFIED)
            state = "unpack"
            model_dir = self.dir / "model"
            shutil.rmtree(model_dir, ignore_errors=True)
            model_dir.mkdir()
            unpack_bundle(part, manifest, model_dir)
            ctx.step(Step.INSTALLING)
            state = "load"
            engine = Engine(model_dir / "model.onnx", manifest, threads=self.engine_threads)
            ctx.step(Step.SELF_TEST)
            state = "self_test"
            engine.self_test()
        except (EdgefleetError, OSError) as e:
            self._drop()
            part.unlink(missing_ok=True)
            ctx.fail(reason_of(e), str(e), state=state)
            return
        part.replace(self.dir / f"{spec.sha256}.efb")
        self.scorer.attach(engine, manifest, digest=spec.sha256, model_id=version_id(manifest),
                           rollout_id=ctx.command.rollout_id)
        ctx.done(Step.SHADOWING, model=self.scorer.info())
