"""The final clustering (split_matched): one template holding two units is split, one unit stays whole."""

import dask.array as da
import numpy as np
import xarray as xr

from spikearray.clustering.final import split_matched
from spikearray.settings import Settings

FS = 30000.0
C, NT, NT0 = 8, 61, 20


def _unit_waveform(peak_channel: int, width: float) -> np.ndarray:
    t = np.arange(NT) - NT0
    shape = -np.exp(-0.5 * (t / width) ** 2) + 0.35 * np.exp(-0.5 * ((t - 3 * width) / (2 * width)) ** 2)
    space = np.exp(-0.5 * ((np.arange(C) - peak_channel) / 1.5) ** 2)
    return (8.0 * space[:, None] * shape[None, :]).astype(np.float32)  # (C, nt), whitened SD units


def _matched(units: list[np.ndarray], n_per_unit: int | list[int], seed: int = 0):
    """A whitened recording with the units planted, and a 'matched' Dataset that gives all spikes to template 0."""
    rng = np.random.default_rng(seed)
    n = int(20 * FS)
    x = (0.3 * rng.standard_normal((n, C))).astype(np.float32)
    counts = [n_per_unit] * len(units) if np.isscalar(n_per_unit) else list(n_per_unit)
    slots = rng.choice(np.arange(200, n - 200, 150), sum(counts), replace=False)
    times = np.sort(slots)
    truth = rng.permutation(np.repeat(np.arange(len(units)), counts))
    for t, u in zip(times, truth):
        x[t - NT0:t - NT0 + NT] += units[u].T * rng.uniform(0.9, 1.1)
    white = xr.DataArray(da.from_array(x, chunks=(int(2 * FS), C)), dims=("time", "channel"),
                         coords={"channel": np.arange(C)}, attrs={"sampling_rate": FS})
    # features as matching computes them: the spike's window on the template's channels, on temporal PCs
    stack = np.concatenate([w for w in units])  # (len(units) * C, nt)
    pcs = np.linalg.svd(stack, full_matrices=False)[2][:3]  # (P, nt)
    win = x[times[:, None] - NT0 + np.arange(NT)[None, :]]  # (n, nt, C)
    feat = np.einsum("ntc,pt->ncp", win, pcs).astype(np.float32)  # (n, nearest=C, P)
    mean = np.mean(units, axis=0)[None]
    matched = xr.Dataset({
        "spike_time": ("spike", times.astype(np.int64)),
        "spike_template": ("spike", np.zeros(len(times), np.int64)),
        "spike_scale": ("spike", np.ones(len(times), np.float32)),
        "spike_features": (("spike", "nearest", "pc"), feat),
        "template_mean": (("template", "channel", "sample"), mean.astype(np.float32)),
        "template_channels": (("template", "nearest"), np.arange(C)[None]),
        "template_count": ("template", np.array([len(times)])),
    })
    return matched, white, truth


def test_a_template_holding_two_units_is_split_into_pure_pieces_with_their_own_waveforms():
    wa, wb = _unit_waveform(2, 2.0), _unit_waveform(5, 3.5)
    matched, white, truth = _matched([wa, wb], 300)
    out = split_matched(matched, white, Settings(), min_spikes=30)
    lab = out["spike_template"].values
    used = np.unique(lab)
    assert len(used) == 2
    for u, w in ((0, wa), (1, wb)):
        piece = np.bincount(lab[truth == u]).argmax()
        assert np.mean(lab[truth == u] == piece) > 0.97  # each unit in one piece ...
        assert np.mean(truth[lab == piece] == u) > 0.97  # ... and each piece one unit
        # the piece's template is read back from the data: the planted waveform, within the noise of its mean
        np.testing.assert_allclose(out["template_mean"].values[piece], w, atol=0.15)
    assert out["template_count"].values[used].tolist() == np.bincount(lab)[used].tolist()
    assert out["template_channels"].shape == (out.sizes["template"], C)


def test_one_unit_stays_one_template():
    matched, white, _ = _matched([_unit_waveform(3, 2.5)], 600, seed=1)
    out = split_matched(matched, white, Settings(), min_spikes=30)
    assert np.unique(out["spike_template"].values).tolist() == [0]
    np.testing.assert_array_equal(out["spike_time"].values, matched["spike_time"].values)


def test_a_few_large_spikes_sharing_a_template_become_their_own_unit():
    """A low-rate unit of large spikes (20 spikes, below the 30 of an ordinary piece) inside a busy neighbour's
    template is taken out: the dense static paper set had four such units of 71-184 µV."""
    busy, rare = _unit_waveform(2, 2.0), 2.0 * _unit_waveform(5, 3.5)
    matched, white, truth = _matched([busy, rare], [400, 20], seed=2)
    feat = matched["spike_features"].values
    assert np.linalg.norm(feat[truth == 1].mean(0)) > 15.0  # the rare unit's spikes are large ...
    out = split_matched(matched, white, Settings(), min_spikes=30)
    lab = out["spike_template"].values
    assert len(np.unique(lab)) == 2
    piece = np.bincount(lab[truth == 1]).argmax()
    assert piece != 0 and np.mean(lab[truth == 1] == piece) >= 0.95 and np.all(truth[lab == piece] == 1)
    # its template is read back from its own spikes: the planted waveform within 10 % (noise of a 20-spike mean)
    assert np.linalg.norm(out["template_mean"].values[piece] - rare) < 0.1 * np.linalg.norm(rare)
    # ... and with pieces of 30 spikes only, they stay in the busy template
    alone = split_matched(matched, white, Settings(), min_spikes=30, small_piece=None)
    assert np.unique(alone["spike_template"].values).tolist() == [0]


def test_a_few_small_spikes_are_not_taken_out_of_a_template():
    """20 spikes of a waveform too small for a piece under 30 spikes (norm < SMALL_PIECE_NORM) stay where
    they are: on the dense paper sets such pieces were fragments of small units, false-positive units alone."""
    busy, faint = _unit_waveform(2, 2.0), 0.35 * _unit_waveform(6, 3.5)
    matched, white, truth = _matched([busy, faint], [400, 20], seed=3)
    feat = matched["spike_features"].values
    assert np.linalg.norm(feat[truth == 1].mean(0)) < 15.0
    out = split_matched(matched, white, Settings(), min_spikes=30)
    assert np.unique(out["spike_template"].values).tolist() == [0]


def test_a_piece_rare_in_the_sampled_chunks_keeps_its_own_waveform():
    """A unit of 33 spikes split out of a busy neighbour's template, on a recording of 80 short chunks of which
    the read-back samples 24: its mean is topped up to 20 spikes from other chunks, beyond the ~10 in the sampled
    ones (too few: the piece kept the parent's mean, and the de-duplication of same-waveform pieces rejoined it)."""
    busy, other = _unit_waveform(2, 2.0), 1.2 * _unit_waveform(5, 3.5)
    matched, white, truth = _matched([busy, other], [400, 33], seed=4)
    white = white.chunk({"time": int(0.25 * FS)})
    out = split_matched(matched, white, Settings(), min_spikes=30)
    lab = out["spike_template"].values
    assert len(np.unique(lab)) == 2
    piece = np.bincount(lab[truth == 1]).argmax()
    assert piece != 0 and np.mean(lab[truth == 1] == piece) >= 0.95 and np.mean(truth[lab == piece] == 1) >= 0.95
    assert np.linalg.norm(out["template_mean"].values[piece] - other) < 0.1 * np.linalg.norm(other)


def test_a_templates_separate_low_amplitude_mode_is_dropped_and_a_broad_one_kept():
    """Template 0: 300 spikes of its unit at scale ~1 and 25 spikes of another neuron it fitted at ~0.35;
    template 1: 400 spikes whose scales spread widely but in one mode (log-normal, SD 0.3); template 2: two
    modes only 1.15× apart. Only template 0's 25 low spikes go."""
    from spikearray.clustering.final import LOW_MODE_RATIO, LOW_MODE_SEPARATION, drop_low_amplitude_mode

    rng = np.random.default_rng(7)
    scale = np.concatenate([
        rng.normal(1.0, 0.08, 300), rng.normal(0.35, 0.04, 25),
        np.exp(rng.normal(0.0, 0.3, 400)),
        np.exp(np.concatenate([rng.normal(0.0, 0.01, 200), rng.normal(-np.log(1.15), 0.01, 100)])),
    ]).astype(np.float32)
    k = np.repeat([0, 0, 1, 2], [300, 25, 400, 300])
    perm = rng.permutation(len(k))
    k, scale = k[perm], scale[perm]
    matched = xr.Dataset({
        "spike_time": ("spike", np.sort(rng.choice(10 ** 7, len(k), replace=False))),
        "spike_template": ("spike", k),
        "spike_scale": ("spike", scale),
        "template_count": ("template", np.bincount(k)),
    })
    out = drop_low_amplitude_mode(matched)
    gone = ~np.isin(matched["spike_time"].values, out["spike_time"].values)
    assert gone.sum() == 25 and out.attrs["n_low_mode_spikes"] == 25
    assert np.all(k[gone] == 0) and np.all(scale[gone] < 0.6)
    assert out["template_count"].values.tolist() == [300, 400, 300]
    # the third template's modes are separated enough but too close in size: the ratio rule keeps them
    assert drop_low_amplitude_mode(matched, ratio=1.1).attrs["n_low_mode_spikes"] == 125
    assert LOW_MODE_RATIO > 1.15 and LOW_MODE_SEPARATION == 5.0
    # a low group smaller than min_spikes stays
    assert drop_low_amplitude_mode(matched, min_spikes=30).attrs["n_low_mode_spikes"] == 0
