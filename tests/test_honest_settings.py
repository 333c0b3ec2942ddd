"""Every Kilosort4 setting either changes what a stage does or is marked ignored and warns.

For the 14 settings that used to be accepted, validated and hashed yet read by no stage, each test shows a changed
result on a small seeded recording (or a check that fires), or an ``IgnoredSettingWarning`` naming the setting and
unchanged stage hashes.
"""

from __future__ import annotations

import warnings

import dask
import numpy as np
import pytest

import spikearray as sa
from spikearray.clustering import cluster_spikes
from spikearray.clustering.cluster import clustering_seed, subsample, x_centres
from spikearray.detection import detect, learn_bases
from spikearray.errors import DataError, RecordingError
from spikearray.preprocessing import preprocess
from spikearray.preprocessing.chain import check_sampling_rate, estimate_windows, scale_shift
from spikearray.pipeline import stage_hashes
from spikearray.settings import IGNORED, PARAMETERS, IgnoredSettingWarning
from spikearray.synthetic import generate_recording

FS = 30000
BATCH = 15000  # 0.5 s batches: an 4 s recording has 8


@pytest.fixture(scope="module")
def small():
    rec, truth = generate_recording(duration=4.0, n_channels=16, n_units=2, seed=1)
    return rec


@pytest.fixture(scope="module")
def with_artifact(small):
    """``small`` with a 5-sample, 20000-count (~47 mV) artifact on 4 of 16 channels at 2.3 s (batch 4)."""
    v = small.values.copy()
    v[int(2.3 * FS):int(2.3 * FS) + 5, :4] = 20000
    return small.copy(data=v)


@pytest.fixture(scope="module")
def detected():
    """Whitened traces, bases and detected spikes of a 10 s, 32-channel, 10-unit recording (no drift stage)."""
    rec, _ = generate_recording(duration=10.0, n_channels=32, n_units=10, seed=2)
    s = sa.Settings(batch_size=30000, device="cpu", nblocks=0)
    white, _ = preprocess(rec, s)
    white = white.persist()
    bases = learn_bases(white, s)
    return white, bases, detect(white, bases, s), s


def _zero_rows(x: np.ndarray) -> np.ndarray:
    return np.flatnonzero((x == 0).all(axis=1))


# --- recording: fs, shift, scale -------------------------------------------------------------------------------

def test_fs_is_checked_against_the_recordings_rate(small):
    check_sampling_rate(small, sa.Settings(fs=30000.0))  # matches
    check_sampling_rate(small, sa.Settings(fs=30010.0))  # within 0.1 %: SpikeGLX's calibrated rates
    with pytest.raises(RecordingError, match=r"fs=25000 Hz but the recording samples at 30000 Hz"):
        preprocess(small, sa.Settings(fs=25000.0, batch_size=BATCH, device="cpu"))
    rec25, _ = generate_recording(duration=0.5, n_channels=8, n_units=1, sampling_rate=25000.0)
    check_sampling_rate(rec25, sa.Settings())  # the default fs is not held against another rate


def test_scale_and_shift_change_the_samples_before_anything_else(small):
    out = scale_shift(small, scale=0.5, shift=3.0)
    assert out.dtype == np.float32 and out.attrs["units"] == small.attrs["units"]
    np.testing.assert_allclose(out.values, small.values.astype(np.float32) * 0.5 + 3.0, rtol=1e-6)
    np.testing.assert_array_equal(out["gain_to_uV"].values, small["gain_to_uV"].values)  # µV gain applies after
    assert out.attrs["stages"][-1] == {"stage": "scale_shift", "scale": 0.5, "shift": 3.0}
    assert scale_shift(small) is small
    white, _ = preprocess(small, sa.Settings(scale=0.5, shift=3.0, batch_size=BATCH, device="cpu"))
    assert {"stage": "scale_shift", "scale": 0.5, "shift": 3.0} in white.attrs["stages"]
    # as in Kilosort4, the high-pass removes a constant offset again: shift alone leaves the whitened traces
    plain = preprocess(small, sa.Settings(batch_size=BATCH, device="cpu"))[0].values
    shifted = preprocess(small, sa.Settings(shift=300.0, batch_size=BATCH, device="cpu"))[0].values
    np.testing.assert_allclose(shifted, plain, atol=2e-3)


def test_scale_changes_what_the_artifact_test_sees(with_artifact):
    s = sa.Settings(batch_size=BATCH, artifact_threshold=1000.0, device="cpu")
    flagged = preprocess(with_artifact, s)[0].values
    # scaled by 0.01 the artifact peaks at ~470 µV filtered: below the threshold, nothing is zeroed
    scaled = preprocess(with_artifact, s.replace(scale=0.01))[0].values
    assert len(_zero_rows(flagged)) == BATCH and len(_zero_rows(scaled)) == 0


# --- preprocessing: artifact_threshold, batch_downsampling -------------------------------------------------------

def test_artifact_threshold_zeroes_the_planted_artifacts_batch_whatever_the_chunking(with_artifact):
    s = sa.Settings(batch_size=BATCH, artifact_threshold=1000.0, device="cpu")
    outs = []
    for chunk in (7000, 30000):
        white, W = preprocess(with_artifact.chunk({"time": chunk}), s)
        x = white.values
        z = _zero_rows(x)
        assert z.tolist() == list(range(4 * BATCH, 5 * BATCH)), chunk  # exactly batch 4, [2.0 s, 2.5 s)
        assert np.abs(x).max() < 20  # the artifact is gone; the rest is whitened noise and spikes
        assert white.attrs["stages"][-1]["stage"] == "artifact_zeroing"
        # the flagged batch is not one of the windows the whitening estimated from
        assert [4 * BATCH, 5 * BATCH] not in W.attrs["windows"]
        outs.append(x)
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)
    default = preprocess(with_artifact, sa.Settings(batch_size=BATCH, device="cpu"))[0].values
    assert len(_zero_rows(default)) == 0 and np.abs(default).max() > 40  # inf (default): nothing zeroed


def test_artifact_flags_are_computed_once_not_per_window_of_chunks(with_artifact, tmp_path, monkeypatch):
    from spikearray._cache import write_int16
    from spikearray.preprocessing import chain

    calls = []
    real = chain.artifact_batches

    def counting(*a, **kw):  # count evaluations of the per-batch test
        flags = real(*a, **kw)
        return dask.delayed(lambda f: calls.append(1) or f)(flags)

    monkeypatch.setattr(chain, "artifact_batches", counting)
    s = sa.Settings(batch_size=BATCH, artifact_threshold=1000.0, device="cpu")
    white, _ = preprocess(with_artifact.chunk({"time": 3000}), s)  # many chunks: several compute windows
    write_int16(white, tmp_path / "x.int16")
    assert len(calls) == 1


def test_an_artifact_threshold_below_the_noise_is_a_clear_error(small):
    with pytest.raises(DataError, match="artifact_threshold=1 µV flags every window"):
        preprocess(small, sa.Settings(batch_size=BATCH, artifact_threshold=1.0, device="cpu"))


def test_batch_downsampling_thins_the_windows_of_the_global_estimates(small):
    assert estimate_windows(120000, batch_size=BATCH, nskip=1, seed=0) == [(b * BATCH, (b + 1) * BATCH)
                                                                          for b in range(8)]
    assert estimate_windows(120000, batch_size=BATCH, nskip=1, seed=0, batch_downsampling=2) == [
        (b * BATCH, (b + 1) * BATCH) for b in (0, 2, 4, 6)]
    s = sa.Settings(batch_size=BATCH, nskip=1, device="cpu")
    _, W1 = preprocess(small, s)
    _, W3 = preprocess(small, s.replace(batch_downsampling=3))
    assert [a for a, _ in W1.attrs["windows"]] == [b * BATCH for b in range(8)]
    assert [a for a, _ in W3.attrs["windows"]] == [0, 3 * BATCH, 6 * BATCH]
    assert W3.attrs["n_samples_used"] == 3 * BATCH
    assert not np.allclose(W1.values, W3.values)


def test_batch_downsampling_thins_the_chunks_the_waveform_bases_are_learned_from(detected):
    white, bases, _, s = detected  # 10 s in 2 s chunks, batch_size 1 s: chunks start in batches 0, 2, 4, 6, 8
    thinned = learn_bases(white, s.replace(batch_downsampling=3))  # only batches 0 and 6: chunks 0 and 3
    assert 0 < thinned.attrs["n_snippets"] < bases.attrs["n_snippets"]
    assert not np.allclose(thinned["pc"].values, bases["pc"].values)


# --- clustering: max_cluster_subset, cluster_init_seed, x_centers ------------------------------------------------

def test_max_cluster_subset_bounds_the_spikes_clustered_per_group(detected):
    white, bases, spikes, s = detected
    full = cluster_spikes(spikes, bases, white, s)
    assert full.attrs["n_groups_subsampled"] == 0 and full.attrs["n_clustered_max"] > 150  # default: no thinning
    capped = cluster_spikes(spikes, bases, white, s.replace(max_cluster_subset=150))
    assert capped.attrs["n_clustered_max"] == 150 and capped.attrs["n_groups_subsampled"] >= 1
    # the spikes beyond the cap are not dropped: they join the nearest cluster
    assert (capped.spike_cluster.values >= 0).sum() >= 0.95 * (full.spike_cluster.values >= 0).sum()
    assert abs(capped.sizes["template"] - full.sizes["template"]) <= 2
    assert subsample(10, 4).tolist() == [0, 3, 6, 9] and subsample(3, None).tolist() == [0, 1, 2]
    # Kilosort4's None (no cap) is accepted and clusters every spike, as the default does on this recording
    unlimited = cluster_spikes(spikes, bases, white, s.replace(max_cluster_subset=None))
    np.testing.assert_array_equal(unlimited.spike_cluster.values, full.spike_cluster.values)


def test_cluster_init_seed_changes_the_initialisation_and_results_stay_valid(detected):
    white, bases, spikes, s = detected
    assert clustering_seed(s) == s.seed  # Kilosort4's default 5 keeps spikearray's seed
    a = cluster_spikes(spikes, bases, white, s)
    b = cluster_spikes(spikes, bases, white, s.replace(cluster_init_seed=1))
    assert a.attrs["seed"] != b.attrs["seed"]
    assert not np.array_equal(a.spike_cluster.values, b.spike_cluster.values)
    assert abs(a.sizes["template"] - b.sizes["template"]) <= 2
    for c in (a, b):
        lab = c.spike_cluster.values
        assert lab.max() == c.sizes["template"] - 1
        assert (np.bincount(lab[lab >= 0]) == c.template_count.values).all()


def test_x_centers_splits_the_groups_laterally(detected):
    white, bases, spikes, s = detected
    assert x_centres(np.array([0.0, 0.0, 16.0, 16.0, 100.0, 116.0]), 2).tolist() == [8.0, 108.0]
    one = cluster_spikes(spikes, bases, white, s)
    two = cluster_spikes(spikes, bases, white, s.replace(x_centers=2))
    assert one.attrs["x_centres"] == [] and len(two.attrs["x_centres"]) == 2
    assert two.attrs["n_groups"] > one.attrs["n_groups"]


# --- the ignored ones ---------------------------------------------------------------------------------------------

NON_DEFAULT = {"dminx": 20.0, "nearest_templates": 50, "max_channel_distance": 50.0, "templates_from_data": False,
               "cluster_neighbors": 5, "cluster_downsampling": 1, "data_dir": "/data", "filename": "x.bin",
               "results_dir": "/out", "probe_name": "np1.json", "probe_path": "/probes/np1.json"}


def _hashes(settings: sa.Settings) -> dict[str, str]:
    return stage_hashes(settings, {"data": "x"})


def test_the_ignored_settings_are_exactly_the_ones_no_stage_reads():
    assert IGNORED == set(NON_DEFAULT)
    for p in PARAMETERS:
        assert p.ignored == p.doc.startswith("ignored"), p.name  # the doc says so, and why


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_an_ignored_setting_warns_by_name_and_never_invalidates_a_cached_stage(name):
    with pytest.warns(IgnoredSettingWarning, match=f"'{name}'"):
        s = sa.Settings(**{name: NON_DEFAULT[name]})
    assert getattr(s, name) == NON_DEFAULT[name]  # accepted and kept (saved with the sorting)
    assert _hashes(s) == _hashes(sa.Settings())
    with pytest.warns(IgnoredSettingWarning, match=f"'{name}'"):
        sa.Settings().replace(**{name: NON_DEFAULT[name]})


def test_a_kilosort4_default_dict_passes_without_warnings():
    ks4 = {p.name: p.default for p in PARAMETERS if p.stage != "compute" and p.default is not None}
    ks4.update(nblocks=1, Th_universal=9.0, Th_learned=8.0, n_chan_bin=385, drift_smoothing=[0.5, 0.5, 0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredSettingWarning)
        s = sa.Settings(**ks4)
        again = sa.Settings.from_json(s.to_json())  # rebuilding a saved, default-valued setting is silent too
    assert again == s and s.nblocks == 1
