"""The label join's index: die id -> the newest logged prediction of that die.

Recent rows live in a dict; every `limit` rows they go to a sorted sidecar
`<dir>/<first seq>-<last seq>.npy` (written to a temp name, then renamed), so memory stays
bounded however long the log is, and a restart only rescans the log past the last sidecar
(`covered`). Lookups take the dict, then the sidecars newest first (binary search). A die id is
keyed by 64 bits of BLAKE2b of its text (`die_key`); its text is `die_text` (binary ids and
JSON integers in decimal, JSON strings as they are).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DieIndex", "Hit", "die_key", "die_text"]


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
    """64-bit key of a die id (BLAKE2b), what the join index sorts on."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")



_INDEX_DTYPE = np.dtype([("key", "<u8"), ("seq", "<u8"), ("time", "<f8"), ("model", "<u4"),
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


class DieIndex:
    """See the module docstring. Owned by the prediction log's writer thread."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.limit = limit
        self.recent: dict[int, tuple] = {}
        self.recent_first: int | None = None
        cars = self.sidecars()
        self.covered = cars[-1][1] + 1 if cars else 0  # every seq below this is in a sidecar

    def sidecars(self) -> list[tuple[int, int, Path]]:
        out = []
        for p in self.dir.glob("*.npy"):
            a, _, b = p.stem.partition("-")
            if a.isdigit() and b.isdigit():
                out.append((int(a), int(b), p))
        return sorted(out)

    def load(self, rows: Iterable[tuple[str, int, float, int, int, int, float]]) -> None:
        """Rebuild the in-memory part from the log's records past `covered` (die id, seq, time,
        model, decision, source, score; agent/predlog.py reads them)."""
        for die, seq, t, model, decision, source, score in rows:
            if die and seq >= self.covered:
                self.add(die_key(die), seq, t, model, decision, source, score)

    def add(self, key: int, seq: int, t: float, model: int, decision: int, source: int,
            score: float) -> None:
        if self.recent_first is None:
            self.recent_first = seq
        self.recent[key] = (seq, t, model, decision, source, score)
        if len(self.recent) >= self.limit:
            self.spill()

    def spill(self) -> None:
        if not self.recent:
            return
        rows = np.array([(k, *v) for k, v in self.recent.items()], dtype=_INDEX_DTYPE)
        rows.sort(order="key")
        last = int(rows["seq"].max())
        path = self.dir / f"{self.recent_first}-{last}.npy"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            np.save(f, rows)
            f.flush()
        tmp.replace(path)
        self.recent.clear()
        self.recent_first = None
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
        todo = []
        for k in keys:
            v = self.recent.get(k)
            if v is not None:
                found[k] = Hit(*v)
            else:
                todo.append(k)
        if not todo:
            return found
        want = np.array(sorted(set(todo)), dtype=np.uint64)
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
                r = rows[pos[i]]
                found[int(want[i])] = Hit(int(r["seq"]), float(r["time"]), int(r["model"]),
                                          int(r["decision"]), int(r["source"]),
                                          float(r["score"]))
            want = want[~hit]
        return found
