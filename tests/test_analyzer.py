"""to_sorting_analyzer: SpikeInterface's quality metrics and widgets run on our templates and amplitudes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

import spikearray as sa
from _sorting import make_sorting
from spikearray.errors import OutputError, OutputExistsError

sic = pytest.importorskip("spikeinterface.core")


def _quiet():
    warnings.simplefilter("ignore")  # SpikeInterface warns about short recordings (presence ratio, drift bins)


@pytest.fixture(scope="module")
def analyzer(sorted_session):
    return sa.to_sorting_analyzer(sorted_session["sorting"])


def test_templates_sparsity_and_recording(sorted_session, analyzer):
    s = sorted_session["sorting"].load()
    assert analyzer.has_recording() and analyzer.return_in_uV
    assert list(map(int, analyzer.unit_ids)) == s.unit.values.tolist()
    assert list(map(int, analyzer.channel_ids)) == s.channel.values.tolist()
    np.testing.assert_allclose(analyzer.get_channel_locations(), np.c_[s.x.values, s.y.values])
    np.testing.assert_allclose(analyzer.recording.get_channel_gains(), sorted_session["recording"].gain_to_uV.values)
    tmpl = analyzer.get_extension("templates")
    np.testing.assert_allclose(tmpl.get_data(), s.template.values, rtol=0, atol=1.0)  # µV; in fact identical
    assert tmpl.nbefore == sa.Settings.from_json(s.attrs["settings"]).nt0min_
    assert tmpl.nbefore + tmpl.nafter == s.sizes["sample"]
    mask = analyzer.sparsity.mask
    np.testing.assert_array_equal(mask, sa.export.analyzer.unit_sparsity(s))
    best = [list(s.channel.values).index(c) for c in s.best_channel.values]
    assert mask[np.arange(len(best)), best].all() and (mask.sum(axis=1) < s.sizes["channel"]).all()
    np.testing.assert_array_equal(analyzer.get_main_channels(), best)


def test_templates_match_what_spikeinterface_extracts(sorted_session, analyzer):
    """The attached (filtered, referenced) recording is the space of our templates: SpikeInterface's own
    templates from it agree with ours to within noise."""
    s = sorted_session["sorting"]
    fresh = sic.create_sorting_analyzer(analyzer.sorting, analyzer.recording, sparse=False)
    fresh.compute("random_spikes", method="all")
    t = analyzer.get_extension("templates")
    fresh.compute("templates", ms_before=t.params["ms_before"], ms_after=t.params["ms_after"])
    theirs = fresh.get_extension("templates").get_data()
    ours = s.template.values
    rms = np.sqrt(np.mean((theirs - ours) ** 2))
    assert rms < 1.5, f"rms difference {rms:.2f} µV"  # measured 0.67 µV; 10 µV noise over ~50-140 spikes
    ptp = np.ptp(ours, axis=1).max(axis=1)
    assert (np.abs(theirs - ours).max(axis=(1, 2)) < 0.1 * ptp).all()


def test_amplitudes_in_spikeinterface_convention(sorted_session, analyzer):
    s = sorted_session["sorting"]
    ours = analyzer.get_extension("spike_amplitudes").get_data()
    vec = analyzer.sorting.to_spike_vector()
    fresh = sic.create_sorting_analyzer(analyzer.sorting, analyzer.recording, sparse=False)
    fresh.compute("random_spikes", method="all")
    fresh.compute("templates")
    fresh.compute("spike_amplitudes")
    theirs = fresh.get_extension("spike_amplitudes").get_data()
    for k, u in enumerate(analyzer.unit_ids):
        m = vec["unit_index"] == k
        assert np.median(ours[m]) < 0  # negative-going spikes: signed peak in µV
        assert np.median(ours[m]) == pytest.approx(np.median(theirs[m]), rel=0.05)
        # = the Dataset's spike_amplitude (peak-to-peak, µV) × the template's extremum / peak-to-peak on its best
        # channel (both in time order within the unit)
        mine = s.spike_amplitude.values[s.spike_unit.values == int(u)]
        wf = s.template.sel(unit=int(u), channel=int(s.best_channel.sel(unit=int(u)))).values
        factor = wf[np.abs(wf).argmax()] / float(s.amplitude.sel(unit=int(u)))
        np.testing.assert_allclose(ours[m], mine * factor, rtol=1e-5)


def test_quality_metrics_and_widgets_run(sorted_session, analyzer):
    s = sorted_session["sorting"]
    with warnings.catch_warnings():
        _quiet()
        qm = analyzer.compute("quality_metrics", metric_names=["num_spikes", "firing_rate", "snr",
                                                              "isi_violation", "amplitude_median"]).get_data()
    np.testing.assert_array_equal(qm["num_spikes"].values, s.n_spikes.values)
    np.testing.assert_allclose(qm["firing_rate"].values, s.firing_rate.values, rtol=1e-6)
    assert (qm["snr"].values > 3).all()
    np.testing.assert_allclose(-qm["amplitude_median"].values, np.abs(qm["amplitude_median"].values))
    import matplotlib

    matplotlib.use("Agg")
    import spikeinterface.widgets as sw

    std = analyzer.get_extension("templates").get_data(operator="std")  # the widget's shading
    on = analyzer.sparsity.mask[:, None, :].repeat(std.shape[1], axis=1)
    assert 3 < np.median(std[on]) < 40  # µV: the 10 µV noise of the synthetic recording, filtered
    w = sw.plot_unit_templates(analyzer, unit_ids=analyzer.unit_ids[:2], backend="matplotlib")
    assert w.figure is not None
    sw.plot_unit_locations(analyzer, backend="matplotlib")
    assert not analyzer.has_extension("waveforms")  # nothing re-extracted


@pytest.mark.parametrize("fmt", ["binary_folder", "zarr"])
def test_disk_formats_reopen(sorted_session, tmp_path, fmt):
    s = sorted_session["sorting"]
    a = sa.to_sorting_analyzer(s, folder=tmp_path / "an", format=fmt, noise_levels=False)
    with pytest.raises(OutputExistsError):
        sa.to_sorting_analyzer(s, folder=tmp_path / "an", format=fmt)
    b = sic.load_sorting_analyzer(a.folder)
    assert b.format == fmt and b.has_recording()
    assert {"templates", "spike_amplitudes", "spike_locations", "unit_locations"} <= set(b.get_saved_extension_names())
    np.testing.assert_allclose(b.get_extension("templates").get_data(), s.template.values, atol=1.0)
    np.testing.assert_allclose(b.get_extension("spike_amplitudes").get_data(),
                               a.get_extension("spike_amplitudes").get_data())
    np.testing.assert_allclose(b.get_extension("unit_locations").get_data()[:, 1], s.depth.values)
    np.testing.assert_array_equal(b.sparsity.mask, a.sparsity.mask)
    tr = b.recording.get_traces(start_frame=1000, end_frame=1100, return_in_uV=True)
    np.testing.assert_allclose(tr, a.recording.get_traces(start_frame=1000, end_frame=1100, return_in_uV=True),
                               atol=1e-3)


def test_in_memory_recording_and_bad_arguments(small_recording, tmp_path):
    rec, truth = small_recording  # a lazy DataArray with no file behind it
    s = make_sorting(rec, truth)
    a = sa.to_sorting_analyzer(s, rec, noise_levels=False)
    np.testing.assert_allclose(a.get_extension("templates").get_data(), s.template.values, atol=1.0)
    raw = sa.to_sorting_analyzer(s, rec, preprocess=False, noise_levels=False).recording
    want = rec.isel(time=slice(0, 50)).values * rec.gain_to_uV.values
    np.testing.assert_allclose(raw.get_traces(start_frame=0, end_frame=50, return_in_uV=True), want, rtol=1e-6)
    with pytest.raises(OutputError, match="format"):
        sa.to_sorting_analyzer(s, rec, format="hdf5")
    with pytest.raises(OutputError, match="folder="):
        sa.to_sorting_analyzer(s, rec, format="zarr")


def test_cli_export_analyzer(sorted_session, tmp_path, capsys):
    from spikearray.cli import main

    out = tmp_path / "an"
    assert main(["export-analyzer", str(sorted_session["out"]), "--out", str(out), "--format", "zarr"]) == 0
    b = sic.load_sorting_analyzer(str(out) + ".zarr")
    assert b.get_num_units() == sorted_session["sorting"].sizes["unit"]
    assert "templates" in capsys.readouterr().out


def test_open_sorting_and_xarray_open_zarr(sorted_session):
    """docs/outputs.md: open_sorting is the way; xr.open_zarr works only where xarray and zarr-python agree."""
    store = sorted_session["out"] / "sorting.zarr"
    ds = sa.open_sorting(sorted_session["out"])
    np.testing.assert_array_equal(ds.spike_time.values, sorted_session["sorting"].spike_time.values)
    if int(zarr.__version__.split(".")[0]) < 3:
        with pytest.raises(TypeError, match="zarr_format"):
            xr.open_zarr(store)  # xarray >= 2026 passes zarr_format=, which zarr 2.18 lacks
    else:
        other = xr.open_zarr(store)
        np.testing.assert_array_equal(other.spike_time.values, ds.spike_time.values)
