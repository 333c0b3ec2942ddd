import numpy as np
import pytest
import xarray as xr

from spikearray.synthetic import displacement_at, generate_recording


def test_same_seed_same_bits_and_other_seed_differs():
    a, ta = generate_recording(duration=2.0, n_channels=16, n_units=4, seed=11)
    b, tb = generate_recording(duration=2.0, n_channels=16, n_units=4, seed=11)
    c, _ = generate_recording(duration=2.0, n_channels=16, n_units=4, seed=12)
    np.testing.assert_array_equal(a.values, b.values)
    xr.testing.assert_identical(ta, tb)
    assert not np.array_equal(a.values, c.values)


@pytest.mark.parametrize("chunk", [0.13, 0.5, 1.7])
def test_chunking_does_not_change_a_bit(chunk):
    ref, _ = generate_recording(duration=3.0, n_channels=16, n_units=5, seed=2, drift="rigid", chunk_seconds=3.0)
    got, _ = generate_recording(duration=3.0, n_channels=16, n_units=5, seed=2, drift="rigid", chunk_seconds=chunk)
    assert got.chunks[0][0] == int(round(chunk * 30000))
    np.testing.assert_array_equal(ref.values, got.values)


def test_planted_spikes_reappear_on_their_best_channel(small_recording):
    rec, truth = small_recording
    uv = rec.values.astype(float) * rec.attrs["gain_to_uV"]
    uv -= np.median(uv, axis=0)
    nt0 = truth.attrs["nt0"]
    for u in range(truth.sizes["unit"]):
        st = truth.spike_time.values[truth.spike_unit.values == u]
        ch = int(truth.unit_best_channel[u])
        # spike-triggered average on the best channel ≈ planted template there (noise averages out)
        win = np.stack([uv[t - nt0:t - nt0 + 61, ch] for t in st])
        sta = win.mean(0) - win.mean()
        tmpl = truth.template.values[u, :, ch]
        r = np.corrcoef(sta, tmpl)[0, 1]
        assert r > 0.9, (u, r)
        ptp = tmpl.max() - tmpl.min()
        assert ptp == pytest.approx(float(truth.unit_ptp_uV[u]), rel=1e-6)
        # the trough sits at the spike time, within a sample
        assert abs(int(np.argmin(sta)) - nt0) <= 1


def test_truth_is_physical(small_recording):
    _, truth = small_recording
    fs = truth.attrs["sampling_rate"]
    for u in range(truth.sizes["unit"]):
        st = truth.spike_time.values[truth.spike_unit.values == u]
        assert np.diff(st).min() >= truth.attrs["refractory_ms"] * fs / 1000 - 1
    assert (np.diff(truth.spike_time.values) >= 0).all()
    ptp = truth.unit_ptp_uV.values
    assert ptp.min() >= 50 and ptp.max() <= 400


def test_noise_level_and_spatial_correlation():
    rec, _ = generate_recording(duration=2.0, n_channels=32, n_units=0, seed=4, common_uV=0.0)
    uv = rec.values.astype(float) * rec.attrs["gain_to_uV"]
    uv -= uv.mean(0)
    assert np.std(uv) == pytest.approx(10.0, rel=0.05)
    c = np.corrcoef(uv.T)
    # channels 0 and 1 are 32 µm apart: exp(-32/25) ≈ 0.28; channels 0 and 30 are ~300 µm apart: ≈ 0
    assert c[0, 1] == pytest.approx(np.exp(-32 / 25), abs=0.05)
    assert abs(c[0, 30]) < 0.05


def test_drift_moves_units_along_y():
    d = displacement_at(np.array([0.0, 2.5, 5.0, 7.5, 10.0]), np.array(0.0), drift="rigid", drift_um=30.0,
                        drift_period=10.0, y_range=(0, 100))
    np.testing.assert_allclose(d, [0, 15, 0, -15, 0], atol=1e-9)
    nr = displacement_at(np.array(2.5), np.array([0.0, 100.0]), drift="nonrigid", drift_um=30.0,
                         drift_period=10.0, y_range=(0, 100))
    np.testing.assert_allclose(nr, [4.5, 15.0])
    rec, truth = generate_recording(duration=4.0, n_channels=32, n_units=3, seed=1, drift="rigid", drift_um=30,
                                    drift_period=4.0)
    assert float(truth.displacement.max()) == pytest.approx(15.0, abs=0.5)
    assert truth.unit_displacement.dims == ("drift_time", "unit")
