"""False-fail rate per lot, wafer and tester: where an average hides a lot that is scrapped.

A threshold calibrated to 1% on average can fail 0.3% of one lot and 3% of another. For each
group of the test rows (the data's `lot`, `wafer`, `tester` columns) this gives the false-fail
rate on its passes with a 95% Wilson interval, and the share of groups whose rate lies inside
[0.5x, 2x] of the target (the issue's bar: >= 95% of lots and of testers). Groups with fewer
than `min_passes` passes are listed but not counted in the share: at 1% target and 50 passes
one false fail is already 2x.

A group of 200 passes is still too small to judge: at exactly the target rate (1%), its
false-fail count lands inside the band only 81% of the time (280 passes: 71%). So each grouping
also gives the share among groups large enough that a group at exactly the target rate is
inside the band with at least 95% probability (`powered`: 1,060 passes at 1%; the binomial's
lattice puts 800 passes at 95.5% but 820 at 91%, so the size is the one from which it stays
above), the share a calibration can be held to; the smaller groups are sampling noise as much
as calibration, and are listed by name (`too_small`), not dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cache
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


def in_band_probability(n: int, target: float) -> float:
    """The probability that a group of `n` passes whose true rate is exactly `target` shows a
    false-fail rate inside the band (binomial): the best any threshold can do on it."""
    from scipy.stats import binom

    lo, hi = math.ceil(BAND[0] * target * n - 1e-9), math.floor(BAND[1] * target * n + 1e-9)
    return float(binom.cdf(hi, n, target) - binom.cdf(lo - 1, n, target))


@cache
def powered_min_passes(target: float, confidence: float = 0.95) -> int:
    """The fewest passes (in steps of 10) from which a group whose true rate is exactly
    `target` shows a false-fail rate inside the band with probability >= `confidence`."""
    n = 10
    while n < 1_000_000:
        if all(in_band_probability(m, target) >= confidence for m in range(n, n + 200, 10)):
            return n  # and stays there: the binomial's lattice makes it wobble near the edge
        n += 10
    return 1_000_000


def ffr_by_group(flagged: np.ndarray, passes: np.ndarray, groups: Mapping[str, np.ndarray],
                 target: float, *, min_passes: int = 200) -> dict[str, Any]:
    """{kind: {"groups": {name: {ffr, flagged, passes, ci}}, "in_band": share, "counted": n}}
    for every grouping column present."""
    out: dict[str, Any] = {}
    lo, hi = BAND[0] * target, BAND[1] * target
    powered_n = powered_min_passes(target) if 0 < target < 0.5 else None
    for kind, names in groups.items():
        rows: dict[str, Any] = {}
        inside = counted = p_inside = p_counted = 0
        small = []
        for name in sorted(set(names[passes].tolist())):
            m = passes & (names == name)
            k, n = int(flagged[m].sum()), int(m.sum())
            rate = k / n
            rows[name] = {"ffr": rate, "flagged": k, "passes": n, "ci": wilson(k, n)}
            if n >= min_passes:
                counted += 1
                inside += lo <= rate <= hi
            if powered_n is not None and n >= powered_n:
                p_counted += 1
                p_inside += lo <= rate <= hi
            elif powered_n is not None:
                small.append(name)
        out[kind] = {"groups": rows, "counted": counted,
                     "in_band": inside / counted if counted else None,
                     "band": [lo, hi], "min_passes": min_passes,
                     "powered": {"min_passes": powered_n, "counted": p_counted,
                                 "in_band": p_inside / p_counted if p_counted else None,
                                 "too_small": small}}
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
