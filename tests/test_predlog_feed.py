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
