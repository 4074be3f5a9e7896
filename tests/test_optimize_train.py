"""Stage 3-4: training is deterministic for a seed and stops early; structured pruning really
removes hidden units (smaller matrices, fewer parameters) without a jump in the output."""

from __future__ import annotations

import numpy as np
import torch

from optimize.prune import PruneConfig, prune, shrink, unit_importance
from optimize.train import (
    AEConfig,
    AutoEncoder,
    TrainConfig,
    new_autoencoder,
    reconstruct,
    train,
)
from tests.optimize_support import FAST_TRAIN, N_PARAMS, ae_inputs, small_model


def _weights(model: AutoEncoder) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_training_is_deterministic_for_a_seed():
    z_train, z_val = ae_inputs()
    runs = [train(new_autoencoder(N_PARAMS, AEConfig(), seed=5), z_train, z_val,
                  TrainConfig(epochs=2, seed=5))[0] for _ in range(2)]
    other = train(new_autoencoder(N_PARAMS, AEConfig(), seed=6), z_train, z_val,
                  TrainConfig(epochs=2, seed=6))[0]
    for a, b in zip(_weights(runs[0]), _weights(runs[1]), strict=True):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(_weights(runs[0]), _weights(other),
                                                     strict=True))


def test_training_lowers_validation_loss_and_keeps_the_best_epoch():
    z_train, z_val = ae_inputs()
    start = new_autoencoder(N_PARAMS, AEConfig(), seed=0)
    before = _weights(start)
    model, hist = train(start, z_train, z_val, FAST_TRAIN)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(start), strict=True))
    assert 1 <= hist.best_epoch <= len(hist.val_loss) <= FAST_TRAIN.epochs
    assert hist.val_loss[hist.best_epoch - 1] == min(hist.val_loss) < hist.val_loss[0] * 1.0001
    got = float(((reconstruct(model, z_val) - z_val) ** 2).mean())
    assert abs(got - min(hist.val_loss)) < 1e-4 * max(1.0, got)


def test_early_stopping_ends_training_after_patience_epochs_without_progress():
    z_train, z_val = ae_inputs()
    cfg = TrainConfig(epochs=50, patience=1, min_delta=0.5)  # nothing counts as progress
    _, hist = train(new_autoencoder(N_PARAMS, AEConfig(), seed=0), z_train, z_val, cfg)
    assert len(hist.val_loss) == 2
    assert hist.best_epoch == 1 + int(np.argmin(hist.val_loss))  # the best weights are kept


def test_widths_shrink_with_the_number_of_features():
    assert AEConfig().layer_sizes(512) == (512, 1024, 256, 64, 256, 1024, 512)
    assert AEConfig().layer_sizes(207) == (207, 414, 104, 26, 104, 414, 207)
    assert min(AEConfig().layer_sizes(16)) >= 4


def test_structured_pruning_shrinks_every_hidden_matrix():
    z_train, z_val = ae_inputs()
    model = small_model()
    result = prune(model, z_train, z_val, PruneConfig(keep=0.3, steps=2, finetune_epochs=2),
                   FAST_TRAIN)
    small = result.model
    assert result.sizes_before == (32, 64, 16, 4, 16, 64, 32)
    assert result.sizes_after == (32, 19, 5, 2, 5, 19, 32)
    sizes = result.sizes_after
    for layer, n_in, n_out in zip(small.layers, sizes[:-1], sizes[1:], strict=True):
        assert tuple(layer.weight.shape) == (n_out, n_in)  # really smaller, not masked
    assert result.params_after == small.n_params() < 0.35 * result.params_before
    assert model.sizes == result.sizes_before  # the input model is untouched


def test_shrink_keeps_important_units_and_folds_the_rest_into_the_next_bias():
    model = small_model()
    z = ae_inputs()[0]
    everything = [np.arange(w) for w in model.sizes[1:-1]]
    same = shrink(model, everything, z)
    np.testing.assert_allclose(reconstruct(same, z), reconstruct(model, z), atol=1e-6)
    # A unit that writes nothing matters nothing: removing it leaves the output unchanged.
    with torch.no_grad():
        model2 = shrink(model, everything, z)
        model2.layers[1].weight[:, 0] = 0.0
    imp = unit_importance(model2)
    assert imp[0][0] == 0.0
    keep = [np.arange(1, model2.sizes[1]), *everything[1:]]
    np.testing.assert_allclose(reconstruct(shrink(model2, keep, z), z),
                               reconstruct(model2, z), atol=1e-5)


def test_missing_spread_keeps_the_tail_of_passes_with_missing_values_in_place():
    """Blanking a share of every pass's values widens the score tail (fewer features in the
    mean); the fitted factor brings the 99th percentile back near the complete passes'."""
    import dataclasses

    from optimize.train import SPREAD_SHARES, Detector
    from tests.optimize_support import small_split

    split, prep = small_split()
    x = split.train.x
    det = Detector.fit(prep, small_model(), x)
    assert len(det.spread[0]) == len(SPREAD_SHARES) and det.spread[0][0] == 0.0
    plain = dataclasses.replace(det, spread=((), ()))
    base = np.quantile(plain.scores(x), 0.99)
    rng = np.random.default_rng(5)
    raw, fixed = [], []
    for m in SPREAD_SHARES:
        blank = x.copy()
        cols = np.argsort(rng.random(blank.shape), axis=1)[:, :round(m * N_PARAMS)]
        np.put_along_axis(blank, cols, np.nan, axis=1)
        raw.append(np.quantile(plain.scores(blank), 0.99) / base)
        fixed.append(np.quantile(det.scores(blank), 0.99) / base)
    assert raw[-1] > 1.15  # the effect is there without the factor
    assert all(0.8 < f < 1.15 for f in fixed), fixed
    assert max(abs(f - 1) for f in fixed) < max(abs(r - 1) for r in raw)
