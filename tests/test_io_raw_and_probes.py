import json
import os
import resource
import time

import numpy as np
import pytest
import scipy.io

import spikearray as sa
from spikearray.errors import (
    EmptyRecordingError,
    FileSizeError,
    ProbeFormatError,
    ProbeMismatchError,
    RecordingError,
    RecordingNotFoundError,
    UnsupportedDtypeError,
)
from spikearray.io.recording import BinaryReader


def _ks_json(path, n, pitch=20.0):
    path.write_text(json.dumps({"chanMap": list(range(n)), "xc": [0.0] * n, "yc": [pitch * i for i in range(n)],
                                "kcoords": [0.0] * n, "n_chan": n}))
    return path


@pytest.fixture
def raw(tmp_path):
    d = np.random.default_rng(0).integers(-100, 100, size=(5000, 8), dtype=np.int16)
    p = tmp_path / "data.dat"
    d.tofile(p)
    return p, d, _ks_json(tmp_path / "probe.json", 8)


def test_raw_int16(raw):
    p, d, probe = raw
    rec = sa.open_recording(p, n_channels=8, sampling_rate=20000.0, gain_to_uV=0.195, probe=probe)
    assert rec.sizes == {"time": 5000, "channel": 8} and rec.dtype == np.int16
    np.testing.assert_array_equal(rec.values, d)
    assert rec.attrs["gain_to_uV"] == pytest.approx(0.195)
    assert rec.time.values[1] == pytest.approx(1 / 20000)


def test_raw_float32_is_uV(tmp_path):
    d = np.random.default_rng(0).standard_normal((1000, 4)).astype(np.float32)
    p = tmp_path / "f.bin"
    d.tofile(p)
    rec = sa.open_recording(p, n_channels=4, sampling_rate=30000.0, dtype="float32",
                            probe=_ks_json(tmp_path / "p.json", 4))
    assert rec.attrs["units"] == "uV" and rec.dtype == np.float32
    np.testing.assert_array_equal(rec.values, d)


def test_wrong_channel_count_names_the_fits(raw):
    p, _, probe = raw
    with pytest.raises(FileSizeError) as e:
        sa.open_recording(p, n_channels=7, sampling_rate=30000.0, gain_to_uV=1.0, probe=probe)
    msg = str(e.value)
    assert "bytes left over" in msg and "8" in msg


def test_bad_inputs(tmp_path, raw):
    p, _, probe = raw
    with pytest.raises(RecordingNotFoundError, match="does not exist"):
        sa.open_recording(tmp_path / "nope.bin", n_channels=8, sampling_rate=1.0)
    with pytest.raises(UnsupportedDtypeError, match="float64"):
        sa.open_recording(p, n_channels=8, sampling_rate=30000.0, dtype="float64", probe=probe)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(EmptyRecordingError):
        sa.open_recording(empty, n_channels=8, sampling_rate=30000.0, gain_to_uV=1.0, probe=probe)
    with pytest.raises(RecordingError, match="n_channels"):
        sa.open_recording(p, sampling_rate=30000.0)
    d4 = tmp_path / "d4.dat"
    np.zeros((100, 4), np.int16).tofile(d4)
    with pytest.raises(ProbeMismatchError, match="only 4 channels"):
        sa.open_recording(d4, n_channels=4, sampling_rate=30000.0, gain_to_uV=1.0, probe=probe)
    bad = tmp_path / "probe.xyz"
    bad.write_text("hello")
    with pytest.raises(ProbeFormatError, match="unknown probe format"):
        sa.open_recording(p, n_channels=8, sampling_rate=30000.0, gain_to_uV=1.0, probe=bad)


def test_probe_formats_agree(tmp_path):
    from probeinterface import ProbeGroup, generate_multi_columns_probe, write_probeinterface

    pr = generate_multi_columns_probe(num_columns=2, num_contact_per_column=4, xpitch=32, ypitch=20)
    pr.set_device_channel_indices(np.array([1, 0, 3, 2, 5, 4, 7, 6]))
    pg = ProbeGroup()
    pg.add_probe(pr)
    write_probeinterface(tmp_path / "pi.json", pg)
    ref = sa.read_probe(tmp_path / "pi.json")
    assert ref.n_channels == 8 and list(ref.channel) == list(range(8))
    pos = {int(c): (x, y) for c, x, y in zip(pr.device_channel_indices, *pr.contact_positions.T)}

    scipy.io.savemat(tmp_path / "map.mat", {
        "chanMap": (np.arange(9) + 1.0)[:, None], "connected": np.r_[np.ones(8), 0][:, None],
        "xcoords": np.r_[[pos[c][0] for c in range(8)], 99][:, None],
        "ycoords": np.r_[[pos[c][1] for c in range(8)], 99][:, None], "kcoords": np.ones((9, 1))})
    prb = tmp_path / "p.prb"
    prb.write_text("channel_groups = {0: {'channels': list(range(8)), 'geometry': {%s}}}"
                   % ", ".join(f"{c}: ({pos[c][0]}, {pos[c][1]})" for c in range(8)))
    ks = tmp_path / "ks.json"
    ks.write_text(json.dumps({"chanMap": list(range(8)), "xc": [pos[c][0] for c in range(8)],
                              "yc": [pos[c][1] for c in range(8)], "kcoords": [0] * 8, "n_chan": 8}))
    for src in (tmp_path / "map.mat", prb, ks, pg, pr):
        got = sa.read_probe(src)
        np.testing.assert_array_equal(got.channel, ref.channel)
        np.testing.assert_allclose(got.x, ref.x)
        np.testing.assert_allclose(got.y, ref.y)
        assert (got.shank == 0).all()


def test_prb_is_never_executed(tmp_path):
    prb = tmp_path / "evil.prb"
    prb.write_text("import os\nchannel_groups = {0: {'channels': [0], 'geometry': {0: (0, 0)}}}\nos.system('x')")
    got = sa.read_probe(prb)  # import / call statements are ignored, only channel_groups is evaluated
    assert got.n_channels == 1
    prb.write_text("channel_groups = {0: {'channels': __import__('os').listdir('.'), 'geometry': {}}}")
    with pytest.raises(ProbeFormatError, match="only literal"):
        sa.read_probe(prb)


def test_sparse_one_hour_file_opens_instantly(tmp_path):
    n = 30000 * 3600
    path = tmp_path / "hour.imec0.ap.bin"
    with open(path, "wb") as f:
        f.truncate(n * 385 * 2)  # sparse: 83 GB apparent, no blocks on disk
    from _meta import np1_meta

    path.with_suffix(".meta").write_text("".join(f"{k}={v}\n" for k, v in np1_meta(n).items()))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    rec = sa.open_recording(path)
    elapsed = time.perf_counter() - t0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert rec.sizes["time"] == n and rec.sizes["channel"] == 384
    assert elapsed < 1.0, f"open took {elapsed:.2f} s"
    assert grown_mb < 100, f"open grew peak RSS by {grown_mb:.0f} MB"
    assert rec.time.size == n and isinstance(rec.xindexes["time"], __import__("xarray").indexes.RangeIndex)


def test_isel_reads_only_that_slice(tmp_path, monkeypatch):
    d = np.arange(200_000 * 4, dtype=np.int16).reshape(-1, 4)
    p = tmp_path / "d.bin"
    d.tofile(p)
    rec = sa.open_recording(p, n_channels=4, sampling_rate=10000.0, gain_to_uV=1.0,
                            probe=_ks_json(tmp_path / "p.json", 4), chunk_seconds=1.0)
    rows = []
    orig = BinaryReader.__getitem__

    def spy(self, key):
        rows.append(key[0])
        return orig(self, key)

    monkeypatch.setattr(BinaryReader, "__getitem__", spy)
    part = rec.isel(time=slice(125_000, 126_000)).values
    np.testing.assert_array_equal(part, d[125_000:126_000])
    touched = sorted({(r.start, r.stop) for r in rows})
    assert all(120_000 <= a and b <= 130_000 for a, b in touched), touched


def test_the_summary_gives_the_data_size_in_the_binary_units_of_the_disk_messages():
    from spikearray._format import format_bytes
    from spikearray.io.summary import format_summary
    from spikearray.synthetic import generate_recording

    rec, _ = generate_recording(duration=2.0, n_channels=16, n_units=2, seed=0)
    data = [line for line in format_summary(rec).splitlines() if line.startswith("data")][0]
    size = 60000 * 16 * rec.dtype.itemsize  # 2 s at 30 kHz
    assert f", {format_bytes(size)}," in data and "MiB" in data, data
