"""Stage-level tests on tiny planted data, each against a simple reference."""

import numpy as np
import pytest
import torch

from spikearray._engine import ChunkInfo
from spikearray.clustering.similarity import template_similarity
from spikearray.clustering.splitmerge import bimodality_score, split_merge
from spikearray.detection.detect import correlate_fft
from spikearray.matching.peel import (_compressed, _context, _cross_correlations, _match_block, _row_groups, _scores, _subtract_windows,
                                      _tensors, low_rank, sparsify)
from spikearray.metrics.groundtruth import compare_to_truth
from spikearray.metrics.refractory import ccg_metrics, correlogram, is_refractory


def test_fft_correlation_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 500)).astype(np.float32)
    w = rng.standard_normal((3, 21)).astype(np.float32)
    got = correlate_fft(torch.from_numpy(x), torch.from_numpy(w), 7).numpy()
    ref = np.zeros_like(x)
    for r in range(3):
        for t in range(500):
            for tau in range(21):
                j = t - 7 + tau
                if 0 <= j < 500:
                    ref[r, t] += w[r, tau] * x[r, j]
    np.testing.assert_allclose(got, ref, atol=1e-4)


def _ctx(U, pcs, th=1.0, drop_tol=0.0, positions=None, th_low=None, amp_range=(1.0, 1.0)):
    K, C, nt = U.shape
    pos = positions if positions is not None else np.c_[np.zeros(C), 20.0 * np.arange(C)]
    return _context(U, pcs, np.zeros((K, 4), dtype=np.int64), pos, th=th, max_peels=20, nt0=20,
                    device=torch.device("cpu"), threads=1, rank=6, drop_tol=drop_tol, th_low=th_low,
                    amp_range=amp_range)


def test_a_small_units_full_size_spikes_pass_the_bounded_threshold_and_noise_does_not():
    """A template of norm 5.5 (whitened SD) in unit noise: its spikes score 5.5 ± 1, so Th_learned = 6 keeps
    about a third of them; the bounded rule (score >= 4.5 at a scale of 0.7-1.4) keeps most, and adds no
    spike where none was planted, on it or on a large template (which noise can never fit at scale 0.7)."""
    from spikearray.matching.peel import BOUNDED_SCALE

    rng = np.random.default_rng(11)
    C, nt, nt0, n = 8, 61, 20, 200
    pcs = np.linalg.qr(rng.standard_normal((nt, 6)))[0].T.astype(np.float32)
    # rank-one templates: the low-rank store keeps them whole, so a planted spike scores |U| plus unit noise
    U = (rng.standard_normal((2, C, 1)) @ pcs[:1]).astype(np.float32)
    U[0] *= 5.5 / np.linalg.norm(U[0])
    U[1] *= 20.0 / np.linalg.norm(U[1])
    L = 300 * (n + 2)
    x = rng.standard_normal((C, L)).astype(np.float32)
    planted = 300 * np.arange(1, n + 1)
    for t in planted:
        x[:, t - nt0:t - nt0 + nt] += U[0]
    found = {}
    for name, th_low in (("single", None), ("bounded", 4.5)):
        out = _match_block(x.T.copy(), ChunkInfo(0, L, 0), _ctx(U, pcs, th=6.0, th_low=th_low, amp_range=BOUNDED_SCALE))
        near = np.abs(out["time"][:, None] - planted[None, :]).min(1) <= 2
        found[name] = int((near & (out["template"] == 0)).sum())
        assert (~near).sum() <= 2, name  # spikes where none was planted: noise crossing 6 or 4.5 at its scale
    assert found["single"] < 0.5 * n
    assert found["bounded"] > 0.8 * n


def test_matching_pursuit_recovers_overlapping_planted_spikes():
    rng = np.random.default_rng(0)
    K, C, nt, nt0 = 3, 8, 61, 20
    pcs = np.linalg.qr(rng.standard_normal((nt, 6)))[0].T.astype(np.float32)
    U = (rng.standard_normal((K, C, 6)) @ pcs).astype(np.float32) * 3
    L = 3000
    x = np.zeros((C, L), np.float32)
    planted = [(500, 0, 1.0), (530, 1, 2.0), (1500, 2, 0.7), (2000, 0, 1.3)]  # 500/530 overlap
    for t, k, a in planted:
        x[:, t - nt0:t - nt0 + nt] += a * U[k]
    out = _match_block(x.T.copy(), ChunkInfo(0, L, 0), _ctx(U, pcs))
    got = sorted(zip(out["time"].tolist(), out["template"].tolist(), out["amplitude"].tolist()))
    want = sorted(planted)
    assert [g[:2] for g in got] == [w[:2] for w in want]
    # overlapping spikes are fitted one after the other, so the first fit absorbs a little of its neighbour
    np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], rtol=0.02)
    # everything explained: the per-template means equal the planted templates × mean amplitude
    np.testing.assert_allclose(out["sums"][1], 2.0 * U[1], atol=2e-2)


def test_sparse_matching_on_a_long_probe_equals_dense_and_drops_far_noise():
    """Localised units on a 96-channel shank whose mean templates carry estimation noise everywhere: the sparse
    templates keep a compact disc around each peak, and matching finds the same planted spikes as dense."""
    rng = np.random.default_rng(3)
    K, C, nt, nt0, L = 4, 96, 61, 20, 6000
    pos = np.c_[np.zeros(C), 20.0 * np.arange(C)]
    pcs = np.linalg.qr(rng.standard_normal((nt, 6)))[0].T.astype(np.float32)
    wave = np.exp(-0.5 * ((np.arange(nt) - nt0) / 3.0) ** 2) * -1.0
    centres = [10, 35, 60, 85]
    U = np.zeros((K, C, nt), np.float32)
    for k, c0 in enumerate(centres):
        U[k] = 12.0 * np.exp(-0.5 * ((np.arange(C) - c0) / 2.0) ** 2)[:, None] * wave[None, :]
    noisy = U + 0.05 * rng.standard_normal(U.shape).astype(np.float32)  # what a mean over a few hundred spikes holds
    sp, tm, rows = low_rank(noisy, 6, tol=3.0)
    kept = sparsify(sp, rows, K, 3.0, pos)
    chans = [np.flatnonzero((kept[rows == k] != 0).any(0)) for k in range(K)]
    for k, ch in enumerate(chans):
        assert centres[k] in ch and 3 <= len(ch) <= 24, (k, ch)
        assert ch.max() - ch.min() + 1 == len(ch)  # a compact stretch around the peak, no stray channels
    # dropping the far channels removes estimation noise, not signal: the sparse low-rank template is closer
    # to the true one than the noisy mean it came from
    Ur = np.zeros((K, C, nt))
    np.add.at(Ur, rows, kept[:, :, None].astype(float) * tm[:, None, :])
    for k in range(K):
        assert np.linalg.norm(Ur[k] - U[k]) < 0.6 * np.linalg.norm(noisy[k] - U[k])
    x = 0.5 * rng.standard_normal((C, L)).astype(np.float32)
    planted = [(300, 0, 1.0), (310, 1, 1.2), (2000, 2, 0.8), (2030, 2, 1.1), (4000, 3, 1.0), (5000, 0, 0.9)]
    for t, k, a in planted:
        x[:, t - nt0:t - nt0 + nt] += a * U[k]
    dense = _match_block(x.T.copy(), ChunkInfo(0, L, 0), _ctx(noisy, pcs, th=6.0, positions=pos))
    sparse = _match_block(x.T.copy(), ChunkInfo(0, L, 0), _ctx(noisy, pcs, th=6.0, drop_tol=3.0, positions=pos))
    for out in (dense, sparse):
        got = sorted(zip(out["time"].tolist(), out["template"].tolist()))
        assert got == sorted((t, k) for t, k, _ in planted)
    np.testing.assert_allclose(sparse["amplitude"], dense["amplitude"], rtol=0.05)


def test_low_rank_keeps_few_components_for_rank_one_templates():
    rng = np.random.default_rng(1)
    U = np.einsum("kc,kt->kct", rng.standard_normal((4, 16)), rng.standard_normal((4, 61))).astype(np.float32)
    sp, tm, rows = low_rank(U * 10, 6)
    assert rows.tolist() == [0, 1, 2, 3]  # one component each suffices


def test_template_similarity_finds_shifted_copies():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4, 30))
    a[1] = np.roll(a[0], 3, axis=1)
    sim, lag = template_similarity(a, 5)
    assert sim[0, 1] > 0.85 and lag[0, 1] == 3 and sim[0, 2] < 0.3
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-6)


def test_split_merge_separates_two_blobs_and_keeps_one():
    rng = np.random.default_rng(0)
    one = rng.standard_normal((600, 8))
    assert len(np.unique(split_merge(one, seed=0))) == 1
    two = np.r_[rng.standard_normal((400, 8)), rng.standard_normal((300, 8)) + np.r_[6, np.zeros(7)]]
    lab = split_merge(two, seed=0)
    assert len(np.unique(lab)) == 2
    assert (lab[:400] == lab[0]).mean() > 0.99 and (lab[400:] == lab[400]).mean() > 0.99
    z = np.r_[rng.normal(-3, 1, 500), rng.normal(3, 1, 500)]
    assert bimodality_score(z, np.ones_like(z), 0.0) > 0.8
    assert bimodality_score(rng.normal(0, 1, 1000), np.ones(1000), 0.0) < 0.4


def test_correlogram_matches_brute_force_and_refractory_metrics():
    rng = np.random.default_rng(0)
    t1 = np.sort(rng.uniform(0, 20, 300))
    t2 = np.sort(rng.uniform(0, 20, 250))
    ref = np.zeros(1001, int)
    for a in t1:
        for b in t2:
            if abs(b - a) <= 0.5005:
                k = int(np.rint((b - a) / 1e-3)) + 500
                if 0 <= k <= 1000:
                    ref[k] += 1
    np.testing.assert_array_equal(correlogram(t1, t2), ref)
    # a Poisson train with a 3 ms dead time is refractory; a train with many 1 ms doublets is not
    isi = 0.003 + rng.exponential(0.1, 3000)
    clean = np.cumsum(isi)
    assert is_refractory(clean)[0]
    dirty = np.sort(np.r_[clean, clean[::3] + 0.0008])
    ok, r12 = is_refractory(dirty)
    assert not ok and r12 > 0.2
    R12, Q12, _, _ = ccg_metrics(clean, clean, acg=True)
    assert R12 < 0.1 and Q12 < 0.05


def test_compare_to_truth_against_spikeinterface():
    import xarray as xr
    from spikeinterface.comparison import compare_sorter_to_ground_truth
    from spikeinterface.core import NumpySorting

    rng = np.random.default_rng(0)
    fs = 30000.0
    gt_t = np.sort(rng.choice(3_000_000, 3000, replace=False))
    gt_u = rng.integers(0, 5, 3000)
    keep = rng.random(3000) < 0.9
    so_t = gt_t[keep] + rng.integers(-5, 6, keep.sum())
    so_u = gt_u[keep].copy()
    so_u[so_u == 4] = 3  # over-merge two units
    extra = np.sort(rng.choice(3_000_000, 200, replace=False))
    so_t = np.r_[so_t, extra]
    so_u = np.r_[so_u, np.full(200, 5)]
    o = np.argsort(so_t, kind="stable")
    truth = xr.Dataset({"spike_time": ("spike", gt_t), "spike_unit": ("spike", gt_u)}, coords={"unit": np.arange(5)},
                       attrs={"sampling_rate": fs})
    sorting = xr.Dataset({"spike_time": ("spike", so_t[o]), "spike_unit": ("spike", so_u[o])},
                         coords={"unit": np.arange(6)})
    ours = compare_to_truth(sorting, truth)
    cmp = compare_sorter_to_ground_truth(
        NumpySorting.from_samples_and_labels([gt_t], [gt_u], fs),
        NumpySorting.from_samples_and_labels([so_t[o]], [so_u[o]], fs), exhaustive_gt=True)
    np.testing.assert_allclose(ours.accuracy.values, cmp.get_performance()["accuracy"].values.astype(float), atol=0.01)
    assert ours.attrs["n_well_detected"] == cmp.count_well_detected_units(0.8)
    assert ours.attrs["n_false_positive"] == cmp.count_false_positive_units()


def test_templates_stop_at_the_radius_cap_and_their_means_cover_the_disc():
    """A 384-channel column whose mean templates carry estimation noise that is uneven along the probe (a band
    of other units' coincident spikes 1 mm away): no template keeps a channel beyond MAX_RADIUS_UM, and the
    matched means equal the plain window means on the disc around the peak and are 0 beyond it."""
    from spikearray.matching.peel import MAX_RADIUS_UM

    rng = np.random.default_rng(7)
    K, C, nt, nt0, L = 3, 384, 61, 20, 8000
    pos = np.c_[np.tile([11.0, 43.0], C // 2), 20.0 * (np.arange(C) // 2)]
    pcs = np.linalg.qr(rng.standard_normal((nt, 6)))[0].T.astype(np.float32)
    wave = -np.exp(-0.5 * ((np.arange(nt) - nt0) / 3.0) ** 2)
    centres = [40, 190, 330]
    U = np.zeros((K, C, nt), np.float32)
    for k, c0 in enumerate(centres):
        U[k] = 14.0 * np.exp(-0.5 * ((np.arange(C) - c0) / 3.0) ** 2)[:, None] * wave[None, :]
    noise_sd = np.full(C, 0.04)
    noise_sd[100:300] = 0.09  # the uneven floor: higher in the middle of the probe
    noisy = U + (noise_sd[None, :, None] * rng.standard_normal(U.shape)).astype(np.float32)
    ctx = _ctx(noisy, pcs, th=6.0, drop_tol=3.0, positions=pos)
    peak = pos[np.array(centres)]
    for k in range(K):
        ch = np.flatnonzero((ctx.Ur[k] != 0).any(1))
        assert centres[k] in ch
        assert np.linalg.norm(pos[ch] - peak[k], axis=1).max() <= MAX_RADIUS_UM
    x = 0.3 * rng.standard_normal((C, L)).astype(np.float32)
    planted = [(500 + 700 * i, i % K) for i in range(10)]
    for t, k in planted:
        x[:, t - nt0:t - nt0 + nt] += U[k]
    out = _match_block(x.T.copy(), ChunkInfo(0, L, 0), ctx)
    assert sorted(zip(out["time"].tolist(), out["template"].tolist())) == planted
    mean = out["sums"] / np.maximum(out["counts"], 1)[:, None, None]
    for k in range(K):
        d = np.linalg.norm(pos - peak[k], axis=1)
        # residual + own fit = the data in the window, on the disc
        windows = np.mean([x[:, t - nt0:t - nt0 + nt] for t, kk in planted if kk == k], axis=0)
        np.testing.assert_allclose(mean[k][d <= MAX_RADIUS_UM], windows[d <= MAX_RADIUS_UM], atol=1e-4)
        beyond = d > MAX_RADIUS_UM
        beyond[0] = False  # _ctx gives every template channel 0 as a feature channel, which the means keep
        assert beyond.sum() > 200 and not mean[k][beyond].any()


def test_blockwise_best_template_equals_the_plain_maximum():
    """The matcher keeps the best template per sample through blocks of consecutive templates and refreshes
    only the blocks a fitted spike overlaps; with every template in one block it is the plain maximum over all
    templates. Both give the same spikes on a crowded 96-channel recording with colliding units."""
    import dataclasses

    rng = np.random.default_rng(11)
    K, C, nt, nt0, L = 30, 96, 61, 20, 12000
    pos = np.c_[np.zeros(C), 20.0 * np.arange(C)]
    pcs = np.linalg.qr(rng.standard_normal((nt, 6)))[0].T.astype(np.float32)
    wave = -np.exp(-0.5 * ((np.arange(nt) - nt0) / 3.0) ** 2)
    centres = rng.permutation(np.linspace(2, 93, K).round().astype(int))  # ids not in depth order
    U = np.stack([(8 + 10 * rng.random()) * np.exp(-0.5 * ((np.arange(C) - c0) / 2.5) ** 2)[:, None] * wave[None]
                  for c0 in centres]).astype(np.float32)
    x = rng.standard_normal((C, L)).astype(np.float32)
    for t in rng.choice(np.arange(100, L - 100), 400, replace=False):
        x[:, t - nt0:t - nt0 + nt] += (0.8 + 0.4 * rng.random()) * U[rng.integers(K)]
    ctx = _ctx(U, pcs, th=6.0, drop_tol=3.0, positions=pos)
    assert ctx.block < K
    plain = dataclasses.replace(ctx, block=K, blk_ptr=np.arange(K + 1), blk=np.zeros(K, np.int64))
    a = _match_block(x.T.copy(), ChunkInfo(0, L, 0), ctx)
    b = _match_block(x.T.copy(), ChunkInfo(0, L, 0), plain)
    assert len(a["time"]) > 300
    np.testing.assert_array_equal(a["time"], b["time"])
    np.testing.assert_array_equal(a["template"], b["template"])
    np.testing.assert_allclose(a["amplitude"], b["amplitude"], rtol=1e-6)


@pytest.mark.parametrize("L", [4036, 4096 + 61, 9999])
def test_blocked_fft_correlation_matches_numpy_across_block_edges(L):
    """Rows longer than two OLS_BLOCKs are filtered block by block (overlap-save); every output sample, at the
    block edges and in a short last block, equals numpy's correlation, for one shared and for per-row filters."""
    from spikearray.detection.detect import OLS_BLOCK

    rng = np.random.default_rng(L)
    nt, nt0 = 61, 20
    x = rng.standard_normal((3, L)).astype(np.float32)
    for w in (rng.standard_normal((1, nt)).astype(np.float32), rng.standard_normal((3, nt)).astype(np.float32)):
        got = correlate_fft(torch.from_numpy(x), torch.from_numpy(w), nt0).numpy()
        xp = np.pad(x.astype(np.float64), ((0, 0), (nt0, nt - 1 - nt0)))  # zero outside x
        ref = np.stack([np.correlate(xp[r], w[min(r, len(w) - 1)].astype(np.float64), "valid") for r in range(3)])
        assert got.shape == (3, L) and L + nt > 2 * OLS_BLOCK
        np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("n", [100, 8192, 8192 * 2 + 5])
def test_wide_matmul_writes_the_product_into_the_given_output_whatever_the_column_blocks(n):
    from spikearray._compute import WIDE_COLUMNS, wide_matmul

    rng = np.random.default_rng(n)
    a = torch.from_numpy(rng.standard_normal((5, 7)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal((7, n)).astype(np.float32))
    out = torch.full((5, n), np.nan)
    got = wide_matmul(a, b, out)
    assert got.data_ptr() == out.data_ptr() and WIDE_COLUMNS == 8192
    np.testing.assert_allclose(out.numpy(), a.double().numpy() @ b.double().numpy(), rtol=1e-5, atol=1e-5)


def test_gathered_windows_equal_indexing_sample_by_sample_and_stay_in_their_row():
    from spikearray._compute import gather_windows
    from spikearray.errors import SpikearrayError

    rng = np.random.default_rng(8)
    x = torch.from_numpy(rng.standard_normal((7, 300)).astype(np.float32))
    chans = torch.from_numpy(rng.integers(0, 7, (40, 5)))
    starts = torch.from_numpy(rng.integers(0, 300 - 21 + 1, 40))
    starts[0], starts[1] = 0, 300 - 21  # a row's first and last window
    want = x[chans[:, :, None], (starts[:, None] + torch.arange(21))[:, None, :]]
    assert torch.equal(gather_windows(x, chans, starts, 21), want)
    with pytest.raises(SpikearrayError, match="outside rows of 300 samples"):
        gather_windows(x, chans, starts + 1, 21)  # the last window would run into the next channel's row


@pytest.mark.parametrize("L", [700, 9000])
def test_scores_equal_the_direct_correlation_with_every_template(L):
    """The frequency-domain scores (one FFT per channel and overlap-save block, spatial products on the spectra)
    are the correlation of the chunk with each low-rank template, divided by its norm, computed here lag by lag
    in numpy; 9,000 samples cross two block edges."""
    rng = np.random.default_rng(5)
    K, C, nt, nt0 = 12, 40, 61, 20
    pos = np.c_[np.zeros(C), 20.0 * np.arange(C)]
    pcs = np.linalg.qr(rng.standard_normal((nt, 6)))[0].T.astype(np.float32)
    wave = -np.exp(-0.5 * ((np.arange(nt) - nt0) / 3.0) ** 2)
    U = np.stack([(6 + 6 * rng.random()) * np.exp(-0.5 * ((np.arange(C) - c0) / 2.0) ** 2)[:, None] * wave[None]
                  + 0.3 * rng.standard_normal((C, nt)) * (np.abs(np.arange(C) - c0) < 4)[:, None]
                  for c0 in rng.integers(2, C - 2, K)]).astype(np.float32)
    ctx = _ctx(U, pcs, th=6.0, drop_tol=3.0, positions=pos)
    c = _tensors(ctx, torch.device("cpu"))
    x = rng.standard_normal((C, L)).astype(np.float32)
    got = _scores(torch.from_numpy(x), ctx, c, torch.device("cpu")).numpy()
    Ur = ctx.Ur.astype(np.float64)  # the matcher's low-rank, sparse templates
    xp = np.pad(x.astype(np.float64), ((0, 0), (nt, nt)))  # zero outside x
    # B[k, t] = sum_tau (U_k[:, tau] @ x)[t - nt0 + tau]
    want = np.stack([sum((Ur[k, :, tau] @ xp)[nt - nt0 + tau:nt - nt0 + tau + L] for tau in range(nt))
                     for k in range(K)]) / np.linalg.norm(Ur.reshape(K, -1), axis=1)[:, None]
    assert got.shape == (K, L)
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())


def test_row_groups_hold_whole_templates_of_nearly_the_same_channel_range():
    """Each template's rows sit in one group; a group reads every channel its rows use, reaches at most the
    slack beyond its widest template's range, and the groups cost fewer multiply-adds than groups of rows taken
    in peak order (templates ten channels wide at every depth, every third one 40 channels wide)."""
    rng = np.random.default_rng(2)
    C, K, rank = 128, 60, 6
    spatial, rows = [], []
    for k in range(K):
        width = 40 if k % 3 == 0 else 10
        c0 = int(rng.integers(0, C - width))
        for _ in range(rank):
            row = np.zeros(C, np.float32)
            row[c0:c0 + width] = rng.standard_normal(width)
            spatial.append(row)
            rows.append(k)
    spatial, rows = np.array(spatial), np.array(rows)
    spatial[5] = 0.0  # a row that sparsify emptied is left out
    order, groups = _row_groups(spatial, rows, 48, 8)
    assert sorted(order.tolist()) == [r for r in range(len(rows)) if r != 5]
    cost = 0
    for r0, r1, chans in groups:
        g = order[r0:r1]
        assert r1 - r0 <= 48
        assert set(np.flatnonzero((spatial[g] != 0).any(0))) <= set(chans.tolist())
        widest = max(np.ptp(np.flatnonzero((spatial[rows == k] != 0).any(0))) + 1 for k in np.unique(rows[g]))
        assert len(chans) <= widest + 8
        cost += (r1 - r0) * len(chans)
    where = {}
    for i, (r0, r1, _) in enumerate(groups):
        for r in order[r0:r1]:
            where.setdefault(int(rows[r]), set()).add(i)
    assert all(len(v) == 1 for v in where.values())
    # the previous rule: 48 rows at a time in the order of their peak channel, reading the groups' whole range
    by_peak = order[np.argsort(np.abs(spatial[order]).argmax(1), kind="stable")]
    old = sum(len(g) * (np.ptp(np.flatnonzero((spatial[g] != 0).any(0))) + 1)
              for g in np.array_split(by_peak, -(-len(by_peak) // 48)))
    assert cost < 0.7 * old, (cost, old)


def test_subtracting_windows_visits_each_templates_own_entries():
    """target[rows[e], t + d] -= a · values[e, d] for each spike (t, k, a) and each entry e of template k, in
    order (spikes sharing samples accumulate), against a plain loop; templates of 0, 1 and 5 entries."""
    rng = np.random.default_rng(3)
    R, L, D = 9, 300, 7
    mask = np.zeros((3, R), bool)
    mask[1, 4] = True
    mask[2, [0, 2, 3, 7, 8]] = True
    ptr, rows = _compressed(mask)
    assert ptr.tolist() == [0, 0, 1, 6] and rows.tolist() == [4, 0, 2, 3, 7, 8]
    values = rng.standard_normal((len(rows), D)).astype(np.float32)
    t = np.array([10, 12, 12, 100, 250, 40], np.int64)
    k = np.array([2, 1, 2, 0, 2, 1], np.int64)
    a = rng.uniform(0.5, 2.0, len(t)).astype(np.float32)
    target = rng.standard_normal((R, L)).astype(np.float32)
    want = target.copy()
    for ti, ki, ai in zip(t, k, a):
        for e in range(ptr[ki], ptr[ki + 1]):
            want[rows[e], ti + np.arange(D)] -= ai * values[e]
    got = torch.from_numpy(target.copy())
    _subtract_windows(got, torch.from_numpy(t), torch.from_numpy(k), torch.from_numpy(a), torch.from_numpy(ptr),
                      torch.from_numpy(rows), torch.from_numpy(values), torch.arange(D))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_cross_correlations_of_overlapping_templates_equal_numpy_lag_by_lag():
    """ctc[k, j, δ] = Σ_c Σ_τ U_k[c, τ + δ - (nt - 1)] · U_j[c, τ] / |U_j| (numpy, lag by lag) for every pair of
    templates that share a channel, and no entry for pairs that do not (their correlation is exactly 0)."""
    rng = np.random.default_rng(5)
    K, C, nt = 8, 24, 9
    U = np.zeros((K, C, nt), np.float32)
    starts = [0, 2, 5, 12, 13, 18, 20]  # template 7 stays empty (sparsify can leave one without channels)
    for k, c0 in enumerate(starts):
        U[k, c0:c0 + 4] = rng.standard_normal((4, nt))
    norms = np.sqrt((U.astype(np.float64) ** 2).sum((1, 2)))
    inv = np.where(norms > 0, 1 / np.maximum(norms, 1e-30), 0).astype(np.float32)
    mask = (U != 0).any(2)
    ptr, nb, ctc = _cross_correlations(U, mask, mask.astype(np.float32) @ mask.T.astype(np.float32) > 0, inv)
    assert ptr[7] == ptr[8]
    for k in range(7):
        want_nb = [j for j in range(7) if abs(starts[j] - starts[k]) < 4]
        assert nb[ptr[k]:ptr[k + 1]].tolist() == want_nb
        for e, j in zip(range(ptr[k], ptr[k + 1]), want_nb):
            ref = np.zeros(2 * nt - 1)
            for d in range(2 * nt - 1):
                for tau in range(nt):
                    s = tau + d - (nt - 1)
                    if 0 <= s < nt:
                        ref[d] += (U[k, :, s].astype(np.float64) * U[j, :, tau]).sum()
            np.testing.assert_allclose(ctc[e], ref * inv[j], rtol=1e-5, atol=1e-5)


def _isolated_reference(x, threshold, nt):
    """isolated_peaks' rule with dense scipy filters: |x| the largest in ±4 channels × ±5 samples, above
    threshold, and the only such peak within ±6 channels × ±30 samples; not within nt of either end."""
    from scipy.ndimage import correlate, maximum_filter

    a = np.abs(x)
    peak = (a == maximum_filter(a, size=(9, 11), mode="constant", cval=-np.inf)) & (a > threshold)
    count = correlate(peak.astype(np.int64), np.ones((13, 61), np.int64), mode="constant", cval=0)
    keep = peak & (count == 1)
    keep[:, :nt] = keep[:, -nt:] = False
    return np.nonzero(keep)


def test_isolated_peaks_equal_the_dense_rule():
    """Crowded and lone peaks, chunk edges included: exactly the peaks of the dense-filter rule."""
    from spikearray.detection.bases import isolated_peaks

    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 3000)).astype(np.float32) * 1.6  # many peaks over 4.5: lone ones and crowds
    x[10, 100], x[16, 130] = 9.0, 8.0  # 6 channels and 30 samples apart: each crowds the other
    x[30, 200], x[37, 200] = 9.0, 8.0  # 7 channels apart: both may be alone
    c, t = isolated_peaks(torch.from_numpy(x), 4.5, 61, 20)
    rc, rt = _isolated_reference(x, 4.5, 61)
    assert 20 < len(rc) < (np.abs(x) > 4.5).sum()  # some peaks kept, some crowded out
    np.testing.assert_array_equal(c.numpy(), rc)
    np.testing.assert_array_equal(t.numpy(), rt)


def test_every_chunk_is_matched_at_one_fft_length(monkeypatch):
    """A recording whose first, middle and last chunks would round to three FFT sizes is matched at one (the
    overlap-save block), so one filter spectrum serves them all; the planted spikes are found in every chunk."""
    import dask.array as da
    import xarray as xr
    from scipy.fft import next_fast_len

    import spikearray as sa
    import spikearray.matching.peel as peel

    rng = np.random.default_rng(5)
    C, nt, nt0, chunk, n = 8, 61, 20, 1000, 3300
    lengths = {next_fast_len(L + nt, real=True) for L in (chunk + 183, chunk + 366, n % chunk + 183)}
    assert len(lengths) == 3  # the chunks' own FFT sizes differ
    pos = np.c_[np.zeros(C), 20.0 * np.arange(C)]
    wave = -np.exp(-0.5 * ((np.arange(nt) - nt0) / 3.0) ** 2)
    U = (12.0 * np.exp(-0.5 * ((np.arange(C) - 3.5) / 1.5) ** 2)[:, None] * wave[None, :]).astype(np.float32)
    x = 0.3 * rng.standard_normal((n, C)).astype(np.float32)
    planted = [150, 900, 1480, 2600, 3150]
    for t in planted:
        x[t - nt0:t - nt0 + nt] += U.T
    white = xr.DataArray(da.from_array(x, chunks=(chunk, C)), dims=("time", "channel"),
                         coords={"x": ("channel", pos[:, 0]), "y": ("channel", pos[:, 1])},
                         attrs={"sampling_rate": 30000.0})
    templates = xr.DataArray(U[None], dims=("unit", "channel", "sample"))
    bases = xr.Dataset({"pc": (("pc", "sample"), np.linalg.qr(rng.standard_normal((nt, 6)))[0].T)})
    sizes = []
    spectrum = peel._filter_spectrum

    def record(ctx, n_fft, dev):
        sizes.append(n_fft)
        return spectrum(ctx, n_fft, dev)

    monkeypatch.setattr(peel, "_filter_spectrum", record)
    out = peel.match(white, templates, bases, sa.Settings(nt=nt, nt0min=nt0, Th_learned=6.0, Th_bounded=6.0))
    assert len(sizes) == 4 and set(sizes) == {peel.OLS_BLOCK}
    assert out["spike_time"].values.tolist() == planted
