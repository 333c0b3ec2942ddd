"""First clustering: detected spikes grouped by depth, clustered per group, turned into templates.

As in Kilosort4 (§2.6), spikes are assigned to spatial centres every ``2·dmin`` µm along y (per shank), each
spike's ``(nearest_chans, n_pcs)`` features are scattered onto the union of the group's channels, and every
group is clustered independently (groups are independent dask-able work). The clustering itself is
:func:`~spikearray.clustering.splitmerge.split_merge` (k-means over-clustering + bimodality merges) on the
group's top principal components rather than Kilosort4's graph modularity: it measured as accurate on our
ground truth and needs no kNN graph. Each cluster's mean feature block, expanded through the temporal PCs,
is a whitened template ``(channel, sample)``; templates found twice (a unit near a group border) are merged
when their similarity is ≥ 0.9 and their norms differ by < 20 % (Kilosort4's rule).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..geometry import vertical_pitch
from ..settings import Settings
from .similarity import template_similarity
from .splitmerge import split_merge

__all__ = ["cluster_spikes", "group_centres", "dedup_templates"]


def group_centres(depth: np.ndarray, shank: np.ndarray, dmin: float, y_range: tuple[float, float]) -> np.ndarray:
    """Index of the spatial group of each spike: nearest y-centre (spacing ``2·dmin``) on its shank."""
    centres = np.arange(y_range[0] + dmin - 1, y_range[1] + dmin + 1, 2 * dmin)
    yi = np.abs(depth[:, None] - centres[None, :]).argmin(1)
    return shank.astype(np.int64) * len(centres) + yi


def _cluster_group(feat: np.ndarray, neigh: np.ndarray, chans: np.ndarray, seed: int,
                   n_dims: int, min_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster one group. Returns labels, the union channels, and mean feature blocks (k, n_union, P)."""
    union, inv = np.unique(neigh[chans], return_inverse=True)
    inv = inv.reshape(len(chans), -1)
    n, nC, P = feat.shape
    Xd = np.zeros((n, len(union), P), np.float32)
    Xd[np.arange(n)[:, None], inv] = feat
    lab = split_merge(Xd.reshape(n, -1).astype(np.float64), n_dims=n_dims, seed=seed, min_size=min_size)
    means = np.stack([Xd[lab == k].mean(0) for k in range(lab.max() + 1)])
    return lab, union, means


def dedup_templates(templates: np.ndarray, counts: np.ndarray, *, max_lag: int, threshold: float = 0.9,
                    norm_tol: float = 0.2) -> np.ndarray:
    """Map each template to a representative: pairs with similarity ≥ ``threshold`` and norms within
    ``norm_tol`` (relative) are the same unit; the template with most spikes represents the group.

    Returns
    -------
    ndarray (K,) of int
        Representative index of each template.
    """
    K = len(templates)
    rep = np.arange(K)
    if K < 2:
        return rep
    sim, _ = template_similarity(templates, max_lag)
    norms = np.linalg.norm(templates.reshape(K, -1), axis=1)
    order = np.argsort(-counts, kind="stable")
    for i in order:
        if rep[i] != i:
            continue
        for j in order:
            if j == i or rep[j] != j or counts[j] > counts[i]:
                continue
            close = 2 * abs(norms[i] - norms[j]) / (norms[i] + norms[j]) < norm_tol
            if sim[i, j] >= threshold and close:
                rep[j] = i
    return rep


def cluster_spikes(spikes: xr.Dataset, bases: xr.Dataset, channels: xr.Dataset | xr.DataArray,
                   settings: Settings | None = None, *, min_spikes: int = 30) -> xr.Dataset:
    """Cluster detected spikes into units and build their whitened templates.

    Parameters
    ----------
    spikes : xarray.Dataset
        From :func:`spikearray.detection.detect`.
    bases : xarray.Dataset
        Temporal PCs (``pc``).
    channels : Dataset or DataArray
        Anything carrying the ``channel`` coords ``x``, ``y``, ``shank``.
    settings : Settings
        Uses ``dmin``, ``seed``, ``nt``, ``nt0min``.
    min_spikes : int
        Smallest cluster kept.

    Returns
    -------
    xarray.Dataset
        ``template`` (template, channel, sample) float32 whitened; ``template_count`` (template) spikes per
        template; ``spike_cluster`` (spike) int64 template index of every detected spike (−1 for spikes
        in dropped clusters).
    """
    s = Settings.coerce(settings)
    pos = np.stack([channels["x"].values, channels["y"].values], 1).astype(float)
    shank = np.asarray(channels["shank"].values) if "shank" in channels.coords else np.zeros(len(pos), int)
    C = len(pos)
    dmin = s.dmin if s.dmin is not None else vertical_pitch(pos)
    pcs = bases["pc"].values
    nt = pcs.shape[1]
    st_chan = spikes["spike_channel"].values
    feat_all = spikes["spike_features"].values
    neigh = spikes["neighbours"].values
    groups = group_centres(spikes["spike_depth"].values.astype(float), shank[st_chan], dmin,
                           (float(pos[:, 1].min()), float(pos[:, 1].max())))
    templates: list[np.ndarray] = []
    counts: list[int] = []
    spike_cluster = np.full(len(st_chan), -1, np.int64)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if len(idx) < min_spikes:
            continue
        lab, union, means = _cluster_group(feat_all[idx], neigh, st_chan[idx], s.seed, 10, min_spikes)
        for k in range(len(means)):
            m = lab == k
            if m.sum() < min_spikes:
                continue
            tmpl = np.zeros((C, nt), np.float32)
            tmpl[union] = means[k] @ pcs
            spike_cluster[idx[m]] = len(templates)
            templates.append(tmpl)
            counts.append(int(m.sum()))
    if not templates:
        return xr.Dataset({"template": (("template", "channel", "sample"), np.zeros((0, C, nt), np.float32)),
                           "template_count": ("template", np.zeros(0, np.int64)),
                           "spike_cluster": ("spike", spike_cluster)})
    T = np.stack(templates)
    cnt = np.asarray(counts)
    rep = dedup_templates(T, cnt, max_lag=nt // 2)
    keep = np.flatnonzero(rep == np.arange(len(T)))
    new_index = {int(k): i for i, k in enumerate(keep)}
    spike_cluster = np.where(spike_cluster >= 0, np.array([new_index[int(r)] for r in rep])[spike_cluster.clip(0)], -1)
    counts_kept = np.bincount(spike_cluster[spike_cluster >= 0], minlength=len(keep))
    return xr.Dataset(
        {"template": (("template", "channel", "sample"), T[keep]),
         "template_count": ("template", counts_kept.astype(np.int64)),
         "spike_cluster": ("spike", spike_cluster)},
        attrs={"dmin": float(dmin), "n_groups": int(len(np.unique(groups)))},
    )
