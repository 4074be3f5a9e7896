"""The prediction log and the capture (agent/predlog.py, agent/segring.py): what is recorded,
crash safety with a real `kill -9`, retention caps, and a really full disk (a tmpfs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.client import Client
from agent.predlog import (
    decode_capture,
    read_predictions,
    wait_flushed,
)
from agent.segring import RECORD, RingConfig, SegmentRing, read_ring
from agent.server import BIG_LINE
from tests.agent_support import (
    build_model,
    install_into_store,
    make_keys,
    short_tmp,
    wait_for,
)
from tests.conftest import REPO
from tests.predlog_support import MODES, logged_agent, metric_value

N = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    return build_model(d, *make_keys(d), n_features=N)


def _records(ring_dir: Path) -> list[tuple[int, bytes]]:
    return read_ring(ring_dir, 0, max_records=10**9, max_bytes=1 << 40).records


def _predictions(ring_dir: Path) -> list[tuple[int, dict]]:
    """(prediction seq, answer) of every logged answer (the ring holds blocks of them)."""
    return read_predictions(ring_dir, 0, max_records=10**9, max_bytes=1 << 40)[1]


@pytest.mark.parametrize("mode", MODES)
def test_every_answer_is_logged_with_die_model_decision_and_top_contributions(model, tmp_path,
                                                                             mode):
    x = model.train[:6].copy()
    x[1] += 50.0  # a fail
    with logged_agent(model, tmp_path / "log", capture_rate=0.0, mode=mode) as (server, plog):
        with Client(server.path) as c:
            c.predict(x[0], die_id=7)
            c.predict(x[1], die_id=8)
            c.predict_batch(x[:3], np.array([10, 11, 12], np.uint64))
            c.predict_json(x[1], die_id="W1-X3")
            c.request([{"die_id": "B0", "params": x[0].tolist()},
                       {"die_id": "B1", "params": x[1].tolist()}])
            c.request({"die_id": "bad", "params": [1.0]})  # refused: not a decision, not logged
        assert wait_flushed(plog, server)
    preds = [p for _, p in _predictions(tmp_path / "log" / "predictions")]
    assert [p["die_id"] for p in preds] == ["7", "8", "10", "11", "12", "W1-X3", "B0", "B1"]
    assert [p["decision"] for p in preds] == ["pass", "fail", "pass", "fail", "pass", "fail",
                                              "pass", "fail"]
    assert {p["source"] for p in preds} == {"model"} and {p["model"] for p in preds} == {0}
    fail = preds[1]
    assert len(fail["top"]) == model.manifest.top_k and fail["score"] > fail["threshold"]
    assert preds[0]["top"] == []
    # capture_rate 0: only the fails' input rows, each pointing at its prediction record
    caps = [decode_capture(p) for _, p in _records(tmp_path / "log" / "capture")]
    assert [(c["die_id"], c["reason"], c["prediction_seq"]) for c, _ in caps] == [
        ("8", "fail", 1), ("11", "fail", 3), ("W1-X3", "fail", 5), ("B1", "fail", 7)]
    for _, row in caps:
        np.testing.assert_allclose(row, x[1], rtol=1e-6)
    models = plog.models.models
    assert len(models) == 1 and models[0].model_sha256 == model.manifest.model_digest
    assert len(models[0].digest) == 64  # the bundle digest, rebuilt from the unpacked model


def test_sampled_rows_follow_the_capture_rate(model, tmp_path):
    rows = model.train[:400]
    with logged_agent(model, tmp_path / "log", capture_rate=0.25) as (server, plog):
        with Client(server.path) as c:
            for i, r in enumerate(rows):
                c.predict(r, die_id=i)
        assert wait_flushed(plog, server)
    caps = [decode_capture(p)[0] for _, p in _records(tmp_path / "log" / "capture")]
    fails = sum(c["reason"] == "fail" for c in caps)
    sampled = len(caps) - fails
    assert 40 <= sampled <= 180  # 25% of ~396 passes; binomial, far from both bounds


@pytest.mark.parametrize("mode", MODES)
def test_a_json_request_s_captured_row_is_the_row_the_dispatcher_parsed(model, tmp_path, mode):
    """A sampled single-row JSON request: its row is what the dispatcher parsed (the tap copies
    it, float32; None = not measured -> NaN), not the line parsed again; a line big enough to
    be answered by the worker thread is logged too (its row from the line); and a JSON
    request answered with an error - refused by the parser or by the scoring - is not
    logged."""
    x = model.train[:3].astype(np.float64)
    reqs = [{"die_id": f"J{i}", "params": [None if j == i else v for j, v in enumerate(r)]}
            for i, r in enumerate(x.tolist())]
    big = orjson.dumps({"die_id": "big", "params": x[0].tolist()}) + b" " * (BIG_LINE + 1) + b"\n"
    with logged_agent(model, tmp_path / "log", capture_rate=1.0, mode=mode) as (server, plog):
        with Client(server.path) as c:
            for r in reqs:
                c.request(r)
            c.request({"die_id": "short", "params": [1.0]})
            assert "error" in c.request({"die_id": "unmeasured", "params": [None] * N})
            assert orjson.loads(c.request_raw(big))["decision"] in ("pass", "fail")
        assert wait_flushed(plog, server)
    found = [decode_capture(p) for _, p in _records(tmp_path / "log" / "capture")]
    assert [c["die_id"] for c, _ in found] == ["J0", "J1", "J2", "big"]
    assert [p["die_id"] for _, p in _predictions(tmp_path / "log" / "predictions")] == [
        "J0", "J1", "J2", "big"]
    np.testing.assert_allclose(found[3][1], x[0], rtol=1e-6)
    found = found[:3]
    for (_, row), r in zip(found, reqs, strict=True):
        want = np.array(r["params"], dtype=np.float64)
        np.testing.assert_array_equal(np.isnan(row), np.isnan(want))
        np.testing.assert_allclose(row[~np.isnan(want)], want[~np.isnan(want)], rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_a_json_answer_the_dispatcher_did_not_note_is_logged_from_its_text(model, tmp_path,
                                                                          mode):
    """The tap reads a single JSON answer's decision and row from the dispatcher
    (`Dispatcher.parsed`); an answer it did not note (another thread's, or no dispatcher
    plugged in) is read from its text: logged when it holds a decision, its row captured from
    the request line when it is a fail (capture rate 0: fails only)."""
    x = model.train[:2].astype(np.float64)
    x[1] += 50.0  # a fail
    with logged_agent(model, tmp_path / "log", capture_rate=0.0, mode=mode) as (server, plog):
        plog.tapper.dispatch = SimpleNamespace(parsed=(None, None, 0))
        with Client(server.path) as c:
            c.predict_json(x[0], die_id="T0")
            c.predict_json(x[1], die_id="T1")
            assert "error" in c.request({"die_id": "unmeasured", "params": [None] * N})
            c.health()
        assert wait_flushed(plog, server)
    preds = [p for _, p in _predictions(tmp_path / "log" / "predictions")]
    assert [(p["die_id"], p["decision"]) for p in preds] == [("T0", "pass"), ("T1", "fail")]
    ((cap, row),) = [decode_capture(p) for _, p in _records(tmp_path / "log" / "capture")]
    assert (cap["die_id"], cap["reason"]) == ("T1", "fail")
    np.testing.assert_allclose(row, x[1], rtol=1e-6)


@pytest.mark.parametrize("noted", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_a_json_batch_s_captured_rows_are_its_requests_rows(model, tmp_path, mode, noted):
    """A sampled request's row of a JSON batch is the row the dispatcher parsed (it notes a
    batch's rows and decisions for the tap when the log runs: JSON_ROWS, the line is not piped);
    for a batch it did not note, the writer reads the row from the request's `params` list
    alone when the line's text makes that sound, else parses the whole line: the same rows
    every way, each at its own place past refused requests and rows the scoring refused."""
    x = model.train[:4].astype(np.float64)
    plain = [{"die_id": f"P{i}", "params": [None if j == i else v for j, v in enumerate(r)]}
             for i, r in enumerate(x.tolist())]
    odd = [dict(plain[0], die_id="params"), dict(plain[1], note={"params": [1]}),
           dict(plain[2], die_id="Ö\\")]  # "params" as a value, nested, a backslash
    with logged_agent(model, tmp_path / "log", capture_rate=1.0, mode=mode) as (server, plog):
        assert server.dispatch.note_batches
        server.dispatch.note_batches = noted
        with Client(server.path) as c:
            c.request(plain)
            c.request(odd)
            c.request([plain[3], {"die_id": "refused", "params": [1.0]}])  # not all answered
            answers = c.request([{"die_id": "unmeasured", "params": [None] * N},
                                 dict(plain[0], die_id="after")])
            assert "error" in answers[0] and answers[1]["decision"] in ("pass", "fail")
        assert wait_flushed(plog, server)
    found = [decode_capture(p) for _, p in _records(tmp_path / "log" / "capture")]
    assert [c["die_id"] for c, _ in found] == ["P0", "P1", "P2", "P3", "params", "P1", "Ö\\",
                                               "P3", "after"]
    caps = {c["die_id"]: row for c, row in found}
    for die, i in [("P0", 0), ("P1", 1), ("P2", 2), ("P3", 3), ("params", 0), ("Ö\\", 2),
                   ("after", 0)]:
        want = np.array(plain[i]["params"], dtype=np.float64)
        np.testing.assert_array_equal(np.isnan(caps[die]), np.isnan(want))
        np.testing.assert_allclose(caps[die][~np.isnan(want)], want[~np.isnan(want)],
                                   rtol=1e-6)


def test_a_full_queue_drops_and_counts_and_never_blocks(model, tmp_path):
    with logged_agent(model, tmp_path / "log", queue_size=5, flush_interval_s=3600) as (
            server, plog):
        with Client(server.path) as c:
            for i in range(20):
                assert c.predict(model.train[i], die_id=i).decision in ("pass", "fail")
        # the tap runs after the answer is sent: wait for the last one
        wait_for(lambda: plog.tapper.dropped + plog.tapper.waiting() == 20)
        assert plog.tapper.dropped == 15
        plog.flush()
        text = server.metrics.exposition().decode()
    assert 'edgefleet_predlog_dropped_total{reason="queue_full"} 15.0' in text
    assert 'edgefleet_predlog_records_total{log="predictions"} 5.0' in text


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def _written(port: int) -> float:
    try:
        return _metric(_scrape(port), 'edgefleet_predlog_records_total{log="predictions"}')
    except OSError:
        return 0.0


def _unlocked(path: Path) -> bool:
    """No process holds `path`'s flock (the log's writer process holds it while it runs)."""
    import fcntl

    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def _exited(proc: subprocess.Popen) -> bool:
    return proc.poll() is not None


def _ready(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200
    except OSError:
        return False


_metric = metric_value


def test_the_log_survives_kill_9_losing_at_most_the_unflushed_tail(model, tmp_path):
    """A real agent process (`edgefleet agent serve`) killed with SIGKILL twice: everything the
    writer had flushed before the kill is on disk, intact and readable; what is lost is at most
    the answers sent after that (the tap's buffer; the writer process writes what it was
    handed and exits); a restart continues the sequence."""
    from tests.test_agent_app import free_port

    keyring = model.bundle.parent.parent / "keyring"
    store = install_into_store(model, tmp_path / "store", keyring)
    logdir = tmp_path / "predlog"
    lost = []
    with short_tmp() as tmp:
        for run in range(2):
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgefleet", "agent", "serve", "--socket",
                 str(tmp / "a.sock"), "--store", str(store), "--keyring", str(keyring),
                 "--metrics-addr", f"127.0.0.1:{port}", "--predlog-dir", str(logdir),
                 "--capture-rate", "1.0"], cwd=REPO)
            try:
                # the killed one left its socket; an agent that exits (e.g. its metrics port
                # taken by another process in between) fails the test at once, with its code
                wait_for(lambda p=port, q=proc: _ready(p) or _exited(q), timeout=120)
                assert proc.poll() is None, f"the agent exited with {proc.returncode}"
                before = len(_predictions(logdir / "predictions"))
                with Client(tmp / "a.sock") as c:
                    for i in range(300):
                        c.predict(model.train[i % 100], die_id=run * 1000 + i)
                wait_for(lambda p=port: _written(p) >= 300, timeout=120)
                with Client(tmp / "a.sock") as c:  # the unflushed tail: these may be lost
                    for i in range(300, 400):
                        c.predict(model.train[i % 100], die_id=run * 1000 + i)
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
            # its writer process writes what it was handed, then exits and lets go of the lock
            wait_for(lambda: _unlocked(logdir / "writer.lock"), timeout=60)
            recs = _predictions(logdir / "predictions")
            assert [s for s, _ in recs] == list(range(len(recs)))  # no hole, no duplicate
            ids = [int(p["die_id"]) for _, p in recs[before:]]
            assert ids[:300] == [run * 1000 + i for i in range(300)]
            assert len(ids) <= 400
            lost.append(400 - len(ids))
            caps = _records(logdir / "capture")
            assert all(decode_capture(p)[0]["prediction_seq"] < len(recs) for _, p in caps)
    assert all(0 <= n <= 100 for n in lost)


def test_a_torn_tail_is_cut_off_at_open_and_appending_continues(tmp_path):
    ring = SegmentRing(tmp_path / "r", RingConfig(min_free_bytes=0))
    ring.append([b"a" * 10, b"b" * 20, b"c" * 30])
    ring.close()
    seg = ring.segments()[-1]
    data = seg.read_bytes()
    seg.write_bytes(data[:-7])  # a write cut short by the crash
    ring = SegmentRing(tmp_path / "r", RingConfig(min_free_bytes=0))
    assert ring.truncated_bytes == RECORD.size + 30 - 7
    assert ring.append([b"d"]) == 2
    assert [p for _, p in ring.read(0).records] == [b"a" * 10, b"b" * 20, b"d"]
    # a flipped bit inside a record: the reader stops that segment there (checksum)
    raw = bytearray(seg.read_bytes())
    raw[RECORD.size + 3] ^= 1
    seg.write_bytes(bytes(raw))
    assert read_ring(tmp_path / "r", 0).records == []


def test_size_and_age_caps_delete_whole_old_segments_and_readers_see_the_gap(tmp_path):
    now = [1000.0]
    ring = SegmentRing(tmp_path / "r", RingConfig(max_bytes=4000, segment_bytes=1000,
                                                  max_age_s=100, min_free_bytes=0),
                       clock=lambda: now[0])
    for i in range(100):
        ring.append([bytes([i]) * 84])  # 100-byte records
    ring.enforce()
    assert ring.disk_bytes() <= 4000 + 1000
    first = ring.first_seq()
    assert first > 0
    batch = ring.read(0, max_records=5)
    assert batch.gap == first and batch.records[0][0] == first
    for p in ring.segments():
        os.utime(p, (0, 0))  # every segment is old now
    now[0] = 10**6
    ring.enforce()
    assert len(ring.segments()) == 1  # the active one is never deleted


@pytest.fixture
def tiny_fs():
    """A real 1 MiB tmpfs: the disk really fills up (root only; skipped elsewhere)."""
    with short_tmp() as d:
        mnt = d / "mnt"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                           capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        try:
            yield mnt
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_capture_on_a_full_disk_drops_and_counts_and_answers_keep_coming(model, tiny_fs):
    with logged_agent(model, tiny_fs / "log", capture_rate=1.0, min_free_bytes=0,
                      max_bytes=64 << 20, capture_max_bytes=64 << 20,
                      segment_bytes=256 << 10) as (server, plog):
        with Client(server.path) as c:
            i = 0
            while plog.dropped["disk_full"] == 0:
                for _ in range(500):
                    assert c.predict(model.train[i % 100], die_id=i).decision
                    i += 1
                c.health()  # a round trip: every earlier answer has been tapped
                assert wait_flushed(plog)
                assert i < 200_000
            for _ in range(200):  # still answering, the log still dropping and counting
                assert c.predict(model.train[0], die_id=i).decision
                i += 1
        assert wait_flushed(plog, server)
        text = server.metrics.exposition().decode()
    st = os.statvfs(tiny_fs)
    assert st.f_blocks * st.f_frsize <= 1 << 20
    assert _metric(text, 'edgefleet_predlog_dropped_total{reason="disk_full"}') > 0
    # what is on disk is whole records: every ring reads back to its end without a torn one
    for name in ("predictions", "capture"):
        ring_bytes = sum(p.stat().st_size for p in (tiny_fs / "log" / name).glob("*.seg"))
        recs = _records(tiny_fs / "log" / name)
        assert sum(RECORD.size + len(p) for _, p in recs) == ring_bytes


def test_capture_stays_within_its_size_cap(model, tmp_path):
    with logged_agent(model, tmp_path / "log", capture_rate=1.0, capture_max_bytes=40_000,
                      segment_bytes=8192, min_free_bytes=0, fsync_interval_s=0.0) as (
            server, plog):
        with Client(server.path) as c:
            for i in range(2000):
                c.predict(model.train[i % 100], die_id=i)
        assert wait_flushed(plog, server)
        plog.flush()
        assert plog.capture.disk_bytes() <= 40_000 + 10_000  # the cap plus the active segment
        assert plog.records["capture"] == 2000


def test_proxy_metrics_per_model_before_any_label(tmp_path):
    """Fail rate, margin and confidence distributions per model digest; the margin PSI against
    the build's reference only for a bundle that ships one."""
    from agent.predlog import MARGIN_EDGES

    ref = {"edges": list(MARGIN_EDGES), "proportions": [0.0] * 3 + [1.0] + [0.0] * 10}
    m = build_model(tmp_path, *make_keys(tmp_path), n_features=N,
                    evaluation={"kind": "test", "score_margin_reference": ref})
    x = m.train[:50].copy()
    x[:5] += 50.0
    with logged_agent(m, tmp_path / "log") as (server, plog):
        with Client(server.path) as c:
            c.predict_batch(x, np.arange(50, dtype=np.uint64))
        assert wait_flushed(plog, server)
        text = server.metrics.exposition().decode()
    digest = plog.models.models[0].digest

    def decisions(d: str) -> float:
        return _metric(text, f'edgefleet_model_decisions_total{{decision="{d}",digest="{digest}",'
                             'source="model"}')

    assert decisions("fail") >= 5 and decisions("fail") + decisions("pass") == 50
    assert _metric(text, f'edgefleet_model_score_margin_total{{digest="{digest}",upper="+Inf"}}'
                   ) >= 5
    assert _metric(text, f'edgefleet_model_score_psi{{digest="{digest}"}}') > 1.0


# ---------------------------------------------------------------------------- the block format

_answers = st.lists(st.tuples(
    st.one_of(st.integers(0, 2**64 - 1), st.text(max_size=40)),  # die id: numeric or text
    st.booleans(),  # fail
    st.floats(width=32, allow_nan=True), st.integers(0, 3),  # score, model
    st.lists(st.tuples(st.integers(0, 511), st.floats(width=32, allow_nan=False)),
             max_size=4)), max_size=30)  # a fail's top contributions


@settings(max_examples=100, deadline=None)
@given(_answers)
def test_a_block_reads_back_every_answer_it_was_built_from(answers):
    from agent.predformat import NUMERIC_ID, ROW, block_count, decode_block, encode_block

    rows = np.zeros(len(answers), ROW)
    text, tops = [], []
    for i, (die, fail, score, model, top) in enumerate(answers):
        if isinstance(die, int):
            rows[i]["die_num"], rows[i]["die_len"] = die, NUMERIC_ID
        else:
            text.append(die.encode())
            rows[i]["die_len"] = len(text[-1])
        rows[i]["decision"], rows[i]["score"], rows[i]["model"] = int(fail), score, model
        if fail:
            tops.append(top)
    k = max((len(t) for t in tops), default=0)
    top_i = np.full((len(tops), k), -1, np.int32)
    top_c = np.zeros((len(tops), k), np.float32)
    for r, t in enumerate(tops):
        top_i[r, :len(t)] = [i for i, _ in t]
        top_c[r, :len(t)] = [c for _, c in t]
    payload = encode_block(rows, top_i, top_c, b"".join(text))
    assert block_count(payload) == len(answers)
    got = decode_block(payload)
    assert [g["die_id"] for g in got] == [str(a[0]) for a in answers]
    assert [g["decision"] for g in got] == ["fail" if a[1] else "pass" for a in answers]
    assert [g["model"] for g in got] == [a[3] for a in answers]
    np.testing.assert_array_equal([g["score"] for g in got],
                                  np.array([a[2] for a in answers], np.float32))
    assert [[t["index"] for t in g["top"]] for g in got if g["decision"] == "fail"] == [
        [i for i, _ in t] for t in tops]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), st.text(min_size=250, max_size=300)),
                min_size=1, max_size=8))  # short ids, and ids past 255 bytes (cut)
def test_json_text_die_ids_are_read_alike_whether_or_not_every_id_is_text(dies):
    """The writer reads a run of JSON answers whose ids are all strings list by list; the same
    as one by one (a None among them takes that way: one more id, at the end)."""
    from agent.predlog import _json_ids

    every = _json_ids(dies)
    assert every == tuple(part[:len(dies)] for part in _json_ids([*dies, None]))
    assert every[0] == [0] * len(dies) and all(len(t) <= 255 for t in every[2])


def test_a_ring_of_blocks_numbers_answers_and_reads_from_inside_a_block(tmp_path):
    count = len  # a payload of n bytes holds n items
    ring = SegmentRing(tmp_path / "r", RingConfig(min_free_bytes=0), count=count)
    assert ring.append([b"abc", b"de"], [3, 2]) == 0 and ring.next_seq == 5
    ring.close()
    ring = SegmentRing(tmp_path / "r", RingConfig(min_free_bytes=0), count=count)
    assert ring.next_seq == 5  # reopened: the sequence continues after the last block's items
    assert ring.append([b"f"], [1]) == 5
    assert [s for s, _ in read_ring(tmp_path / "r", 1, count=count).records] == [0, 3, 5]
    assert [s for s, _ in read_ring(tmp_path / "r", 3, count=count).records] == [3, 5]
    batch = read_ring(tmp_path / "r", 4, max_records=1, count=count)
    assert batch.records == [(3, b"de")] and batch.next_cursor == 5  # capped in items


def test_the_queue_is_capped_in_bytes_too(model, tmp_path):
    """A JSON batch's line is copied when one of its rows is captured: hundreds of kB each.
    Beyond `queue_bytes` messages are dropped and counted, whatever their number."""
    rows = [{"die_id": f"D{i}", "params": model.train[i].tolist()} for i in range(64)]
    with logged_agent(model, tmp_path / "log", capture_rate=1.0, queue_bytes=100_000,
                      flush_interval_s=3600) as (server, plog):
        with Client(server.path) as c:
            for _ in range(20):
                c.request(rows)
        wait_for(lambda: plog.tapper.dropped + plog.tapper.waiting() == 20)
        queued = plog.tapper.waiting()
        assert 1 <= queued < 20 and plog.tapper.dropped == 20 - queued
        plog.flush()
        assert plog.records["predictions"] == 64 * queued
        assert plog._in_bytes == plog._out_bytes  # nothing queued, nothing counted twice


def test_a_log_directory_of_an_older_format_is_set_aside_not_misread(model, tmp_path):
    old = tmp_path / "log" / "predictions"
    old.mkdir(parents=True)
    (old / f"{0:020d}.seg").write_bytes(b"records of the first format")
    with logged_agent(model, tmp_path / "log") as (server, plog):
        with Client(server.path) as c:
            c.predict(model.train[0], die_id=5)
        assert wait_flushed(plog, server)
    assert [p["die_id"] for _, p in _predictions(old)] == ["5"]
    kept = [p for p in (tmp_path / "log").iterdir() if p.name.startswith("predictions.v1-")]
    assert len(kept) == 1 and (kept[0] / f"{0:020d}.seg").read_bytes().startswith(b"records")
