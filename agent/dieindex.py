"""The label join's index: die id -> the newest logged prediction of that die.

Recent rows live in memory as numpy arrays (one per block the log writes: no Python object per
die); every `limit` rows they go to a sorted sidecar `<dir>/<first seq>-<last seq>.npy` (written
to a temp name, then renamed), so memory stays bounded however long the log is, and a restart
only rescans the log past the last sidecar (`covered`). Lookups take the memory, then the
sidecars newest first (binary search). A die id is keyed by 64 bits (`die_key`): a number
0..2**64-1 (a binary frame's id, a JSON integer, or a string that is one in decimal) by its
value, any other text by BLAKE2b; its text is `die_text` (binary ids and JSON integers in
decimal, JSON strings as they are).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["INDEX_DTYPE", "DieIndex", "Hit", "die_key", "die_text"]


def die_text(die_id: Any) -> str:
    """A die id as the text the log and the label join use: binary ids and JSON integers in
    decimal, JSON strings as they are (so 42 and "42" are the same die)."""
    if die_id is None:
        return ""
    if isinstance(die_id, str):
        return die_id
    if isinstance(die_id, bool) or not isinstance(die_id, int):
        return json.dumps(die_id)
    return str(die_id)


def die_key(text: str) -> int:
    """64-bit key of a die id, what the join index sorts on: a decimal number below 2**64 (no
    sign, no leading zero) is its own key, so the writer keys binary ids without hashing;
    other text is BLAKE2b's."""
    if text.isdigit() and text.isascii() and len(text) <= 20 and (text[0] != "0" or
                                                                   len(text) == 1):
        v = int(text)
        if v < 1 << 64:
            return v
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")



INDEX_DTYPE = np.dtype([("key", "<u8"), ("seq", "<u8"), ("time", "<f8"), ("model", "<u4"),
                         ("decision", "u1"), ("source", "u1"), ("score", "<f4")])


@dataclass(frozen=True)
class Hit:
    """The newest logged prediction of a die."""

    seq: int
    time: float
    model: int
    decision: int
    source: int
    score: float


_MERGE = 32  # recent arrays merged into one at this many: lookups and memory stay small


class DieIndex:
    """See the module docstring. Owned by the prediction log's writer thread."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self.recent: list[np.ndarray] = []  # INDEX_DTYPE arrays, oldest first
        self.recent_rows = 0
        cars = self.sidecars()
        self.covered = cars[-1][1] + 1 if cars else 0  # every seq below this is in a sidecar

    def sidecars(self) -> list[tuple[int, int, Path]]:
        out = []
        for p in self.dir.glob("*.npy"):
            a, _, b = p.stem.partition("-")
            if a.isdigit() and b.isdigit():
                out.append((int(a), int(b), p))
        return sorted(out)

    def add(self, rows: np.ndarray) -> None:
        """Index `rows` (INDEX_DTYPE, in seq order; the log builds them for each block)."""
        if not len(rows):
            return
        self.recent.append(rows)
        self.recent_rows += len(rows)
        if self.recent_rows >= self.limit:
            self.spill()
        elif len(self.recent) >= _MERGE:  # a quiet agent writes blocks of a few rows
            self.recent = [np.concatenate(self.recent)]

    def spill(self) -> None:
        if not self.recent:
            return
        rows = np.concatenate(self.recent)[::-1]  # newest first: unique keeps each key's newest
        _, first = np.unique(rows["key"], return_index=True)
        rows = rows[first]  # sorted by key
        last = int(self.recent[-1]["seq"][-1])
        path = self.dir / f"{int(self.recent[0]['seq'][0])}-{last}.npy"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.save(f, rows)
            f.flush()
        tmp.replace(path)
        self.recent.clear()
        self.recent_rows = 0
        self.covered = last + 1

    def prune(self, first_seq: int, next_seq: int) -> None:
        """Delete sidecars older than the ring by more than the ring's own span: a label that
        comes a little too late is still told apart (`expired`) from a die never seen."""
        horizon = first_seq - (next_seq - first_seq)
        for _a, b, p in self.sidecars():
            if b < horizon:
                p.unlink(missing_ok=True)

    def lookup(self, keys: list[int]) -> dict[int, Hit]:
        """Newest hit per key, from memory, then the sidecars newest first."""
        found: dict[int, Hit] = {}
        want = np.array(sorted(set(keys)), dtype=np.uint64)
        for rows in reversed(self.recent):
            if not len(want):
                return found
            at = np.flatnonzero(np.isin(rows["key"], want))
            for i in at[::-1].tolist():  # newest first
                k = int(rows["key"][i])
                if k not in found:
                    found[k] = _hit(rows[i])
            if len(at):
                want = want[~np.isin(want, rows["key"][at])]
        for _a, _b, p in reversed(self.sidecars()):
            if not len(want):
                break
            try:
                rows = np.load(p, mmap_mode="r")
            except (OSError, ValueError):
                continue
            pos = np.searchsorted(rows["key"], want)
            pos = np.minimum(pos, len(rows) - 1)
            hit = rows["key"][pos] == want
            for i in np.flatnonzero(hit):
                found[int(want[i])] = _hit(rows[pos[i]])
            want = want[~hit]
        return found


def _hit(r: np.void) -> Hit:
    return Hit(int(r["seq"]), float(r["time"]), int(r["model"]), int(r["decision"]),
               int(r["source"]), float(r["score"]))
