"""The fleet inventory: label selectors (kubectl syntax), device rows from retained states, the
canary spread over sites, and `edgefleet fleet devices` against a real broker."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import UsageError
from fleet.inventory import Device, Inventory, Requirement, Selector, devices_table, spread
from tests.broker_fixtures import Broker, FleetKeys, make_box
from tests.fleet.rollout_helpers import cli

pytestmark = pytest.mark.timeout(60)


def _dev(i: int, site: str, online: bool = True, health: str = "ok", **labels: str) -> Device:
    return Device.from_state({
        "device_id": f"d{i:03d}", "online": online, "ts": "2026-01-01T00:00:00Z",
        "labels": {"site": site, "tester": f"t{i % 4}", **labels},
        "model": {"active": {"id": "1-a-x", "name": "m", "version": "1", "sequence": 1,
                             "digest": "ab" * 32}},
        "health": {"status": health, "reason": None}, "summary": {"requests": 5}})


def test_selector_terms_match_like_kubectl():
    labels = {"site": "fab2", "tester": "t5k", "group": "canary"}
    assert Selector.parse("").matches(labels)
    assert Selector.parse("site=fab2,tester=t5k").matches(labels)
    assert Selector.parse("site==fab2").matches(labels)
    assert not Selector.parse("site=fab2,tester=t7").matches(labels)
    assert Selector.parse("site!=fab1").matches(labels)
    assert Selector.parse("tester in (t5k, t7)").matches(labels)
    assert not Selector.parse("tester notin (t5k,t7)").matches(labels)
    assert Selector.parse("group").matches(labels)
    assert Selector.parse("!rack").matches(labels)
    assert not Selector.parse("!group").matches(labels)
    assert Selector.parse("site in (fab2),!rack,tester!=t1").matches(labels)


@pytest.mark.parametrize("bad", ["site=", "=fab2", "site in ()", "site in (a", "site=a b",
                                 "si te=x", ",", "site=fab2,", "tester in (a,,b)"])
def test_selector_errors_name_the_term(bad: str):
    with pytest.raises(UsageError, match="label selector"):
        Selector.parse(bad)


_word = st.from_regex(r"[a-z0-9]([a-z0-9._-]{0,6}[a-z0-9])?", fullmatch=True)
_req = st.one_of(
    st.builds(lambda k, v: Requirement(k, "=", (v,)), _word, _word),
    st.builds(lambda k, v: Requirement(k, "!=", (v,)), _word, _word),
    st.builds(lambda k, vs: Requirement(k, "in", tuple(vs)), _word,
              st.lists(_word, min_size=1, max_size=3)),
    st.builds(lambda k, vs: Requirement(k, "notin", tuple(vs)), _word,
              st.lists(_word, min_size=1, max_size=3)),
    st.builds(lambda k: Requirement(k, "exists"), _word),
    st.builds(lambda k: Requirement(k, "!"), _word),
)


@given(st.lists(_req, min_size=1, max_size=4),
       st.dictionaries(_word, _word, max_size=4))
def test_selector_text_round_trips_and_matches_the_same(reqs, labels):
    sel = Selector(tuple(reqs))
    again = Selector.parse(str(sel))
    assert again == sel
    assert again.matches(labels) == all(r.matches(labels) for r in reqs)


def test_canary_is_spread_over_sites_not_the_first_ids():
    devs = [_dev(i, f"fab{i % 3}") for i in range(30)]
    pick = spread(devs, 6, keys=("site",))
    assert Counter(d.labels["site"] for d in pick) == {"fab0": 2, "fab1": 2, "fab2": 2}
    assert [d.id for d in pick] != [d.id for d in devs[:6]]
    assert [d.id for d in spread(devs, 6, keys=("site",))] == [d.id for d in pick]  # stable
    # any prefix is as even as it can be
    three = spread(devs, 3, keys=("site",))
    assert len({d.labels["site"] for d in three}) == 3


def test_spread_prefers_online_healthy_devices_within_a_site():
    devs = [_dev(0, "a", online=False), _dev(1, "a", health="fallback"), _dev(2, "a")]
    assert spread(devs, 1, keys=("site",))[0].id == "d002"


def test_inventory_selects_and_renders_a_table():
    inv = Inventory([_dev(i, "fab2" if i < 3 else "fab1") for i in range(5)])
    got = inv.select(Selector.parse("site=fab2"))
    assert [d.id for d in got] == ["d000", "d001", "d002"]
    table = devices_table(got)
    assert table.splitlines()[0].split() == ["DEVICE", "ONLINE", "MODEL", "SEQ", "HEALTH",
                                             "LABELS", "LAST", "SEEN"]
    assert "site=fab2" in table and "m 1" in table


def test_fleet_devices_lists_retained_states_with_selector_and_json(
        tmp_path: Path, broker: Broker, fleet_keys: FleetKeys):
    boxes = [make_box(tmp_path / "boxes", broker, fleet_keys, f"box-{i}",
                      labels={"site": "fab2" if i < 2 else "fab1", "tester": f"t{i}"})
             for i in range(3)]
    try:
        env = {"EDGEFLEET_MQTT_HOST": broker.host, "EDGEFLEET_MQTT_PORT": str(broker.port)}
        for _ in range(50):  # the boxes' first states may still be on their way
            r = cli("fleet", "devices", "-o", "json", env=env)
            if r.returncode == 0 and len(json.loads(r.stdout)) == 3:
                break
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)
        assert [d["id"] for d in rows] == ["box-0", "box-1", "box-2"]
        assert all(d["online"] and d["health"] == "ok" for d in rows)
        r = cli("fleet", "devices", "-l", "site=fab2", env=env)
        assert r.returncode == 0, r.stderr
        assert "box-0" in r.stdout and "box-1" in r.stdout and "box-2" not in r.stdout
        assert "2 devices, 2 online" in r.stdout
        r = cli("fleet", "devices", "-l", "site=", env=env)
        assert r.returncode == 2 and r.stderr.count("\n") == 1
        assert "label selector" in r.stderr
    finally:
        for b in boxes:
            b.stop()


def test_settling_waits_for_the_retained_burst_not_for_a_quiet_fleet():
    """A fleet that reports all the time never falls quiet: waiting for no message at all
    made every command that reads the fleet (`fleet devices`, `rollout start`) wait its full
    cap. Only new devices (the retained burst a new subscription gets) count."""
    import time

    from fleet.inventory import wait_settled

    class Chatty:  # a live report on every look; the retained burst is over
        def device_count(self) -> int:
            return 12

        def __init__(self) -> None:
            self.looks = 0

        @property
        def messages(self) -> int:
            self.looks += 1
            return self.looks

    t0 = time.monotonic()
    wait_settled(Chatty(), 0.05, max_s=10)  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 10  # returned on the quiet burst, not at the cap
