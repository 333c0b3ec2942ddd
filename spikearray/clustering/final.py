"""Final clustering: split each matched template's spikes where they hold more than one unit.

The first clustering works on detected spikes grouped by depth; where units crowd (the dense 128-channel
paper set has units 5 µm apart), two neighbours with similar waveforms can end up in one cluster, hence
one template, and matching then gives both units' spikes to it. Kilosort4 re-clusters the matched spikes
on their PC features for the same reason (its "final clustering", kilosort4.md §2.6, template mode). We
keep the first clustering's templates and only test each template's own spikes: the features of a matched
spike (residual plus its fitted template, on the template's ``nearest_chans`` channels) are split
recursively along their own principal components while the two halves are bimodal
(:func:`~spikearray.clustering.splitmerge.split_population`), the same test the first clustering uses.
The pieces' templates are read back from the data; the merges that follow (refractory cross-correlograms,
fragments, residual catchers) undo splits of one neuron.

Measured on the dense paper set (seed 2205, 128 channels, 250 units): 149 → 163 well-detected units (144 before
this and the size-aware merges of :mod:`~spikearray.clustering.merge`); GT-A/GT-B: docs/sorter.md.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..settings import Settings
from ..metrics.refractory import is_refractory
from .cluster import clustering_seed, dedup_templates
from .merge import _unit_members
from .splitmerge import split_population
from .templates import mean_waveforms

__all__ = ["split_matched", "drop_low_amplitude_mode", "SMALL_PIECE_SPIKES", "SMALL_PIECE_NORM",
           "LOW_MODE_SEPARATION", "LOW_MODE_RATIO"]

#: Fewest spikes of a small piece (:func:`split_matched`'s ``small_piece``); a unit needs more than
#: ``metrics.sorting.MIN_UNIT_SPIKES`` (10) spikes, and Kilosort4's refractory test more than 10.
SMALL_PIECE_SPIKES = 12

#: Smallest norm of a small piece's mean feature vector (whitened: noise has unit variance per feature), 2.5
#: times ``Th_learned``'s default. The dense static paper set (seed 2205) holds low-rate units of large spikes
#: (17-59 spikes in 100 s, 71-184 µV) that share a template with a neighbour; pieces of 30 spikes could not
#: take them out. Their pieces' norms were 15-38; the small pieces of 23-28 µV units, which are fragments
#: of units whose other spikes lie elsewhere, 7-14. Measured (well detected / false-positive units):
#: static 170 / 4 → 173 / 4 with (12, 15); (12, 12) 173 / 6, (12, 20) 172 / 4, (10, 15) 173 / 4; the
#: drifting set 142 / 13 at (12, 15) and (12, 20), 143 / 14 at (10, 15).
SMALL_PIECE_NORM = 15.0


#: Least separation of a template's low-amplitude mode, in pooled standard deviations of the log fitted scale
#: (:func:`drop_low_amplitude_mode`). A unimodal bell cut at its mean reads about 2.7. Reruns from cached
#: stages (well detected / false-positive units) at 2, 3, 4, 5, 6, 8: P128-drift 145/4, 151/5, 153/4, 152/4,
#: 151/5, 149/5 (147/5 without); P128-static 176/4, 177/4, 178/4, 177/4, 177/4, 176/4 (176/4 without); GT-B
#: 31, 32, then 33 from 4 up (33 without); GT-A and GT-N12 unchanged throughout.
LOW_MODE_SEPARATION = 5.0

#: Least ratio of the median scales of a template's two amplitude modes for the low one to be dropped.
LOW_MODE_RATIO = 1.3


def _low_mode(scale: np.ndarray, min_spikes: int, separation: float, ratio: float) -> np.ndarray:
    """Indices into ``scale`` of its low mode, or an empty array.

    The cut is the best two-means split of ``log(scale)`` with at least ``min_spikes`` on either side; the
    low side is a mode when the two sides' means lie ``separation`` pooled standard deviations apart and
    their medians ``ratio`` times.
    """
    n = len(scale)
    if n < 2 * min_spikes:
        return np.zeros(0, np.int64)
    z = np.log(np.maximum(scale.astype(np.float64), 1e-6))
    order = np.argsort(z, kind="stable")
    zs = z[order]
    csum = np.cumsum(zs)
    cut = np.arange(min_spikes, n - min_spikes + 1)  # sizes of the low side
    left = csum[cut - 1] / cut
    right = (csum[-1] - csum[cut - 1]) / (n - cut)
    c = int(cut[np.argmax(cut * (n - cut) * (right - left) ** 2)])
    lo, hi = zs[:c], zs[c:]
    spread = np.sqrt(0.5 * (lo.var() + hi.var()))
    if hi.mean() - lo.mean() < separation * max(spread, 1e-12) or np.median(hi) - np.median(lo) < np.log(ratio):
        return np.zeros(0, np.int64)
    return np.sort(order[:c])


def drop_low_amplitude_mode(matched: xr.Dataset, *, min_spikes: int = SMALL_PIECE_SPIKES,
                            separation: float = LOW_MODE_SEPARATION, ratio: float = LOW_MODE_RATIO) -> xr.Dataset:
    """Drop the spikes that a template fitted at a separate, much lower amplitude than its own.

    Matching gives a spike to the template that explains it best at any amplitude, so a large template also
    takes, at a fraction of its size, spikes of smaller neurons nearby that no template fits better. Their
    fitted scales form a mode of their own, below the unit's spikes around 1. Per template, when the log
    scales split into two groups whose means lie ``separation`` pooled SDs apart and whose medians differ
    ``ratio`` times, the low group (at least ``min_spikes``) is dropped from the sorting: those spikes belong
    to other neurons. On the dense paper sets they did: on the drifting 128-channel set 30 of the 680 spikes
    dropped were the template's own unit's, the rest groups of 12-80 spikes of other units (a 204 µV unit's
    accuracy 0.62 → 0.97, a 251 µV unit's on the static set 0.80 → 1.00). Kept as a unit of its own instead,
    the low group added false-positive units and no well-detected one (docs/sorter.md).

    Parameters
    ----------
    matched : xarray.Dataset
        From :func:`split_matched`: ``spike_template`` and ``spike_scale`` (spike), ``template_count``.
    min_spikes : int
        Fewest spikes of the low group, and of the rest.
    separation : float
        :data:`LOW_MODE_SEPARATION`.
    ratio : float
        :data:`LOW_MODE_RATIO`.

    Returns
    -------
    xarray.Dataset
        ``matched`` without the dropped spikes, ``template_count`` recounted; attr ``n_low_mode_spikes``
        counts the spikes dropped.

    Examples
    --------
    >>> matched = drop_low_amplitude_mode(split_matched(matched, white, settings))  # doctest: +SKIP
    """
    k = matched["spike_template"].values.astype(np.int64)
    scale = matched["spike_scale"].values
    drop = np.zeros(len(k), bool)
    for idx in _unit_members(k, matched.sizes["template"]).values():
        drop[idx[_low_mode(scale[idx], min_spikes, separation, ratio)]] = True
    out = matched.isel(spike=np.flatnonzero(~drop))
    out = out.assign(template_count=(matched["template_count"].dims,
                                     np.bincount(k[~drop], minlength=matched.sizes["template"]).astype(np.int64)))
    out.attrs = dict(matched.attrs, n_low_mode_spikes=int(drop.sum()))
    return out


def split_matched(matched: xr.Dataset, white: xr.DataArray, settings: Settings | None = None, *,
                  min_spikes: int = 30, split_above: float = 0.75, n_dims: int = 10,
                  small_piece: tuple[int, float] | None = (SMALL_PIECE_SPIKES, SMALL_PIECE_NORM)) -> xr.Dataset:
    """Split matched templates whose spikes form more than one cluster in feature space.

    Parameters
    ----------
    matched : xarray.Dataset
        From :func:`spikearray.matching.match`: ``spike_template`` (spike), ``spike_features``
        (spike, nearest, pc), ``spike_scale`` (spike), ``template_mean`` (template, channel, sample, whitened),
        ``template_channels`` (template, nearest), ``template_count`` (template).
    white : xarray.DataArray (time, channel)
        The whitened recording the templates were matched on (for the pieces' mean waveforms).
    settings : Settings
        Uses ``seed`` and ``cluster_init_seed`` (the clustering seed), ``nt``, ``nt0min``, ``acg_threshold``.
    min_spikes : int
        Each piece keeps at least this many spikes (but see ``small_piece``); templates with fewer than this
        plus the smallest piece allowed are not tested.
    split_above : float
        Bimodality score (0–1) a split needs, as in the first clustering.
    n_dims : int
        Principal components of the features used per split.
    small_piece : (int, float) or None
        ``(n, norm)``: a split that ``min_spikes`` refuses still takes out a piece of at least ``n`` spikes
        whose mean feature vector (whitened, the template's channels × PCs) has at least this norm — a whole
        low-rate unit of large spikes that shares a template with a neighbour (see
        :data:`SMALL_PIECE_NORM`). ``None``: pieces of ``min_spikes`` only.

    Returns
    -------
    xarray.Dataset
        ``matched`` with new templates appended for the pieces (a piece keeps its parent's channels),
        ``spike_template`` relabelled, ``spike_scale`` re-expressed relative to the piece's template, and
        ``template_mean``/``template_count`` recomputed for every template that was split. Attr
        ``n_split`` counts the templates split.

    Examples
    --------
    >>> matched = split_matched(matched, white, settings)  # doctest: +SKIP
    """
    s = Settings.coerce(settings)
    k = matched["spike_template"].values.astype(np.int64).copy()
    feat = matched["spike_features"].values
    scale = matched["spike_scale"].values.astype(np.float32).copy()
    tmean = matched["template_mean"].values
    tchan = matched["template_channels"].values
    K = len(tmean)
    least = min_spikes if small_piece is None else min(min_spikes, small_piece[0])
    parent_of_new: list[int] = []
    split_ids: list[int] = []
    for j in range(K):
        idx = np.flatnonzero(k == j)
        if len(idx) < min_spikes + least:
            continue
        X = feat[idx].reshape(len(idx), -1).astype(np.float64)
        parts = split_population(X, seed=clustering_seed(s), n_dims=n_dims, min_size=min_spikes,
                                 split_above=split_above, small=small_piece)
        if len(parts) < 2:
            continue
        split_ids.append(j)
        for p in parts[1:]:
            k[idx[p]] = K + len(parent_of_new)
            parent_of_new.append(j)
    if not split_ids:
        out = matched.copy()
        out.attrs = dict(matched.attrs, n_split=0)
        return out
    Kn = K + len(parent_of_new)
    family = np.array(split_ids + list(range(K, Kn)))
    # read back the pieces' (and the parents' remaining) mean waveforms; others keep the matched means
    lab = np.full(len(k), -1, np.int64)
    pos = {int(f): i for i, f in enumerate(family)}
    in_fam = np.isin(k, family)
    lab[in_fam] = [pos[int(v)] for v in k[in_fam]]
    times = matched["spike_time"].values
    fs = float(white.attrs["sampling_rate"])
    means, counts = mean_waveforms(white, times, lab, len(family), nt=s.nt, nt0=s.nt0min_,
                                   min_per_template=min(20, min_spikes), torch_threads_=s.torch_threads)
    parents = np.array(split_ids + parent_of_new)
    new_mean = np.concatenate([tmean, np.zeros((Kn - K,) + tmean.shape[1:], tmean.dtype)])
    sizes = np.bincount(k, minlength=Kn)
    for i, f in enumerate(family):
        # a piece with fewer than 20 spikes in the sampled chunks is topped up from other chunks (mean_waveforms'
        # min_per_template). From the sampled chunks alone, the 33-spike piece of a 51 µV unit inside a 76 µV
        # unit's template got 16, kept its parent's mean, and the de-duplication below rejoined it. Reading
        # every spike of such pieces instead of 20 scored the same on every set and took 3.2 instead of 2.5 s of
        # re-clustering on P128-static (2.0 s without). A piece still short (the top-up reads at most 24 more
        # chunks, and skips spikes at chunk edges) keeps its parent's mean.
        need = min(20, min_spikes) if sizes[f] >= min_spikes else least
        new_mean[f] = means[i] if counts[i] >= need else tmean[parents[i]]
    # pieces whose read-back means are the same waveform are one unit after all (the first clustering's
    # de-duplication rule, Kilosort4's: similarity >= 0.9 and norms within 20 %). On GT-A a unit's spikes
    # split 296/86 into two pieces of equal norm, too few spikes for the refractory merge to decide.
    for j in split_ids:
        members = [j] + [K + i for i, p in enumerate(parent_of_new) if p == j]
        # compared on the parent's own channels: a piece's mean from a few dozen sampled spikes carries enough
        # noise on the probe's far channels to pull a whole-probe similarity of one waveform below 0.9
        local = new_mean[members][:, tchan[j], :]
        rep = dedup_templates(local, np.array([np.sum(k == f) for f in members]), max_lag=new_mean.shape[2] // 2)
        for a, r in enumerate(rep):
            # ... and only when their union keeps the refractory period, as one neuron's spikes do
            if r != a and is_refractory(np.sort(times[(k == members[a]) | (k == members[r])]) / fs,
                                        s.acg_threshold)[0]:
                k[k == members[a]] = members[r]
    # spike_scale was fitted against the parent template: express it against the piece's own
    for i, f in enumerate(family):
        a, b = tmean[parents[i]].ravel(), new_mean[f].ravel()
        nb = float(b @ b)
        if nb > 0:
            scale[k == f] *= np.float32(float(a @ b) / nb)
    new_chan = np.concatenate([tchan, tchan[np.asarray(parent_of_new, np.int64)]])
    out = matched.drop_vars(["template_mean", "template_channels", "template_count"]).assign(
        spike_template=("spike", k),
        spike_scale=("spike", scale),
        template_mean=(matched["template_mean"].dims, new_mean.astype(np.float32)),
        template_channels=(matched["template_channels"].dims, new_chan),
        template_count=(matched["template_count"].dims, np.bincount(k, minlength=Kn).astype(np.int64)),
    )
    out.attrs = dict(matched.attrs, n_split=len(split_ids))
    return out
