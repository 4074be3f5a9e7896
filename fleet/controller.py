"""The controller: the one long-lived process that drives every rollout (`edgefleet fleet
controller`), or, in one-shot mode (`rollout start --once`), the same loop limited to one
rollout in the operator's terminal.

    ctl_loop = Controller(db, fleet_controller, ControllerOptions())
    ctl_loop.run(stop_event)      # until stop_event is set (SIGTERM)

What it does, every round (`step`):
1. lease (service mode): renews the `controller` lease in the state store every
   `heartbeat_s`; a second controller finds it held and refuses to start; a controller whose
   lease was taken (it stalled past `stale_s`) stops driving. With `shared` (several
   controllers on one PostgreSQL store), each holds its own `controller/<owner>` lease and
   rollouts are shared out by their own leases alone: each has exactly one driver, and the
   rollouts of a controller that died are taken by another once their leases expire.
2. requests: operator actions queued in the store (`rollout pause|resume|...`), in order,
   each applied through fleet/actions.py (the transition table) by the process that holds the
   rollout; its driver flushes first and reloads after.
3. pick-up: every rollout that needs driving (pending, running, rolling-back) and has no live
   driver gets one (the per-rollout lease: `owner`, `heartbeat`); a pending one waits while
   another non-final rollout holds any of its devices (one rollout per device). So after a
   restart, or a kill -9, what was running is resumed. Shared, a controller leaves a rollout
   to a live peer that drives fewer (as the peers' leases say), so the rollouts spread.
   Declared rollouts (`on_apply`, Git) are followed by one controller only: shared, the
   longest-running live one.
4. drive: `tick` every driver (fleet/driver.py); one that no longer needs driving releases
   its rollout; one whose write was refused (`LeaseLost`: another process took the rollout
   while this one was not heard from) is dropped without another write.

A one-shot run that is interrupted (Ctrl-C) pauses its rollout, saying so, instead of leaving
it `running` with nobody driving it; a service that stops (SIGTERM) only releases its
rollouts, which the next controller resumes.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.errors import EdgefleetError
from fleet import actions
from fleet.driver import DriverOptions, RolloutDriver
from fleet.machine import DRIVEN, RolloutState
from fleet.state import LeaseLost, StateDB
from fleet.state_backend import StoreUnavailable
from fleet.transport import FleetController

__all__ = ["Controller", "ControllerOptions", "new_owner"]

_LOG = logging.getLogger("edgefleet.fleet")


def new_owner() -> str:
    """`host:pid:token`: names a driving process (its liveness is checkable on this host)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass
class ControllerOptions:
    actor: str = "controller"
    tick_s: float = 0.2  # at most a round this often (while a driver has work)
    # requests and rollouts to pick up: with each heartbeat, driving or not (two queries a
    # scan, about 0.5 ms of CPU on a small VM; twice a second while driving, it was one of
    # the larger costs a second of rollout): an operator's request waits up to a second
    scan_s: float = 1.0
    heartbeat_s: float = 1.0
    stale_s: float = 10.0
    only: frozenset[str] | None = None  # one-shot: drive just these, hold no service lease
    shared: bool = False  # several controllers on one store (per-rollout leases only)
    driver: DriverOptions | None = None
    on_apply: Callable[[Controller], None] | None = None  # git follow: runs every scan


class Controller:
    def __init__(self, db: StateDB, ctl: FleetController,
                 options: ControllerOptions | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.db, self.ctl = db, ctl
        self.opt = options or ControllerOptions()
        self.clock = clock
        self.owner = new_owner()
        self.drivers: dict[str, RolloutDriver] = {}
        self._targets: dict[str, frozenset[str]] = {}  # non-final rollout -> its devices
        self.started = clock()
        self.last_round = 0.0
        self._last_beat = self._last_scan = 0.0
        self.lost_lease: str | None = None
        self.store_error: str | None = None  # the database server is unreachable

    def _pause(self) -> float:
        """How long the loop sleeps before its next round: a tick while a driver has work
        (it folds the messages that arrived meanwhile and watches the clock: step timeouts,
        measure intervals), in a quiet bake until its next measure or the bake's end, the
        next scan (`scan_s`: requests, rollouts to pick up) or heartbeat, whichever comes
        first; with no rollout, until the next heartbeat, which brings the scan with it. One
        wake-up a round, at a pace set by the clock, not by the message stream: a thread's
        wake-up costs tens of microseconds of CPU on a small VM (and the first statements
        after it, with cold caches, hundreds), and a stream of device messages used to wake
        the loop for rounds of next to nothing; an idle controller wakes once a second."""
        now = self.clock()
        due = self._last_beat + self.opt.heartbeat_s
        if self.drivers:
            due = min(due, self._last_scan + self.opt.scan_s,
                      *(drv.next_round(now) for drv in self.drivers.values()))
        return max(self.opt.tick_s, min(due - now, self.opt.heartbeat_s))  # (clock stepped back)

    @property
    def service(self) -> bool:
        return self.opt.only is None

    # -- lease ------------------------------------------------------------------------

    def take_lease(self) -> None:
        """Service mode: hold the controller lease or raise `EdgefleetError` naming who
        does."""
        holder = self.db.take_lease(self.owner, self._info(), stale_s=self.opt.stale_s,
                                    shared=self.opt.shared)
        if holder is not None:
            raise EdgefleetError(f"another controller ({holder}) is running on this state store",
                                 hint="stop that one first, or run every controller with "
                                      "--shared (a PostgreSQL store several share)")
        self._last_beat = self.clock()

    def _info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": self.started,
                "rollouts": sorted(self.drivers)}

    def _heartbeat(self, now: float) -> None:
        """Renew the controller lease (service mode) and every driven rollout's, in one
        transaction; stop driving what was taken while this controller was not heard from."""
        holder, held = self.db.heartbeat(self.owner, self._info() if self.service else None,
                                         stale_s=self.opt.stale_s, shared=self.opt.shared)
        if holder is not None:
            self.lost_lease = holder
            _LOG.error("controller lease taken by %s: stopping", holder)
            for drv in self.drivers.values():
                drv.close()
            self.drivers.clear()
            return
        for rid, drv in list(self.drivers.items()):
            if held.get(rid) != drv.epoch:  # taken while not heard from
                _LOG.error("rollout %s taken over by %s: no longer driving it", rid,
                           self.db.rollout(rid).owner)
                self.drivers.pop(rid).close()

    def _lost(self, rid: str, e: LeaseLost) -> None:
        """A driver's write was refused: drop it (the new holder drives the rollout)."""
        _LOG.error("%s: no longer driving it", e)
        drv = self.drivers.pop(rid, None)
        if drv is not None:
            drv.close()

    # -- one round --------------------------------------------------------------------

    def step(self) -> None:
        """One round. A database server that cannot be reached (PostgreSQL restarting, the
        network) costs the round, not the process: every driver is dropped (what it had not
        written is redone from the store, command ids unchanged) and the next round connects
        again and picks the rollouts up, unless another controller took them meanwhile."""
        try:
            self._round()
        except StoreUnavailable as e:
            if self.store_error is None:
                _LOG.error("%s: retrying every round", e)
            self.store_error = str(e)
            for drv in self.drivers.values():
                drv.close()
            self.drivers.clear()
            self._last_scan = 0.0
            return
        if self.store_error is not None:
            _LOG.warning("state store reachable again")
            self.store_error = None

    def _round(self) -> None:
        now = self.clock()
        if now - self._last_beat >= self.opt.heartbeat_s:
            self._last_beat = now
            self._heartbeat(now)
        if self.lost_lease:
            return
        if now - self._last_scan >= self.opt.scan_s:
            self._last_scan = now
            if self.opt.on_apply is not None and self._leads():
                try:
                    self.opt.on_apply(self)
                except Exception:
                    _LOG.exception("applying declared rollouts failed")
            self._requests()
            self._pick_up()
        for rid, drv in list(self.drivers.items()):
            try:
                if not drv.tick():
                    drv.flush()
                    self.db.release(rid, self.owner)
                    self.drivers.pop(rid).close()
            except LeaseLost as e:
                self._lost(rid, e)
        self.last_round = self.clock()

    def run(self, stop: threading.Event, until: Callable[[], bool] | None = None) -> None:
        """Drive until `stop` is set (or `until()` is true, or the lease is lost)."""
        if self.service:
            self.take_lease()
        try:
            while not stop.is_set() and not self.lost_lease:
                self.step()
                if until is not None and until():
                    break
                stop.wait(self._pause())
            if stop.is_set() and not self.service:
                self.interrupt("stopped")
        except BaseException:  # Ctrl-C (KeyboardInterrupt) or a bug: never leave it running
            if not self.service:
                self.interrupt("interrupted")
            raise
        finally:
            self.release_all()

    def release_all(self) -> None:
        for rid, drv in list(self.drivers.items()):
            try:
                drv.flush()
            except LeaseLost:
                continue  # not ours any more: nothing to release
            self.db.release(rid, self.owner)
            drv.close()
        self.drivers.clear()
        if self.service:
            self.db.drop_lease(self.owner)

    def interrupt(self, why: str) -> None:
        """One-shot mode stopped early: pause what it drove, saying so."""
        for rid, drv in list(self.drivers.items()):
            try:
                drv.flush()
            except LeaseLost as e:
                self._lost(rid, e)
                continue
            if drv.row.state in (RolloutState.RUNNING, RolloutState.PENDING):
                try:
                    actions.apply(self.db, rid, "pause", self.opt.actor, {
                        "reason": f"its driver stopped ({why}); next: edgefleet fleet rollout "
                                  f"resume {rid} --once, or start a controller: edgefleet "
                                  "fleet controller"}, lease=(self.owner, drv.epoch))
                except LeaseLost as e:
                    self._lost(rid, e)

    def _mine(self, rid: str) -> bool:
        return self.opt.only is None or rid in self.opt.only

    def _requests(self) -> None:
        for req in self.db.open_requests():
            rid = req["rollout_id"]
            if not self._mine(rid):
                continue
            holder = self.db.holder(rid, self.opt.stale_s)
            if holder is not None and holder != self.owner:
                continue  # the process driving it handles it
            drv = self.drivers.get(rid)
            if drv is None:  # nobody drives it: hold it while applying (another controller
                # on the same store may be looking at the same request)
                if self.db.acquire(rid, self.owner, stale_s=self.opt.stale_s) is not None:
                    continue
                if self.db.request_result(req["seq"]) is not None:
                    self.db.release(rid, self.owner)  # applied meanwhile by the other one
                    continue
                epoch = self.db.rollout(rid).epoch
            else:
                try:
                    drv.flush()
                except LeaseLost as e:
                    self._lost(rid, e)
                    continue
                epoch = drv.epoch
            try:  # fenced: applied only while this controller still holds the rollout
                ok, msg = actions.apply(self.db, rid, req["action"], req["actor"], req["args"],
                                        lease=(self.owner, epoch))
                with self.db.tx() as c:
                    self.db.close_request(req["seq"], ("ok: " if ok else "refused: ") + msg, c)
            except LeaseLost as e:  # taken over meanwhile: its new holder applies the request
                if drv is not None:
                    self._lost(rid, e)
                else:
                    _LOG.error("%s: leaving the request to it", e)
                continue
            finally:
                if drv is None:
                    self.db.release(rid, self.owner)  # `_pick_up` takes it if it needs a driver
            if drv is not None:
                drv.reload()

    def _leads(self) -> bool:
        """Whether this controller follows declared rollouts (Git): alone, always; shared,
        only the longest-running live controller, so one declaration makes one rollout."""
        if not self.opt.shared:
            return True
        live = self.db.controllers(self.opt.stale_s)
        if self.owner not in live:
            return False
        return self.owner == min(live, key=lambda o: (live[o].get("started") or 0.0, o))

    def _peer_load(self) -> int | None:
        """Shared: the fewest rollouts a live peer drives (None: no peer)."""
        if not self.opt.shared:
            return None
        peers = [len(info.get("rollouts") or ()) for owner, info in
                 self.db.controllers(self.opt.stale_s).items() if owner != self.owner]
        return min(peers) if peers else None

    def _pick_up(self) -> None:
        """Give every rollout that needs driving and has no live driver one. Costs one query a
        scan while nothing waits; the device sets (to hold back a pending rollout that
        overlaps another) are read only when a pending rollout is up for a driver, and kept
        per rollout id (a rollout's targets never change) while it is not final."""
        active = self.db.active()
        wanted = [r for r in active if r.id not in self.drivers and r.state in DRIVEN
                  and self._mine(r.id)]
        if not wanted:
            return
        live = {r.id for r in active}
        for rid in [rid for rid in self._targets if rid not in live]:
            del self._targets[rid]
        peer_load = self._peer_load()
        busy: dict[str, str] | None = None
        for r in wanted:
            if r.state == RolloutState.PENDING:
                if busy is None:
                    busy = {d: a.id for a in active if a.state != RolloutState.PENDING
                            for d in self._target_set(a.id)}
                if any(busy.get(d, r.id) != r.id for d in self._target_set(r.id)):
                    continue  # waits for the rollout it overlaps to end (superseded, say)
            if peer_load is not None and len(self.drivers) > peer_load:
                continue  # a peer with fewer takes it
            if self.db.acquire(r.id, self.owner, stale_s=self.opt.stale_s) is not None:
                continue
            self.db.audit(r.id, self.opt.actor, "driver", {"owner": self.owner,
                                                           "state": r.state})
            drv = RolloutDriver(self.db, r.id, self.ctl, self.owner,
                                self.opt.driver or DriverOptions(actor=self.opt.actor),
                                clock=self.clock)
            self.drivers[r.id] = drv
            if busy is not None and r.state != RolloutState.PENDING:
                busy.update(dict.fromkeys(drv.targets, r.id))

    def _target_set(self, rid: str) -> frozenset[str]:
        if rid not in self._targets:
            self._targets[rid] = frozenset(self.db.target_ids(rid))
        return self._targets[rid]

    # -- what /metrics and `status` show ----------------------------------------------

    def healthy(self, max_age_s: float = 5.0) -> tuple[bool, str]:
        if self.lost_lease:
            return False, f"lease lost to {self.lost_lease}"
        if self.store_error:
            return False, f"state store unreachable: {self.store_error}"
        if not self.ctl.connected.is_set():
            return False, "not connected to the MQTT broker"
        age = self.clock() - self.last_round
        if age > max_age_s:
            return False, f"no round for {age:.1f} s"
        return True, f"ok: driving {len(self.drivers)} rollouts"
