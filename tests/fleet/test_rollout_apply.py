"""Declarative rollouts (fleet/apply.py): a YAML document applied with `edgefleet fleet apply`
(the real CLI) idempotently, `--dry-run` showing what would change on which devices; and the
controller following a real local Git repository (the `git` command): a commit that declares
a rollout runs it, reverting the commit rolls it back."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from agent.errors import UsageError
from fleet.apply import GitFollower, load_docs, spec_plan
from fleet.controller import Controller, ControllerOptions
from fleet.driver import DriverOptions
from fleet.inventory import open_controller
from tests.broker_fixtures import Broker, FleetKeys
from tests.fleet.rollout_helpers import cli_env, cli_here, floor, wait_reporting

DOC = """\
apiVersion: edgefleet/v1
kind: Rollout
metadata:
  name: lab-model
spec:
  bundle: sha256:{digest}
  selector: site in (s0,s1)
  strategy:
    shadow: false
    canary: 1
    bake: 0s
    waves: [100%]
  minRequests: 1
  timeouts: {{step: 20s, healthGrace: 5s, measureInterval: 0.3s}}
"""


def test_spec_fields_map_to_the_plan_and_unknown_ones_are_named():
    ref, p = spec_plan({"bundle": "sha256:ab", "selector": "site=a",
                        "strategy": {"shadow": {"enabled": True, "minDies": 50,
                                                "timeout": "1m"},
                                     "canary": "5%", "waves": ["10%", "100%"], "bake": "2m"},
                        "budgets": {"maxFailures": "1", "allowPartial": True},
                        "timeouts": {"offline": "skip", "step": "90s"}}, "x.yaml")
    assert ref == "sha256:ab"
    assert (p.shadow, p.shadow_min_dies, p.shadow_timeout_s, p.canary, p.waves, p.bake_s,
            p.max_failures, p.allow_partial, p.offline, p.step_timeout_s) == (
        True, 50, 60.0, "5%", (10.0, 100.0), 120.0, "1", True, "skip", 90.0)
    with pytest.raises(UsageError, match=r"x.yaml: unknown field spec.strategy.bakes"):
        spec_plan({"bundle": "sha256:ab", "strategy": {"bakes": "1m"}}, "x.yaml")
    with pytest.raises(UsageError, match="does not end at 100%"):
        spec_plan({"bundle": "sha256:ab", "strategy": {"waves": ["10%"]}}, "x.yaml")
    with pytest.raises(UsageError, match="kind: Rollout"):
        load_docs("apiVersion: v1\nkind: Pod\n", "x.yaml")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_apply_is_idempotent_and_a_git_commit_rolls_out_and_its_revert_rolls_back(
        tmp_path: Path, broker: Broker, fleet_keys: FleetKeys):
    n = 4
    with floor(tmp_path, broker, fleet_keys, n, sites=2) as fl:
        env = cli_env(fl)
        v1, v2 = fl.pubs["v1"].digest, fl.pubs["v2"].digest
        doc = tmp_path / "rollout.yaml"
        doc.write_text(DOC.format(digest=v2))
        # the dry run: what would change on which devices; nothing recorded
        r = cli_here("fleet", "apply", "-f", str(doc), "--dry-run", env=env)
        assert r.returncode == 0, r.stderr
        assert "(dry run) rollout lab-model: create lab-model-1" in r.stdout
        assert f"{n} of {n} devices would change" in r.stdout
        assert r.stdout.count(" -> ") == n and fl.db.rollouts() == []
        # no controller running: refused, naming how to start one; nothing recorded
        r = cli_here("fleet", "apply", "-f", str(doc), env=env)
        assert r.returncode == 1 and "no controller is running" in r.stderr, r.stderr
        assert "edgefleet fleet controller" in r.stderr and "--once" not in r.stderr
        assert fl.db.rollouts() == [] and fl.db.declared("lab-model") == []
        # the repository the controller follows
        repo = tmp_path / "repo"
        repo.mkdir()
        _git(repo, "init", "--quiet", "-b", "main")
        _git(repo, "config", "user.email", "ops@example.com")
        _git(repo, "config", "user.name", "ops")
        (repo / "README").write_text("fleet\n")
        _git(repo, "add", ".")
        _git(repo, "commit", "--quiet", "-m", "empty fleet")
        follower = GitFollower(str(repo), "main", "rollouts", fl.db, store=fl.store,
                               keyring=fl.keyring, artifact_url=fl.artifacts.base_url,
                               workdir=tmp_path / "follow", interval_s=0.2)
        stop = threading.Event()
        with open_controller(fl.mqtt, fleet_key=fl.fleet_key, client_id="ctl-git") as ctl:
            wait_reporting(ctl, n)
            loop = Controller(fl.db, ctl, ControllerOptions(
                actor="controller", on_apply=follower.poll,
                driver=DriverOptions(actor="controller")))
            thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
            thread.start()
            try:
                (repo / "rollouts").mkdir()
                (repo / "rollouts" / "lab.yaml").write_text(DOC.format(digest=v2))
                _git(repo, "add", ".")
                _git(repo, "commit", "--quiet", "-m", "lab: v2")
                assert ctl.wait_for(lambda c: any(
                    r.id == "lab-model-1" and r.state == "succeeded"
                    for r in fl.db.rollouts()), 60), [(r.id, r.state, r.reason)
                                                      for r in fl.db.rollouts()]
                assert set(fl.actives().values()) == {v2}
                # the same document again, by hand: nothing to do
                r = cli_here("fleet", "apply", "-f", str(doc), "-o", "json", env=env)
                assert r.returncode == 0, r.stderr
                assert [(c["action"], c["rollout_id"]) for c in json.loads(r.stdout)] == [
                    ("unchanged", "lab-model-1")]
                assert [r.id for r in fl.db.rollouts()] == ["lab-model-1"]
                # revert the commit: the declaration is gone, its rollout rolls back
                _git(repo, "revert", "--no-edit", "HEAD")
                assert ctl.wait_for(lambda c: fl.db.rollout("lab-model-1").state ==
                                    "rolled-back", 60), fl.db.rollout("lab-model-1")
                assert set(fl.actives().values()) == {v1}
            finally:
                stop.set()
                thread.join(20)
        actions = [a["action"] for a in fl.db.audit_log("lab-model-1")]
        assert actions[0] == "start" and "request-rollback" in actions
        assert actions[-1] == "rolled-back"
