"""Stage 2: preprocessing fitted on training passes, mirrored exactly inside the ONNX graph.

    missing  = isnan(x)
    imputed  = where(missing, center, x)                 median imputation
    bounded  = max(min(imputed, high), low)              low/high = center -/+ bound * scale
    z        = (bounded - center) * inv_scale            robust scaling, |z| <= bound (1000)
    z_in     = clip(z, -clip, clip)                      what the autoencoder sees, |z_in| <= 10

`center` is the median and `scale` the IQR / 1.349 of each column over training passes (the
standard deviation when the IQR is 0, as for a column that is constant except for rare values).
Real fab signals span 1e-4 to 1e4, so a robust per-column scale is the only thing that puts
them on one footing. Columns that are never observed or constant (scale below 1e-6 of the
median's size, i.e. float noise) are *inactive*: center = median (0 if never observed),
inv_scale = 0 and low = high = center, so z is exactly 0 whatever the input (even +-inf) and
no step can divide by zero or make a NaN (`bound` only keeps +-inf and absurd values finite).
The autoencoder sees z clipped to `clip` robust sigmas, so one wild sensor cannot dominate
training or drag the reconstruction of the others; the score compares the reconstruction with
the unclipped z, so a parameter 25 sigma out counts as 25 sigma, not 10 (with the input clipped
too, one out-of-spec parameter of 512 hid inside the pass spread: 9% of gross defects missed).

`transform` does the same float32 arithmetic as the graph, so torch trains on the values the
device computes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from optimize.data import DataError

_REL_FLOOR = 1e-6  # a scale this small relative to the median is float noise, not signal


@dataclass(frozen=True)
class PreprocessConfig:
    clip: float = 10.0  # autoencoder input range, robust sigmas
    bound: float = 1000.0  # scaled value range (keeps +-inf finite), robust sigmas


@dataclass(frozen=True)
class Preprocessor:
    center: np.ndarray  # (n_features,) float32, finite
    inv_scale: np.ndarray  # (n_features,) float32, 0 for inactive columns
    low: np.ndarray  # (n_features,) float32: center - bound * scale (center if inactive)
    high: np.ndarray  # (n_features,) float32
    active: np.ndarray  # (n_features,) bool
    clip: float  # autoencoder input range, robust sigmas
    bound: float  # scaled value range, robust sigmas

    @property
    def n_features(self) -> int:
        return int(self.center.shape[0])

    def scale(self, x: np.ndarray) -> np.ndarray:
        """(n, n_features) raw with NaN -> (n, n_features) float32 z, finite, |z| <= bound."""
        x = np.asarray(x, dtype=np.float32)
        imputed = np.where(np.isnan(x), self.center, x)
        bounded = np.maximum(np.minimum(imputed, self.high), self.low)
        return ((bounded - self.center) * self.inv_scale).astype(np.float32)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(n, n_features) raw with NaN -> the autoencoder's input, float32, |z| <= clip."""
        return np.clip(self.scale(x), -self.clip, self.clip)


def fit_preprocessor(
    x: np.ndarray, clip: float = 10.0, bound: float = 1000.0, where: str = "data"
) -> Preprocessor:
    """Fit on training passes `x` (n, n_features), NaN = missing."""
    x = np.asarray(x, dtype=np.float64)
    observed = ~np.isnan(x)
    if not observed.any():
        raise DataError(
            f"{where}: every feature of every training pass is missing; expected measurements"
        )
    with warnings.catch_warnings():  # all-NaN columns: handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(x, axis=0)
        q25, q75 = np.nanpercentile(x, [25, 75], axis=0)
        std = np.nanstd(x, axis=0)
    center = np.where(np.isfinite(median), median, 0.0)
    scale = (q75 - q25) / 1.349
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, std)
    scale = np.where(np.isfinite(scale), scale, 0.0)
    active = (observed.sum(axis=0) >= 2) & (scale > _REL_FLOOR * np.maximum(np.abs(center), 1e-30))
    scale = np.where(active, scale, 1.0)
    center32 = center.astype(np.float32)
    return Preprocessor(
        center=center32,
        inv_scale=np.where(active, 1.0 / scale, 0.0).astype(np.float32),
        low=np.where(active, center - bound * scale, center).astype(np.float32),
        high=np.where(active, center + bound * scale, center).astype(np.float32),
        active=active,
        clip=float(clip),
        bound=float(bound),
    )
