"""Input drift: population stability index (PSI) of recent inputs against the training data.

The bundle's `drift_reference` holds, per feature, k inner bin edges and the k+1 shares of
training passes per bin. Binning convention (writers must use the same): a value x falls in bin
`searchsorted(edges, x, side="right")`, i.e. the number of edges <= x (`numpy.digitize`);
missing values (NaN) are left out. `drift_reference()` below builds a reference that way, so the
optimizer can import it.

The monitor keeps the last `window` rows in a ring buffer (a row copy per request, about a
microsecond) and computes PSI on demand, at most once per `interval` seconds (the metrics scrape
asks). PSI per feature = sum over bins of (p - q) * ln(p / q), p the window's shares, q the
reference's, both floored at `EPS`. Only the worst few features and the maximum are exported,
never one series per feature.

Alert threshold: the bundle's `drift_reference.alert_psi`, which the build sets from the PSI
noise floor it measured on in-distribution windows of the reference period (a lot change moves
PSI too; a fixed 0.25 fired on in-distribution SECOM rows). Bundles without it get
`DEFAULT_ALERT_PSI` (the rule of thumb: > 0.25 a real shift). `DriftReport.alerting` says
whether the window is beyond it; the metrics export both, and the Prometheus alert compares
them.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

import numpy as np

EPS = 1e-4
DEFAULT_ALERT_PSI = 0.25
# rows binned per numpy call, so no call holds the GIL for long and the temporaries stay under
# ~0.5 MB each (at 512 features and 10 bins)
_CHUNK = 64


@dataclass(frozen=True)
class DriftReport:
    rows: int  # rows in the window
    psi_max: float  # NaN until the window has `min_rows`
    worst: tuple[tuple[int, float], ...]  # (feature, psi), worst first
    alert_psi: float = DEFAULT_ALERT_PSI

    @property
    def alerting(self) -> bool:
        """The window has drifted beyond the shipped alert threshold."""
        return bool(self.psi_max > self.alert_psi)  # NaN (too few rows) compares False


def alert_threshold(drift_reference: dict | None) -> float:
    """The bundle's `alert_psi` when it is a positive finite number, else the default."""
    v = (drift_reference or {}).get("alert_psi")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e6:
        return DEFAULT_ALERT_PSI
    return float(v)


def drift_reference(x: np.ndarray, bins: int = 10) -> dict[str, list[list[float]]]:
    """A manifest `drift_reference` from training rows (rows, n_features): quantile edges and
    the shares per bin, with the monitor's own binning. Columns never measured get one bin."""
    edges, props = [], []
    for j in range(x.shape[1]):
        col = x[:, j][~np.isnan(x[:, j])].astype(np.float64)
        if col.size == 0:
            edges.append([])
            props.append([1.0])
            continue
        e = np.unique(np.quantile(col, np.arange(1, bins) / bins))
        counts = np.bincount(np.searchsorted(e, col, side="right"), minlength=len(e) + 1)
        edges.append([float(v) for v in e])
        props.append([float(v) for v in counts / counts.sum()])
    return {"edges": edges, "proportions": props}


def psi(observed: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """PSI per row of two (features, bins) share matrices."""
    p = np.maximum(observed, EPS)
    q = np.maximum(reference, EPS)
    return ((p - q) * np.log(p / q)).sum(axis=-1)


def _padded(rows: tuple[tuple[float, ...], ...], width: int, fill: float,
            dtype: type) -> np.ndarray:
    """`rows` as a (len(rows), width) array, each row padded on the right with `fill`. A few
    numpy calls instead of one slice assignment per feature: the monitor is built on every
    model swap, in the serving process, and 512 assignments held the GIL for ~0.4 ms."""
    lengths = np.fromiter(map(len, rows), dtype=np.intp, count=len(rows))
    out = np.full((len(rows), width), fill, dtype=dtype)
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.float64,
                       count=int(lengths.sum()))
    out[np.arange(width) < lengths[:, None]] = flat  # row-major: each row's values in order
    return out


class DriftMonitor:
    """Recent inputs of one model against its training reference. Thread-safe."""

    def __init__(self, edges: tuple[tuple[float, ...], ...],
                 proportions: tuple[tuple[float, ...], ...], *, window: int = 2048,
                 min_rows: int = 200, top_k: int = 5, interval: float = 10.0,
                 alert_psi: float = DEFAULT_ALERT_PSI,
                 padded: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """`padded`: the same reference as `Manifest.drift_arrays` holds it (edges padded
        with +inf, proportions with 0), used instead of padding `edges` and `proportions`."""
        n = len(edges)
        self.alert_psi = alert_psi
        self.n_features = n
        self.window = window
        self.min_rows = min_rows
        self.top_k = top_k
        self.interval = interval
        # Pad every feature to k edges with +inf: x >= inf is never true, so padded bins stay
        # empty in both the window and the reference and add nothing to PSI.
        if padded is not None:
            self._edges, self._ref = padded  # read only: shared with the manifest
        else:
            k = max((len(e) for e in edges), default=0)
            self._edges = _padded(edges, k, np.inf, np.float32)
            self._ref = _padded(proportions, k + 1, 0.0, np.float64)
        if len(proportions) != n:
            raise ValueError(f"{n} features' edges but {len(proportions)} features' proportions")
        self._buf = np.empty((window, n), dtype=np.float32)
        self._written = 0  # rows ever observed
        self._slots = itertools.count()  # next row's sequence number
        self._lock = threading.Lock()
        self._report = DriftReport(0, float("nan"), (), alert_psi)
        self._computed_at = -np.inf
        self._computed_written = -1

    def observe_one(self, v: np.ndarray) -> None:
        """Remember one row (n_features,): the per-request path, so no lock; next() on the
        counter is atomic, and a row overwritten by a concurrent batch is only a statistic."""
        i = next(self._slots)
        self._buf[i % self.window] = v
        self._written = i + 1

    def observe(self, x: np.ndarray) -> None:
        """Remember a (rows, n_features) batch; only the last `window` rows are kept."""
        rows = x.shape[0]
        if rows >= self.window:
            x, rows = x[-self.window:], self.window
        with self._lock:
            start = next(self._slots)
            self._slots = itertools.count(start + rows)
            pos = start % self.window
            first = min(rows, self.window - pos)
            self._buf[pos:pos + first] = x[:first]
            if first < rows:
                self._buf[:rows - first] = x[first:]
            self._written = start + rows

    def report(self, *, force: bool = False) -> DriftReport:
        """The latest PSI figures, recomputed if older than `interval` and rows arrived."""
        now = time.monotonic()
        if not force and (now - self._computed_at < self.interval
                          or self._written == self._computed_written):
            return self._report
        written = self._written
        self._report = self._compute(min(written, self.window))
        self._computed_at, self._computed_written = now, written
        return self._report

    def _chunk(self, start: int, stop: int) -> np.ndarray:
        """A copy of window rows start..stop, taken under the lock (a batch being written
        is not seen half done)."""
        with self._lock:
            return self._buf[start:stop].copy()

    def _compute(self, rows: int) -> DriftReport:
        """PSI over the first `rows` rows of the window, binned `_CHUNK` rows at a time, each
        copied on its own: a copy of the whole window (4 MB at 512 features) plus the
        temporaries was what the first metrics scrape after traffic left in the scraping
        thread's heap (~8 MB of resident memory, issue 15). A row written between two chunks
        is only a statistic, as in `observe_one`."""
        n, bins = self._ref.shape
        if rows < self.min_rows:
            return DriftReport(rows, float("nan"), (), self.alert_psi)
        offsets = np.arange(n, dtype=np.int64) * bins
        counts = np.zeros(n * bins, dtype=np.int64)
        for start in range(0, rows, _CHUNK):
            chunk = self._chunk(start, min(start + _CHUNK, rows))  # (c, n)
            idx = (chunk[:, :, None] >= self._edges[None]).sum(axis=2, dtype=np.int64)
            idx += offsets  # (c, n)
            counts += np.bincount(idx[~np.isnan(chunk)], minlength=n * bins)
            del chunk, idx
        counts = counts.reshape(n, bins)
        measured = counts.sum(axis=1, keepdims=True)
        shares = counts / np.maximum(measured, 1)
        values = psi(shares, self._ref)
        values[measured[:, 0] < self.min_rows] = np.nan  # too few measurements to judge
        if np.all(np.isnan(values)):
            return DriftReport(rows, float("nan"), (), self.alert_psi)
        order = np.argsort(-np.nan_to_num(values, nan=-1.0), kind="stable")[:self.top_k]
        worst = tuple((int(j), float(values[j])) for j in order if not np.isnan(values[j]))
        return DriftReport(rows, float(np.nanmax(values)), worst, self.alert_psi)
