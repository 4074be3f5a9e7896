"""Shadow scoring on the device: counters compare the candidate's decisions with the live
model's on the same dies, the request path only queues (bounded, copied), a candidate that
raises is counted and never propagates, detach stops it."""

from __future__ import annotations

import dataclasses
import time
import tracemalloc

import numpy as np
import pytest

from agent.shadow import MARGIN_EDGES, ShadowCounters, ShadowScorer


@dataclasses.dataclass(eq=False)
class _M:
    threshold: float
    confidence_scale: float = 1.0
    name: str = "m"
    version: str = "1"
    sequence: int = 1
    model_digest: str = "ab" * 32
    n: int = 3

    @property
    def input(self):
        return type("I", (), {"n_features": self.n})()


class _Engine:
    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls = 0

    def predict(self, x):
        self.calls += 1
        return type("S", (), {"score": self.fn(x)})()


def test_counters_count_agreement_fail_rates_and_margins():
    c = ShadowCounters()
    live = np.array([0.5, 1.5, 2.5, 3.5])
    shadow = np.array([0.4, 2.6, 2.4, np.nan])
    c.add(live, shadow, _M(2.0), _M(2.5))
    doc = c.to_json()
    # dies 0,1,2 scored (3 is NaN -> an error); live fails {2}; shadow fails {1}
    assert (doc["dies"], doc["errors"], doc["live_fail"], doc["shadow_fail"]) == (3, 1, 1, 1)
    assert doc["agree"] == 1  # only die 0: pass/pass
    assert sum(doc["live_hist"]) == 3 and len(doc["live_hist"]) == len(MARGIN_EDGES) + 1
    # margins: live 0.5-2 = -1.5 -> bucket (-2,-1]; shadow 2.6-2.5 = 0.1 -> (0, 0.25]
    assert doc["live_hist"][MARGIN_EDGES.index(-1.0)] == 1
    assert doc["shadow_hist"][MARGIN_EDGES.index(0.25)] == 1


def test_scorer_scores_queued_rows_off_the_request_thread_and_detaches():
    s = ShadowScorer(interval_s=0.005, capacity_rows=64, batch_rows=16, max_rows_per_s=None)
    eng = _Engine(lambda x: x[:, 0] * 2)
    s.attach(eng, _M(1.0), digest="cd" * 32, model_id="2-x-abc")
    buf = np.zeros((4, 3), dtype=np.float32)
    live = _M(1.5)
    for i in range(50):
        buf[:] = i % 3  # the caller reuses its buffer: the scorer must have copied it
        while (s.summary()["pending"]) > 48:  # the ring wraps around meanwhile
            time.sleep(0.002)
        s.offer(buf, np.full(4, float(i % 3)), live)
    deadline = time.monotonic() + 5
    while (s.summary() or {}).get("dies", 0) < 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    doc = s.summary()
    assert doc["digest"] == "cd" * 32 and doc["model_id"] == "2-x-abc"
    # live fails when i%3 = 2 (score 2 > 1.5); shadow when 2*(i%3) > 1 -> i%3 in {1, 2}
    assert doc["agree"] == 4 * sum(1 for i in range(50) if i % 3 != 1)
    assert s.info()["version"] == "1"
    final = s.detach()
    assert final["dies"] == 200 and s.summary() is None and s.info() is None
    s.offer(buf, np.zeros(4), live)  # after detach: a no-op
    s.close()


def test_a_full_queue_drops_and_counts_and_a_raising_candidate_is_counted():
    s = ShadowScorer(threaded=False, capacity_rows=8, max_rows_per_s=None)
    s.attach(_Engine(lambda x: x[:, 0]), _M(1.0, n=2), digest="ef" * 32)
    live = _M(1.0, n=2)
    for _ in range(5):
        s.offer(np.zeros((4, 2), np.float32), np.zeros(4), live)
    assert s.summary()["dropped"] == 12 and s.summary()["pending"] == 8
    assert s.drain() == 8 and s.summary()["dies"] == 8
    s.offer(np.zeros((4, 2), np.float32), np.zeros(4), _M(1.0, n=2))  # another live model
    s.offer(np.zeros((2, 2), np.float32), np.zeros(2), live)  # and back: the 4 are dropped
    assert s.summary()["dropped"] == 16 and s.drain() == 2
    capped = ShadowScorer(threaded=False, max_rows_per_s=80)
    capped.attach(_Engine(lambda x: x[:, 0]), _M(1.0, n=2), digest="ef" * 32)
    for _ in range(5):
        capped.offer(np.zeros((4, 2), np.float32), np.zeros(4), live)
    assert capped.summary()["pending"] == 8 and capped.summary()["skipped"] == 12
    bad = ShadowScorer(threaded=False)

    def boom(x):
        raise RuntimeError("onnx said no")

    bad.attach(_Engine(boom), _M(1.0, n=2), digest="01" * 32)
    bad.score(np.zeros((3, 2), np.float32), np.zeros(3), _M(1.0))
    assert bad.summary()["errors"] == 3 and bad.summary()["dies"] == 0


def test_a_batch_bigger_than_a_rate_slice_still_contributes_rows():
    """At 500 rows/s a 0.1 s slice takes 50 rows: a 256-row batch (the CLI's default) gives
    50 rows of evidence and counts the rest as skipped, instead of being skipped whole."""
    s = ShadowScorer(threaded=False, max_rows_per_s=500)
    live = _M(1.0, n=2)
    s.attach(_Engine(lambda x: x[:, 0]), _M(1.0, n=2), digest="ef" * 32)
    s.offer(np.zeros((256, 2), np.float32), np.zeros(256), live)
    assert s.summary()["pending"] == 50 and s.summary()["skipped"] == 206
    assert s.drain() == 50 and s.summary()["dies"] == 50


@pytest.mark.parametrize("rows", [1, 64])
def test_offer_is_cheap_when_no_candidate_is_attached(rows: int):
    """Without a candidate an offer copies nothing and queues nothing: what it costs in time
    depends on the machine (bench/shadow_bench.py measures the live latency with and without
    a candidate); here, that it allocates no copy of the rows."""
    s = ShadowScorer(threaded=False)
    x, live, m = np.zeros((rows, 512), np.float32), np.zeros(rows), _M(1.0, n=512)
    s.offer(x, live, m)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(1000):
            s.offer(x, live, m)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - base < x.nbytes // 2, f"{peak - base} bytes allocated"
    assert s.summary() is None and s.drain() == 0
