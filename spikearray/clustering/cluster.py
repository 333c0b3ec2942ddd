"""First clustering: detected spikes grouped by depth, clustered per group, turned into templates.

As in Kilosort4 (§2.6), spikes are assigned to spatial centres every ``2·dmin`` µm along y (per shank), each
spike's ``(nearest_chans, n_pcs)`` features are scattered onto the union of the group's channels, and every
group is clustered independently (groups are independent dask-able work). The clustering itself is
:func:`~spikearray.clustering.splitmerge.split_merge` (k-means over-clustering + bimodality merges) on the
group's top principal components rather than Kilosort4's graph modularity: it measured as accurate on our
ground truth and needs no kNN graph. Each cluster's mean feature block, expanded through the temporal PCs,
is a whitened template ``(channel, sample)``; templates found twice (a unit near a group border) are merged
when their similarity is ≥ 0.9 and their norms differ by < 20 % (Kilosort4's rule).

Kilosort4's clustering settings that map onto this design: ``x_centers`` (lateral centres: k-means of the
contacts' x; by default one per shank, which is what Kilosort4's histogram rule gives on Neuropixels),
``max_cluster_subset`` (a group with more spikes is clustered on an evenly spaced subset and the rest join the
nearest cluster mean, so time and memory stay bounded on long recordings) and ``cluster_init_seed`` (the
k-means++ seed). ``cluster_neighbors`` and ``cluster_downsampling`` belong to Kilosort4's kNN graph, which this
clustering does not build; they are accepted and ignored (see ``docs/settings.md``).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..detection.bases import sample_chunks
from ..geometry import shanks, vertical_pitch
from ..settings import Settings
from .similarity import template_similarity
from .splitmerge import split_merge

__all__ = ["cluster_spikes", "group_centres", "x_centres", "subsample", "clustering_seed", "dedup_templates"]


def clustering_seed(settings: Settings) -> int:
    """The k-means++ seed of the clustering: ``(seed + cluster_init_seed − 5) mod 2³²``.

    Kilosort4's default ``cluster_init_seed`` (5) leaves spikearray's ``seed`` as the clustering seed, so default
    results are unchanged; any other value gives another (deterministic) initialisation.
    """
    return int((int(settings.seed) + int(settings.cluster_init_seed) - 5) % 2**32)


def x_centres(x: np.ndarray, n: int) -> np.ndarray:
    """``n`` lateral centres (µm): 1-D k-means of the contacts' x (Kilosort4's manual ``x_centers``).

    Initialised at the quantiles of the distinct x values, so it is deterministic; fewer centres are returned
    when the probe has fewer distinct x positions.

    Examples
    --------
    >>> x_centres(np.array([0., 0., 16., 16., 100., 116.]), 2).tolist()
    [8.0, 108.0]
    """
    ux = np.unique(np.asarray(x, float))
    n = max(1, min(int(n), len(ux)))
    c = np.quantile(ux, (np.arange(n) + 0.5) / n)
    xs = np.asarray(x, float)
    for _ in range(100):
        lab = np.abs(xs[:, None] - c[None, :]).argmin(1)
        new = np.array([xs[lab == i].mean() if (lab == i).any() else c[i] for i in range(n)])
        if np.allclose(new, c):
            break
        c = new
    return np.sort(c)


def group_centres(depth: np.ndarray, shank: np.ndarray, dmin: float, y_range: tuple[float, float],
                  x: np.ndarray | None = None, xc: np.ndarray | None = None) -> np.ndarray:
    """Index of the spatial group of each spike: nearest y-centre (spacing ``2·dmin``) on its shank, and, with
    lateral centres ``xc`` (µm, see :func:`x_centres`) and spike positions ``x``, the nearest x-centre."""
    centres = np.arange(y_range[0] + dmin - 1, y_range[1] + dmin + 1, 2 * dmin)
    yi = np.abs(depth[:, None] - centres[None, :]).argmin(1)
    g = shank.astype(np.int64) * len(centres) + yi
    if x is not None and xc is not None and len(xc) > 1:
        xi = np.abs(np.asarray(x, float)[:, None] - np.asarray(xc)[None, :]).argmin(1)
        g = g * len(xc) + xi
    return g


def subsample(n: int, cap: int | None) -> np.ndarray:
    """Evenly spaced indices of at most ``cap`` of ``n`` items (all of them when ``cap`` is None or ≥ n).

    Deterministic and spread over the whole group (spikes are in time order, so over the whole recording).
    """
    return np.arange(n) if cap is None else sample_chunks(n, int(cap))


def _cluster_group(feat: np.ndarray, neigh: np.ndarray, chans: np.ndarray, seed: int,
                   n_dims: int, min_size: int,
                   max_subset: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Cluster one group. Returns labels, the union channels, mean feature blocks (k, n_union, P) and the number
    of spikes clustered directly (the rest, beyond ``max_subset``, join the nearest cluster mean)."""
    union, inv = np.unique(neigh[chans], return_inverse=True)
    inv = inv.reshape(len(chans), -1)
    n, nC, P = feat.shape
    Xd = np.zeros((n, len(union), P), np.float32)
    Xd[np.arange(n)[:, None], inv] = feat
    flat = Xd.reshape(n, -1)
    sub = subsample(n, max_subset)
    lab_sub = split_merge(flat[sub].astype(np.float64), n_dims=n_dims, seed=seed, min_size=min_size)
    if len(sub) == n:
        lab = lab_sub
    else:
        cents = np.stack([flat[sub][lab_sub == k].mean(0) for k in range(lab_sub.max() + 1)])
        cc = (cents ** 2).sum(1)
        lab = np.empty(n, np.int64)
        for a in range(0, n, 8192):  # nearest mean, in slices: (slice, k) distances only
            lab[a:a + 8192] = (cc[None, :] - 2 * flat[a:a + 8192] @ cents.T).argmin(1)
        lab[sub] = lab_sub  # the clustered spikes keep their own labels
    means = np.stack([Xd[lab == k].mean(0) if (lab == k).any() else np.zeros((len(union), P), np.float32)
                      for k in range(lab.max() + 1)])
    return lab, union, means, len(sub)


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
        Uses ``dmin``, ``x_centers``, ``max_cluster_subset``, ``seed`` and ``cluster_init_seed``
        (:func:`clustering_seed`), ``nt``, ``nt0min``.
    min_spikes : int
        Smallest cluster kept.

    Returns
    -------
    xarray.Dataset
        ``template`` (template, channel, sample) float32 whitened; ``template_count`` (template) spikes per
        template; ``spike_cluster`` (spike) int64 template index of every detected spike (−1 for spikes
        in dropped clusters). attrs: ``dmin``, ``n_groups``, ``x_centres`` (µm), ``max_cluster_subset``,
        ``n_clustered_max`` (most spikes clustered directly in one group), ``n_groups_subsampled``, ``seed``.
    """
    s = Settings.coerce(settings)
    pos = np.stack([channels["x"].values, channels["y"].values], 1).astype(float)
    shank = shanks(channels)
    C = len(pos)
    dmin = s.dmin if s.dmin is not None else vertical_pitch(pos)
    pcs = bases["pc"].values
    nt = pcs.shape[1]
    st_chan = spikes["spike_channel"].values
    feat_all = spikes["spike_features"].values
    neigh = spikes["neighbours"].values
    xc = x_centres(pos[:, 0], s.x_centers) if s.x_centers is not None else None
    groups = group_centres(spikes["spike_depth"].values.astype(float), shank[st_chan], dmin,
                           (float(pos[:, 1].min()), float(pos[:, 1].max())),
                           x=spikes["spike_x"].values if xc is not None else None, xc=xc)
    seed = clustering_seed(s)
    n_direct_max, n_thinned = 0, 0
    templates: list[np.ndarray] = []
    counts: list[int] = []
    spike_cluster = np.full(len(st_chan), -1, np.int64)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if len(idx) < min_spikes:
            continue
        lab, union, means, n_direct = _cluster_group(feat_all[idx], neigh, st_chan[idx], seed, 10, min_spikes,
                                                     s.max_cluster_subset)
        n_direct_max, n_thinned = max(n_direct_max, n_direct), n_thinned + int(n_direct < len(idx))
        for k in range(len(means)):
            m = lab == k
            if m.sum() < min_spikes:
                continue
            tmpl = np.zeros((C, nt), np.float32)
            tmpl[union] = means[k] @ pcs
            spike_cluster[idx[m]] = len(templates)
            templates.append(tmpl)
            counts.append(int(m.sum()))
    attrs = {"dmin": float(dmin), "n_groups": int(len(np.unique(groups))),
             "x_centres": [] if xc is None else [float(v) for v in xc],
             "max_cluster_subset": -1 if s.max_cluster_subset is None else int(s.max_cluster_subset),
             "n_clustered_max": int(n_direct_max), "n_groups_subsampled": int(n_thinned), "seed": seed}
    if not templates:
        return xr.Dataset({"template": (("template", "channel", "sample"), np.zeros((0, C, nt), np.float32)),
                           "template_count": ("template", np.zeros(0, np.int64)),
                           "spike_cluster": ("spike", spike_cluster)}, attrs=attrs)
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
        attrs=attrs,
    )
