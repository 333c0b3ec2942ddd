"""End-to-end sorting on a small synthetic recording: accuracy regressions fail CI."""

import json
import warnings

import numpy as np
import pytest

import spikearray as sa
from spikearray.synthetic import generate_recording


def _score(sorting, truth):
    from spikeinterface.comparison import compare_sorter_to_ground_truth
    from spikeinterface.core import NumpySorting

    fs = truth.attrs["sampling_rate"]
    gt = NumpySorting.from_samples_and_labels([truth.spike_time.values], [truth.spike_unit.values], fs)
    so = NumpySorting.from_samples_and_labels([sorting.spike_time.values], [sorting.spike_unit.values], fs)
    return compare_sorter_to_ground_truth(gt, so, exhaustive_gt=True)


@pytest.fixture(scope="module")
def sorted_small():
    rec, truth = generate_recording(duration=30.0, n_channels=32, n_units=10, seed=7, amplitudes_uV=(60, 400))
    sorting = sa.sort(rec, sa.Settings(nblocks=0), progress=False)
    return rec, truth, sorting


def test_accuracy_on_planted_units(sorted_small):
    _, truth, sorting = sorted_small
    cmp = _score(sorting, truth)
    perf = cmp.get_performance()
    assert cmp.count_well_detected_units(0.8) >= 9
    assert cmp.count_false_positive_units() <= 1
    assert float(np.median(perf["precision"])) > 0.95


def test_sorting_dataset_contract(sorted_small):
    rec, truth, so = sorted_small
    assert so["spike_time"].dtype == np.int64 and (np.diff(so.spike_time.values) >= 0).all()
    K = so.sizes["unit"]
    assert so["template"].shape == (K, 61, 32) and so["template"].attrs["units"] == "uV"
    assert set(np.unique(so.label.values)) <= {"good", "mua"}
    np.testing.assert_allclose(so.firing_rate.values, so.n_spikes.values / 30.0)
    assert np.bincount(so.spike_unit.values, minlength=K).tolist() == so.n_spikes.values.tolist()
    # µV amplitudes: each planted unit's ptp is recovered by its best-matching unit within 20 %
    cmp = _score(so, truth)
    for u, k in cmp.best_match_12.items():
        if k != -1:
            assert float(so.amplitude[int(k)]) == pytest.approx(float(truth.unit_ptp_uV[int(u)]), rel=0.2)
    timings = json.loads(so.attrs["timings"])
    assert {"preprocess", "detect", "cluster", "match"} <= set(timings)
    assert json.loads(so.attrs["settings"])["nblocks"] == 0


def test_same_input_same_spikes(sorted_small):
    rec, _, so = sorted_small
    again = sa.sort(rec, sa.Settings(nblocks=0), progress=False)
    np.testing.assert_array_equal(again.spike_time.values, so.spike_time.values)
    np.testing.assert_array_equal(again.spike_unit.values, so.spike_unit.values)


def test_no_spikes_gives_empty_sorting():
    rec, _ = generate_recording(duration=4.0, n_channels=16, n_units=0, seed=1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        so = sa.sort(rec, sa.Settings(nblocks=0, batch_size=30000), progress=False)
    assert so.sizes["unit"] == 0 and so.sizes["spike"] == 0
    assert any("no" in str(x.message).lower() for x in w)
