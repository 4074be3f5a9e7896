"""The prediction log's record formats: blocks of answers, and captured input rows.

A **prediction block** is one ring record holding many answers, stored column-wise so the
writer builds it with a few numpy operations instead of a Python loop per answer (what the log
costs the serving thread is the GIL time of its writer: docs/operations.md). The ring numbers
answers, not blocks (agent/segring.py, `count`): answer `i` of a block whose record seq is `s`
is prediction `s + i`, the number labels and captured rows refer to.

    header   "EP", version (2), k, u32 n                                    (8 bytes)
    rows     n x ROW: time f8, die_num u8, model u4, score f4, threshold f4,
             confidence f4, die_len u2, decision u1, source u1                (36 bytes each)
    tops     for the fails only, in row order: (fails, k) int32 feature indices, then
             (fails, k) float32 contributions; index -1 pads a shorter list
    text     the UTF-8 die ids of the rows whose die_len is not NUMERIC_ID, in row order

A die id is numeric (`die_len == NUMERIC_ID`, the value in `die_num`: every binary frame's id,
JSON integers in 0..2**64-1) or text of `die_len` bytes (at most 255). Either way a reader gets
its text (`die_text`): decimal for numbers.

A **capture record** is one sampled input row (every fail, and `capture_rate` of the rest):
    time f8, model u4, prediction seq u8, decision u1, reason u1, score f4, die id length u2,
    n u4; then the die id (UTF-8), then n float32 values (NaN = not measured)
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import numpy as np

from agent.protocol import DECISION_LABELS, Decision, Source

BLOCK = struct.Struct("<2sBBI")
BLOCK_MAGIC, BLOCK_VERSION = b"EP", 2
ROW = np.dtype([("time", "<f8"), ("die_num", "<u8"), ("model", "<u4"), ("score", "<f4"),
                ("threshold", "<f4"), ("confidence", "<f4"), ("die_len", "<u2"),
                ("decision", "u1"), ("source", "u1")])
NUMERIC_ID = 0xFFFF
MAX_ID_BYTES = 255
_FAIL = int(Decision.FAIL)
_F4 = np.dtype("<f4")
_I4 = np.dtype("<i4")
_CAP = struct.Struct("<dIQBBfHI")
CAPTURE_SAMPLE, CAPTURE_FAIL = 1, 2

__all__ = ["BLOCK", "CAPTURE_FAIL", "CAPTURE_SAMPLE", "NUMERIC_ID", "ROW", "Block",
           "block_count", "decode_block", "decode_capture", "encode_block", "encode_capture",
           "iter_predictions"]


class FormatError(ValueError):
    """Not a prediction block of this version."""


def block_count(payload: bytes) -> int:
    """Answers in one block (the ring's `count`)."""
    return BLOCK.unpack_from(payload)[3]


def encode_block(rows: np.ndarray, top_index: np.ndarray, top_contribution: np.ndarray,
                 text: bytes) -> bytes:
    """One block: `rows` (ROW), the fails' tops ((fails, k) each) and the text ids, joined."""
    k = top_index.shape[1] if top_index.ndim == 2 else 0
    return b"".join((BLOCK.pack(BLOCK_MAGIC, BLOCK_VERSION, k, len(rows)), rows.tobytes(),
                     np.ascontiguousarray(top_index, _I4).tobytes(),
                     np.ascontiguousarray(top_contribution, _F4).tobytes(), text))


class Block:
    """A decoded block: `rows` (ROW array), tops of its fails, and each row's die id text."""

    def __init__(self, payload: bytes) -> None:
        magic, version, k, n = BLOCK.unpack_from(payload)
        if magic != BLOCK_MAGIC or version != BLOCK_VERSION:
            raise FormatError(f"not a version {BLOCK_VERSION} prediction block")
        pos = BLOCK.size
        self.rows = np.frombuffer(payload, ROW, n, pos)  # (n,)
        pos += n * ROW.itemsize
        fails = int(np.count_nonzero(self.rows["decision"] == _FAIL))
        self.top_index = np.frombuffer(payload, _I4, fails * k, pos).reshape(fails, k)
        pos += fails * k * 4
        self.top_contribution = np.frombuffer(payload, _F4, fails * k, pos).reshape(fails, k)
        self._text = payload[pos + fails * k * 4:]

    def die_ids(self) -> list[str]:
        """Each row's die id as text (decimal for numeric ids)."""
        out, pos, text = [], 0, self._text
        for num, length in zip(self.rows["die_num"].tolist(), self.rows["die_len"].tolist(),
                               strict=True):
            if length == NUMERIC_ID:
                out.append(str(num))
            else:
                out.append(text[pos:pos + length].decode("utf-8", "replace"))
                pos += length
        return out


def decode_block(payload: bytes) -> list[dict[str, Any]]:
    """Every answer of a block, as the data feed and tools show it."""
    b = Block(payload)
    out, fail_i = [], 0
    for r, die in zip(b.rows.tolist(), b.die_ids(), strict=True):
        t, _num, model, score, thr, conf, _len, decision, source = r
        top = []
        if decision == _FAIL and b.top_index.size:
            top = [{"index": i, "contribution": c} for i, c in zip(
                b.top_index[fail_i].tolist(), b.top_contribution[fail_i].tolist(), strict=True)
                if i >= 0]
        if decision == _FAIL:
            fail_i += 1
        out.append({"time": t, "model": model, "die_id": die,
                    "decision": DECISION_LABELS[decision],
                    "source": "model" if source == Source.MODEL else "fallback",
                    "score": score, "threshold": thr, "confidence": conf, "top": top})
    return out


def iter_predictions(records: list[tuple[int, bytes]], cursor: int = 0
                     ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(prediction seq, answer) of ring records (blocks), from `cursor` on."""
    for seq, payload in records:
        for i, p in enumerate(decode_block(payload)):
            if seq + i >= cursor:
                yield seq + i, p


def id_bytes(text: str) -> bytes:
    return text.encode("utf-8")[:MAX_ID_BYTES]


def encode_capture(t: float, model: int, pred_seq: int, die_id: str, decision: int,
                   reason: int, score: float, row: np.ndarray | bytes) -> bytes:
    """`row`: the values, or their little-endian float32 bytes as a binary frame carries them."""
    raw = id_bytes(die_id)
    values = row if isinstance(row, bytes) else np.ascontiguousarray(row, dtype=_F4).tobytes()
    return b"".join((_CAP.pack(t, model, pred_seq, decision, reason, score, len(raw),
                               len(values) // 4), raw, values))


def decode_capture(payload: bytes) -> tuple[dict[str, Any], np.ndarray]:
    t, model, seq, decision, reason, score, idlen, n = _CAP.unpack_from(payload)
    pos = _CAP.size
    die = payload[pos:pos + idlen].decode("utf-8", "replace")
    row = np.frombuffer(payload, _F4, n, pos + idlen).copy()
    return ({"time": t, "model": model, "prediction_seq": seq, "die_id": die,
             "decision": DECISION_LABELS[decision],
             "reason": "fail" if reason == CAPTURE_FAIL else "sample", "score": score}, row)
