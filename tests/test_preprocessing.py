"""Preprocessing on data: high-pass vs scipy, chunk invariance, CAR, whitening quality, bad data, laziness."""

from __future__ import annotations

import json
import warnings

import dask
import numpy as np
import pytest
import scipy.signal
import torch
import xarray as xr

import spikearray as sa
from spikearray.errors import DataError, ProbeMismatchError, SettingsError
from spikearray.io.recording import make_recording
from spikearray.preprocessing import (BadChannelWarning, common_reference, detect_bad_channels, highpass,
                                      preprocess, whiten, whitening_matrix)
from spikearray.preprocessing._cpu_kernels import median_subtract_block
from spikearray.preprocessing._graph import sample_windows
from spikearray.preprocessing._kernels import (band_blocks, highpass_halo, median_subtract,
                                               reference_whiten_inplace, whiten_block)
from spikearray.synthetic import generate_recording, probe_layout

FS = 30000.0


class CountComputes(dask.callbacks.Callback):
    """Counts dask graph executions (each ``compute``/``values`` is one)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def _start(self, dsk):
        self.n += 1


@pytest.fixture(scope="module")
def rec8():
    """8 s, 16 channels: long enough for 7 s chunks."""
    rec, truth = generate_recording(duration=8.0, n_channels=16, n_units=3, seed=11)
    return rec, truth


@pytest.fixture(scope="module")
def rec48():
    """3 s, 48 channels (so whitening_range=16 is local), spatially correlated noise, moderate spikes (the
    covariance includes spikes, as Kilosort4, so very large units would bias the noise estimate)."""
    return generate_recording(duration=3.0, n_channels=48, n_units=4, seed=5, amplitudes_uV=(60.0, 120.0))


def _scipy_reference(rec):
    x = np.asarray(rec.values, dtype=np.float64) * rec["gain_to_uV"].values
    sos = scipy.signal.butter(3, 300.0, btype="highpass", fs=FS, output="sos")
    return scipy.signal.sosfiltfilt(sos, x, axis=0)


@pytest.mark.parametrize("method", ["iir", "fft"])
def test_highpass_matches_scipy_sosfiltfilt(small_recording, method):
    rec, _ = small_recording
    ref = _scipy_reference(rec)
    out = highpass(rec, method=method, device="cpu").values
    assert out.dtype == np.float32 and out.shape == ref.shape
    inner = slice(int(0.1 * FS), -int(0.1 * FS))
    rms = ref[inner].std()
    assert np.abs(out[inner] - ref[inner]).max() < 1e-3 * rms
    # the ends differ only through the padding convention, and only for a few ms
    assert np.abs(out[int(0.02 * FS):-int(0.02 * FS)] - ref[int(0.02 * FS):-int(0.02 * FS)]).max() < 1e-2 * rms


def test_highpass_is_chunk_invariant(rec8):
    rec, _ = rec8
    outs = [highpass(rec.chunk({"time": int(s * FS)})).values for s in (0.5, 2.0, 7.0)]
    assert highpass(rec.chunk({"time": int(0.5 * FS)})).data.chunks[0][0] == int(0.5 * FS)
    for o in outs[1:]:
        assert np.abs(o - outs[0]).max() < 1e-4


def test_highpass_halo_scales_with_cutoff():
    assert 500 <= highpass_halo(3, 300.0, FS) <= 3000
    assert highpass_halo(3, 150.0, FS) > highpass_halo(3, 300.0, FS)


def test_highpass_float_uV_input_passes_through(small_recording):
    rec, _ = small_recording
    uv = rec.sa.to_uV()
    a = highpass(rec).values
    b = highpass(uv).values
    assert np.abs(a - b).max() < 1e-3
    with pytest.raises(SettingsError, match="cutoff"):
        highpass(rec, 20000.0)


def test_stages_are_lazy_and_attrs_json(small_recording):
    rec, _ = small_recording
    with CountComputes() as cc:
        hp = rec.sa.highpass()
        car = hp.sa.common_reference()
    assert cc.n == 0
    w = whitening_matrix(car, batch_size=30000)
    with CountComputes() as cc:
        white = car.sa.whiten(matrix=w)
    assert cc.n == 0
    assert white.attrs["units"] == "whitened"
    assert [s["stage"] for s in white.attrs["stages"]] == ["highpass", "common_reference", "whiten"]
    assert white.attrs["stages"][0] == {**white.attrs["stages"][0], "cutoff": 300.0, "order": 3}
    json.dumps(white.attrs)
    json.dumps(w.attrs)
    assert white.dtype == np.float32 and white.data.chunks == rec.data.chunks
    xr.testing.assert_identical(white.coords.to_dataset(), rec.coords.to_dataset())
    # preprocess computes only its one sampled estimate at build time
    with CountComputes() as cc:
        out, _ = preprocess(rec, sa.Settings(batch_size=30000))
    assert cc.n == 1
    assert "gain_to_uV" not in out.attrs and out.attrs["sampling_rate"] == FS


def test_common_reference_is_lower_median(small_recording):
    rec, _ = small_recording
    hp = highpass(rec)
    x = hp.values
    car = common_reference(hp).values
    expected = x - torch.median(torch.from_numpy(x), dim=1, keepdim=True).values.numpy()
    np.testing.assert_array_equal(car, expected)
    mean_ref = common_reference(hp, operator="mean").values
    np.testing.assert_allclose(mean_ref, x - x.mean(axis=1, keepdims=True), atol=1e-3)


@pytest.mark.parametrize("c", [1, 2, 7, 64, 385])
def test_median_kernel_exact_including_bracket_misses(c):
    rng = np.random.default_rng(c)
    x = rng.standard_normal((400, c)).astype(np.float32)
    x[::7, : max(1, c // 3)] += 1e4  # a third of the channels jump: the mean±std bracket misses the median
    x[::11] = 0.0  # ties
    out = np.empty_like(x)
    med = np.empty(len(x), np.float32)
    median_subtract_block(x, out, med)
    expected = torch.median(torch.from_numpy(x), dim=1).values.numpy()
    np.testing.assert_array_equal(med, expected)
    np.testing.assert_array_equal(out, x - expected[:, None])


@pytest.mark.parametrize("median", [True, False])
@pytest.mark.parametrize("n, tile", [(2500, 1024), (1024, 1024), (5, 1024), (700, 64)])
def test_tiled_inplace_reference_whitening_equals_the_two_kernels(n, tile, median):
    rng = np.random.default_rng(n + tile)
    c = 96
    y = (rng.standard_normal((n, c)) * 30).astype(np.float32)
    w = np.triu(np.tril(rng.standard_normal((c, c)), 12), -12).astype(np.float32)
    blocks = band_blocks(w)
    cpu = torch.device("cpu")
    ref = median_subtract(y, device=cpu) if median else y
    expected = whiten_block(ref, w, blocks, device=cpu)
    got = y.copy()
    assert reference_whiten_inplace(got, w, blocks, median=median, tile=tile) is got
    # the same products row by row (bit-identical with torch's CPU BLAS; allow float32 rounding elsewhere)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(got, ref.astype(np.float64) @ w.T.astype(np.float64), rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        reference_whiten_inplace(y[:, ::2], w[::2, ::2], band_blocks(w[::2, ::2]), median=median)


def test_whitening_makes_local_noise_white(rec48):
    rec, truth = rec48
    settings = sa.Settings(whitening_range=16, batch_size=30000)
    white, w = preprocess(rec, settings)
    assert w.dims == ("channel", "channel_out")
    np.testing.assert_array_equal(w["channel"].values, rec["channel"].values)
    np.testing.assert_array_equal(w["channel_out"].values, rec["channel"].values)
    np.testing.assert_array_equal(w.values, w.values.T)  # exactly symmetric
    assert np.isfinite(w.values).all()
    # local: each row only couples channels that are some channel's neighbours
    assert (np.count_nonzero(w.values, axis=1) < rec.sizes["channel"]).all()
    x = white.values.astype(np.float64)
    # noise only: drop ±2 ms around every planted spike
    keep = np.ones(len(x), bool)
    for t in truth["spike_time"].values:
        keep[max(0, t - 60):t + 60] = False
    x = x[keep]
    cov = x.T @ x / len(x)
    pos = np.stack([rec["x"].values, rec["y"].values], 1)
    near = np.zeros_like(cov, bool)
    for j in range(len(pos)):
        near[j, np.argsort(np.hypot(*(pos - pos[j]).T), kind="stable")[:16]] = True
    near &= near.T
    off = cov[near & ~np.eye(len(cov), dtype=bool)]
    assert np.abs(off).max() < 0.05
    np.testing.assert_allclose(np.diag(cov), 1.0, atol=0.1)
    # the raw filtered noise was spatially correlated (so whitening had work to do)
    hp = common_reference(highpass(rec)).values[keep].astype(np.float64)
    corr = np.corrcoef(hp.T)
    assert np.abs(corr[near & ~np.eye(len(cov), dtype=bool)]).max() > 0.2


def test_spikes_keep_their_shape_on_the_best_channel(rec48):
    rec, truth = rec48
    white, _ = preprocess(rec, sa.Settings(whitening_range=16, batch_size=30000))
    x = white.values
    times = truth["spike_time"].values
    units = truth["spike_unit"].values
    template = truth["template"].values  # (unit, sample, channel) µV
    n_t = template.shape[1]
    trough = int(np.argmin(template[0].min(axis=1)))
    checked = 0
    for u in range(template.shape[0]):
        best = int(truth["unit_best_channel"].values[u])
        st = times[(units == u) & (times > n_t) & (times < len(x) - n_t)]
        if len(st) < 5:
            continue
        tpl = template[u, :, best]
        t_tr = int(np.argmin(tpl))
        snippets = np.stack([x[t - t_tr:t - t_tr + n_t, best] for t in st])
        r = np.corrcoef(snippets.mean(0), tpl)[0, 1]
        assert r > 0.9, (u, r)
        checked += 1
    assert checked >= 2 and trough >= 0


def test_preprocess_equals_the_stage_composition_and_is_chunk_invariant(rec8):
    rec, _ = rec8
    settings = sa.Settings(batch_size=30000, whitening_range=8)
    white, w = preprocess(rec, settings)
    composed = whiten(common_reference(highpass(rec)), matrix=w).values
    out = white.values
    np.testing.assert_allclose(out, composed, rtol=0, atol=1e-5)
    other, w2 = preprocess(rec.chunk({"time": int(0.7 * FS)}), settings)
    np.testing.assert_allclose(w2.values, w.values, rtol=0, atol=1e-6)
    assert np.abs(other.values - out).max() < 1e-4
    # the per-window estimate inside preprocess equals the public matrix computed from the chunked stages
    public = whitening_matrix(common_reference(highpass(rec)), whitening_range=8, batch_size=30000)
    np.testing.assert_allclose(w.values, public.values, rtol=0, atol=1e-5)
    # whitening matrix convention: out[t, i] = sum_j W[i, j] x[t, j]
    car = common_reference(highpass(rec)).values.astype(np.float64)
    np.testing.assert_allclose(out, car @ w.values.astype(np.float64).T, atol=2e-3)


def test_preprocess_is_deterministic_and_invert_sign(small_recording):
    rec, _ = small_recording
    s = sa.Settings(batch_size=30000)
    a, wa = preprocess(rec, s)
    b, wb = preprocess(rec, s)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(wa.values, wb.values)
    no_car, _ = preprocess(rec, s.replace(do_CAR=False))
    assert "common_reference" not in [st["stage"] for st in no_car.attrs["stages"]]
    # sign inversion commutes with the linear stages (the lower median of -x is not -(lower median of x))
    neg, _ = rec.sa.preprocess(s.replace(invert_sign=True, do_CAR=False))
    assert neg.attrs["stages"][0] == {"stage": "invert_sign"}
    np.testing.assert_allclose(neg.values, -no_car.values, atol=1e-4)


def _float_recording(x):
    probe = probe_layout(x.shape[1])
    return make_recording(x.astype(np.float32), sampling_rate=FS, probe=probe, units="uV")


@pytest.mark.parametrize("stage", ["highpass", "common_reference", "whiten", "highpass_fft"])
def test_nan_raises_naming_channel_and_time(stage):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3 * 30000, 8)).astype(np.float32) * 10
    x[45000, 5] = np.nan
    x[50000, 2] = np.inf
    rec = _float_recording(x)
    if stage == "highpass":
        out = highpass(rec)
    elif stage == "highpass_fft":
        out = highpass(rec, method="fft")
    elif stage == "common_reference":
        out = common_reference(rec)
    else:
        w = whitening_matrix(_float_recording(np.nan_to_num(x, posinf=0.0)), batch_size=30000)
        out = whiten(rec, matrix=w)
    with pytest.raises(DataError) as err:
        out.values
    msg = str(err.value)
    assert "[2, 5]" in msg and "1.500000 s" in msg


def test_bad_channels_detected_and_whitening_stays_finite():
    rec, _ = generate_recording(duration=2.0, n_channels=24, n_units=2, seed=2)
    x = np.asarray(rec.values).copy()
    x[:, 3] = 0  # dead: all zero
    x[:, 9] = 123  # dead: constant
    x[:, 17] = (x[:, 17].astype(np.float64) * 30).clip(-32000, 32000).astype(np.int16)  # very noisy
    bad_rec = make_recording(x, sampling_rate=FS, probe=probe_layout(24), gain_to_uV=rec.attrs["gain_to_uV"])
    report = detect_bad_channels(bad_rec, batch_size=30000)
    assert report["dead"] == [3, 9] and report["noisy"] == [17]
    json.dumps(report)
    with pytest.warns(BadChannelWarning, match=r"dead channels \[3, 9\]"):
        white, w = preprocess(bad_rec, sa.Settings(batch_size=30000, whitening_range=8))
    assert white.attrs["bad_channels"] == {"dead": [3, 9], "noisy": [17]}
    assert w.attrs["bad_channels"]["dead"] == [3, 9]
    wv = w.values
    assert np.isfinite(wv).all() and np.isfinite(np.linalg.inv(wv)).all()
    assert wv[3, 3] == 1 and np.count_nonzero(wv[3]) == 1 and np.count_nonzero(wv[:, 9]) == 1
    out = white.values
    assert np.isfinite(out).all()
    good = np.setdiff1d(np.arange(24), [3, 9, 17])
    assert np.abs(out[:, good].std(axis=0) - 1).max() < 0.2


def test_whiten_checks_matrix_channels(small_recording):
    rec, _ = small_recording
    hp = highpass(rec)
    w = whitening_matrix(hp, batch_size=30000)
    with pytest.raises(ProbeMismatchError):
        whiten(hp.isel(channel=slice(0, 10)), matrix=w)


def test_sample_windows_and_band_blocks():
    assert sample_windows(10 * 60000, batch_size=60000, nskip=25) == [(b * 60000, (b + 1) * 60000)
                                                                     for b in (0, 2, 4, 6, 8)]
    assert sample_windows(1800 * 30000, batch_size=60000, nskip=25)[:2] == [(0, 60000), (25 * 60000, 26 * 60000)]
    assert len(sample_windows(50000, batch_size=60000, nskip=25)) == 1
    rng = np.random.default_rng(0)
    w = np.triu(np.tril(rng.standard_normal((96, 96)), 10), -10)
    blocks = band_blocks(w)
    x = rng.standard_normal((50, 96))
    out = np.zeros_like(x)
    for o0, o1, i0, i1 in blocks:
        out[:, o0:o1] = x[:, i0:i1] @ w[o0:o1, i0:i1].T
    np.testing.assert_allclose(out, x @ w.T, atol=1e-9)
    assert sum((o1 - o0) * (i1 - i0) for o0, o1, i0, i1 in blocks) < 96 * 96 / 2


def test_plot_traces_one_line_per_channel(small_recording):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rec, _ = small_recording
    fig = rec.sa.plot_traces(0.5, 0.6, channels=[0, 1, 2, 5])
    assert isinstance(fig, Figure)
    lines = fig.axes[0].lines
    assert [ln.get_label() for ln in lines] == ["0", "1", "2", "5", "scale bar"]
    assert len(lines[0].get_xdata()) == 3000
    assert any("µV" in t.get_text() for t in fig.axes[0].texts)
    # channels at larger depth sit higher
    assert np.mean(lines[2].get_ydata()) > np.mean(lines[0].get_ydata())
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_covariance_tasks_with_sd_match_numpy_per_window(small_recording):
    from spikearray.preprocessing.bad_channels import robust_sd
    from spikearray.preprocessing.whitening import covariance_tasks

    hp = highpass(small_recording[0])
    n = hp.sizes["time"]
    windows = [(0, n // 3), (n // 2, n)]
    x = hp.values
    got = dask.compute(*covariance_tasks(hp, windows, device=torch.device("cpu"), threads=1, with_sd=True))
    plain = dask.compute(*covariance_tasks(hp, windows, device=torch.device("cpu"), threads=1))
    for (a, b), (cov, count, sd), (cov2, count2) in zip(windows, got, plain):
        xs = x[a:b].astype(np.float64)
        assert count == count2 == b - a
        np.testing.assert_allclose(cov, xs.T @ xs, rtol=1e-4, atol=1e-2)
        np.testing.assert_array_equal(cov, cov2)
        np.testing.assert_allclose(sd, np.median(np.abs(x[a:b][::8]), axis=0) / 0.6745, rtol=1e-6)
        np.testing.assert_array_equal(sd, robust_sd(x[a:b]))
