"""Two controller services (`edgefleet fleet controller --shared`, real processes) on one real
PostgreSQL store, a real Mosquitto and simulated devices: a rollout has exactly one driver at
a time. Its driver is stopped (SIGSTOP: alive, silent) mid-rollout and the other takes the
rollout once the lease expires; the stopped one, resumed, finds it taken and lets go; then the
new driver is killed (SIGKILL) mid-rollout and the first one takes it back and completes it.
No command is published twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.state import StateDB
from tests.broker_fixtures import Broker, FleetKeys, free_port
from tests.deploy_helpers import http_get
from tests.fleet.rollout_helpers import (
    FAST_FLAGS,
    REPO,
    CommandSniffer,
    Floor,
    cli,
    cli_env,
    floor,
    wait_until,
)
from tests.postgres_support import Postgres

pytestmark = [pytest.mark.timeout(150), pytest.mark.slow]
TTL_S = 3  # --lease-ttl: how long a silent controller keeps its rollouts


class _Ctl:
    """One controller service process and its /healthz."""

    def __init__(self, fl: Floor, env: dict[str, str], name: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "fleet", "controller", "--shared",
             "--lease-ttl", f"{TTL_S}s", "--client-id", f"ctl-{name}",
             "--metrics-port", str(self.port)],
            cwd=REPO, env=dict(os.environ, **env), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)

    def health(self) -> tuple[int, str]:
        try:
            code, body = http_get(f"http://127.0.0.1:{self.port}/healthz", timeout=5)
        except OSError:  # not listening yet
            return 0, ""
        return code, body.decode()

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.communicate(timeout=30)[1]


def test_two_controllers_share_a_postgresql_store_and_take_over_each_others_rollout(
        tmp_path: Path, broker: Broker, fleet_keys: FleetKeys, postgres: Postgres):
    n = 6
    # bakes long enough that the hand-overs below happen before the last wave has baked,
    # whatever the machine's pace (the rollout cannot finish while a bake runs)
    flags = ["--canary", "1", "--waves", "50%,100%", "--bake", "2s", "--wave-bake", "3s",
             "--max-parallel", "1", *FAST_FLAGS]
    url = postgres.new_store()
    db = StateDB(url)
    with floor(tmp_path, broker, fleet_keys, n) as fl:
        env = {**cli_env(fl), "EDGEFLEET_ROLLOUT_DB": url}
        sniffer = CommandSniffer(fl.mqtt)
        ctls = [_Ctl(fl, env, "a"), _Ctl(fl, env, "b")]
        try:
            for c in ctls:
                wait_until(lambda c=c: c.health()[0] == 200, 60, "a controller's /healthz")
            assert len(db.lease()["controllers"]) == 2  # both run: neither refused the other
            r = cli("fleet", "rollout", "start", f"sha256:{fl.pubs['v3'].digest}", "--id",
                    "r-1", *flags, env=env)
            assert r.returncode == 0 and "the controller" in r.stdout, r.stderr

            def driver() -> _Ctl | None:
                owner = db.holder("r-1", TTL_S)
                return next((c for c in ctls if owner and
                             owner.split(":")[1] == str(c.proc.pid)), None)

            first = wait_until(lambda: db.rollout("r-1").stage >= 1 and driver(), 90,
                               "the canary to pass under one controller")
            second = next(c for c in ctls if c is not first)
            # stalled past its lease (alive, silent): the other takes the rollout over
            first.proc.send_signal(signal.SIGSTOP)
            wait_until(lambda: db.holder("r-1", TTL_S) and driver() is second, 30,
                       "the other controller to take the rollout over")
            r = cli("fleet", "rollout", "status", "r-1", env=env)  # read from PostgreSQL
            assert f"  driver  {db.holder('r-1', TTL_S)} (heartbeat" in r.stdout, r.stdout
            first.proc.send_signal(signal.SIGCONT)
            wait_until(lambda: first.health() == (200, "ok: driving 0 rollouts\n"), 30,
                       "the resumed controller to let the rollout go")
            # killed mid-rollout: the first one takes it back and completes it
            assert db.rollout("r-1").state == "running"
            second.proc.send_signal(signal.SIGKILL)
            second.proc.communicate(timeout=10)
            wait_until(lambda: db.rollout("r-1").state == "succeeded", 90, "the rollout")
            assert first.health() == (200, "ok: driving 0 rollouts\n")
        finally:
            errs = [c.stop() for c in ctls]
        assert ctls[0].proc.returncode in (0, -9) and ctls[1].proc.returncode in (0, -9), errs
        sniffer.close()
        ids = sniffer.ids()
        assert len(ids) == n and max(ids.values()) == 1, \
            [i for i, k in ids.items() if k > 1]  # no device commanded twice
        assert set(fl.actives().values()) == {fl.pubs["v3"].digest}
        # who drove it, in order: one driver at a time, each hand-over a new lease epoch
        owners = [e["detail"]["owner"] for e in db.audit_log("r-1") if e["action"] == "driver"]
        pids = [o.split(":")[1] for o in owners]
        assert pids == [str(first.proc.pid), str(second.proc.pid), str(first.proc.pid)], owners
        assert db.rollout("r-1").epoch == 3
        assert {(s.step, s.status, s.result) for s in db.steps("r-1")} == \
            {("install", "done", "live")}
        assert "taken over" in errs[ctls.index(first)] or "lease lost" in \
            errs[ctls.index(first)], errs
