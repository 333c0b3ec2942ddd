"""Merge passes and template read-back on tiny planted spike tables and arrays."""

import numpy as np
import xarray as xr

from spikearray._cache import materialize
from spikearray.clustering.merge import (SAME_WAVEFORM_RATIO, SAME_WAVEFORM_RATIO_NEAR, absorb_fragments, ccg_merge,
                                        denoised_templates, drift_merge, redundant_units, remove_duplicates,
                                        same_waveform_merge)
from spikearray.clustering.similarity import template_similarity
from spikearray.clustering.templates import mean_waveforms

FS = 30000.0


def _train(rng, rate, dur, dead=0.003):
    isi = dead + rng.exponential(1 / rate, int(rate * dur * 2))
    t = np.cumsum(isi)
    return np.round(t[t < dur] * FS).astype(np.int64)


def _templates(rng, K, C=8, nt=31):
    base = rng.standard_normal((C, nt))
    T = np.stack([base + 0.05 * rng.standard_normal((C, nt)) for _ in range(K)])
    return T.astype(np.float32)


def test_ccg_merge_joins_two_halves_of_one_neuron_not_two_neurons():
    rng = np.random.default_rng(0)
    one = _train(rng, 10, 60)
    other = _train(rng, 10, 60)
    half = rng.random(len(one)) < 0.5
    t = np.r_[one, other]
    u = np.r_[np.where(half, 0, 1), np.full(len(other), 2)]
    T = _templates(rng, 3)
    _, uu, parent = ccg_merge(t, u, T, sampling_rate=FS, acg_threshold=0.2, ccg_threshold=0.25)
    assert parent[0] == parent[1]  # halves of one refractory train
    assert parent[2] != parent[0]  # an independent train with the same template stays apart
    assert len(np.unique(uu)) == 2


def test_drift_merge_joins_pieces_that_take_turns_in_time():
    rng = np.random.default_rng(1)
    t = _train(rng, 10, 60)
    phase = (t // int(5 * FS)) % 2  # alternate every 5 s, as drift-split pieces do
    other = _train(rng, 10, 60)
    tt = np.r_[t, other]
    u = np.r_[phase, np.full(len(other), 2)]
    T = _templates(rng, 3)
    _, uu, parent = drift_merge(tt, u, T, bin_samples=int(2 * FS))
    assert parent[0] == parent[1] and parent[2] == 2


def _noisy_means(rng, signal, counts, C=64):
    """Means of ``counts[k]`` whitened spikes of ``signal`` (on the first channels of C) in unit noise."""
    nt = signal.shape[1]
    out = np.zeros((len(counts), C, nt))
    for k, n in enumerate(counts):
        out[k, : len(signal)] = signal
        out[k] += rng.standard_normal((C, nt)) / np.sqrt(n)
    return out.astype(np.float32)


def test_denoised_templates_zero_the_channels_that_hold_only_averaging_noise():
    rng = np.random.default_rng(5)
    sig = np.zeros((4, 31))
    sig[:, 10:14] = [[-3, -6, -3, 1], [-2, -4, -2, 1], [-1, -2, -1, 0.5], [-1, -1.5, -1, 0.5]]
    T = _noisy_means(rng, sig, [25, 2000])
    clean = denoised_templates(T, np.array([25, 2000]))
    assert clean[:, :4].any(axis=2).all()  # every signal channel kept, for the small unit too
    assert clean[:, 4:].any(axis=2).sum() <= 2  # of 2 x 60 noise channels, at most a couple survive
    # the small unit's similarity to the big one is its waveform's, not its spike count's
    raw, _ = template_similarity(T, 5)
    den, _ = template_similarity(clean, 5)
    assert raw[0, 1] < 0.8 and den[0, 1] > 0.95


def test_drift_merge_joins_a_small_piece_whose_raw_mean_is_mostly_noise():
    rng = np.random.default_rng(6)
    t = _train(rng, 10, 60)
    late = t > 50 * FS  # the last 10 s of one neuron went to a second template (~100 spikes)
    other = _train(rng, 10, 60)
    sig = np.zeros((4, 31))
    sig[:, 10:14] = [[-3, -6, -3, 1], [-2, -4, -2, 1], [-1, -2, -1, 0.5], [-1, -1.5, -1, 0.5]]
    sig *= 0.5  # a small unit: its 100-spike mean has as much noise as signal over 64 channels
    other_sig = np.roll(sig, 2, axis=0)  # a neighbour: same shape two channels away
    T = np.concatenate([_noisy_means(rng, sig, [(~late).sum(), late.sum()]),
                        _noisy_means(rng, other_sig, [len(other)])])
    assert template_similarity(T, 5)[0][0, 1] < 0.8  # the raw means would not pass drift_merge's threshold
    tt = np.r_[t, other]
    u = np.r_[late.astype(np.int64), np.full(len(other), 2)]
    _, _, parent = drift_merge(tt, u, T, bin_samples=int(2 * FS))
    assert parent[1] == parent[0] and parent[2] == 2


def _binned_pair(counts_a, counts_b, bin_s=2.0):
    """Spike times (samples) of two units with the given spikes per bin, evenly spread within each bin."""
    t, u = [], []
    for unit, counts in ((0, counts_a), (1, counts_b)):
        for i, n in enumerate(counts):
            t.append(np.round((i + (np.arange(n) + 0.5 + 0.25 * unit) / n) * bin_s * FS).astype(np.int64))
            u.append(np.full(n, unit))
    return np.concatenate(t), np.concatenate(u)


def test_drift_merge_wants_an_anticorrelation_that_chance_cannot_give_over_few_bins():
    a = np.array([20, 24, 16, 22, 18, 25, 15, 20, 21, 19])
    b = np.array([20, 17, 22, 20, 21, 18, 20, 23, 18, 21])
    r = np.corrcoef(a, b)[0, 1]
    assert -0.8 < r < -0.4  # more negative than max_rate_correlation, within chance for 10 bins
    T = _templates(np.random.default_rng(7), 2)
    t, u = _binned_pair(a, b)
    assert drift_merge(t, u, T, bin_samples=int(2 * FS))[2][1] == 1  # 20 s: kept apart
    t, u = _binned_pair(np.tile(a, 6), np.tile(b, 6))
    assert drift_merge(t, u, T, bin_samples=int(2 * FS))[2][1] == 0  # the same pattern over 120 s: merged


def test_drift_merge_second_pass_joins_a_moved_big_footprint_of_the_same_size_only():
    """A big unit whose footprint moved by one channel (similarity 0.78, under the first pass's 0.8) in pieces
    that take turns every 10 s over 100 s: the second pass joins them. A template three times larger with the
    same turns is another neuron and stays apart; so do pieces whose rates anti-correlate only weakly."""
    sig = np.zeros((8, 31))
    sig[2:6, 10:14] = [[-3, -6, -3, 1], [-6, -12, -6, 2], [-5, -10, -5, 2], [-2, -4, -2, 1]]
    moved = np.roll(sig, 1, axis=0) * 0.9
    T = np.stack([sig, moved]).astype(np.float32)
    assert 0.6 < template_similarity(T, 5)[0][0, 1] < 0.8
    t = _train(np.random.default_rng(8), 10, 100)
    u = (t // int(10 * FS)) % 2  # one piece while the probe is up, the other while it is down
    bins = int(2 * FS)

    def joined(t, u, T, **kw):
        parent = drift_merge(t, u, T, bin_samples=bins, **kw)[2]
        return parent[0] == parent[1]

    assert joined(t, u, T)
    assert not joined(t, u, T, loose_similarity=0.8)  # the first pass alone keeps them apart
    assert not joined(t, u, np.stack([sig, 3 * moved]).astype(np.float32))
    # rates correlating at -0.48 over 50 bins: enough for the first pass (-0.36), not for the second (-0.6)
    a = np.tile([20, 24, 16, 22, 18, 25, 15, 20, 21, 19], 5)
    b = np.tile([21, 19, 21, 21, 20, 18, 20, 22, 18, 21], 5)
    assert -0.6 < np.corrcoef(a, b)[0, 1] < -0.36
    tw, uw = _binned_pair(a, b)
    assert not joined(tw, uw, T)
    assert joined(tw, uw, _templates(np.random.default_rng(7), 2))


def test_drift_merge_joins_pieces_that_fired_at_different_probe_positions():
    """A 3 Hz unit split by where the probe was (one piece above the midline, one below) with the probe moving
    faster than the 2-s rate bins resolve: the binned rates do not anti-correlate, but the displacement at one
    piece's spikes is always above the other's, and the position test joins them. An independent neuron with
    the same waveform, whose spikes sample every position, stays apart; without displacements nothing joins."""
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 100, 300))
    other = np.sort(rng.uniform(0, 100, 300))
    tt = np.r_[t, other]
    disp = 20 * np.sin(2 * np.pi * tt / 2.0)  # µm; one up-and-down per rate bin
    u = np.r_[(disp[:300] < 0).astype(np.int64), np.full(300, 2)]
    samples = np.round(tt * FS).astype(np.int64)
    bins = int(2 * FS)
    rates = [np.bincount(samples[u == j] // bins, minlength=50) for j in (0, 1)]
    assert np.corrcoef(*rates)[0, 1] > -0.36  # the rate test alone (50 bins) cannot join them
    T = _templates(np.random.default_rng(4), 3)
    parent = drift_merge(samples, u, T, bin_samples=bins)[2]
    assert parent[0] != parent[1]
    parent = drift_merge(samples, u, T, bin_samples=bins, spike_displacement=disp)[2]
    assert parent[0] == parent[1] and parent[2] == 2


def test_absorb_fragments_folds_a_small_refractory_piece():
    rng = np.random.default_rng(2)
    t = _train(rng, 10, 60)
    u = (rng.random(len(t)) < 0.1).astype(np.int64)  # unit 1 holds ~10 % of one neuron's spikes
    _, uu, parent = absorb_fragments(t, u, _templates(rng, 2), sampling_rate=FS, acg_threshold=0.2)
    assert parent[1] == 0 and (uu == 0).all()
    # a fragment whose union would break the refractory period stays apart
    t2 = np.r_[t, t[::5] + 15]  # 0.5 ms after a tenth of the big unit's spikes
    u2 = np.r_[np.zeros(len(t), np.int64), np.ones(len(t[::5]), np.int64)]
    _, _, parent2 = absorb_fragments(t2, u2, _templates(rng, 2), sampling_rate=FS, acg_threshold=0.2)
    assert parent2[1] == 1


def test_redundant_units_flags_residual_catchers_only():
    rng = np.random.default_rng(3)
    big = _train(rng, 10, 60)
    catcher = big[::3] + 3  # sits 0.1 ms after a third of the big unit's spikes
    independent = _train(rng, 3, 60)
    t = np.r_[big, catcher, independent]
    u = np.r_[np.zeros(len(big)), np.ones(len(catcher)), np.full(len(independent), 2)].astype(np.int64)
    drop = redundant_units(t, u, 3, delta=12)
    assert drop.tolist() == [False, True, False]


def test_remove_duplicates_keeps_the_first_of_close_spikes_per_unit():
    t = np.array([100, 103, 104, 110, 200, 201])
    u = np.array([0, 0, 1, 0, 0, 1])
    keep = remove_duplicates(t, u, 7)
    # unit 0: 100 kept, 103 dropped (3 after the last kept), 110 kept (10 after 100), 200 kept; unit 1 all kept
    assert keep.tolist() == [True, False, True, True, True, True]


def test_mean_waveforms_recover_planted_waveforms_and_materialize_round_trips(tmp_path):
    rng = np.random.default_rng(4)
    n, C, nt, nt0 = 60000, 6, 21, 7
    x = (0.1 * rng.standard_normal((n, C))).astype(np.float32)
    W = rng.standard_normal((2, nt, C)).astype(np.float32) * 5
    times = np.sort(rng.choice(np.arange(100, n - 100, 40), 300, replace=False))
    labels = rng.integers(0, 2, 300)
    for t, k in zip(times, labels):
        x[t - nt0:t - nt0 + nt] += W[k]
    import dask.array as da

    white = xr.DataArray(da.from_array(x, chunks=(10000, C)), dims=("time", "channel"))
    means, counts = mean_waveforms(white, times, labels, 2, nt=nt, nt0=nt0, n_chunks=6)
    assert counts.sum() == 300
    np.testing.assert_allclose(means, W.transpose(0, 2, 1), atol=0.05)
    back = materialize(white, tmp_path / "copy.int16")
    np.testing.assert_allclose(back.values, x, atol=0.5 / 200 + 1e-6)
    assert back.chunks == white.chunks and not list(tmp_path.glob("*.partial"))


def test_mean_waveforms_tops_up_a_label_too_rare_in_the_sampled_chunks():
    """Two of six chunks are sampled: a unit of 300 spikes keeps its sampled ones; a unit of 12 spikes spread
    over the recording (2 per chunk, so 4 in the sampled chunks) gets more from other chunks, up to
    ``min_per_template``, from at most ``n_chunks`` further chunks."""
    import dask.array as da

    rng = np.random.default_rng(5)
    n, C, nt, nt0 = 60000, 5, 21, 7
    x = (0.1 * rng.standard_normal((n, C))).astype(np.float32)
    W = rng.standard_normal((2, nt, C)).astype(np.float32) * 5
    rare = np.linspace(1000, n - 1000, 12).round().astype(np.int64) + 17
    grid = np.arange(100, n - 100, 40)
    grid = grid[np.abs(grid[:, None] - rare[None]).min(1) > nt]  # no waveform overlaps a rare one
    common = np.sort(rng.choice(grid, 300, replace=False))
    times = np.concatenate([common, rare])
    labels = np.repeat([0, 1], [300, 12])
    for t, k in zip(times, labels):
        x[t - nt0:t - nt0 + nt] += W[k]
    white = xr.DataArray(da.from_array(x, chunks=(10000, C)), dims=("time", "channel"))
    sampled = np.isin(common // 10000, [0, 5]).sum()  # sample_chunks(6, 2): the first and the last chunk
    assert np.isin(rare // 10000, [0, 5]).sum() == 4
    _, counts = mean_waveforms(white, times, labels, 2, nt=nt, nt0=nt0, n_chunks=2)
    assert counts.tolist() == [sampled, 4]
    # two more chunks of 2 rare spikes each reach 8; the common unit's mean is untouched
    _, counts = mean_waveforms(white, times, labels, 2, nt=nt, nt0=nt0, n_chunks=2, min_per_template=8)
    assert counts.tolist() == [sampled, 8]
    # at most n_chunks (2) further chunks are read, however many spikes are asked for
    means, counts = mean_waveforms(white, times, labels, 2, nt=nt, nt0=nt0, n_chunks=2, min_per_template=30)
    assert counts.tolist() == [sampled, 8]
    np.testing.assert_allclose(means, W.transpose(0, 2, 1), atol=0.12)


def _masked_pair(rng, rate_a=3.0, rate_b=8.0, dur=100.0, gap_ms=1.5):
    """Two independent neurons whose spikes never fall within ``gap_ms`` of each other: what matching pursuit
    leaves of two overlapping units (it fits one of two templates that arrive together)."""
    a, b = _train(rng, rate_a, dur), _train(rng, rate_b, dur)
    gap = int(gap_ms * 1e-3 * FS)
    i = np.clip(np.searchsorted(a, b), 1, len(a) - 1)
    near = np.minimum(np.abs(a[i] - b), np.abs(a[i - 1] - b)) <= gap
    return a, b[~near]


def test_merges_keep_apart_two_neurons_of_very_different_size_whose_ccg_is_masked():
    rng = np.random.default_rng(5)
    for fn, rates in ((ccg_merge, (5.0, 10.0)), (absorb_fragments, (2.0, 12.0))):
        a, b = _masked_pair(rng, *rates, gap_ms=2.0)
        t = np.r_[a, b]
        u = np.r_[np.zeros(len(a), np.int64), np.ones(len(b), np.int64)]
        kw = {"ccg_threshold": 0.25} if fn is ccg_merge else {}
        T = _templates(rng, 2)
        # with templates of equal size the refractory-looking CCG is all a merge has to go on: merged
        _, _, parent = fn(t, u, T, sampling_rate=FS, acg_threshold=0.2, **kw)
        assert parent[0] == parent[1], fn.__name__
        T[0] *= 4.0  # a 4x larger unit of the same shape (the dense set: 251 uV beside 43 uV): kept apart
        _, uu, parent = fn(t, u, T, sampling_rate=FS, acg_threshold=0.2, **kw)
        assert parent[0] != parent[1] and len(np.unique(uu)) == 2, fn.__name__


def test_redundant_units_drops_the_weaker_template_of_a_coinciding_pair():
    rng = np.random.default_rng(6)
    big = _train(rng, 2, 60)  # a large unit firing rarely
    small = np.sort(np.r_[big[::2] + 3, _train(rng, 6, 60)])  # a weak template that catches its residuals too
    t = np.r_[big, small]
    u = np.r_[np.zeros(len(big), np.int64), np.ones(len(small), np.int64)]
    # by spike count alone the rare large unit looks like the catcher
    assert redundant_units(t, u, 2, delta=12, max_fraction=0.4).tolist() == [True, False]
    norms = np.array([40.0, 10.0])
    assert redundant_units(t, u, 2, delta=12, max_fraction=0.4, norms=norms).tolist() == [False, False]
    assert redundant_units(t, u, 2, delta=12, max_fraction=0.4, norms=norms[::-1]).tolist() == [True, False]


def test_same_waveform_merge_joins_pieces_of_one_small_unit_not_a_neighbour_or_a_second_neuron():
    """Three pieces of ~170 spikes of one small unit (1 noise SD on a few channels, the pieces' means ~0.8
    alike) become one; a neighbour with the same shape three channels away stays apart, and so does a second
    neuron of the same waveform firing 0.5 ms after the first (its union breaks the refractory period)."""
    rng = np.random.default_rng(4)
    nC, P = 10, 6
    wave = np.zeros((nC, P))
    wave[:3, :2] = 0.4 * np.array([[2.5, -1.0], [1.5, 0.5], [1.0, 0.8]])
    other = 1.5 * np.roll(wave, 3, axis=0)  # a larger neighbour of the same shape three channels away
    train = _train(rng, 5.0, 100)  # one neuron's ~500 spikes, cut in three pieces
    n = len(train)
    piece = np.arange(n) % 3
    neighbour = _train(rng, 5.0, 100)
    overlap = np.sort(train[rng.choice(n, 80, replace=False)]) + 15  # 0.5 ms after the unit's: a second neuron
    t = np.concatenate([train, neighbour, overlap])
    u = np.concatenate([piece, np.full(len(neighbour), 3), np.full(len(overlap), 4)])
    feat = np.concatenate([wave + rng.standard_normal((n, nC, P)), other + rng.standard_normal((len(neighbour), nC, P)),
                           wave + rng.standard_normal((len(overlap), nC, P))])
    chans = np.tile(np.arange(nC), (5, 1))
    # the pieces' means are noisy: their plain similarity is below the 0.9 of the de-duplication rule
    m = np.stack([feat[u == j].mean(0).ravel() for j in range(3)])
    assert (m[0] @ m[1]) / np.linalg.norm(m[0]) / np.linalg.norm(m[1]) < 0.9
    _, merged, parent = same_waveform_merge(t, u, u, feat, chans, sampling_rate=FS, acg_threshold=0.2)
    assert len(set(parent[:3].tolist())) == 1
    assert parent[3] == 3 and parent[4] == 4
    assert np.unique(merged).size == 3
    # with a ratio threshold of 0 nothing can merge
    assert np.unique(same_waveform_merge(t, u, u, feat, chans, sampling_rate=FS, acg_threshold=0.2,
                                         max_ratio=0.0)[1]).size == 5
    assert SAME_WAVEFORM_RATIO == 4.0
    # pairs must share min_common feature channels: asking for more than a unit has leaves all five apart
    assert np.unique(same_waveform_merge(t, u, u, feat, chans, sampling_rate=FS, acg_threshold=0.2,
                                         min_common=nC + 1)[1]).size == 5
    # with contact positions, the neighbour (60 µm away) still stays apart from the pieces
    pos = np.stack([np.zeros(nC), 20.0 * np.arange(nC)], 1)
    parent = same_waveform_merge(t, u, u, feat, chans, sampling_rate=FS, acg_threshold=0.2, positions=pos)[2]
    assert len(set(parent[:3].tolist())) == 1 and parent[3] == 3 and parent[4] == 4


def test_same_waveform_merge_joins_a_unit_split_by_its_noise_where_both_halves_sit():
    """A unit of ~2,000 spikes cut in two by the sign of its noise along one direction (as matching splits a
    neuron between two near-identical templates): the halves' means differ by ~1.6 noise SD along that
    direction, far more than averaging noise (ratio ~8), so without positions they stay apart; with positions
    (both halves peak on the same contact) they join. A neighbour with a distinct waveform 60 µm away, cut the
    same way, does not join either half."""
    rng = np.random.default_rng(8)
    nC, P = 10, 6
    wave = np.zeros((nC, P))
    wave[3:6, :2] = [[3.0, -1.0], [4.0, 1.0], [2.0, 0.5]]
    away = np.roll(wave, 3, axis=0)  # the same shape three contacts (60 µm) along
    train = _train(rng, 20.0, 100)
    n = len(train)
    noise = rng.standard_normal((n, nC, P))
    direction = rng.standard_normal((nC, P))
    direction /= np.linalg.norm(direction)
    half = (np.einsum("ncp,cp->n", noise, direction) > 0).astype(np.int64)
    other = _train(rng, 5.0, 100)
    t = np.concatenate([train, other])
    u = np.concatenate([half, np.full(len(other), 2)])
    feat = np.concatenate([wave + noise, away + rng.standard_normal((len(other), nC, P))])
    chans = np.tile(np.arange(nC), (3, 1))
    pos = np.stack([np.zeros(nC), 20.0 * np.arange(nC)], 1)
    kw = dict(sampling_rate=FS, acg_threshold=0.2)
    # the halves differ by more than SAME_WAVEFORM_RATIO but less than SAME_WAVEFORM_RATIO_NEAR
    x0 = feat[u == 0].reshape(-1, nC * P)
    x1 = feat[u == 1].reshape(-1, nC * P)
    take = np.linspace(0, min(len(x0), len(x1)) - 1, 400).round().astype(int)
    x0, x1 = x0[take], x1[take]
    ratio = ((x0.mean(0) - x1.mean(0)) ** 2).sum() / (x0.var(0, ddof=1) / 400 + x1.var(0, ddof=1) / 400).sum()
    assert SAME_WAVEFORM_RATIO < ratio < SAME_WAVEFORM_RATIO_NEAR
    assert np.unique(same_waveform_merge(t, u, u, feat, chans, **kw)[1]).size == 3
    _, merged, parent = same_waveform_merge(t, u, u, feat, chans, positions=pos, **kw)
    assert parent[0] == parent[1] and parent[2] == 2
    assert np.unique(merged).size == 2
    # it is the near limit that joins them: with it at the plain limit, or no contact counted near, they stay apart
    assert same_waveform_merge(t, u, u, feat, chans, positions=pos, max_ratio_near=SAME_WAVEFORM_RATIO, **kw)[2][1] == 1
    assert same_waveform_merge(t, u, u, feat, chans, positions=pos, near_um=-1.0, **kw)[2][1] == 1


def test_same_waveform_merge_joins_the_pieces_of_a_low_rate_unit_but_not_a_union_with_violations():
    """A unit firing ~0.3 Hz for 100 s, cut in two pieces of ~15 spikes with one waveform: too few spikes for
    Kilosort4's evidence of refractoriness (the union's Q12 stays above 0.2, so ``is_refractory`` says no) and
    nothing in the union breaks the refractory period, so the pieces join. A 10 Hz neuron and a "piece" of the
    same waveform whose spikes fall 1 ms after its spikes (a second neuron) break it together (R12 above the
    threshold) and stay apart."""
    from spikearray.metrics.refractory import ccg_metrics, is_refractory

    rng = np.random.default_rng(11)
    nC, P = 6, 3
    small, big = np.zeros((nC, P)), np.zeros((nC, P))
    small[:3, 0] = [3.0, 2.0, 1.0]
    big[3:, 1] = [6.0, 4.0, 2.0]
    slow = _train(rng, 0.3, 100)
    n = len(slow)
    assert 20 <= n <= 45
    fast = _train(rng, 10.0, 100)
    echo = fast[::2] + 30  # 1 ms after every other spike of the fast neuron
    t = np.concatenate([slow, fast, echo])
    u = np.concatenate([np.arange(n) % 2, np.full(len(fast), 2), np.full(len(echo), 3)])
    feat = np.concatenate([small + rng.standard_normal((n, nC, P)), big + rng.standard_normal((len(fast), nC, P)),
                           big + rng.standard_normal((len(echo), nC, P))])
    chans = np.tile(np.arange(nC), (4, 1))
    assert not is_refractory(np.sort(slow) / FS, 0.2)[0]  # no evidence either way from so few spikes
    both = np.sort(np.concatenate([fast, echo])) / FS
    assert ccg_metrics(both, both, acg=True)[0] >= 0.2  # the echo's union does break the period
    _, merged, parent = same_waveform_merge(t, u, u, feat, chans, sampling_rate=FS, acg_threshold=0.2)
    assert parent[0] == parent[1]
    assert parent[2] == 2 and parent[3] == 3
    assert np.unique(merged).size == 3


def test_each_spike_reads_the_drift_of_its_templates_depth_and_shank():
    """The displacement handed to the drift merge: the estimate at the spike's time (recording clock, with its
    start offset) and its template's peak depth, from the blocks of that channel's shank; 0 on a shank the
    estimate has no blocks for."""
    import xarray as xr

    from spikearray.metrics.sorting import _spike_displacement

    times = np.array([10.0, 12.0, 14.0])  # s, batch centres on a clock that starts at 10 s
    disp = np.array([[0.0, 10.0, 5.0], [2.0, 20.0, 7.0], [4.0, 30.0, 9.0]])  # (time, block) µm
    drift = xr.Dataset({"displacement": (("time", "block"), disp)},
                       coords={"time": times, "depth": ("block", [0.0, 100.0, 50.0]),
                               "block_shank": ("block", [0, 0, 1])})
    pos = np.array([[0.0, 0.0], [0.0, 50.0], [250.0, 50.0], [500.0, 0.0]])  # channel 3 on shank 2 (no blocks)
    shank = np.array([0, 0, 1, 2])
    T = np.zeros((3, 4, 5), np.float32)
    T[0, 1, 2] = -5  # peak at 50 µm on shank 0: halfway between its blocks at 0 and 100 µm
    T[1, 2, 2] = -5  # shank 1: its one block
    T[2, 3, 2] = -5  # shank 2: none
    fs = 1000.0
    t = np.array([1000, 3000, 1000, 2000, 0])  # samples from the recording's start (10 s)
    k = np.array([0, 0, 1, 1, 2])
    got = _spike_displacement(drift, t, k, T, pos, shank, fs, 10.0)
    # template 0 at 11 s: its shank's blocks read 1 and 15 µm, halfway 8; at 13 s 3 and 25, halfway 14;
    # template 1 reads shank 1's block at 11 and 12 s (6, 7); template 2's shank has no blocks
    np.testing.assert_allclose(got, [8.0, 14.0, 6.0, 7.0, 0.0], atol=1e-9)


def test_same_waveform_merge_does_not_let_a_noisy_piece_bridge_two_neurons():
    """Two units of 140 spikes with distinct waveforms (their means differ ~80× the averaging noise) and a
    12-spike piece half-way between them whose scatter is 3 noise SD: the piece passes the test with each unit,
    the units fail it with each other. Complete linkage joins the piece to one of them and keeps the two units
    apart (single linkage made all three one). Their spikes never break the refractory period together, so the
    waveform test alone decides."""
    rng = np.random.default_rng(12)
    nC, P = 6, 3
    a = np.zeros((nC, P))
    a[:3, 0] = [3.0, 2.0, 1.0]
    b = a.copy()
    b[:3, 1] = [2.0, 2.0, 1.0]  # |a - b|² = 9
    train = _train(rng, 4.0, 100)  # one refractory train dealt out to the three, so no union breaks it
    assert len(train) >= 292
    u = np.full(len(train), -1)
    u[:292] = np.concatenate([np.zeros(140, int), np.ones(140, int), np.full(12, 2)])[rng.permutation(292)]
    t, u = train[u >= 0], u[u >= 0]
    mean = np.stack([a, b, (a + b) / 2])[u]
    sd = np.array([1.0, 1.0, 3.0])[u][:, None, None]
    feat = mean + sd * rng.standard_normal((len(u), nC, P))
    chans = np.tile(np.arange(nC), (3, 1))

    def ratio(i, j):
        xi, xj = feat[u == i].reshape(-1, nC * P), feat[u == j].reshape(-1, nC * P)
        noise = (xi.var(0, ddof=1) / len(xi) + xj.var(0, ddof=1) / len(xj)).sum()
        return ((xi.mean(0) - xj.mean(0)) ** 2).sum() / noise

    assert ratio(0, 2) <= SAME_WAVEFORM_RATIO and ratio(1, 2) <= SAME_WAVEFORM_RATIO < ratio(0, 1)
    _, merged, parent = same_waveform_merge(t, u, u, feat, chans, sampling_rate=FS, acg_threshold=0.2)
    assert parent[0] != parent[1]
    assert parent[2] in (parent[0], parent[1])
    assert np.unique(merged).size == 2
