"""Shared fixtures: a small synthetic RSNA-layout dataset, written once per test session."""

from pathlib import Path

import pytest

from ich_tune.config import build_experiment
from ich_tune.config.loader import merge


@pytest.fixture(scope="session")
def tiny_rsna(tmp_path_factory) -> Path:
    """Real DICOM files and Kaggle CSVs: 8 studies x 6 slices at 64 px, with RSNA's quirks."""
    from ich_tune.data.synthetic import generate

    root = tmp_path_factory.mktemp("rsna")
    generate(root, studies=8, slices=6, size=64, seed=3, positive_rate=0.4, quirk_rate=0.05)
    return root


def tiny_tree(root: Path, cache_dir: Path, **sections) -> dict:
    """An experiment tree small enough to train in a second: 3 windows at 32x32, 2 stages."""
    tree = {
        "data": {"root": str(root), "cache_dir": str(cache_dir), "full_size": 64, "lod": 1,
                 "channels": ["brain", "subdural", "bone"], "max_bad_fraction": 0.2},
        "model": {"hidden_dims": [8, 16], "dropout": 0.1},
        "loss": {"objective": "bce"},
        "optimizer": {"lr": 0.003},
        "schedule": {"warmup_steps": 2, "decay": "cosine"},
        "train": {"batch_size": 4, "max_steps": 6, "val_interval": 3},
        "logging": {"print_interval": 2, "tensorboard": False},
        "seed": 7,
    }
    return merge(tree, {}, sections, {})[0]


@pytest.fixture
def tiny_config(tiny_rsna, tmp_path):
    """A factory: tiny_config(train={"max_steps": 8}) -> ExperimentConfig."""
    return lambda **sections: build_experiment(tiny_tree(tiny_rsna, tmp_path / "cache", **sections), {})
