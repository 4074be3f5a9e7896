"""The prediction log's writer process (agent/predlog_proc.py, agent/predlog_child.py): a real
child process, killed for real; what it imports. (The log's behaviour in that process - every
answer, captured rows, labels - is tested with both writers: tests/test_predlog.py,
tests/test_labels.py, MODES.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from agent.client import Client
from agent.predlog import read_predictions
from tests.agent_support import build_model, make_keys, wait_for
from tests.conftest import REPO
from tests.predlog_support import logged_agent, metric_value

N = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    return build_model(d, *make_keys(d), n_features=N)


_metric = metric_value


def test_a_killed_writer_process_is_restarted_and_later_answers_are_logged(model, tmp_path):
    """SIGKILL to the writer: the next hand-over finds it gone, starts another (counted), and
    the answers after that are written, numbered on from what the first one wrote."""
    with logged_agent(model, tmp_path / "log", mode="process") as (server, plog):
        with Client(server.path) as c:
            for i in range(5):
                c.predict(model.train[i], die_id=i)
            c.health()  # a round trip: every earlier answer has been tapped
            assert plog.flush()
            first = plog._proc.pid
            os.kill(first, signal.SIGKILL)
            wait_for(lambda: plog._proc.poll() is not None)
            for i in range(5, 9):
                c.predict(model.train[i], die_id=i)
            c.health()
            assert plog.flush()
            assert plog._proc.pid != first and plog.restarts == 1
        text = server.metrics.exposition().decode()
    assert _metric(text, "edgefleet_predlog_writer_restarts_total") == 1
    assert _metric(text, 'edgefleet_predlog_records_total{log="predictions"}') == 4  # the new
    _, preds = read_predictions(tmp_path / "log" / "predictions", 0, 100)
    assert [s for s, _ in preds] == list(range(9))
    assert [p["die_id"] for _, p in preds] == [str(i) for i in range(9)]


@pytest.mark.parametrize("idle", [True, False])
def test_the_writer_process_takes_only_cpu_time_serving_does_not_want(model, tmp_path, idle):
    """By default the writer runs at SCHED_IDLE (and nice 10): a waking serving thread takes
    its CPU at once. writer_idle=False (PREDLOG_WRITER_IDLE=0): nice 10 only."""
    agent = logged_agent(model, tmp_path / "log", mode="process", writer_idle=idle)
    with agent as (server, plog), Client(server.path) as c:
        c.predict(model.train[0], die_id=0)
        c.health()
        assert plog.flush()  # the writer answered: it set its priority before reading
        pid = plog._proc.pid
        policy = os.sched_getscheduler(pid)
        nice = os.getpriority(os.PRIO_PROCESS, pid)
    assert policy == (os.SCHED_IDLE if idle else os.SCHED_OTHER)
    assert nice == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)


def test_the_writer_process_writes_what_it_was_handed_when_the_agent_stops(model, tmp_path):
    """stop(): the rest of the tap goes down the pipe, the pipe closes, the writer writes it
    all and exits; nothing is flushed by hand."""
    with logged_agent(model, tmp_path / "log", mode="process",
                      flush_interval_s=3600) as (server, plog):
        with Client(server.path) as c:
            c.predict_batch(model.train[:300], np.arange(300, dtype=np.uint64))
            c.health()
        proc = plog._proc
    assert proc.poll() == 0
    _, preds = read_predictions(tmp_path / "log" / "predictions", 0, 1000)
    assert [p["die_id"] for _, p in preds] == [str(i) for i in range(300)]


def test_the_writer_process_imports_no_serving_library():
    """It loads numpy and orjson, not ONNX Runtime, the MQTT client, cryptography or the
    Prometheus client (its resident memory counts for the device)."""
    r = subprocess.run([sys.executable, "-c", "import sys, agent.predlog_child\n"
                        "print(' '.join(sorted(sys.modules)))"], cwd=REPO, capture_output=True,
                       text=True, check=True)
    mods = set(r.stdout.split())
    assert {"numpy", "orjson"} <= mods
    assert not mods & {"onnxruntime", "paho", "cryptography", "prometheus_client", "torch"}


def test_a_writer_that_cannot_start_costs_counted_answers_not_a_fork_loop(model, tmp_path):
    """A writer process that exits at once (a broken install): at most 3 are started within
    RESPAWN_S, the answers handed over meanwhile are counted as lost, and serving goes on."""
    from agent.predlog import PredLogConfig, plug_in
    from agent.predlog_proc import WriterProcess
    from tests.agent_support import running_agent

    with running_agent(model) as server:
        plog = WriterProcess(PredLogConfig(directory=tmp_path / "log", min_free_bytes=0),
                             server.runtime)
        plog._argv = [sys.executable, "-c", "raise SystemExit(3)"]
        plug_in(server, plog)
        plog.start()
        try:
            with Client(server.path) as c:
                for i in range(8):
                    assert c.predict(model.train[i], die_id=i).decision in ("pass", "fail")
                    c.health()
                    wait_for(lambda: plog._proc.poll() is not None)
                    plog.forward()
            assert len(plog._spawns) == 3 and plog.restarts == 2
            assert plog.lost >= 1
            text = server.metrics.exposition().decode()
        finally:
            plog.stop()
    assert _metric(text, 'edgefleet_predlog_dropped_total{reason="writer_lost"}') >= 1
