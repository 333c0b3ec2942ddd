"""Drift estimation and correction on seeded synthetic recordings with known drift."""

from __future__ import annotations

import dask
import dask.array as da
import matplotlib
import numpy as np
import pytest
import xarray as xr

import spikearray as sa
from spikearray.drift import correct, detect_peaks, estimate, rms_error
from spikearray.synthetic import generate_recording

matplotlib.use("Agg")

KW = dict(duration=30.0, n_channels=64, n_units=25, drift_um=30.0, drift_period=30.0, seed=5)


def _white(kind):
    rec, truth = generate_recording(drift=kind, **KW)
    white, _ = sa.preprocess(rec)
    return white.copy(data=white.data.persist()), truth


@pytest.fixture(scope="module")
def static():
    return _white(None)


@pytest.fixture(scope="module")
def rigid():
    return _white("rigid")


@pytest.fixture(scope="module")
def nonrigid():
    return _white("nonrigid")


@pytest.fixture(scope="module")
def rigid_drift(rigid):
    return estimate(rigid[0], {"nblocks": 1})


def _err(drift, truth):
    return rms_error(drift, truth["unit_displacement"].values, times_s=truth["drift_time"].values,
                     unit_depths_um=truth["unit_y"].values)


def _raw_err(truth):
    d = truth["unit_displacement"].values
    return float(np.sqrt(np.mean((d - d.mean()) ** 2)))


def test_rigid_zigzag_within_1um(rigid, rigid_drift):
    white, truth = rigid
    assert _raw_err(truth) > 5.0  # the problem is not trivial
    # No sign flip allowed: positive displacement = units move towards larger y.
    assert _err(rigid_drift, truth) <= 1.0
    d = rigid_drift["displacement"]
    assert d.dims == ("time", "block") and d.sizes["block"] == 1 and d.dtype == np.float32
    assert d.attrs["units"] == "um"
    np.testing.assert_allclose(rigid_drift["time"].values, np.arange(1.0, 30.0, 2.0))
    assert rigid_drift.sizes["spike"] > 1000


def test_nonrigid_within_2um(nonrigid):
    white, truth = nonrigid
    drift = estimate(white, {"nblocks": 5})
    assert drift.sizes["block"] == 9
    assert np.all(np.diff(drift["depth"].values) > 0)
    assert _err(drift, truth) <= 2.0 < _raw_err(truth)


def test_static_recording_gives_no_drift(static):
    white, truth = static
    drift = estimate(white, {"nblocks": 1})
    d = drift["displacement"].values
    assert np.sqrt(np.mean((d - d.mean()) ** 2)) <= 0.5
    assert _err(drift, truth) <= 0.5


def test_estimate_is_deterministic(static):
    white, _ = static
    a = estimate(white.isel(time=slice(0, 300_000)), {"nblocks": 2})
    w = white.isel(time=slice(0, 300_000))
    b = estimate(w.copy(data=w.data.rechunk((70_000, -1))), {"nblocks": 2})
    np.testing.assert_array_equal(a["displacement"].values, b["displacement"].values)
    np.testing.assert_array_equal(a["spike_time"].values, b["spike_time"].values)


def _unit_spread(peaks, truth, drift_truth=None):
    """Median over units (≥ 40 matched spikes) of the SD of each unit's detected depths."""
    st, su = truth["spike_time"].values, truth["spike_unit"].values
    uy = truth["unit_y"].values
    pt, pd = peaks["spike_time"].values, peaks["spike_depth"].values
    j = np.searchsorted(pt, st)
    depths: dict[int, list] = {}
    for k in range(len(st)):
        lo, hi = max(0, j[k] - 8), min(len(pt), j[k] + 8)
        cand = [m for m in range(lo, hi) if abs(pt[m] - st[k]) <= 5 and abs(pd[m] - uy[su[k]]) < 50]
        if cand:
            depths.setdefault(int(su[k]), []).append(pd[min(cand, key=lambda m: abs(pd[m] - uy[su[k]]))])
    return {u: float(np.std(v)) for u, v in depths.items() if len(v) >= 40}


def test_correction_brings_unit_spread_back_to_static(static, rigid, rigid_drift):
    s_static = _unit_spread(detect_peaks(static[0]), static[1])
    s_drift = _unit_spread(detect_peaks(rigid[0]), rigid[1])
    s_corr = _unit_spread(detect_peaks(correct(rigid[0], rigid_drift)), rigid[1])
    units = sorted(set(s_static) & set(s_drift) & set(s_corr))
    assert len(units) >= 10
    med = {name: float(np.median([s[u] for u in units])) for name, s in
           [("static", s_static), ("drift", s_drift), ("corrected", s_corr)]}
    assert med["drift"] > 2.5 * med["static"]  # drift really blurs the units
    assert med["corrected"] <= 1.5 * med["static"], med


def test_correct_is_lazy_and_chunk_invariant(rigid, rigid_drift):
    white = rigid[0].isel(time=slice(0, 150_000))
    calls = []

    class Count(dask.callbacks.Callback):
        def _start(self, dsk):
            calls.append(1)

    # Rechunk the data only (DataArray.chunk would also turn the channel coords into dask arrays).
    a = white.copy(data=white.data.rechunk((60_000, -1)))
    b = white.copy(data=white.data.rechunk((37_000, -1)))
    with Count():
        out_a = correct(a, rigid_drift)
        out_b = correct(b, rigid_drift)
    assert not calls  # building the graphs computes nothing
    assert isinstance(out_a.data, da.Array) and out_a.dtype == np.float32
    assert out_a.attrs["drift_corrected"] is True
    np.testing.assert_allclose(out_a.values, out_b.values, atol=1e-5)


def test_zero_displacement_is_identity_up_to_kriging(static):
    white, _ = static
    w = white.isel(time=slice(0, 60_000))
    drift = estimate(w, {"nblocks": 1, "batch_size": 30_000})
    zero = drift.copy()
    zero["displacement"] = xr.zeros_like(drift["displacement"])
    out = correct(w, zero).values
    # The kriging smoother (ridge 0.01) leaves the signal nearly unchanged when nothing moves.
    assert np.corrcoef(out.ravel(), w.values.ravel())[0, 1] > 0.95


def test_nblocks_0_turns_correction_off(static):
    white, _ = static
    drift = estimate(white, {"nblocks": 0})
    assert drift.attrs["drift_correction"] == "off"
    assert drift["displacement"].shape == (15, 1) and not drift["displacement"].values.any()
    assert drift.sizes["spike"] == 0
    assert correct(white, drift) is white


def test_shorter_than_one_batch(static):
    white, _ = static
    short = white.isel(time=slice(0, 20_000))
    drift = estimate(short, {"nblocks": 5})
    assert drift.sizes["time"] == 1
    assert not drift["displacement"].values.any()
    np.testing.assert_allclose(drift["time"].values, [10_000 / 30_000])
    assert correct(short, drift).shape == short.shape


def test_batches_without_spikes(rigid):
    white, truth = rigid
    # Silence 8 s in the middle (4 batches): no spikes there; the estimate elsewhere stays accurate and the
    # silent batches are bridged smoothly.
    mask = np.ones(white.sizes["time"], np.float32)
    mask[300_000:540_000] = 0.0
    silenced = white * xr.DataArray(mask, dims="time")
    silenced.attrs = white.attrs
    drift = estimate(silenced, {"nblocks": 1})
    assert np.isfinite(drift["displacement"].values).all()
    keep = (truth["drift_time"].values < 10.0) | (truth["drift_time"].values > 18.0)
    err = rms_error(drift, truth["unit_displacement"].values[keep], times_s=truth["drift_time"].values[keep],
                    unit_depths_um=truth["unit_y"].values)
    assert err <= 1.5


def test_two_shanks_are_estimated_separately(rigid):
    white, truth = rigid
    shank = np.repeat([0, 1], white.sizes["channel"] // 2)
    two = white.assign_coords(shank=("channel", shank))
    drift = estimate(two, {"nblocks": 1})
    assert drift.attrs["shanks"] == "estimated per shank"
    assert list(drift["block_shank"].values) == [0, 1]
    # Each shank's block follows the (rigid) truth of the units on that shank.
    uy = truth["unit_y"].values
    for sh in (0, 1):
        ys = white["y"].values[shank == sh]
        on = (uy > ys.min() + 20) & (uy < ys.max() - 20)
        sub = drift.isel(block=[sh])
        err = rms_error(sub, truth["unit_displacement"].values[:, on], times_s=truth["drift_time"].values,
                        unit_depths_um=uy[on])
        assert err <= 2.0
    out = correct(two, drift)
    assert out.shape == two.shape


def test_plots(rigid_drift):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    sa.plotting.plot_drift_map(rigid_drift, ax=axes[0])
    sa.plotting.plot_drift_map(rigid_drift, ax=axes[1], corrected=True)
    sa.plotting.plot_displacement(rigid_drift, ax=axes[2])
    assert len(axes[0].collections) == 1 and len(axes[2].lines) >= 1
    # The registered drift map is tighter in depth than the raw one for the same spikes.
    raw = axes[0].collections[0].get_offsets()[:, 1]
    reg = axes[1].collections[0].get_offsets()[:, 1]
    assert len(raw) == len(reg)
    plt.close(fig)


def test_accessor_methods(rigid, rigid_drift):
    white = rigid[0].isel(time=slice(0, 120_000))
    drift = white.sa.estimate_drift({"nblocks": 1})
    assert drift["displacement"].sizes["time"] == 2
    assert white.sa.correct_drift(rigid_drift).shape == white.shape


def test_rms_error_checks_shapes(rigid_drift):
    with pytest.raises(sa.errors.DataError):
        rms_error(rigid_drift, np.zeros((3, 2)), times_s=np.zeros(3), unit_depths_um=np.zeros(5))


def test_kriging_matrix_has_no_subnormal_weights_and_reads_like_the_full_one():
    """A 384-channel Neuropixels column: the weights below float32 resolution of their row are exactly 0 (as
    float32 they were subnormal, which CPU BLAS multiplies ~25x slower), what remains is the full matrix to
    float32 rounding, and the banded product the correction uses equals the dense one."""
    import torch

    from spikearray._compute import band_blocks, band_matmul
    from spikearray.drift.correction import kriging_inverse, kriging_matrix

    C = 384
    x = np.array([43.0, 11.0, 59.0, 27.0] * (C // 4))
    y = 20.0 * (np.arange(C) // 2)
    shank = np.zeros(C, int)
    shift = np.linspace(-7.3, 12.1, C)
    m = kriging_matrix(x, y, shank, shift, 20.0)
    # the same algebra without the cut (one shank)
    kyx = np.exp(-((x[:, None] - x[None, :]) ** 2 + ((y + shift)[:, None] - y[None, :]) ** 2) / 800.0)
    full = kyx @ np.linalg.inv(np.exp(-((x[:, None] - x[None, :]) ** 2 + (y[:, None] - y[None, :]) ** 2) / 800.0)
                               + 0.01 * np.eye(C))
    m32 = m.astype(np.float32)
    tiny = np.finfo(np.float32).tiny
    assert not ((np.abs(m32) < tiny) & (m32 != 0)).any()  # no subnormal float32 weight left
    assert ((np.abs(full.astype(np.float32)) < tiny) & (full != 0)).mean() > 0.01  # there were some
    np.testing.assert_allclose(m, full, rtol=0, atol=2e-7 * np.abs(full).max())
    assert np.allclose(kriging_matrix(x, y, shank, shift, 20.0, inverse=kriging_inverse(x, y, shank, 20.0)), m)
    blocks = band_blocks(m)
    assert len(blocks) > 1 and max(i1 - i0 for _, _, i0, i1 in blocks) < C // 2  # a band, not the whole probe
    sig = torch.from_numpy(np.random.default_rng(0).standard_normal((3000, C)).astype(np.float32))
    w = torch.from_numpy(m32)
    np.testing.assert_allclose(band_matmul(w, sig, blocks, channels_first=False).numpy(), (sig @ w.T).numpy(),
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(band_matmul(w, sig.T.contiguous(), blocks, channels_first=True).numpy(),
                               (w @ sig.T).numpy(), rtol=0, atol=1e-5)


def _reference_peaks(x, *, core, neigh, loc_neigh, cx, cy, threshold, half, loc_half, loc_sigma, loc_iters):
    """The peak rule of ``drift/peaks.py``'s docstring written plainly in numpy/scipy (no slabs, no candidates)."""
    from scipy.ndimage import maximum_filter1d

    neg = -x.astype(np.float64)
    n = len(neg)
    tmax = maximum_filter1d(neg, size=2 * half + 1, axis=0, mode="constant", cval=-np.inf)
    smax = tmax[:, neigh].max(axis=2)  # (n, C): the running maximum over each channel's neighbourhood
    is_peak = (neg == smax) & (neg > threshold)
    is_peak[: core[0]] = is_peak[core[1]:] = False
    rows = []
    for t, ch in zip(*np.nonzero(is_peak)):
        tt = np.clip(np.arange(t - loc_half, t + loc_half + 1), 0, n - 1)
        ref = x[tt, ch].astype(np.float64)
        nbs = loc_neigh[ch]
        amp = np.maximum(x[tt][:, nbs].T @ ref / max(np.linalg.norm(ref), 1e-6), 0.0)
        amp[nbs == ch] = 0.0
        amp[0] = np.linalg.norm(ref)
        py, px = cy[nbs[0]], cx[nbs[0]]
        for _ in range(loc_iters):
            g = amp * np.exp(-((cy[nbs] - py) ** 2 + (cx[nbs] - px) ** 2) / (2 * loc_sigma ** 2))
            py, px = (g * cy[nbs]).sum() / g.sum(), (g * cx[nbs]).sum() / g.sum()
        rows.append((t, ch, py, px, neg[t, ch]))
    return np.array(rows)


@pytest.mark.parametrize("slab_rows", [37, 4096])
def test_peak_search_equals_the_plain_rule(monkeypatch, slab_rows):
    """Candidates, slabs and the sparse-table running maximum find exactly the peaks of the plain rule."""
    import torch

    from spikearray.drift import peaks
    from spikearray.geometry import neighbourhoods

    rng = np.random.default_rng(3)
    n, c = 900, 24
    cy, cx = (np.arange(c) // 2) * 20.0, np.array([16.0, 48.0])[np.arange(c) % 2]
    x = rng.normal(size=(n, c)).astype(np.float32)
    w = -np.exp(-0.5 * (np.arange(-8, 9) / 2.5) ** 2)
    for t0, c0, a in zip(rng.integers(8, n - 9, 40), rng.integers(0, c, 40), rng.uniform(5, 15, 40)):
        x[t0 - 8:t0 + 9] += (a * w)[:, None] * np.exp(-np.hypot(cx - cx[c0], cy - cy[c0]) / 25.0)[None, :]
    x[100, 5] = x[110, 5] = -20.0  # a tie inside one window: both are peaks by the rule (>= every neighbour)
    # With 37-row slabs from sample 7, a slab starts at 44: a larger value exactly `half` = 15 samples before it
    # must still veto the one at 44 (the slab's halo), and one just outside the window must not.
    x[29, 10], x[44, 10] = -30.0, -25.0
    x[265, 12], x[229, 12] = -30.0, -25.0  # 265 - 229 = 36 > 15: both are peaks
    kw = dict(core=(7, n - 7), neigh=neighbourhoods(cx, cy, radius_um=50.0),
              loc_neigh=neighbourhoods(cx, cy, radius_um=100.0), cx=cx, cy=cy, threshold=5.0, half=15,
              loc_half=5, loc_sigma=30.0, loc_iters=5)
    monkeypatch.setattr(peaks, "_SLAB_ROWS", slab_rows)
    got = peaks._detect_block(x, start=1000, device=torch.device("cpu"), **kw)
    ref = _reference_peaks(x, **kw)
    assert len(got) == len(ref) > 30
    order = np.lexsort((ref[:, 1], ref[:, 0]))
    ref = ref[order]
    np.testing.assert_array_equal(got["time"], ref[:, 0].astype(np.int64) + 1000)
    np.testing.assert_array_equal(got["channel"], ref[:, 1].astype(np.int64))
    np.testing.assert_allclose(got["amplitude"], ref[:, 4], rtol=1e-6)
    # float32 (torch) against float64 (numpy) centres of mass: agree to well under a micrometre
    np.testing.assert_allclose(got["depth"], ref[:, 2], atol=1e-3)
    np.testing.assert_allclose(got["x"], ref[:, 3], atol=1e-3)


@pytest.mark.parametrize("speed", [1.0, 0.02])
def test_each_segment_is_read_with_its_own_rounded_displacement(speed):
    """The correction of a chunk equals, segment by segment, ``kriging_matrix(shift) @ x`` in numpy, with each
    block's displacement taken at the segment's middle and rounded to the quantum, and each channel's shift
    mixed from its blocks; a chunk that starts and ends inside segments included, however it is chunked.
    Fast drift changes most segments' matrices (batched products); slow drift (``speed`` 0.02) leaves runs of
    segments with one matrix (one product per run)."""
    from spikearray.drift.correction import kriging_matrix

    fs, n, C = 30_000.0, 9_000, 48
    x = np.array([43.0, 11.0, 59.0, 27.0] * (C // 4))
    y = 20.0 * (np.arange(C) // 2)
    rng = np.random.default_rng(3)
    sig = rng.standard_normal((n, C)).astype(np.float32)
    rec = xr.DataArray(sig, dims=("time", "channel"),
                       coords={"x": ("channel", x), "y": ("channel", y)}, attrs={"sampling_rate": fs})
    # two blocks moving apart fast (3 µm over 0.3 s), so many segments differ
    t = np.array([0.0, 0.1, 0.2, 0.3])
    disp = speed * np.stack([np.linspace(0.0113, 3.0137, 4), np.linspace(0.0071, -2.0213, 4)], 1)  # no ties
    drift = xr.Dataset({"displacement": (("time", "block"), disp)},
                       coords={"time": t, "depth": ("block", [100.0, 400.0]), "block_shank": ("block", [0, 0])},
                       attrs={"settings": "{}", "drift_correction": "nonrigid"})
    seg, quantum = 300, 0.1
    outs = [correct(rec.copy(data=da.from_array(sig, chunks=(ch, C))), drift, segment_ms=10.0,
                    quantum_um=quantum).values for ch in (9_000, 1_000, 2_345)]
    # the reference: per segment, the blocks' displacements rounded, each channel's mix of them, one dense matrix
    from spikearray.drift.registration import depth_weights, time_weights

    w = depth_weights(y, np.array([100.0, 400.0]))
    ref = np.empty_like(sig)
    for s in range(n // seg):
        k0, k1, f = time_weights(np.array([(s + 0.5) * seg]), t * fs)
        d = (1 - f[0]) * disp[k0[0]] + f[0] * disp[k1[0]]
        shift = w @ (np.rint(d / quantum) * quantum)
        m = kriging_matrix(x, y, np.zeros(C, int), shift, 20.0).astype(np.float32)
        ref[s * seg:(s + 1) * seg] = sig[s * seg:(s + 1) * seg] @ m.T
    for out in outs:
        np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5)


def test_registration_solve_dense_and_sparse_agree(monkeypatch):
    """The global solve factorises small normal matrices densely and large ones with SuperLU; both must give the
    same displacements (checked on a random pair graph with the solver's own priors, forcing each path)."""
    from spikearray.drift import registration as reg

    rng = np.random.default_rng(11)
    B, T, H = 3, 40, 6
    L = 2 * H + 1
    # linear in depth at every batch: the depth prior penalises only curvature across blocks
    truth = rng.normal(0, 2.0, (T, 1)) + rng.normal(0, 1.0, (T, 1)) * np.arange(B)[None, :]
    i = np.arange(T)[:, None]
    j = i + np.arange(L)[None, :] - H
    valid = (j >= 0) & (j < T) & (j != i)
    jc = np.clip(j, 0, T - 1)
    D = np.stack([truth[i, k] - truth[jc, k] + rng.normal(0, 0.05, (T, L)) for k in range(B)])
    W = rng.uniform(0.2, 1.0, (B, T, L))
    monkeypatch.setattr(reg, "DENSE_SOLVE_MAX", 10 ** 6)
    dense = reg._solve(D, W, valid, depth_smoothness=reg.DEPTH_SMOOTHNESS)
    monkeypatch.setattr(reg, "DENSE_SOLVE_MAX", 0)
    sparse = reg._solve(D, W, valid, depth_smoothness=reg.DEPTH_SMOOTHNESS)
    np.testing.assert_allclose(dense, sparse, rtol=0, atol=1e-9)
    # and both recover the planted offsets (up to the common mean the solve removes) to the noise level
    np.testing.assert_allclose(dense, truth - truth.mean(0), rtol=0, atol=0.2)
