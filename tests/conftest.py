"""Shared fixtures: small seeded synthetic recordings, built once per module or session."""

from __future__ import annotations

import numpy as np
import pytest

from spikearray.synthetic import generate_recording


@pytest.fixture(scope="session")
def small_recording():
    """4 s, 32 channels, 6 units, NP1-like; (recording, truth)."""
    return generate_recording(duration=4.0, n_channels=32, n_units=6, seed=3)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
