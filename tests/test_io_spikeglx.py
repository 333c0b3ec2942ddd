import numpy as np
import pytest

import spikearray as sa
from spikearray.errors import FileSizeError, MetaFileError, ProbeMismatchError, RecordingError
from spikearray.synthetic import generate_recording, write_spikeglx

from _meta import np1_meta, np2_4shank_meta, write_pair

N = 3000


@pytest.fixture
def data385():
    rng = np.random.default_rng(1)
    d = rng.integers(-500, 500, size=(N, 385), dtype=np.int16)
    d[:, 384] = 64  # sync word: bit 6 high
    return d


def test_np1_from_meta_alone(tmp_path, data385):
    path = write_pair(tmp_path, "run_g0_t0.imec0", np1_meta(N), data385)
    rec = sa.open_recording(path)
    assert rec.name == "traces" and rec.dims == ("time", "channel")
    assert rec.sizes == {"time": N, "channel": 384}
    assert rec.attrs["sampling_rate"] == pytest.approx(30000.123)  # calibrated rate kept, never rounded
    assert rec.attrs["gain_to_uV"] == pytest.approx(2.34375)
    assert rec.dtype == np.int16
    np.testing.assert_array_equal(rec.values, data385[:, :384])  # sync column dropped
    # SpikeGLX geometry: channels 0..3 at (27,0) (59,0) (11,20) (43,20)
    np.testing.assert_allclose(rec.x.values[:4], [27, 59, 11, 43])
    np.testing.assert_allclose(rec.y.values[:4], [0, 0, 20, 20])
    assert rec.y.values.max() == 20 * 191
    assert rec.attrs["sync_columns"] == [384]


def test_np1_positions_match_probeinterface(tmp_path, data385):
    from probeinterface import read_spikeglx

    path = write_pair(tmp_path, "run_g0_t0.imec0", np1_meta(N), data385)
    rec = sa.open_recording(path)
    pi = read_spikeglx(path.with_suffix(".meta"))
    order = np.argsort(pi.device_channel_indices)
    pos = pi.contact_positions[order]
    dx = rec.x.values - pos[:, 0]
    assert np.ptp(dx) == 0  # same layout up to probeinterface's x shift
    np.testing.assert_allclose(rec.y.values, pos[:, 1])


def test_np1_old_shank_map_gives_same_geometry(tmp_path, data385):
    a = sa.open_recording(write_pair(tmp_path, "a.imec0", np1_meta(N), data385))
    b = sa.open_recording(write_pair(tmp_path, "b.imec0", np1_meta(N, geom=False), data385))
    np.testing.assert_allclose(a.x.values, b.x.values)
    np.testing.assert_allclose(a.y.values, b.y.values)


def test_np2_four_shank_from_imro(tmp_path, data385):
    rec = sa.open_recording(write_pair(tmp_path, "run_g0_t0.imec1", np2_4shank_meta(N), data385))
    assert rec.sizes["channel"] == 384
    assert rec.attrs["gain_to_uV"] == pytest.approx(0.762939453125)
    assert sorted(np.unique(rec.shank.values).tolist()) == [0, 1, 2, 3]
    # shank s, electrode e: x = 250 s + 27 + 32 (e % 2), y = 15 (e // 2)
    c = np.arange(384)
    np.testing.assert_allclose(rec.x.values, 250 * (c // 96) + 27 + 32 * (c % 96 % 2))
    np.testing.assert_allclose(rec.y.values, 15 * (c % 96 // 2))


def test_own_writer_round_trip(tmp_path):
    rec, _ = generate_recording(duration=1.0, n_channels=16, n_units=2, seed=5)
    for layout, gain in (("np1", 2.34375), ("np2", 0.762939453125)):
        rec_l, _ = generate_recording(duration=1.0, n_channels=16, n_units=2, seed=5, layout=layout)
        path = write_spikeglx(rec_l, tmp_path / f"syn_{layout}.imec0.ap.bin", layout=layout)
        back = sa.open_recording(path)
        assert back.attrs["gain_to_uV"] == pytest.approx(gain)
        np.testing.assert_array_equal(back.values, rec_l.values)
        np.testing.assert_allclose(back.x.values, rec_l.x.values)
        np.testing.assert_allclose(back.y.values, rec_l.y.values)
        assert not list(tmp_path.glob("*.partial"))


def test_missing_meta(tmp_path, data385):
    path = tmp_path / "x.imec0.ap.bin"
    data385.tofile(path)
    with pytest.raises(MetaFileError, match="no .meta beside"):
        sa.open_recording(path)


def test_meta_without_needed_key(tmp_path, data385):
    meta = np1_meta(N)
    del meta["nSavedChans"]
    with pytest.raises(MetaFileError, match="nSavedChans"):
        sa.open_recording(write_pair(tmp_path, "x.imec0", meta, data385))


def test_truncated_file_against_meta(tmp_path, data385):
    path = write_pair(tmp_path, "x.imec0", np1_meta(N), data385)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 385 * 2 * 10)  # ten samples short, still whole samples
    with pytest.raises(FileSizeError, match="fileSizeBytes"):
        sa.open_recording(path)


def test_file_not_whole_samples(tmp_path, data385):
    path = write_pair(tmp_path, "x.imec0", np1_meta(N), data385)
    with open(path, "ab") as f:
        f.write(b"\0" * 6)
    with pytest.raises(FileSizeError, match="6 bytes left over"):
        sa.open_recording(path)


def test_probe_that_does_not_fit(tmp_path, data385):
    import json

    path = write_pair(tmp_path, "x.imec0", np1_meta(N), data385)
    probe = tmp_path / "p.json"
    probe.write_text(json.dumps({"chanMap": [0, 1, 500], "xc": [0, 0, 0], "yc": [0, 20, 40], "n_chan": 3}))
    with pytest.raises(ProbeMismatchError, match="500"):
        sa.open_recording(path, probe=probe)


def test_n_channels_contradicting_meta(tmp_path, data385):
    path = write_pair(tmp_path, "x.imec0", np1_meta(N), data385)
    with pytest.raises(FileSizeError, match="nSavedChans=385"):
        sa.open_recording(path, n_channels=384)


def test_nidq_stream_rejected(tmp_path, data385):
    meta = np1_meta(N)
    meta["typeThis"] = "nidq"
    with pytest.raises(RecordingError, match="nidq"):
        sa.open_recording(write_pair(tmp_path, "x.imec0", meta, data385))
