"""Stage 4: structured pruning. Whole hidden units go, so every weight matrix really shrinks
(rows of one layer, columns of the next) and the exported graph does less work; nothing is
merely zeroed.

A unit's importance is ||incoming weights||_2 * ||outgoing weights||_2: a unit that reads little
or writes little matters little. Pruning is gradual: in each of `steps` steps every hidden layer
keeps keep^(s/steps) of its original width (the most important units, in their original order),
then the network is fine-tuned (same loop as training, early stopping on validation loss). A
removed unit's mean activation over training passes is folded into the next layer's bias, so
the network starts each fine-tune close to where it was.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from optimize.train import AutoEncoder, History, TrainConfig, train

log = logging.getLogger("edgefleet.optimize")


@dataclass(frozen=True)
class PruneConfig:
    keep: float = 0.3  # share of each hidden layer's units kept at the end
    steps: int = 2  # prune-then-fine-tune rounds
    finetune_epochs: int = 10  # per round (early stopping applies)
    finetune_lr: float = 1e-3
    min_units: int = 2


@dataclass(frozen=True)
class PruneResult:
    model: AutoEncoder
    params_before: int
    params_after: int
    sizes_before: tuple[int, ...]
    sizes_after: tuple[int, ...]
    history: tuple[History, ...]


def unit_importance(model: AutoEncoder) -> list[np.ndarray]:
    """Per hidden layer (the outputs of every layer but the last): (width,) importance."""
    layers = list(model.layers)
    out = []
    with torch.no_grad():
        for layer, nxt in itertools.pairwise(layers):
            incoming = layer.weight.norm(dim=1)  # (width,): row h = weights into unit h
            outgoing = nxt.weight.norm(dim=0)  # (width,): column h = weights out of unit h
            out.append((incoming * outgoing).numpy())
    return out


def _hidden_means(model: AutoEncoder, z: np.ndarray) -> list[torch.Tensor]:
    """Mean post-ReLU activation of every hidden unit over `z` (n, F)."""
    means = []
    with torch.no_grad():
        h = torch.from_numpy(z)
        for layer in list(model.layers)[:-1]:
            h = torch.relu(layer(h))  # (n, width)
            means.append(h.mean(dim=0))
    return means


def shrink(model: AutoEncoder, keep: list[np.ndarray], z: np.ndarray) -> AutoEncoder:
    """A new, smaller AutoEncoder with only the units `keep[i]` (sorted indices) of hidden
    layer i. The removed units' mean activations over `z` are folded into the next biases."""
    layers = list(model.layers)
    means = _hidden_means(model, z)
    sizes = [layers[0].in_features, *(len(k) for k in keep), layers[-1].out_features]
    small = AutoEncoder(sizes)
    with torch.no_grad():
        for i, (src, dst) in enumerate(zip(layers, small.layers, strict=True)):
            w, b = src.weight.clone(), src.bias.clone()  # (out, in), (out,)
            if i > 0:  # fold removed inputs, then drop their columns
                gone = np.setdiff1d(np.arange(w.shape[1]), keep[i - 1])
                b += w[:, gone] @ means[i - 1][gone]
                w = w[:, keep[i - 1]]
            if i < len(keep):
                w, b = w[keep[i]], b[keep[i]]
            dst.weight.copy_(w)
            dst.bias.copy_(b)
    small.eval()
    return small


def prune(
    model: AutoEncoder,
    z_train: np.ndarray,
    z_val: np.ndarray,
    cfg: PruneConfig,
    train_cfg: TrainConfig,
) -> PruneResult:
    """Prune hidden units of (a copy of) `model` down to `cfg.keep` of each layer's width,
    fine-tuning after every step. z_train / z_val: (n, F) autoencoder inputs of passing dies."""
    if not 0 < cfg.keep <= 1 or cfg.steps < 1:
        raise ValueError(f"prune: keep must be in (0, 1] and steps >= 1, got {cfg}")
    original = model.sizes[1:-1]
    sample = z_train[: min(len(z_train), 4096)]
    ft_cfg = replace(train_cfg, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr)
    histories = []
    current = model
    for step in range(1, cfg.steps + 1):
        fraction = cfg.keep ** (step / cfg.steps)
        targets = [min(w, max(cfg.min_units, round(w * fraction))) for w in original]
        keep = [np.sort(np.argsort(-imp, kind="stable")[:t])
                for imp, t in zip(unit_importance(current), targets, strict=True)]
        current = shrink(current, keep, sample)
        log.info("prune: step %d/%d, hidden widths %s, %d parameters", step, cfg.steps,
                 "-".join(map(str, current.sizes[1:-1])), current.n_params())
        current, hist = train(current, z_train, z_val, replace(ft_cfg, seed=train_cfg.seed + step),
                              what=f"fine-tune {step}/{cfg.steps}")
        histories.append(hist)
    return PruneResult(current, model.n_params(), current.n_params(), model.sizes,
                       current.sizes, tuple(histories))
