"""export_nwb: pynwb reads the file back, nwbinspector finds nothing important, SpikeInterface reads the same trains."""

from __future__ import annotations

import datetime as dt
import sys

import numpy as np
import pytest

import spikearray as sa
from _sorting import make_sorting
from spikearray.errors import MetadataError, MissingExtraError, OutputExistsError

pynwb = pytest.importorskip("pynwb")

SUBJECT = {"subject_id": "mouse01", "species": "Mus musculus", "sex": "F", "age": "P90D",
           "description": "synthetic test subject"}


@pytest.fixture(scope="module")
def nwb_file(sorted_session, tmp_path_factory):
    path = tmp_path_factory.mktemp("nwb") / "session.nwb"
    sa.export_nwb(sorted_session["sorting"], path, subject=SUBJECT, location="VISp", write_raw=True,
                  experimenter="Doe, Jane", lab="test lab", institution="test institute")
    return path


def _read(path):
    io = pynwb.NWBHDF5IO(str(path), "r")
    return io, io.read()


def test_units_spike_times_labels_and_columns(sorted_session, nwb_file):
    s = sorted_session["sorting"].load()
    fs = s.attrs["sampling_rate"]
    io, f = _read(nwb_file)
    try:
        units = f.units
        assert units.id[:].tolist() == s.unit.values.tolist()
        st, su = s.spike_time.values, s.spike_unit.values
        for k, u in enumerate(s.unit.values):
            t = np.asarray(units.get_unit_spike_times(k))
            want = np.sort(st[su == u])
            assert len(t) == len(want)
            np.testing.assert_array_less(np.abs(t * fs - want), 1.0)  # within one sample (in fact exact)
        df = units.to_dataframe()
        assert df["quality"].tolist() == s.label.values.astype(str).tolist()
        np.testing.assert_array_equal(df["n_spikes"].values, s.n_spikes.values)
        np.testing.assert_array_equal(df["best_channel"].values, s.best_channel.values)
        for col in ("firing_rate", "amplitude", "depth", "unit_x", "contamination"):
            np.testing.assert_allclose(df[col].values, s[col].values, rtol=1e-6, err_msg=col)
        assert units.resolution == pytest.approx(1 / fs)
        # per-spike µV amplitudes in spike_times order
        amp0 = np.asarray(df["spike_amplitudes"].iloc[0])
        np.testing.assert_allclose(amp0, s.spike_amplitude.values[su == s.unit.values[0]], rtol=1e-6)
    finally:
        io.close()


def test_waveforms_in_uV_on_each_units_electrodes(sorted_session, nwb_file):
    s = sorted_session["sorting"].load()
    io, f = _read(nwb_file)
    try:
        units = f.units
        assert units.waveform_unit == "microvolts"
        assert units.waveform_rate == pytest.approx(s.attrs["sampling_rate"])
        nt0min = sa.Settings.from_json(s.attrs["settings"]).nt0min_
        assert units.waveform_time_before_peak_in_ms == pytest.approx(1000 * nt0min / s.attrs["sampling_rate"])
        chan_rows = f.electrodes["channel_index"][:]
        for k, u in enumerate(s.unit.values):
            elec = units["electrodes"][k]
            rows = elec.index.values  # electrode table rows of this unit
            wf = np.asarray(units["waveform_mean"][k])
            assert wf.shape == (s.sizes["sample"], len(rows)) == (61, 12)
            tmpl = s.template.sel(unit=u).values
            pos = [list(s.channel.values).index(c) for c in chan_rows[rows]]
            np.testing.assert_allclose(wf, tmpl[:, pos], rtol=0, atol=1e-4)  # µV, float32 storage
            assert int(s.best_channel.sel(unit=u)) in chan_rows[rows]
    finally:
        io.close()


def test_probe_electrodes_and_session_metadata(sorted_session, nwb_file):
    s = sorted_session["sorting"]
    rec = sorted_session["recording"]
    io, f = _read(nwb_file)
    try:
        e = f.electrodes.to_dataframe()
        np.testing.assert_array_equal(e["channel_index"].values, s.channel.values)
        np.testing.assert_allclose(e["rel_x"].values, s.x.values)
        np.testing.assert_allclose(e["rel_y"].values, s.y.values)
        np.testing.assert_array_equal(e["shank"].values, s.shank.values)
        assert e["contact_id"].tolist() == s.contact_id.values.astype(str).tolist()
        np.testing.assert_allclose(e["gain_to_uV"].values, rec.gain_to_uV.values, rtol=1e-12)
        assert set(f.electrode_groups) == {"shank0"} and list(f.devices) == ["probe"]
        # session start from the SpikeGLX .meta's fileCreateTime (2026-11-25T00:00:00, local time)
        assert f.session_start_time.replace(tzinfo=None) == dt.datetime(2026, 11, 25)
        assert f.session_start_time.tzinfo is not None
        assert f.subject.subject_id == "mouse01"
        # raw data, chunk-copied: int16 counts whose conversion gives volts
        es = f.acquisition["ElectricalSeriesAP"]
        want = rec.isel(time=slice(1000, 1400)).values
        np.testing.assert_array_equal(es.data[1000:1400], want)
        assert es.conversion == pytest.approx(float(rec.gain_to_uV.values[0]) * 1e-6)
        assert es.rate == pytest.approx(s.attrs["sampling_rate"]) and es.data.shape == rec.shape
    finally:
        io.close()


def test_nwbinspector_finds_nothing_important(nwb_file):
    from nwbinspector import Importance, inspect_nwbfile

    messages = list(inspect_nwbfile(nwbfile_path=str(nwb_file)))
    bad = [m for m in messages if m.importance in (Importance.CRITICAL, Importance.BEST_PRACTICE_VIOLATION)]
    assert not bad, [(m.check_function_name, m.message) for m in bad]


def test_spikeinterface_reads_the_same_trains(sorted_session, nwb_file):
    se = pytest.importorskip("spikeinterface.extractors")
    s = sorted_session["sorting"]
    si = se.read_nwb_sorting(str(nwb_file), electrical_series_path="acquisition/ElectricalSeriesAP")
    assert si.sampling_frequency == pytest.approx(s.attrs["sampling_rate"])
    assert list(map(int, si.unit_ids)) == s.unit.values.tolist()
    st, su = s.spike_time.values, s.spike_unit.values
    for u in si.unit_ids:
        np.testing.assert_array_equal(si.get_unit_spike_train(u), np.sort(st[su == int(u)]))
    assert list(si.get_property("quality")) == s.label.values.astype(str).tolist()


def test_raw_copy_goes_through_bounded_blocks(sorted_session):
    from spikearray.export.nwb import _raw_iterator

    rec = sorted_session["recording"]
    it = _raw_iterator(rec, rec.channel.values, buffer_gb=0.0002)  # 200 kB buffers for a 11.5 MB recording
    blocks = [chunk.selection for chunk in it]
    assert len(blocks) > 5
    assert max(b[0].stop - b[0].start for b in blocks) < rec.sizes["time"] / 5
    covered = sum((b[0].stop - b[0].start) * (b[1].stop - b[1].start) for b in blocks)
    assert covered == rec.size


def test_missing_metadata_names_the_argument(small_recording, tmp_path):
    rec, truth = small_recording  # in memory: no .meta, so no fileCreateTime
    s = make_sorting(rec, truth)
    with pytest.raises(MetadataError, match="session_start_time="):
        sa.export_nwb(s, tmp_path / "a.nwb", subject=SUBJECT)
    with pytest.raises(MetadataError, match="subject="):
        sa.export_nwb(s, tmp_path / "a.nwb", session_start_time="2024-05-01T13:30:00+00:00")
    with pytest.raises(MetadataError, match="species"):
        sa.export_nwb(s, tmp_path / "a.nwb", session_start_time="2024-05-01T13:30:00+00:00",
                      subject={"subject_id": "m1", "sex": "F", "age": "P90D"})
    assert not (tmp_path / "a.nwb").exists()
    p = sa.export_nwb(s, tmp_path / "a.nwb", subject=SUBJECT,
                      session_start_time=dt.datetime(2024, 5, 1, 13, 30, tzinfo=dt.timezone.utc))
    with pytest.raises(OutputExistsError):
        sa.export_nwb(s, p, subject=SUBJECT, session_start_time="2024-05-01T13:30:00+00:00")
    io, f = _read(p)
    try:
        assert f.session_start_time == dt.datetime(2024, 5, 1, 13, 30, tzinfo=dt.timezone.utc)
        assert len(f.units) == s.sizes["unit"] and "ElectricalSeriesAP" not in f.acquisition
    finally:
        io.close()


def test_missing_extra_names_the_pip_install(small_recording, tmp_path, monkeypatch):
    rec, truth = small_recording
    s = make_sorting(rec, truth)
    monkeypatch.setitem(sys.modules, "pynwb", None)  # import pynwb now raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'spikearray\[nwb\]'"):
        sa.export_nwb(s, tmp_path / "x.nwb", subject=SUBJECT)
    monkeypatch.setitem(sys.modules, "spikeinterface.core", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'spikearray\[interop\]'"):
        sa.to_sorting_analyzer(s, rec)


def test_cli_export_nwb(sorted_session, tmp_path, capsys):
    from spikearray.cli import main

    out = tmp_path / "cli.nwb"
    rc = main(["export-nwb", str(sorted_session["out"]), "--out", str(out), "--subject-id", "mouse01",
               "--species", "Mus musculus", "--sex", "F", "--age", "P90D", "--location", "VISp"])
    assert rc == 0 and out.is_file()
    assert str(out) in capsys.readouterr().out
    io, f = _read(out)
    try:
        assert f.units.id[:].tolist() == sorted_session["sorting"].unit.values.tolist()
    finally:
        io.close()
    rc = main(["export-nwb", str(sorted_session["out"]), "--out", str(tmp_path / "b.nwb")])
    assert rc == 2 and "--subject-id" in capsys.readouterr().err


def test_full_disk_raises_disk_full_and_leaves_nothing(small_recording, tmp_path, monkeypatch):
    import errno

    from spikearray.errors import DiskFullError

    rec, truth = small_recording
    s = make_sorting(rec, truth)

    def full(self, *args, **kwargs):  # what h5py raises when a write hits ENOSPC (its OSError carries errno 28)
        raise OSError(errno.ENOSPC, "Can't synchronously write data (file write failed: errno = 28, "
                                    "error message = 'No space left on device')")

    monkeypatch.setattr(pynwb.NWBHDF5IO, "write", full)
    with pytest.raises(DiskFullError, match=r"NWB file .*a\.nwb.*partial file was deleted"):
        sa.export_nwb(s, tmp_path / "a.nwb", subject=SUBJECT, session_start_time="2024-05-01T13:30:00+00:00")
    assert list(tmp_path.iterdir()) == []

    def broken(self, *args, **kwargs):  # any other failure keeps its own type
        raise ValueError("not a disk problem")

    monkeypatch.setattr(pynwb.NWBHDF5IO, "write", broken)
    with pytest.raises(ValueError, match="not a disk problem"):
        sa.export_nwb(s, tmp_path / "a.nwb", subject=SUBJECT, session_start_time="2024-05-01T13:30:00+00:00")
    assert list(tmp_path.iterdir()) == []
