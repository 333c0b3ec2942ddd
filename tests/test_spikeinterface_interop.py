"""SpikeInterface interop: recordings in (lazy, µV and geometry kept), sortings out (spike trains, properties)."""

from __future__ import annotations

import pickle
import warnings

import dask
import numpy as np
import pytest

si = pytest.importorskip("spikeinterface")
from spikeinterface.core import NumpyRecording, generate_ground_truth_recording  # noqa: E402

from _sorting import make_sorting  # noqa: E402
from spikearray import from_spikeinterface, open_recording, to_spikeinterface, write_sorting  # noqa: E402
from spikearray.errors import RecordingError  # noqa: E402


@pytest.fixture(scope="module")
def gt():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return generate_ground_truth_recording(durations=[3.0], num_channels=16, num_units=4, seed=2)


class _Counting:
    """Wraps a recording's get_traces to count calls (shows nothing is read while building the graph)."""

    def __init__(self, rec):
        self.calls = 0
        real = rec.get_traces

        def get_traces(*a, **k):
            self.calls += 1
            return real(*a, **k)

        rec.get_traces = get_traces


def test_float_recording_same_uV_traces_and_geometry(gt):
    rec_si, _ = gt
    counter = _Counting(rec_si)
    rec = from_spikeinterface(rec_si, chunk_seconds=1.0)
    assert counter.calls == 0  # lazy: nothing read at build time
    assert rec.dims == ("time", "channel") and rec.dtype == np.float32 and rec.attrs["units"] == "uV"
    assert rec.sizes["time"] == rec_si.get_num_samples() and rec.attrs["sampling_rate"] == rec_si.get_sampling_frequency()
    assert rec.data.chunks[0][0] == int(rec_si.get_sampling_frequency())
    want = rec_si.get_traces(return_in_uV=True)
    np.testing.assert_array_equal(rec.values, want)
    sub = rec.sa.seconds(1.0, 1.5).values
    np.testing.assert_array_equal(sub, want[int(1.0 * 25000):int(1.5 * 25000)])
    locs = rec_si.get_channel_locations()
    np.testing.assert_array_equal(rec["x"].values, locs[:, 0])
    np.testing.assert_array_equal(rec["y"].values, locs[:, 1])
    assert rec.attrs["si_channel_ids"] == [str(c) for c in rec_si.get_channel_ids()]
    # open_recording dispatches SpikeInterface objects here.
    rec2 = open_recording(rec_si)
    np.testing.assert_array_equal(rec2[:100].values, want[:100])


def test_int16_with_gains_stays_integer_and_pickles(tmp_path):
    from probeinterface import generate_multi_shank

    rng = np.random.default_rng(0)
    C, fs = 8, 30000.0
    counts = rng.integers(-500, 500, (60000, C)).astype(np.int16)
    r = NumpyRecording([counts], sampling_frequency=fs)
    gains = np.linspace(2.0, 3.0, C)
    r.set_channel_gains(gains)
    r.set_channel_offsets(0.0)
    probe = generate_multi_shank(num_shank=2, num_columns=1, num_contact_per_column=4)
    probe.set_device_channel_indices(np.arange(C))
    r.set_probe(probe)  # in place in SpikeInterface >= 0.105
    rec = from_spikeinterface(r, chunk_seconds=0.5)
    assert rec.dtype == np.int16 and rec.attrs["units"] == "counts"
    np.testing.assert_allclose(rec["gain_to_uV"].values, gains)
    np.testing.assert_array_equal(rec.values, counts)
    np.testing.assert_allclose(rec.sa.to_uV().values, r.get_traces(return_in_uV=True), rtol=1e-6)
    assert rec["shank"].values.tolist() == [0] * 4 + [1] * 4
    np.testing.assert_array_equal(rec["y"].values, r.get_channel_locations()[:, 1])
    # The graph pickles (for dask-distributed workers) and computes to the same values after the round trip.
    back = pickle.loads(pickle.dumps(rec))
    with dask.config.set(scheduler="synchronous"):
        np.testing.assert_array_equal(back[30000:30010].values, counts[30000:30010])


def test_int_with_offsets_becomes_float_uV():
    counts = np.arange(40, dtype=np.int16).reshape(10, 4)
    r = NumpyRecording([counts], sampling_frequency=1000.0)
    r.set_channel_gains(0.5)
    r.set_channel_offsets(-10.0)
    r.set_dummy_probe_from_locations(np.c_[np.zeros(4), np.arange(4) * 20.0])
    rec = from_spikeinterface(r)
    assert rec.dtype == np.float32 and rec.attrs["units"] == "uV"
    np.testing.assert_allclose(rec.values, counts * 0.5 - 10.0)


def test_multi_segment_and_no_geometry_rejected():
    seg = np.zeros((100, 2), np.float32)
    with pytest.raises(RecordingError, match="segments"):
        from_spikeinterface(NumpyRecording([seg, seg], sampling_frequency=1000.0))
    with pytest.raises(RecordingError, match="probe"):
        from_spikeinterface(NumpyRecording([seg], sampling_frequency=1000.0))


def test_to_spikeinterface_round_trips_trains(small_recording, tmp_path):
    rec, truth = small_recording
    ds = make_sorting(rec, truth)
    s = to_spikeinterface(ds)
    assert s.get_sampling_frequency() == ds.attrs["sampling_rate"]
    assert s.unit_ids.tolist() == ds["unit"].values.tolist()
    st, su = ds["spike_time"].values, ds["spike_unit"].values
    for u in s.unit_ids:
        np.testing.assert_array_equal(s.get_unit_spike_train(u), st[su == u])
    assert s.get_property("quality").tolist() == ds["label"].values.tolist()
    np.testing.assert_allclose(s.get_property("contamination"), ds["contamination"].values)
    np.testing.assert_allclose(s.get_property("depth"), ds["depth"].values)
    # From a saved sorting folder too.
    write_sorting(ds, tmp_path)
    s2 = to_spikeinterface(tmp_path)
    for u in s2.unit_ids:
        np.testing.assert_array_equal(s2.get_unit_spike_train(u), st[su == u])


def test_ground_truth_sorting_survives_both_ways(gt):
    rec_si, sorting_si = gt
    rec = from_spikeinterface(rec_si)
    import xarray as xr

    st = np.concatenate([sorting_si.get_unit_spike_train(u) for u in sorting_si.unit_ids]).astype(np.int64)
    su = np.concatenate([np.full(len(sorting_si.get_unit_spike_train(u)), i)
                         for i, u in enumerate(sorting_si.unit_ids)]).astype(np.int64)
    o = np.lexsort((su, st))
    ds = xr.Dataset({"spike_time": ("spike", st[o]), "spike_unit": ("spike", su[o])},
                    coords={"unit": np.arange(len(sorting_si.unit_ids))},
                    attrs={"sampling_rate": rec.attrs["sampling_rate"]})
    back = to_spikeinterface(ds)
    for i, u in enumerate(sorting_si.unit_ids):
        np.testing.assert_array_equal(back.get_unit_spike_train(i), sorting_si.get_unit_spike_train(u))
