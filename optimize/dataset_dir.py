"""Read a dataset directory written by `edgefleet fleet collect` (fleet/collect.py) as a
`Dataset`, so `edgefleet optimize build --data DIR` trains on the fleet's own dies.

What becomes of the collected records:
- every captured row (`capture/<device>/*.jsonl`: the random sample and every fail) is one die;
  X from its `params_f32` (NaN = not measured), ids `<device>:<die_id>`, times from `time`;
- its label is the final-test outcome when a label for that die id was collected
  (`labels/<device>/*.jsonl`, the newest per die), else the device's own decision. The
  `label_source` column (extra) says which: `final_test` or `device`. Fails captured because the
  device failed them and never contradicted by a label are kept as fails;
- provenance columns (extra): device, site, tester, digest (the bundle that decided), reason
  (`sample` or `fail`);
- feature names from the models the devices report (`devices/<id>.json`); rows of another
  width than the most common one are refused, naming the device and the width.
A row collected twice (a resumed run) is read once (device, seq).
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from optimize.data import DataError, Dataset, write_npz

__all__ = ["data_file", "is_collected_dir", "load_collected"]


def is_collected_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "capture").is_dir()


def _jsonl(files: list[Path]) -> list[dict[str, Any]]:
    out = []
    for f in sorted(files):
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as e:
                    raise DataError(f"{f}: line {n}: not JSON: {e}") from None
    return out


def load_collected(path: Path | str) -> Dataset:
    root = Path(path)
    if not is_collected_dir(root):
        raise DataError(f"{root}: not a collected dataset (no capture/ directory); run "
                        "`edgefleet fleet collect --out DIR` first")
    seen: set[tuple[str, int]] = set()
    rows = []
    for r in _jsonl(list((root / "capture").glob("*/*.jsonl"))):
        key = (r["device"], int(r["seq"]))
        if key not in seen:
            seen.add(key)
            rows.append(r)
    if not rows:
        raise DataError(f"{root}: no captured rows")
    labels: dict[str, tuple[float, int]] = {}
    for r in _jsonl(list((root / "labels").glob("*/*.jsonl"))):
        t = r.get("received") or 0.0
        if r["die_id"] not in labels or t >= labels[r["die_id"]][0]:
            labels[r["die_id"]] = (t, 1 if r["label"] == "fail" else 0)
    values = [np.frombuffer(base64.b64decode(r["params_f32"]), dtype="<f4") for r in rows]
    width = Counter(len(v) for v in values).most_common(1)[0][0]
    for r, v in zip(rows, values, strict=True):
        if len(v) != width:
            raise DataError(f"{root}: device {r['device']} die {r['die_id']}: {len(v)} values, "
                            f"the other rows have {width} (collect one test program at a time)")
    x = np.stack(values).astype(np.float32)  # (n, width)
    final = [r["die_id"] in labels for r in rows]
    y = np.array([labels[r["die_id"]][1] if f else int(r["decision"] == "fail")
                  for r, f in zip(rows, final, strict=True)], dtype=np.int64)
    times = np.array([np.datetime64(int(r["time"]), "s") for r in rows])
    order = np.argsort(times, kind="stable")
    names = _feature_names(root, width)

    def col(key: str) -> np.ndarray:
        return np.array([str(r.get(key) or "") for r in rows])[order]

    extra = {k: col(k) for k in ("device", "site", "tester", "digest", "reason")}
    extra["label_source"] = np.array(["final_test" if f else "device" for f in final])[order]
    return Dataset(X=x[order], feature_names=names, labels=y[order],
                   times=times[order],
                   ids=np.array([f"{r['device']}:{r['die_id']}" for r in rows])[order],
                   source=root, extra=extra)


def _feature_names(root: Path, width: int) -> tuple[str, ...]:
    for f in sorted((root / "devices").glob("*.json")):
        for m in json.loads(f.read_text()).get("models", []):
            names = m.get("feature_names")
            if names and len(names) == width:
                return tuple(names)
    return tuple(f"p{i:03d}" for i in range(width))


@contextlib.contextmanager
def data_file(path: Path) -> Iterator[Path]:
    """`path` itself, or for a collected directory a temporary .npz of it (removed after):
    what `optimize build --data` hands to the pipeline."""
    path = Path(path)
    if not path.is_dir():
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-collected-"))
    try:
        yield write_npz(tmp / "collected.npz", load_collected(path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
