"""Small data and fast settings shared by the tests of the `optimize/` stages."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np

from optimize.data import Dataset, DieConfig, generate_dies, write_csv
from optimize.pipeline import BuildConfig, load_config
from optimize.preprocess import Preprocessor, fit_preprocessor
from optimize.split import Split, split_dataset
from optimize.train import AEConfig, AutoEncoder, TrainConfig, new_autoencoder, train

N_DIES, N_PARAMS = 600, 32
# Seconds, not minutes: few epochs, short latency runs.
FAST = {
    "train": {"epochs": 3},
    "prune": {"finetune_epochs": 2},
    "distill": {"epochs": 5, "latency_runs": 200},
    "evaluate": {"latency_runs": 200, "latency_rounds": 2, "throughput_runs": 1,
                 "throughput_batch": 64},
    # 600 dies and 3 epochs make a model no floor should take: the tests that are not about
    # the gates sign it anyway.
    "gate": {"accept_risk": "test data: 600 dies, 3 epochs"},
}
FAST_TRAIN = TrainConfig(epochs=3)


@cache
def small_dies(seed: int = 1) -> Dataset:
    """600 dies x 32 parameters with many defects, so every class shows up in each split."""
    return generate_dies(DieConfig(n_dies=N_DIES, n_params=N_PARAMS, seed=seed, gross_rate=0.04,
                                   subtle_rate=0.08))


def write_small_csv(path: Path, seed: int = 1) -> Path:
    return write_csv(path, small_dies(seed))


def fast_config_file(path: Path, **sections: dict) -> Path:
    cfg = {k: dict(v) for k, v in FAST.items()}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    path.write_text(json.dumps(cfg))
    return path


def fast_config(**sections: dict) -> BuildConfig:
    merged = {k: dict(v) for k, v in FAST.items()}
    for k, v in sections.items():
        merged.setdefault(k, {}).update(v)
    return load_config(env={}, overrides=merged)


@cache
def small_split() -> tuple[Split, Preprocessor]:
    split = split_dataset(small_dies())
    return split, fit_preprocessor(split.train.x)


@cache
def small_model() -> AutoEncoder:
    """A trained (briefly) 32-wide autoencoder on the small split."""
    split, prep = small_split()
    z_val = prep.transform(split.val.x[split.val.passes])
    model = new_autoencoder(N_PARAMS, AEConfig(), seed=0)
    return train(model, prep.transform(split.train.x), z_val, FAST_TRAIN)[0]


def ae_inputs() -> tuple[np.ndarray, np.ndarray]:
    split, prep = small_split()
    return prep.transform(split.train.x), prep.transform(split.val.x[split.val.passes])
