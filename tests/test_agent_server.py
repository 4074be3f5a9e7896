"""The agent on a real Unix socket with a real model: both encodings, every kind of bad input,
many clients, slow and broken clients, the socket file, and swapping models under load."""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import stat
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from agent.client import AgentError, Client
from agent.config import AgentConfig
from agent.protocol import HEADER_SIZE, MAGIC, ErrorCode, decode_answer_frame, encode_predict
from agent.runtime import Runtime
from agent.server import AgentServer, ServerError
from tests.agent_support import build_model, make_keys, running_agent, short_tmp, wait_for

N = 16


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def model(tmp_path_factory, keys):
    return build_model(tmp_path_factory.mktemp("model"), *keys, n_features=N)


@pytest.fixture
def agent(model):
    with running_agent(model) as srv:
        yield srv


def _raw(path: Path, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


def _line(s: socket.socket) -> dict | list:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        assert chunk, "agent closed the connection"
        data += chunk
    return json.loads(data)


def _frame(s: socket.socket):
    data = b""
    while len(data) < HEADER_SIZE or len(data) < HEADER_SIZE + struct.unpack_from(
            "<I", data, 20)[0]:
        chunk = s.recv(65536)
        assert chunk, "agent closed the connection"
        data += chunk
    return decode_answer_frame(data[:HEADER_SIZE], data[HEADER_SIZE:])


class _Stream:
    """Answers read off one socket, keeping what arrives early (pipelined answers)."""

    def __init__(self, s: socket.socket) -> None:
        self.s, self.data = s, b""

    def _more(self) -> None:
        chunk = self.s.recv(65536)
        assert chunk, "agent closed the connection"
        self.data += chunk

    def line(self):
        while b"\n" not in self.data:
            self._more()
        line, _, self.data = self.data.partition(b"\n")
        return json.loads(line)

    def frame(self):
        while len(self.data) < HEADER_SIZE or len(self.data) < HEADER_SIZE + struct.unpack_from(
                "<I", self.data, 20)[0]:
            self._more()
        size = HEADER_SIZE + struct.unpack_from("<I", self.data, 20)[0]
        frame, self.data = self.data[:size], self.data[size:]
        return decode_answer_frame(frame[:HEADER_SIZE], frame[HEADER_SIZE:])


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


# ---------------------------------------------------------------------------- answers


def test_binary_row_answer_matches_the_model_and_manifest(agent, model):
    engine = model.engine()
    x = model.train[:1].copy()
    x[0, 3] += 5.0  # far out: a fail with parameter 3 on top
    expected = float(engine.predict(x).score[0])
    with Client(agent.path) as c:
        r = c.predict(x[0], die_id=2**64 - 1)
    m = model.manifest
    assert r.die_id == 2**64 - 1 and r.decision == "fail" and r.source == "model"
    assert r.score == pytest.approx(expected, rel=1e-6)
    assert r.threshold == pytest.approx(m.threshold, rel=1e-6)
    assert r.confidence == pytest.approx(1 - math.exp(-abs(expected - m.threshold)
                                                      / m.confidence_scale), rel=1e-5)
    assert r.top[0][0] == 3 and len(r.top) == m.top_k
    assert r.model_version == m.version and r.imputed == 0 and r.latency_us > 0


def test_a_passing_die_has_no_top_parameters(agent, model):
    with Client(agent.path) as c:
        r = c.predict(model.train[5])
    assert r.decision == "pass" and r.top == () and r.confidence >= 0


def test_a_single_die_with_missing_and_infinite_values_is_refused_naming_the_infinite_one(
        agent, model):
    x = model.train[7].copy()
    x[1] = np.nan
    x[6] = -np.inf
    with Client(agent.path) as c, pytest.raises(AgentError) as e:
        c.predict(x)
    assert e.value.code == "not_finite" and "params[6]" in str(e.value)


def test_binary_batch_answers_each_row_in_order_with_its_own_errors(agent, model):
    x = model.train[:6].copy()
    x[1, 2] = np.nan  # imputed
    x[2, 7] = np.inf  # refused, naming column 7
    x[3, :5] = np.nan  # 5 of 16 missing: over the default 20% share
    with Client(agent.path) as c:
        b = c.predict_batch(x, np.arange(100, 106, dtype=np.uint64))
    rs = b.results()
    assert [r.die_id for r in rs] == list(range(100, 106))
    assert rs[1].decision == "pass" and rs[1].imputed == 1
    assert rs[2].error == "not_finite" and "params[7]" in rs[2].message
    assert rs[3].error == "too_many_missing" and rs[3].decision == "error"
    assert all(r.source == "model" for r in (rs[0], rs[1], rs[4], rs[5]))
    assert b.model_sequence == model.manifest.sequence


def test_json_answer_echoes_ids_and_counts_imputed_values(agent, model):
    params = model.train[0].tolist()
    params[4] = None
    with Client(agent.path) as c:
        a = c.request({"id": "req-1", "die_id": "W3-12-07", "params": params})
    assert a["id"] == "req-1" and a["die_id"] == "W3-12-07" and a["imputed"] == 1
    assert a["decision"] == "pass" and a["source"] == "model" and a["top"] == []
    assert a["model_version"] == model.manifest.version and a["latency_us"] > 0
    # the model is named as the fleet names it: sequence and the bundle's sha256
    assert a["model_sequence"] == model.manifest.sequence
    assert a["model_digest"] == hashlib.sha256(model.bundle.read_bytes()).hexdigest()
    assert set(a) == {"id", "die_id", "decision", "score", "threshold", "confidence", "source",
                      "model_version", "model_sequence", "model_digest", "imputed", "top",
                      "latency_us"}


def test_json_fail_names_the_top_parameters(agent, model):
    params = model.train[0].tolist()
    params[9] = 50.0
    with Client(agent.path) as c:
        a = c.request({"id": 1, "params": params})
    assert a["decision"] == "fail" and a["top"][0]["index"] == 9
    assert a["top"][0]["name"] == "p009" and a["top"][0]["contribution"] > 0


def test_json_batch_answers_one_line_in_the_same_order(agent, model):
    good = model.train[0].tolist()
    batch = [{"id": 1, "params": good}, {"id": 2, "params": good[:3]},
             {"id": 3, "params": [*good[:-1], "x"]}, {"id": 4, "params": good}]
    with Client(agent.path) as c:
        answers = c.request(batch)
    assert [a["id"] for a in answers] == [1, 2, 3, 4]
    assert answers[1]["error"]["code"] == "bad_width"
    assert answers[2]["error"] == {"code": "bad_value", "field": "params", "index": N - 1,
                                   "message": answers[2]["error"]["message"]}
    assert "[2].params[15]" in answers[2]["error"]["message"]
    assert answers[0]["score"] == answers[3]["score"]


def test_health_and_info_describe_the_model(agent, model):
    with Client(agent.path) as c:
        h = c.health()
        i = c.info(feature_names=True)
    assert h["ok"] and h["status"] == "ok" and h["model_version"] == model.manifest.version
    assert i["model"]["sequence"] == model.manifest.sequence
    assert i["model"]["digest"] == hashlib.sha256(model.bundle.read_bytes()).hexdigest()
    assert i["model"]["model_sha256"] == model.manifest.model_digest
    assert h["model_sequence"] == model.manifest.sequence
    assert h["model_digest"] == i["model"]["digest"]
    assert i["n_features"] == N and i["threshold"] == model.manifest.threshold
    assert i["feature_names"][0] == "p000" and i["uptime_s"] >= 0 and i["ready"]


def test_both_encodings_interleave_on_one_connection(agent, model):
    s = _raw(agent.path)
    x = model.train[:1]
    line = json.dumps({"id": 7, "params": x[0].tolist()}).encode() + b"\n"
    s.sendall(encode_predict(x, tag=1) + line + b"\r\n" + encode_predict(x, tag=2) + line)
    answers = _Stream(s)
    a1 = answers.frame()
    j1 = answers.line()
    a2 = answers.frame()
    j2 = answers.line()
    assert (a1.tag, a2.tag, j1["id"], j2["id"]) == (1, 2, 7, 7)
    assert a1.records["score"][0] == pytest.approx(j1["score"], rel=1e-6)
    s.close()


@pytest.mark.parametrize("together", [True, False])
def test_a_big_batch_on_the_worker_is_answered_before_the_dies_sent_after_it(agent, model,
                                                                             together):
    """A lone connection: a batch of more rows than the loop answers itself (BIG_ROWS, on the
    worker thread) and single dies right behind it, sent with it or just after: the answers
    come in the order sent (the loop reads nothing more from the connection meanwhile)."""
    from agent.server import BIG_ROWS

    s = _raw(agent.path)
    big = encode_predict(model.train[:BIG_ROWS + 1], tag=1)
    small = [encode_predict(model.train[i:i + 1], tag=2 + i) for i in range(3)]
    line = json.dumps({"id": 9, "params": model.train[0].tolist()}).encode() + b"\n"
    if together:
        s.sendall(big + b"".join(small) + line)
    else:
        s.sendall(big)
        for frame in small:
            s.sendall(frame)
        s.sendall(line)
    answers = _Stream(s)
    first = answers.frame()
    assert first.tag == 1 and len(first.records) == BIG_ROWS + 1
    assert [answers.frame().tag for _ in small] == [2, 3, 4]
    assert answers.line()["id"] == 9
    s.close()


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("line", "code", "needle"), [
    (b'{"params": [1, 2', "bad_json", "not valid JSON"),
    (b'{"op": "reboot"}', "unknown_op", "op: expected one of"),
    (b'{"params": [1, 2]}', "bad_width", "expected 16 values, found 2"),
    (b'{"params": ' + json.dumps(["a"] * N).encode() + b"}", "bad_value", "params[0]"),
    (b'{"params": ' + json.dumps([None] * N).encode() + b"}", "too_many_missing", "16 of 16"),
    (b'{"params": ' + json.dumps([1e39] + [1.0] * (N - 1)).encode() + b"}", "not_finite",
     "params[0]"),
    (b'"just a string"', "bad_request", "expected an object or an array"),
])
def test_bad_json_requests_get_an_error_answer_and_the_connection_stays(agent, model, line,
                                                                        code, needle):
    s = _raw(agent.path)
    s.sendall(line + b"\n")
    answer = _line(s)
    assert answer["error"]["code"] == code and needle in answer["error"]["message"]
    s.sendall(b'{"op": "health"}\n')
    assert _line(s)["ok"] is True
    s.close()


def test_wrong_width_frame_is_refused_and_the_connection_stays(agent, model):
    s = _raw(agent.path)
    s.sendall(encode_predict(np.zeros((1, N + 1), np.float32), tag=5))
    with pytest.raises(Exception) as e:
        _frame(s)
    assert e.value.code == ErrorCode.BAD_WIDTH and "expected 16" in e.value.message
    s.sendall(encode_predict(model.train[:1], tag=6))
    assert _frame(s).tag == 6
    s.close()


def test_unparseable_frame_header_gets_an_error_then_the_connection_closes(agent):
    s = _raw(agent.path)
    s.sendall(MAGIC + bytes([1, 1, 0, 0]) + struct.pack("<IIII", 0, 1, N, 7))  # bad length
    with pytest.raises(Exception) as e:
        _frame(s)
    assert e.value.code == ErrorCode.BAD_FRAME and "length" in e.value.message
    assert _closed(s)


def test_oversized_frame_and_line_are_refused_and_closed(model):
    with running_agent(model, max_frame_bytes=4096, max_line_bytes=2048) as agent:
        s = _raw(agent.path)
        s.sendall(encode_predict(np.zeros((100, N), np.float32))[:HEADER_SIZE])
        with pytest.raises(Exception) as e:
            _frame(s)
        assert e.value.code == ErrorCode.TOO_LARGE and _closed(s)
        s = _raw(agent.path)
        s.sendall(b"{" + b" " * 5000)  # no newline yet, already too long
        assert _line(s)["error"]["code"] == "too_large" and _closed(s)
        with Client(agent.path) as c:  # everyone else is still served
            assert c.predict(model.train[0]).decision == "pass"


def test_a_client_that_hangs_up_mid_frame_is_counted_and_others_are_served(agent, model):
    s = _raw(agent.path)
    s.sendall(encode_predict(model.train[:3])[:100])
    s.close()
    with Client(agent.path) as c:
        assert c.predict(model.train[0]).source == "model"
    wait_for(lambda: agent.metrics._errors[ErrorCode.INCOMPLETE] == 1)


def test_a_garbage_flood_gets_errors_and_never_stalls_other_clients(agent, model):
    rng = np.random.default_rng(0)
    junk = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes().replace(b"\x89", b"\x88")
    s = _raw(agent.path)
    t = threading.Thread(target=lambda: s.sendall(junk + b"\n"), daemon=True)
    t.start()
    with Client(agent.path) as c:
        for _ in range(20):
            assert c.predict(model.train[0]).decision == "pass"
    t.join(timeout=10)
    data = b""
    while b"\n" not in data:
        data += s.recv(65536)
    first = json.loads(data.split(b"\n")[0])
    assert first["error"]["code"] in ("bad_json", "too_large")
    s.close()


def test_a_stalled_half_frame_does_not_block_other_clients_and_times_out(model):
    half = encode_predict(model.train[:1])[:HEADER_SIZE + 10]
    # an agent that waited for the stalled client would answer no one for a minute, past the
    # other client's timeout: no timing of ours decides this
    with running_agent(model, message_timeout_s=60) as agent:
        stalled = _raw(agent.path)
        stalled.sendall(half)
        with Client(agent.path, timeout=20) as c:
            for _ in range(50):
                c.predict(model.train[0])
        stalled.setblocking(False)
        with pytest.raises(BlockingIOError):  # still open, waiting for the rest
            stalled.recv(1)
        stalled.close()
    with running_agent(model, message_timeout_s=0.3) as agent:
        stalled = _raw(agent.path)
        stalled.sendall(half)
        wait_for(lambda: _closed(stalled), timeout=10)


def test_a_client_that_never_reads_answers_does_not_stall_others(model):
    with running_agent(model, io_timeout_s=0.5) as agent:
        hog = _raw(agent.path)
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        frame = encode_predict(model.train[:64])
        stop = threading.Event()

        def flood():
            try:
                while not stop.is_set():
                    hog.sendall(frame)
            except OSError:
                pass

        threading.Thread(target=flood, daemon=True).start()
        with Client(agent.path) as c:
            for _ in range(50):
                assert c.predict(model.train[0]).source == "model"
        stop.set()
        hog.close()


# ---------------------------------------------------------------------------- many clients


def test_eight_clients_at_once_each_get_their_own_answers(agent, model):
    errors: list[str] = []
    engine = model.engine()
    expected = engine.predict(model.train[:40]).score

    def client(k: int) -> None:
        try:
            with Client(agent.path) as c:
                for i in range(40):
                    r = c.predict(model.train[i], die_id=k * 1000 + i)
                    if r.die_id != k * 1000 + i or abs(r.score - expected[i]) > 1e-5:
                        errors.append(f"client {k} row {i}: {r}")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []


def test_connections_beyond_the_limit_are_told_busy(model):
    with running_agent(model, max_connections=2) as agent:
        a, b = Client(agent.path), Client(agent.path)
        a.health()
        b.health()
        s = _raw(agent.path)
        assert _line(s)["error"]["code"] == "busy"
        a.close()
        wait_for(lambda: agent.metrics.connections_active._value.get() <= 1)
        with Client(agent.path) as c:
            assert c.health()["ok"]
        b.close()


def test_swap_under_load_drops_no_request(tmp_path, keys, model):
    v2 = build_model(tmp_path, *keys, n_features=N, version="2.0.0", sequence=2)
    seen: list[str | None] = []
    failures: list[str] = []
    stop = threading.Event()
    with running_agent(model) as agent:
        def stream():
            with Client(agent.path) as c:
                while not stop.is_set():
                    b = c.predict_batch(model.train[:8])
                    if any(r.error for r in b.results()):
                        failures.append("error answer")
                    seen.append(b.model_version)

        t = threading.Thread(target=stream)
        t.start()
        wait_for(lambda: len(seen) > 20)
        agent.runtime.swap(v2.engine(), v2.manifest)
        wait_for(lambda: seen[-1] == "2.0.0")
        n = len(seen)
        wait_for(lambda: len(seen) > n + 20)
        stop.set()
        t.join(timeout=10)
    switch = seen.index("2.0.0")
    assert failures == [] and set(seen[:switch]) == {"1.0.0"} and set(seen[switch:]) == {"2.0.0"}


# ---------------------------------------------------------------------------- socket file


def test_socket_file_mode_defaults_to_0660_and_is_configurable(model):
    with running_agent(model) as agent:
        assert stat.S_IMODE(os.stat(agent.path).st_mode) == 0o660
    with running_agent(model, socket_mode=0o600, socket_group=_my_group()) as agent:
        st = os.stat(agent.path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == os.getgid()


def _my_group() -> str:
    import grp

    return grp.getgrgid(os.getgid()).gr_name


def test_a_stale_socket_file_is_replaced_and_a_live_one_is_refused(model):
    with short_tmp() as d:
        path = d / "agent.sock"
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))
        stale.close()  # the file stays, nobody listens: what a crash leaves behind
        cfg = AgentConfig(socket=path, metrics_addr="")
        with AgentServer(cfg, Runtime()):
            with Client(path) as c:
                assert c.health()["status"] == "unavailable"
            with pytest.raises(ServerError, match="another process is listening"):
                AgentServer(cfg, Runtime()).start()
        assert not path.exists()  # removed on stop


def test_a_path_that_is_not_a_socket_is_never_replaced():
    with short_tmp() as d:
        path = d / "agent.sock"
        path.write_text("important")
        with pytest.raises(ServerError, match="not a socket"):
            AgentServer(AgentConfig(socket=path, metrics_addr=""), Runtime()).start()
        assert path.read_text() == "important"


def test_client_reports_an_agent_that_is_not_running():
    from agent.client import AgentUnreachable

    with short_tmp() as d, pytest.raises(AgentUnreachable, match="agent serve"):
        Client(d / "none.sock")


def test_refused_single_die_raises_with_the_code(agent):
    with Client(agent.path) as c, pytest.raises(AgentError) as e:
        c.predict(np.full(N, np.inf, dtype=np.float32))
    assert e.value.code == "not_finite"


# ---------------------------------------------------------------------------- model changes


def test_a_model_with_another_width_on_a_live_connection_is_named_and_reread(tmp_path, keys,
                                                                              model):
    """A rollout can change n_features under an open connection: the old width gets bad_width
    naming the model now answering, and the Python client re-reads info when an answer's
    sequence changes."""
    wide = build_model(tmp_path, *keys, n_features=N + 4, version="2.0.0", sequence=2)
    with running_agent(model) as agent, Client(agent.path) as c:
        assert c.described()["n_features"] == N
        assert c.predict(model.train[0]).model_version == "1.0.0" and c.model_sequence == 1
        agent.runtime.swap(wide.engine(), wide.manifest)
        with pytest.raises(AgentError) as e:
            c.predict(model.train[0])
        assert e.value.code == "bad_width" and "2.0.0, sequence 2" in str(e.value)
        a = c.predict_json(model.train[0])
        assert a["error"]["code"] == "bad_width" and "sequence 2" in a["error"]["message"]
        assert c.described()["n_features"] == N + 4  # dropped on bad_width, read again
        r = c.predict(wide.train[0])
        assert r.model_version == "2.0.0" and c.model_sequence == 2
        agent.runtime.swap(model.engine(), model.manifest)  # back to 1.0.0: seen in an answer
        assert c.predict_json(model.train[0])["model_sequence"] == 1
        assert c.model_sequence == 1 and c.described()["n_features"] == N


@pytest.mark.parametrize("bad", [{"id": [1]}, {"die_id": {"lot": 3}}, {"id": 1e400}])
def test_an_id_that_cannot_be_echoed_is_refused(agent, model, bad):
    line = json.dumps({"params": model.train[0].tolist(), **bad}).replace("Infinity", "1e400")
    with Client(agent.path) as c:
        a = json.loads(c.request_raw(line.encode() + b"\n"))
        batch = json.loads(c.request_raw(b"[" + line.encode() + b"," + json.dumps(
            {"id": 9, "params": model.train[0].tolist()}).encode() + b"]\n"))
        for op in ("health", "info"):
            other = json.loads(c.request_raw(json.dumps({"op": op, **bad}).replace(
                "Infinity", "1e400").encode() + b"\n"))
            assert other["error"]["code"] == "bad_request"
    key = next(iter(bad))
    assert a["error"]["code"] == "bad_request" and a["error"]["field"] == key
    assert a["id"] is None and a["die_id"] is None
    assert batch[0]["error"]["code"] == "bad_request" and batch[0]["error"]["message"].startswith(
        f"[0].{key}: expected a string, a number, true/false or null")
    assert batch[1]["id"] == 9 and batch[1]["decision"] == "pass"


def test_score_and_threshold_compare_in_float32_on_every_path(agent, model):
    """One row (compared in double by the agent) and batches (float32 in numpy) agree, and a
    client comparing the two float32 fields it gets finds the agent's decision."""
    thr32 = np.float32(model.manifest.threshold)
    with Client(agent.path) as c:
        one = c.predict(model.train[0])
        batch = c.predict_batch(model.train[:50]).records
        text = c.request_raw(json.dumps({"params": model.train[0].tolist()}).encode() + b"\n")
    assert np.float32(one.threshold) == thr32 and (batch["threshold"] == thr32).all()
    assert json.loads(text)["threshold"] == float(str(thr32))
    assert ((batch["score"] > batch["threshold"]) == (batch["decision"] == 1)).all()


def test_batch_answers_are_arrays_and_a_stream_keeps_their_order(agent, model):
    x = model.train[:40].copy()
    x[3, 2] = np.inf
    with Client(agent.path) as c:
        b = c.predict_batch(x, np.arange(500, 540, dtype=np.uint64))
        streamed = list(c.predict_stream((x[i:i + 8], np.arange(i, i + 8, dtype=np.uint64))
                                         for i in range(0, 40, 8)))
        assert c.health()["ok"]  # nothing left over on the connection
    assert isinstance(b.decision, np.ndarray) and b.die_id.tolist() == list(range(500, 540))
    assert b.counts() == {"pass": 39, "fail": 0, "error": 1, "fallback": 0}
    assert b.error_code[3] == ErrorCode.NOT_FINITE and len(b) == 40
    assert [s.die_id.tolist() for s in streamed] == [list(range(i, i + 8)) for i in range(0, 40, 8)]
    assert np.array_equal(np.concatenate([s.score for s in streamed]), b.score, equal_nan=True)


@pytest.mark.parametrize("widths", ["model", "one wrong", "model answers all"])
def test_single_rows_answered_together_get_the_answers_they_get_alone(agent, model, widths):
    """Single-row frames of several connections answered by one model run
    (`Dispatcher.frames`, what the server does with single rows that arrive together): every
    answer is the one its frame gets alone, byte for byte but for latency_ns, refused and
    failing dies among them (the general path, `score_batch`) or none (the lean path the
    model answers alone, `score_rows`); with a frame of the wrong width among them each is
    answered alone."""
    x = np.tile(np.linspace(0.9, 1.1, N, dtype=np.float32), (6, 1))
    x[1] += 5.0  # fails
    if widths != "model answers all":
        x[2, 3] = np.inf  # not_finite
        x[3, :N // 2] = np.nan  # too_many_missing
    x[4, 0] = np.nan  # imputed
    frames = [encode_predict(row, np.array([100 + i], np.uint64), tag=7 + i)
              for i, row in enumerate(x)]
    if widths == "one wrong":
        frames[5] = encode_predict(np.ones((1, N + 1), np.float32), tag=12)
    bufs = [bytearray(f) for f in frames]
    held = [(b, 0, 7 + i, struct.unpack_from("<I", b, 16)[0], 0.0) for i, b in enumerate(bufs)]
    counted = agent.dispatch.metrics.totals
    before = counted()
    together = agent.dispatch.frames(held)
    between = counted()
    alone = [agent.dispatch.frame(b, 0, tag, 1, cols, 0.0) for b, _, tag, cols, _ in held]
    after = counted()
    for b, m, a in zip(before, between, after, strict=True):  # the same metrics counted
        assert np.array_equal(np.subtract(m, b), np.subtract(a, m))
    assert len(together) == len(alone) == 6
    for a, b in zip(together, alone, strict=True):
        assert a[:24] + a[32:] == b[:24] + b[32:]  # bytes 24..32: latency_ns
    rec = [decode_answer_frame(a[:HEADER_SIZE], a[HEADER_SIZE:]).records[0] for a in together[:5]]
    assert [int(r["die_id"]) for r in rec] == [100, 101, 102, 103, 104]
    if widths == "model answers all":
        assert [int(r["decision"]) for r in rec] == [0, 1, 0, 0, 0]
        assert int(rec[1]["top_index"][0]) >= 0
    else:  # pass, fail, error, error, pass
        assert [int(r["decision"]) for r in rec] == [0, 1, 2, 2, 0]
        assert [int(r["error_code"]) for r in rec[2:4]] == [ErrorCode.NOT_FINITE,
                                                            ErrorCode.TOO_MANY_MISSING]
    assert int(rec[4]["imputed"]) == 1
