"""Stage 3: a dense autoencoder trained on passing dies, and the per-feature residual scale that
turns its reconstruction error into a score.

The model is a stack of Linear layers with ReLU between them, input and output n_features wide
(z from `optimize.preprocess`), e.g. 512-1024-256-64-256-1024-512. Training is a plain loop:
Adam on mean squared reconstruction error, shuffled mini-batches from a seeded generator, early
stopping on validation loss (the best epoch's weights are kept). A share of the rows
(`mask_rate`) see a block of columns imputed (0) in the input but not in the target, so a die
with a skipped test block is reconstructed from the rest instead of looking anomalous. Same
seed, same data, same thread count -> bit-identical weights.

Score of a die = mean over its measured, active features of (z - reconstruction)^2 / v, where v
is the feature's mean squared residual over training passes (`residual_weights`; z unclipped,
the reconstruction from the clipped input, see `optimize.preprocess`). A typical pass
scores about 1 whatever the feature mix; a feature the model predicts well from the others (the
ones a subtle defect breaks) weighs more than one it can only guess.

Missing values: the input holds the training median (z = 0) where a value is missing, and a
die with a skipped test block (a whole parameter family at 0) reads as a family that disagrees
with the others, the very signature of a multivariate defect. Training with masked blocks
alone does not remove that: on the floor data, complete test passes blanked of one family each
failed 5.2% at a 1% threshold (0.5% before blanking), and bursts of such dies on one tester
put a lot's false-fail at 1.3% or 0.4% depending on whether a burst hit it. So the
reconstruction is refined `refine` times (`REFINE`, 2): the missing inputs are replaced by the
previous reconstruction (clipped like an input) and the die reconstructed again (iterative
imputation by the model itself). Blanked dies then failed 0.74% vs 0.65% for the same dies
complete. A die without missing values gets exactly the same reconstruction in every round.

The score of a die must not depend on how many of its values were missing. It is a mean over
the measured features, so its mean stays put, but its spread grows as fewer (and worse
reconstructed) features enter it: on floor seed 203, complete passes blanked at random of 25,
35 and 45% of their values failed 1.43, 2.33 and 8.19% at a threshold where they failed 1.15%
complete (score sd x1.12, x1.23, x1.58), while one skipped test block or a few cells changed
nothing (1.14-1.17%). So the score of a die missing a share m of its active features is divided by
the factor that keeps the 99th percentile of passes where it is when they are complete (at
least 0.5): `missing_spread` measures it at every build by blanking 5-50% of the values of
validation passes (the same dies at every share), linear in m between those shares. With it,
the same blanked dies failed 1.29, 1.03, 0.86 and 0.64% at 10, 25, 35 and 45% missing
(complete 1.13%). A complete die is divided by exactly 1. The calibration's strata (complete
vs imputed, agent/calibration.py) then see one score distribution per stratum whatever the
mix of missing counts.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import torch
from torch import nn

from optimize.preprocess import Preprocessor

log = logging.getLogger("edgefleet.optimize")


@dataclass(frozen=True)
class AEConfig:
    widths: tuple[int, ...] = (1024, 256, 64)  # encoder hidden widths; the decoder mirrors them
    reference_features: int = 512  # widths are for this many inputs; fewer inputs scale them down
    min_width: int = 4

    def layer_sizes(self, n_features: int) -> tuple[int, ...]:
        """All layer sizes, input to output: (F, h1, .., hk, .., h1, F). Widths shrink in
        proportion when n_features < reference_features (small real data), never grow."""
        factor = min(1.0, n_features / self.reference_features)
        hidden = [max(self.min_width, round(w * factor)) for w in self.widths]
        return (n_features, *hidden, *hidden[-2::-1], n_features)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    lr: float = 2e-3
    batch_size: int = 256  # capped at n_train / 16 so small data still gets enough steps
    patience: int = 3  # epochs without a better validation loss before stopping
    min_delta: float = 1e-3  # relative improvement that counts as better
    weight_decay: float = 0.0
    seed: int = 0
    # torch intra-op threads (part of what makes a run reproducible). One: on a shared 2-core
    # box, two OpenMP threads spin-wait on each other whenever another process holds a core;
    # we measured epochs 1.4-2.2 s with one thread and 2.3-10 s with two under load.
    threads: int = 1
    # Share of training rows whose input has a block of adjacent columns set to 0, the value a
    # missing measurement is imputed with, while the target keeps the measured values: a die
    # with a skipped test block must not look anomalous for it (on the floor data most false
    # fails were such dies).
    mask_rate: float = 0.1


def _mask_blocks(z: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """A copy of z (batch, F) with a random block of 1/16 to 1/8 of the columns zeroed on a
    share `rate` of the rows (drawn from `gen`, so training stays reproducible)."""
    rows, n = z.shape
    pick = torch.rand(rows, generator=gen) < rate  # (batch,)
    if not bool(pick.any()):
        return z
    width = torch.randint(max(1, n // 16), max(2, n // 8 + 1), (rows,), generator=gen)
    start = (torch.rand(rows, generator=gen) * (n - width + 1)).long()
    cols = torch.arange(n)[None, :]  # (1, F)
    hole = pick[:, None] & (cols >= start[:, None]) & (cols < (start + width)[:, None])
    return z.masked_fill(hole, 0.0)


class AutoEncoder(nn.Module):
    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.layers[0].in_features, *(layer.out_features for layer in self.layers))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (batch, F) -> (batch, F)
        for layer in self.layers[:-1]:
            z = torch.relu(layer(z))  # (batch, hidden)
        return self.layers[-1](z)


@dataclass(frozen=True)
class History:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads and at most `n` threads in numpy's BLAS
    and the other native pools sklearn uses (threadpoolctl), at most the CPU count, then
    restore. The BLAS pool matters as much as torch's: on the shared 2-core machine at load
    7, an SVD and a product of a 9,000 x 512 matrix took 24.1 s wall and 13.7 s CPU with
    OpenBLAS's default 2 threads (spin-waiting for a core) and 3.7 s and 2.3 s with one; a
    default build's baselines stage took 22.8 s CPU at load ~7 where it took 11.9 s at ~4."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    k = max(1, min(n, os.cpu_count() or 1))
    torch.set_num_threads(k)
    try:
        with threadpool_limits(k):
            yield
    finally:
        torch.set_num_threads(before)


def new_autoencoder(n_features: int, cfg: AEConfig, seed: int) -> AutoEncoder:
    torch.manual_seed(seed)
    return AutoEncoder(cfg.layer_sizes(n_features))


def reconstruct(model: AutoEncoder, z: np.ndarray, batch: int = 4096) -> np.ndarray:
    """(n, F) float32 -> (n, F) float32 reconstruction, in eval mode without gradients."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(z), batch):
            out.append(model(torch.from_numpy(z[i : i + batch])).numpy())
    return np.concatenate(out) if out else np.zeros_like(z)


def _loss(model: AutoEncoder, z: torch.Tensor, batch: int = 4096) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(z), batch):
            zb = z[i : i + batch]
            total += float(((model(zb) - zb) ** 2).sum())
    return total / max(1, z.numel())


def train(
    model: AutoEncoder,
    z_train: np.ndarray,
    z_val: np.ndarray,
    cfg: TrainConfig,
    what: str = "train",
) -> tuple[AutoEncoder, History]:
    """Train a copy of `model` on z_train (n, F) float32; return the copy with the weights of
    its best validation epoch, and the loss history. `model` itself is not changed."""
    t0 = time.perf_counter()
    model = copy.deepcopy(model)
    xt, xv = torch.from_numpy(z_train), torch.from_numpy(z_val)
    n = len(xt)
    batch = max(8, min(cfg.batch_size, n // 16))
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_losses: list[float] = []
    val_losses: list[float] = []
    best, best_epoch, best_state = math.inf, 0, copy.deepcopy(model.state_dict())
    progress_at, stale = math.inf, 0  # patience counts epochs without a min_delta improvement
    with torch_threads(cfg.threads):
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            total = 0.0
            for idx in torch.randperm(n, generator=gen).split(batch):
                zb = xt[idx]  # (batch, F)
                zin = _mask_blocks(zb, cfg.mask_rate, gen) if cfg.mask_rate > 0 else zb
                loss = ((model(zin) - zb) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            val = _loss(model, xv)
            train_losses.append(total / n)
            val_losses.append(val)
            if val < best:
                best, best_epoch, best_state = val, epoch, copy.deepcopy(model.state_dict())
            if val < progress_at * (1 - cfg.min_delta):  # progress_at starts at inf
                progress_at, stale = val, 0
            else:
                stale += 1
            log.info("%s: epoch %d/%d  train loss %.4f  val loss %.4f%s", what, epoch,
                     cfg.epochs, total / n, val, "  (best)" if best_epoch == epoch else "")
            if stale >= cfg.patience:
                log.info("%s: early stop, best epoch %d", what, best_epoch)
                break
    model.load_state_dict(best_state)
    model.eval()
    return model, History(train_losses, val_losses, best_epoch, time.perf_counter() - t0)


REFINE = 2  # reconstruction rounds that re-impute missing inputs (module docstring)


def refined_reconstruction(model: AutoEncoder, z_in: np.ndarray, missing: np.ndarray,
                           clip: float, refine: int = REFINE) -> np.ndarray:
    """(n, F) reconstruction of the AE input `z_in`, the `missing` inputs replaced by the
    previous round's reconstruction (clipped to +-clip) `refine` times (module docstring)."""
    recon = reconstruct(model, z_in)
    if not missing.any():
        return recon
    for _ in range(refine):
        z_in = np.where(missing, np.clip(recon, -clip, clip), z_in).astype(np.float32)
        recon = reconstruct(model, z_in)
    return recon


def residual_weights(
    recon: np.ndarray, z: np.ndarray, active: np.ndarray, floor: float = 0.01
) -> np.ndarray:
    """(F,) float32 weight per feature = 1 / mean squared residual (z - recon)^2 over
    training passes, the residual floored at `floor` (z units^2, i.e. 0.1 robust sigma) so a
    feature the model happens to reproduce exactly cannot get an unbounded weight. Inactive
    features weigh 0."""
    resid = ((recon - z) ** 2).mean(axis=0)
    return np.where(active, 1.0 / np.maximum(resid, floor), 0.0).astype(np.float32)


@dataclass(frozen=True)
class Detector:
    """Everything the exported graph computes: preprocessing, autoencoder, feature weights."""

    prep: Preprocessor
    model: AutoEncoder
    weights: np.ndarray  # (F,) float32, from `residual_weights`
    refine: int = REFINE  # re-imputation rounds (module docstring)
    # (knots, slopes): a die missing a share m of its active features has its score divided
    # by max(1 + sum_k slopes_k relu(m - knots_k), SPREAD_MIN) (`missing_spread`, module
    # docstring): piecewise linear in m, exactly 1 for a complete die; ((), ()) = none
    spread: tuple[tuple[float, ...], tuple[float, ...]] = ((), ())

    @classmethod
    def fit(cls, prep: Preprocessor, model: AutoEncoder, x_train: np.ndarray,
            refine: int = REFINE, *, x_holdout: np.ndarray | None = None,
            seed: int = 0) -> Detector:
        """Attach the feature weights measured on training passes `x_train` (raw), then the
        missing-share correction (`missing_spread`) measured on passes the model did not
        learn from, `x_holdout` (validation passes; `x_train` when None: on the very rows it
        fitted, the complete dies' tail is short and the correction overshoots, on floor seed
        203 dies missing 45% then failed 0.30% where complete ones failed 1.17%)."""
        det = cls(prep, model, np.zeros(prep.n_features, np.float32), refine)
        weights = residual_weights(det.reconstruction(x_train), prep.scale(x_train), prep.active)
        det = cls(prep, model, weights, refine)
        rows = x_train if x_holdout is None else x_holdout
        return dataclasses.replace(det, spread=missing_spread(det, rows, seed))

    def reconstruction(self, x: np.ndarray) -> np.ndarray:
        """(n, F) raw -> (n, F) float32 reconstruction in z units (refined where missing)."""
        missing = np.isnan(np.asarray(x, dtype=np.float32))
        return refined_reconstruction(self.model, self.prep.transform(x), missing,
                                      self.prep.clip, self.refine)

    def denominators(self, missing: np.ndarray) -> np.ndarray:
        """(n, F) bool missing -> (n, 1) float32: what a die's summed contributions are divided
        by, its measured active features times the missing-share factor (the graph's steps)."""
        count = np.where(missing, 0, self.prep.active).sum(axis=1, keepdims=True)
        denom = np.maximum(count, 1).astype(np.float32)
        knots, slopes = self.spread
        if not knots:
            return denom
        share = np.float32(1) - count.astype(np.float32) / np.float32(self.prep.active.sum())
        hinge = np.maximum(share - np.asarray(knots, np.float32), np.float32(0))  # (n, K)
        factor = hinge @ np.asarray(slopes, np.float32)[:, None] + np.float32(1)
        return (denom * np.maximum(factor, np.float32(SPREAD_MIN))).astype(np.float32)

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """(n, F) raw -> (n, F) float32 per-feature contributions; they sum to the score.
        The reference for the ONNX graph (same float32 steps, torch for the autoencoder)."""
        missing = np.isnan(np.asarray(x, dtype=np.float32))
        z = self.prep.scale(x)  # (n, F), |z| <= bound
        recon = self.reconstruction(x)
        contrib = np.where(missing, np.float32(0), (z - recon) ** 2 * self.weights)
        return (contrib / self.denominators(missing)).astype(np.float32)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """(n, F) raw -> (n,) float32 anomaly scores."""
        return self.contributions(x).sum(axis=1, dtype=np.float32)


SPREAD_MIN = 0.5  # the missing-share factor never more than doubles a score
SPREAD_SHARES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)  # shares of active features blanked to fit it
SPREAD_QUANTILE = 0.99  # the tail the correction matches (near the 1% threshold)


def missing_spread(det: Detector, x_passes: np.ndarray, seed: int = 0, max_rows: int = 4000
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(knots, slopes) of the missing-share factor (module docstring): the factor at each share
    m of `SPREAD_SHARES` is how far the `SPREAD_QUANTILE` of the scores of passes `x_passes`
    (raw; validation passes in a build) moves when a share m of each die's active features is
    blanked at random (the same dies at every share, so the ratios are paired); linear between
    shares, from 1 at m = 0, and beyond the last share with the last slope. Dies with at most
    2% of their active features missing serve as the complete ones; ((), ()), no correction,
    when fewer than 200 of them (SECOM's validation part, say)."""
    x = np.asarray(x_passes, dtype=np.float32)
    act = np.flatnonzero(det.prep.active)
    if len(act) < 10:
        return (), ()
    rows = x[np.isnan(x[:, act]).mean(axis=1) <= 0.02]
    if len(rows) < 200:
        return (), ()
    rng = np.random.default_rng(seed)
    if len(rows) > max_rows:
        rows = rows[np.sort(rng.choice(len(rows), max_rows, replace=False))]
    plain = dataclasses.replace(det, spread=((), ()))
    base = float(np.quantile(plain.scores(rows), SPREAD_QUANTILE))
    if not (np.isfinite(base) and base > 0):
        return (), ()
    order = np.argsort(rng.random((len(rows), len(act))), axis=1)  # a random column order
    shares, factors = [0.0], [1.0]
    for m in SPREAD_SHARES:
        k = max(1, round(m * len(act)))
        blank = rows.copy()
        np.put_along_axis(blank, act[order[:, :k]], np.nan, axis=1)
        shares.append(k / len(act))
        factors.append(float(np.quantile(plain.scores(blank), SPREAD_QUANTILE)) / base)
    slope = np.diff(factors) / np.diff(shares)  # (K,) between consecutive shares
    hinges = np.diff(slope, prepend=0.0)  # the change of slope at each knot
    return (tuple(float(np.float32(v)) for v in shares[:-1]),
            tuple(float(np.float32(v)) for v in hinges))
