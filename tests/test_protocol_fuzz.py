"""Fuzzing the agent: random bytes and random JSON into the request handler (hypothesis), and a
timed run of garbage, mutated frames and abandoned connections against a live agent while a
watchdog client checks that it keeps answering. EDGEFLEET_FUZZ_SECONDS sets the live run's
length (CI default 2 s, and at least MIN_SENT messages however slow the machine; run minutes
locally: EDGEFLEET_FUZZ_SECONDS=300 pytest -k live); EDGEFLEET_FUZZ_SEED its seed (fixed by
default)."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.client import Client
from agent.dispatch import Dispatcher
from agent.labels import encode_label_frame
from agent.metrics import AgentMetrics
from agent.protocol import HEADER_SIZE, MAGIC, ErrorCode, encode_predict
from agent.runtime import Runtime
from tests.agent_support import build_model, make_keys, running_agent
from tests.conftest import examples

N = 8
FUZZ_SECONDS = float(os.environ.get("EDGEFLEET_FUZZ_SECONDS", "2"))
MIN_SENT = 40  # the live run goes on past FUZZ_SECONDS until this many messages were sent
HUNG_S = 5.0  # an answer slower than this is a hang, not a busy machine


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    return build_model(d, *make_keys(d), n_features=N)


@pytest.fixture(scope="module")
def dispatcher(model):
    runtime = Runtime()
    runtime.swap(model.engine(), model.manifest)
    return Dispatcher(runtime, AgentMetrics(runtime))


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(10**40), 10**40),
                      st.floats(), st.text(max_size=6))
json_any = st.recursive(json_leaf, lambda c: st.one_of(
    st.lists(c, max_size=N + 2), st.dictionaries(
        st.sampled_from(["op", "id", "die_id", "params", "feature_names", "x"]), c, max_size=4)),
    max_leaves=40)
FUZZ = settings(max_examples=examples(400), deadline=None, suppress_health_check=list(HealthCheck))


def _one_json_line(answer: bytes):
    assert answer.endswith(b"\n") and answer.count(b"\n") == 1
    return json.loads(answer)


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_as_a_json_line_always_get_one_json_answer(dispatcher, data):
    answer = _one_json_line(dispatcher.json_line(data.replace(b"\n", b" "), time.perf_counter()))
    assert isinstance(answer, (dict, list))


@FUZZ
@given(json_any)
def test_random_json_always_gets_one_json_answer(dispatcher, obj):
    line = json.dumps(obj, allow_nan=True).encode()  # NaN/Infinity literals too: refused
    answer = _one_json_line(dispatcher.json_line(line, time.perf_counter()))
    if isinstance(obj, list) and isinstance(answer, list):
        assert len(answer) == len(obj)
    assert dispatcher.metrics._errors[ErrorCode.INTERNAL] == 0


@FUZZ
@given(st.lists(st.one_of(st.none(), st.floats(width=32), st.integers(-5, 5)), min_size=N,
                max_size=N), st.one_of(st.none(), st.text(max_size=5), st.integers()))
def test_any_row_of_numbers_and_nulls_gets_a_decision_or_a_named_error(dispatcher, params,
                                                                       die_id):
    line = json.dumps({"die_id": die_id, "params": params}).encode()
    answer = _one_json_line(dispatcher.json_line(line, time.perf_counter()))
    if "error" in answer and answer["error"]["code"] == "bad_json":  # Infinity/NaN literals
        assert any(v is not None and not np.isfinite(v) for v in params)
        return
    assert answer["die_id"] == die_id
    if "error" in answer:
        assert answer["error"]["code"] in ("not_finite", "too_many_missing")
    else:
        assert answer["decision"] in ("pass", "fail") and answer["imputed"] == sum(
            v is None for v in params)


# ---------------------------------------------------------------------------- live


def _garbage(rng: random.Random, model) -> bytes:
    kind = rng.randrange(9)
    x = model.train[rng.randrange(100):][: rng.randrange(1, 5)]
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 3000))
    if kind == 1:  # a valid frame, mutated
        frame = bytearray(encode_predict(x))
        for _ in range(rng.randrange(1, 4)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
        return bytes(frame)
    if kind == 2:  # a valid frame, truncated: the client then hangs up mid-frame
        frame = encode_predict(x)
        return frame[: rng.randrange(1, len(frame))]
    if kind == 3:  # a header promising a huge payload
        return MAGIC + bytes([1, 1, 0, 0]) + rng.randbytes(16)
    if kind == 4:  # random JSON-ish text
        pieces = ['{"params":', "[", "]", "null", "1e999", '"x"', ",", "{", "}", '"op":',
                  '"info"', "true", str(rng.random()), "\n"]
        return "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 60))).encode()
    if kind == 5:  # valid requests with wrong values
        params = [rng.choice([None, 1.0, -1e30, "a", True, 1e39]) for _ in range(N)]
        return (json.dumps({"id": rng.random(), "params": params}) + "\n").encode()
    if kind == 6:  # a valid frame and a valid line: must be answered
        return encode_predict(x) + (json.dumps({"params": x[0].tolist()}) + "\n").encode()
    if kind == 7:  # a LABEL frame or a label line, mutated
        if rng.random() < 0.5:
            return (json.dumps({"op": "label", "die_id": rng.choice([1, "a", None, -1]),
                                "label": rng.choice(["pass", "fail", 2, None])}) + "\n").encode()
        frame = bytearray(encode_label_frame([rng.randrange(2**63)], [rng.randrange(2)]))
        frame[rng.randrange(len(frame))] = rng.randrange(256)
        return bytes(frame)
    return b"\x89" * rng.randrange(1, 40)  # magic bytes alone


@pytest.mark.timeout(FUZZ_SECONDS + 180)
def test_live_fuzz_finds_no_crash_and_no_hang(model, caplog):
    caplog.set_level(logging.ERROR, "edgefleet.agent")
    seed = int(os.environ.get("EDGEFLEET_FUZZ_SEED", "20261204"))
    deadline = time.monotonic() + FUZZ_SECONDS
    problems: list[str] = []
    sent = [0]

    def going() -> bool:
        """The time asked for, then on until MIN_SENT messages (a minute more at most: an
        agent that takes none fails the count below)."""
        now = time.monotonic()
        return now < deadline or (sent[0] < MIN_SENT and now < deadline + 60)

    with running_agent(model, io_timeout_s=0.2, message_timeout_s=0.2, max_line_bytes=32_768,
                       max_frame_bytes=65_536) as agent:

        def fuzzer(k: int) -> None:
            rng = random.Random(seed + k)
            while going():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(0.5)
                try:
                    s.connect(str(agent.path))
                    for _ in range(rng.randrange(1, 6)):
                        s.sendall(_garbage(rng, model))
                        sent[0] += 1
                    if rng.random() < 0.5:
                        s.shutdown(socket.SHUT_WR)
                    while s.recv(65536):  # drain answers until the agent closes or goes quiet
                        pass
                except (TimeoutError, OSError):
                    pass
                finally:
                    s.close()

        def watchdog() -> None:
            with Client(agent.path, timeout=2 * HUNG_S) as c:
                x = model.train[0]
                expected = c.predict(x).score
                while going():
                    t0 = time.monotonic()
                    try:
                        if c.predict(x).score != expected or not c.health()["ok"]:
                            problems.append("wrong answer")
                    except Exception as e:
                        problems.append(f"watchdog: {e!r}")
                        return
                    if time.monotonic() - t0 > HUNG_S:
                        problems.append(f"hung answer: {time.monotonic() - t0:.2f} s")

        threads = [threading.Thread(target=fuzzer, args=(k,)) for k in range(3)]
        threads.append(threading.Thread(target=watchdog))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=FUZZ_SECONDS + 120)
        assert not any(t.is_alive() for t in threads), "a client thread hung"
        with Client(agent.path) as c:
            assert c.predict(model.train[1]).source == "model"
        internal = agent.metrics._errors[ErrorCode.INTERNAL]
    assert problems == [], f"seed {seed}: {problems[:5]}"
    assert internal == 0 and "Traceback" not in caplog.text, f"seed {seed}"
    assert sent[0] >= MIN_SENT
    logging.getLogger(__name__).warning("live fuzz: %d messages in %.0f s, seed %d", sent[0],
                                        FUZZ_SECONDS, seed)


def test_header_size_is_what_the_docs_say():
    assert HEADER_SIZE == 24 and len(encode_predict(np.zeros((1, N), np.float32))) == 24 + 8 + 4 * N
