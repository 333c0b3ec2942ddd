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


@pytest.fixture(scope="session")
def sorted_session(tmp_path_factory):
    """A real ``sa.sort`` of a tiny SpikeGLX session (6 s, 32 channels, 6 planted units): the interop tests'
    "sorted synthetic recording". Returns dict(root, raw, out, recording, truth, sorting); ``out`` holds
    sorting.zarr and phy/. Shared by tests/test_nwb.py, test_analyzer.py and test_phy_curation.py."""
    import spikearray as sa
    from spikearray.synthetic import write_spikeglx

    root = tmp_path_factory.mktemp("sorted_session")
    (root / "data").mkdir()
    rec, truth = generate_recording(duration=6.0, n_channels=32, n_units=6, seed=11, amplitudes_uV=(80, 400),
                                    firing_rates=(8.0, 20.0))
    raw = write_spikeglx(rec, root / "data" / "run_g0_t0.imec0.ap.bin")
    recording = sa.open_recording(raw)
    sorting = sa.sort(recording, sa.Settings(nblocks=0, batch_size=30000), output=root / "out", progress=False)
    return {"root": root, "raw": raw, "out": root / "out", "recording": recording, "truth": truth,
            "sorting": sorting}


@pytest.fixture(scope="session")
def sorted_drifting_session(tmp_path_factory):
    """A drifting synthetic SpikeGLX session (16 s, 32 channels, 8 units, 20 µm rigid drift) sorted once with
    drift correction (``nblocks=1, batch_size=30000``), outputs and report: ``root/sorted`` holds sorting.zarr,
    phy/ and report/. Returns dict(root, raw, out, truth). Shared by tests/test_report.py and test_docs.py, which
    sorted the same kind of session with the same settings each on their own."""
    import spikearray as sa
    from spikearray.synthetic import write_spikeglx

    root = tmp_path_factory.mktemp("drifting_session")
    rec, truth = generate_recording(duration=16.0, n_channels=32, n_units=8, seed=1, drift="rigid", drift_um=20)
    raw = write_spikeglx(rec, root / "demo_g0_t0.imec0.ap.bin")
    out = root / "sorted"
    sa.sort(sa.open_recording(raw), sa.Settings(nblocks=1, batch_size=30000), output=out, progress=False,
            report=True)
    return {"root": root, "raw": raw, "out": out, "truth": truth}
