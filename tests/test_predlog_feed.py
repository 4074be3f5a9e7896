"""The writer's reading of the tap's byte stream (agent/predlog.py `PredictionLog.feed`): a
stream read in pieces cut anywhere - inside a message's head, its answer, its extra - is
logged exactly as the same stream read at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.client import Client
from agent.predlog import PredictionLog, PredLogConfig, plug_in
from agent.segring import read_ring
from tests.agent_support import build_model, make_keys, running_agent, wait_for

N = 8


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> bytes:
    """A real tap stream: a model's announcement, binary and JSON single rows and batches,
    passes and fails (every fail and a quarter of the rest sampled)."""
    d = tmp_path_factory.mktemp("feed")
    model = build_model(d, *make_keys(d), n_features=N)
    x = model.train[:40].copy()
    x[::5] += 50.0
    with running_agent(model) as server:
        plog = PredictionLog(PredLogConfig(directory=d / "tap", min_free_bytes=0,
                                           capture_rate=0.25), server.runtime)
        plug_in(server, plog)
        with Client(server.path) as c:
            for i in range(10):
                c.predict(x[i], die_id=i)
                c.predict_json(x[10 + i], die_id=f"J{i}")
            c.predict_batch(x[20:30], np.arange(20, 30, dtype=np.uint64))
            c.request([{"die_id": f"B{i}", "params": r.tolist()} for i, r in enumerate(x[30:])])
        wait_for(lambda: plog.tapper.waiting() == 22)
        parts, n = plog.tapper.take()
    assert n == 22
    return b"".join(bytes(p) for p in parts)


def _log(directory: Path, pieces: list[bytes]) -> tuple:
    """What a log fed `pieces` writes, and the bytes it counts queued after its pass (0)."""
    plog = PredictionLog(PredLogConfig(directory=directory, min_free_bytes=0),
                         clock=lambda: 5000.0)
    for piece in pieces:
        plog.feed(piece)
    assert plog.queued_bytes() > 0
    plog.flush()
    queued_after = plog.queued_bytes()
    written = (read_ring(directory / "predictions", 0, 10**9, 1 << 40).records,
               read_ring(directory / "capture", 0, 10**9, 1 << 40).records,
               plog.snapshot()["stats"], plog.records)
    plog.stop()
    return written, queued_after


@pytest.mark.parametrize("step", [1, 3, 29, 97, 1000])
def test_a_stream_read_in_pieces_is_logged_as_read_at_once(stream, tmp_path, step):
    whole, left = _log(tmp_path / "whole", [stream])
    assert whole[3]["predictions"] == 10 + 10 + 10 + 10 and whole[3]["capture"] >= 8
    assert left == 0
    cut = [stream[i:i + step] for i in range(0, len(stream), step)]
    assert _log(tmp_path / "cut", cut) == (whole, 0)


def _json_log(directory: Path, answers: list[bytes]) -> list[dict]:
    from agent.predlog import read_predictions
    from agent.predlog_tap import JSON_ONE, MSG

    plog = PredictionLog(PredLogConfig(directory=directory, min_free_bytes=0))
    plog.feed(b"".join(MSG.pack(JSON_ONE, 1, 0, 1000.0 + i, len(a), 0) + a
                       for i, a in enumerate(answers)))
    plog.flush()
    plog.stop()
    return [p for _, p in read_predictions(directory / "predictions", 0)[1]]


def test_json_answers_read_alike_whole_or_with_fields_missing(tmp_path):
    """A run of whole answers is read field by field at once; a run with an answer missing a
    field (or one without a decision, which is not logged) is read answer by answer, a missing
    threshold or confidence as 0, a missing source as the fallback's: the whole answers are
    logged the same either way."""
    whole = [b'{"id":1,"die_id":"D1","decision":"pass","score":0.5,"threshold":1.25,'
             b'"confidence":0.125,"source":"model","top":[]}',
             b'{"id":2,"die_id":7,"decision":"fail","score":3.5,"threshold":1.25,'
             b'"confidence":0.75,"source":"fallback","top":[{"index":2,"contribution":1.5}]}']
    odd = [b'{"id":3,"decision":"fail","score":null}', b'{"id":4,"ok":true}']
    fast = _json_log(tmp_path / "whole", whole)
    slow = _json_log(tmp_path / "odd", whole + odd)
    assert len(fast) == 2 and slow[:2] == fast
    assert [(p["die_id"], p["decision"], p["source"], p["threshold"], p["confidence"])
            for p in slow] == [("D1", "pass", "model", 1.25, 0.125),
                               ("7", "fail", "fallback", 1.25, 0.75),
                               ("", "fail", "fallback", 0.0, 0.0)]
    assert np.isnan(slow[2]["score"]) and slow[1]["top"][0]["index"] == 2
