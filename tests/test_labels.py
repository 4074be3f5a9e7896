"""Final-test labels (agent/labels.py): the `label` op in JSON and binary, the MES drop
directory, the join by die id and its counters, and the op fuzzed like the others."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.client import Client
from agent.dispatch import Dispatcher
from agent.labels import (
    LABEL_RECORD,
    LabelConfig,
    LabelDesk,
    encode_label_frame,
    parse_label_csv,
    parse_label_payload,
)
from agent.metrics import AgentMetrics
from agent.predlog import wait_flushed
from agent.protocol import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    ErrorCode,
    FrameType,
    ProtocolError,
    parse_header,
)
from agent.runtime import Runtime
from tests.agent_support import build_model, make_keys, running_agent
from tests.predlog_support import MODES, logged_agent

N = 8
FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    return build_model(d, *make_keys(d), n_features=N)


def _metrics(server) -> dict[str, float]:
    out = {}
    for line in server.metrics.exposition().decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _frame_round_trip(path: Path, frame: bytes) -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(frame)
        head = _recv(s, HEADER_SIZE)
        _m, _v, ftype, _f, _t, _r, _c, length = HEADER.unpack(head)
        return ftype, _recv(s, length)


def _recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "agent closed the connection"
        out += chunk
    return out


@pytest.mark.parametrize("mode", MODES)
def test_labels_join_to_the_logged_decision_per_model_and_unknown_dies_are_counted(model,
                                                                                    tmp_path, mode):
    good, bad = model.train[0], model.train[1] + 50.0
    with logged_agent(model, tmp_path / "log", mode=mode) as (server, plog):
        with Client(server.path) as c:
            c.predict(good, die_id=1)      # pass; the label says pass: a true pass
            c.predict(bad, die_id=2)       # fail; the label says pass: a false fail
            c.predict_json(bad, die_id="W7")  # fail; the label says fail: a true fail
            c.predict(good, die_id=4)      # pass; the label says fail: a miss
            c.health()  # a round trip: every earlier answer has been tapped
            assert wait_flushed(plog)
            assert c.request({"op": "label", "die_id": 1, "label": "pass"})["accepted"] == 1
            ftype, body = _frame_round_trip(server.path, encode_label_frame([2, 4], [0, 1]))
            assert ftype == FrameType.LABELED and struct.unpack("<II", body) == (2, 0)
            answer = c.request({"op": "label", "id": "r1", "labels": [
                {"die_id": "W7", "label": "fail", "time": "2026-03-01T10:00:00Z"},
                {"die_id": "never-seen", "label": "fail"},
                {"die_id": 999, "label": 0}]})
            assert answer == {"id": "r1", "ok": True, "accepted": 3, "dropped": 0}
        assert wait_flushed(plog, server)
        m = _metrics(server)
    digest = plog.models.models[0].digest

    def joins(pred: str, actual: str) -> float:
        return m.get(f'edgefleet_label_joins_total{{actual="{actual}",digest="{digest}",'
                     f'predicted="{pred}"}}', 0.0)

    assert (joins("pass", "pass"), joins("fail", "pass"), joins("fail", "fail"),
            joins("pass", "fail")) == (1, 1, 1, 1)
    assert m['edgefleet_labels_total{result="joined",source="socket"}'] == 4
    assert m['edgefleet_labels_total{result="unknown_die",source="socket"}'] == 2
    records = [json.loads(p) for _, p in plog.labels.ring.read(0).records]
    assert [(r["die_id"], r["result"]) for r in records] == [
        ("1", "joined"), ("2", "joined"), ("4", "joined"), ("W7", "joined"),
        ("never-seen", "unknown_die"), ("999", "unknown_die")]
    assert records[3]["time"] == 1772359200.0 and records[3]["digest"] == digest


def test_labels_for_dies_the_ring_no_longer_holds_are_counted_as_expired_or_unknown(
        model, tmp_path):
    with logged_agent(model, tmp_path / "log", max_bytes=3000, segment_bytes=1000,
                        fsync_interval_s=0.0, index_rows=64, flush_interval_s=3600,
                        enforce_interval_s=0.0) as (
            server, plog):
        with Client(server.path) as c:
            for i in range(400):
                c.predict(model.train[i % 100], die_id=i)
                if i % 40 == 39:  # a block of 40 answers (over 1000 bytes: a segment each)
                    c.health()  # a round trip: every earlier answer has been tapped
                    plog.flush()
            first = plog.predictions.first_seq()
            assert 100 < first < 399  # the oldest segments are gone
            # die i was logged as prediction i: just out of the ring, long gone, still there
            c.request({"op": "label", "labels": [{"die_id": first - 2, "label": "pass"},
                                                 {"die_id": 0, "label": "pass"},
                                                 {"die_id": 399, "label": "pass"}]})
        assert wait_flushed(plog, server)
        m = _metrics(server)
    assert m['edgefleet_labels_total{result="expired",source="socket"}'] == 1
    assert m['edgefleet_labels_total{result="unknown_die",source="socket"}'] == 1
    assert m['edgefleet_labels_total{result="joined",source="socket"}'] == 1


def test_the_join_index_survives_a_restart(model, tmp_path):
    """Dies logged before a restart still join: sidecars plus a rescan of the log's tail."""
    with logged_agent(model, tmp_path / "log", index_rows=50) as (server, plog):
        with Client(server.path) as c:
            for i in range(120):
                c.predict(model.train[i % 100], die_id=i)
        assert wait_flushed(plog, server)
    with logged_agent(model, tmp_path / "log", index_rows=50) as (server, plog):
        with Client(server.path) as c:
            c.request({"op": "label", "labels": [{"die_id": i, "label": "pass"}
                                                 for i in (0, 60, 119)]})
        assert wait_flushed(plog, server)
        assert _metrics(server)['edgefleet_labels_total{result="joined",source="socket"}'] == 3


def test_mes_files_are_joined_then_moved_to_done_or_rejected_with_a_reason(model, tmp_path):
    drop = tmp_path / "drop"
    with logged_agent(model, tmp_path / "log", drop=drop) as (server, plog):
        with Client(server.path) as c:
            c.predict(model.train[0], die_id=11)
        assert wait_flushed(plog, server)
        (drop / "incoming" / "lot42.csv.tmp").write_text("die_id,label\n11,pass\n")
        (drop / "incoming" / "lot42.csv.tmp").rename(drop / "incoming" / "lot42.csv")
        (drop / "incoming" / "bad.csv").write_text("die_id,label,time\n11,pass,\n12,maybe,\n")
        (drop / "incoming" / "noheader.csv").write_text("11,pass\n")
        assert wait_flushed(plog)
        m = _metrics(server)
    assert sorted(p.name for p in (drop / "done").iterdir()) == ["lot42.csv"]
    assert sorted(p.name for p in (drop / "rejected").iterdir()) == [
        "bad.csv", "bad.csv.reason", "noheader.csv", "noheader.csv.reason"]
    assert "line 3" in (drop / "rejected" / "bad.csv.reason").read_text()
    assert "header" in (drop / "rejected" / "noheader.csv.reason").read_text()
    assert list((drop / "incoming").iterdir()) == []
    assert m['edgefleet_labels_total{result="joined",source="file"}'] == 1
    assert m['edgefleet_labels_total{result="invalid",source="file"}'] == 2


def test_a_dropped_file_waits_for_dies_not_yet_handed_to_the_log(model, tmp_path):
    """An MES export dropped right after its dies were screened, before the agent handed
    those answers to the log's writer: the file waits in incoming/ (its labels are not all
    counted unknown_die, as a CI run of the retrain demo saw); after the hand-over they join."""
    drop = tmp_path / "drop"
    with logged_agent(model, tmp_path / "log", drop=drop, label_grace_s=600,
                      flush_interval_s=3600) as (server, plog):
        with Client(server.path) as c:
            c.predict(model.train[0], die_id=21)
            c.health()  # a round trip: the answer is in the tap, not yet with the writer
        (drop / "incoming" / "lot7.csv").write_text("die_id,label\n21,pass\n")
        plog.labels.tick(plog)  # the writer polls the drop before its next hand-over
        assert (drop / "incoming" / "lot7.csv").exists()
        assert wait_flushed(plog, server)  # the hand-over, then a poll
        m = _metrics(server)
    assert [p.name for p in (drop / "done").iterdir()] == ["lot7.csv"]
    assert m['edgefleet_labels_total{result="joined",source="file"}'] == 1
    assert m.get('edgefleet_labels_total{result="unknown_die",source="file"}', 0) == 0


def test_bad_labels_get_named_errors_and_the_connection_stays_open(model, tmp_path):
    with logged_agent(model, tmp_path / "log") as (server, _plog), Client(server.path) as c:
        e = c.request({"op": "label", "die_id": 1, "label": "maybe"})["error"]
        assert e["code"] == "bad_value" and e["field"] == "label"
        e = c.request({"op": "label", "labels": [{"die_id": 1, "label": "pass"},
                                                 {"label": "pass"}]})["error"]
        assert e["code"] == "bad_value" and "labels[1].die_id" in e["message"]
        bad = bytearray(encode_label_frame([5], [1]))
        bad[HEADER_SIZE + 16] = 7  # label byte
        ftype, body = _frame_round_trip(server.path, bytes(bad))
        assert ftype == FrameType.ERROR
        assert struct.unpack_from("<H", body)[0] == ErrorCode.BAD_VALUE
        assert c.predict(model.train[0], die_id=1).decision == "pass"


def test_the_client_label_helper_sends_a_label_frame_to_a_real_agent(model, tmp_path):
    """`Client.label` (agent/client.py): the binary LABEL frame, its LABELED answer, the
    join it leads to, and a refusal raised as AgentError on a connection still usable."""
    from agent.client import AgentError

    with logged_agent(model, tmp_path / "log") as (server, plog):
        with Client(server.path) as c:
            c.predict(model.train[0], die_id=11)
            c.predict(model.train[1] + 50.0, die_id=12)
            c.health()
            assert wait_flushed(plog)
            # before any label, the model's four cells exist at zero (Prometheus' increase()
            # then counts the first label too)
            zero = [v for k, v in _metrics(server).items()
                    if k.startswith("edgefleet_label_joins_total{")]
            assert zero == [0.0] * 4
            assert c.label([11, 12, 13], ["pass", "pass", 1], times=[1.7e9, 0, 0]) == (3, 0)
            with pytest.raises(ValueError, match="pass"):
                c.label([11], ["maybe"])
            assert c.predict(model.train[0], die_id=14).decision == "pass"
        # the example of docs/protocol.md, as written
        doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
        start = doc.index("```python", doc.index("`Client.label`")) + len("```python")
        scope: dict = {}
        exec(doc[start:doc.index("```", start)].replace("/run/edgefleet/agent.sock",
                                                        str(server.path)), scope)
        assert (scope["accepted"], scope["dropped"]) == (2, 0)
        assert wait_flushed(plog, server)
        m = _metrics(server)
    digest = plog.models.models[0].digest
    assert m[f'edgefleet_label_joins_total{{actual="pass",digest="{digest}",'
             'predicted="fail"}'] == 1
    assert m['edgefleet_labels_total{result="unknown_die",source="socket"}'] == 3
    with running_agent(model) as server, Client(server.path) as c:  # no log: unavailable
        with pytest.raises(AgentError, match="unavailable|label"):
            c.label([1], [0])
        assert c.predict(model.train[0], die_id=1).decision == "pass"  # still open


def test_an_agent_without_a_log_refuses_labels_as_unavailable(model):
    with running_agent(model) as server:
        with Client(server.path) as c:
            e = c.request({"op": "label", "die_id": 1, "label": "pass"})["error"]
            assert e["code"] == "unavailable"
        ftype, body = _frame_round_trip(server.path, encode_label_frame([1], [0]))
        assert ftype == FrameType.ERROR
        assert struct.unpack_from("<H", body)[0] == ErrorCode.UNAVAILABLE


def test_a_full_label_queue_drops_and_counts(tmp_path):
    desk = LabelDesk(LabelConfig(max_pending=3), tmp_path)
    assert desk.offer([("a", 0, None)] * 5, "socket") == (3, 2)
    assert desk.results[("socket", "dropped")] == 2


# ---------------------------------------------------------------------------- fuzz


@pytest.fixture(scope="module")
def dispatcher(model, tmp_path_factory):
    runtime = Runtime()
    runtime.swap(model.engine(), model.manifest)
    d = Dispatcher(runtime, AgentMetrics(runtime))
    d.labels = LabelDesk(LabelConfig(max_pending=10**6), tmp_path_factory.mktemp("labels"))
    return d


label_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(),
                       st.text(max_size=8), st.sampled_from(["pass", "fail", "0", "1"]))
label_obj = st.dictionaries(st.sampled_from(["die_id", "label", "time", "id", "x"]), label_leaf,
                            max_size=4)
label_req = st.one_of(
    label_obj.map(lambda o: {**o, "op": "label"}),
    st.lists(st.one_of(label_obj, label_leaf), max_size=5).map(
        lambda items: {"op": "label", "labels": items}),
    st.fixed_dictionaries({"op": st.just("label"), "labels": label_leaf}))


@FUZZ
@given(label_req)
def test_random_label_requests_get_one_json_answer_accepted_or_a_named_error(dispatcher, obj):
    line = json.dumps(obj, allow_nan=True).encode()
    answer = dispatcher.json_line(line, time.perf_counter())
    assert answer.endswith(b"\n") and answer.count(b"\n") == 1
    out = json.loads(answer)
    assert ("accepted" in out) != ("error" in out)
    if "error" in out:
        assert out["error"]["code"] in ("bad_json", "bad_request", "bad_value", "too_large")
    assert dispatcher.metrics._errors[ErrorCode.INTERNAL] == 0


@FUZZ
@given(st.binary(max_size=24 * 6), st.integers(0, 6))
def test_random_label_payloads_parse_or_raise_a_protocol_error(data, rows):
    data = data.ljust(rows * LABEL_RECORD.size, b"\0")
    try:
        labels = parse_label_payload(data, rows)
    except ProtocolError as e:
        assert e.code == ErrorCode.BAD_VALUE and e.row is not None
        return
    assert len(labels) == rows and all(v in (0, 1) for _, v, _ in labels)


@FUZZ
@given(st.text(max_size=200))
def test_random_csv_parses_or_is_rejected_with_a_line(text):
    try:
        rows = parse_label_csv(text)
    except ValueError as e:
        assert str(e).startswith("line ")
        return
    assert all(d and v in (0, 1) for d, v, _ in rows)


@FUZZ
@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
def test_random_label_headers_are_accepted_only_when_consistent(data):
    frame = bytearray(data)
    frame[0:5] = MAGIC + b"\x01"
    frame[5] = FrameType.LABEL
    _m, _v, _t, flags, _tag, rows, columns, length = HEADER.unpack(bytes(frame))
    try:
        parse_header(bytes(frame))
    except ProtocolError as e:
        assert e.code == ErrorCode.BAD_FRAME
        return
    assert flags == 0 and columns == 0 and length == rows * LABEL_RECORD.size


def test_live_label_frames_mutated_then_a_prediction_still_answers(model, tmp_path):
    rng = np.random.default_rng(0)
    with logged_agent(model, tmp_path / "log") as (server, _plog):
        for _ in range(200):
            frame = bytearray(encode_label_frame(rng.integers(0, 2**63, 3).tolist(),
                                                 rng.integers(0, 2, 3).tolist()))
            for _ in range(int(rng.integers(1, 4))):
                frame[int(rng.integers(0, len(frame)))] = int(rng.integers(0, 256))
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(str(server.path))
                s.sendall(bytes(frame))
                s.shutdown(socket.SHUT_WR)
                with contextlib.suppress(OSError):
                    while s.recv(65536):
                        pass
        with Client(server.path) as c:
            assert c.predict(model.train[0], die_id=1).decision == "pass"
            assert c.request({"op": "label", "die_id": 1, "label": "pass"})["accepted"] == 1
    assert server.metrics._errors[ErrorCode.INTERNAL] == 0


def test_the_die_index_finds_each_dies_newest_prediction_in_memory_and_in_sidecars(tmp_path):
    """Blocks of one row (a quiet agent) and of many; a die logged again; rows spilled to a
    sorted sidecar; numeric ids keyed by value, so the text "7" finds the binary id 7."""
    from agent.dieindex import INDEX_DTYPE, DieIndex, die_key

    def rows(seqs, keys):
        r = np.zeros(len(seqs), INDEX_DTYPE)
        r["seq"], r["key"], r["decision"] = seqs, keys, [s % 2 for s in seqs]
        return r

    index = DieIndex(tmp_path / "index", limit=300)
    for s in range(100):  # 100 one-row blocks: merged as they come, looked up alike
        index.add(rows([s], [s]))
    index.add(rows(list(range(100, 250)), [die_key(f"W{i}") for i in range(150)]))
    index.add(rows([250], [7]))  # die 7 again
    assert len(index.recent) < 32 and not index.sidecars()
    hits = index.lookup([die_key("7"), die_key("W3"), 5, die_key("nope")])
    assert (hits[7].seq, hits[die_key("W3")].seq, hits[5].seq) == (250, 103, 5)
    assert die_key("nope") not in hits and die_key("7") == 7 and die_key("07") != 7
    index.add(rows(list(range(251, 301)), list(range(1000, 1050))))  # over the limit: spilled
    assert index.sidecars() and not index.recent
    index = DieIndex(tmp_path / "index", limit=300)  # a restart reads the sidecar
    hits = index.lookup([7, 5, 1049])
    assert (hits[7].seq, hits[5].seq, hits[1049].seq, hits[7].decision) == (250, 5, 300, 0)
