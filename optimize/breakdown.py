"""False-fail rate per lot, wafer and tester: where an average hides a lot that is scrapped.

A threshold calibrated to 1% on average can fail 0.3% of one lot and 3% of another. For each
group of the test rows (the data's `lot`, `wafer`, `tester` columns) this gives the false-fail
rate on its passes with a 95% Wilson interval, and the share of groups whose rate lies inside
[0.5x, 2x] of the target (the issue's bar: >= 95% of lots and of testers). Groups with fewer
than `min_passes` passes are listed but not counted in the share: at 1% target and 50 passes
one false fail is already 2x.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

BAND = (0.5, 2.0)  # of the target false-fail rate


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, min(p, c - h)), min(1.0, max(p, c + h))  # float rounding: keep p inside


def ffr_by_group(flagged: np.ndarray, passes: np.ndarray, groups: Mapping[str, np.ndarray],
                 target: float, *, min_passes: int = 200) -> dict[str, Any]:
    """{kind: {"groups": {name: {ffr, flagged, passes, ci}}, "in_band": share, "counted": n}}
    for every grouping column present."""
    out: dict[str, Any] = {}
    lo, hi = BAND[0] * target, BAND[1] * target
    for kind, names in groups.items():
        rows: dict[str, Any] = {}
        inside = counted = 0
        for name in sorted(set(names[passes].tolist())):
            m = passes & (names == name)
            k, n = int(flagged[m].sum()), int(m.sum())
            rate = k / n
            rows[name] = {"ffr": rate, "flagged": k, "passes": n, "ci": wilson(k, n)}
            if n >= min_passes:
                counted += 1
                inside += lo <= rate <= hi
        out[kind] = {"groups": rows, "counted": counted,
                     "in_band": inside / counted if counted else None,
                     "band": [lo, hi], "min_passes": min_passes}
    return out


def band_summary(by_group: Mapping[str, Any]) -> str:
    """One readable line per grouping, e.g. 'lot: 9 of 10 in [0.5%, 2%] (worst LOT0007 2.6%)'."""
    lines = []
    for kind, g in by_group.items():
        if not g["counted"]:
            continue
        counted = {k: v for k, v in g["groups"].items() if v["passes"] >= g["min_passes"]}
        worst = max(counted, key=lambda k: counted[k]["ffr"])
        best = min(counted, key=lambda k: counted[k]["ffr"])
        inside = round(g["in_band"] * g["counted"])
        lines.append(f"{kind}: {inside} of {g['counted']} inside [{g['band'][0]:.2%}, "
                     f"{g['band'][1]:.2%}]; highest {worst} {counted[worst]['ffr']:.2%}, lowest "
                     f"{best} {counted[best]['ffr']:.2%}")
    return "; ".join(lines)
