"""Final merges after template matching (Kilosort4 §2.9) and duplicate-spike removal.

Units are visited in decreasing spike count; a refractory unit (its own ACG passes the ``acg_threshold``
test) is a seed. Its candidates are units whose template similarity (normalised cross-correlation, max over
lags) is ≥ 0.5, most similar first; the first one whose cross-correlogram with the seed is refractory
(``R12 < ccg_threshold`` and ``Q12 < 0.05``: the two trains never fire within a refractory period of each
other, so they are one neuron) is merged into it, its spike times shifted by the best template lag, and
the seed is examined again until nothing merges.
"""

from __future__ import annotations

import numpy as np

from ..metrics.refractory import is_cross_refractory, is_refractory
from .similarity import template_similarity

__all__ = ["ccg_merge", "remove_duplicates"]


def ccg_merge(spike_time: np.ndarray, spike_unit: np.ndarray, templates: np.ndarray, *, sampling_rate: float,
              acg_threshold: float, ccg_threshold: float, min_similarity: float = 0.5,
              max_lag: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge units that are one neuron.

    Parameters
    ----------
    spike_time : ndarray (n,) int64, samples
    spike_unit : ndarray (n,) int64, 0..K-1
    templates : ndarray (K, C, nt)
    sampling_rate : float
    acg_threshold, ccg_threshold : float
        Kilosort4's thresholds.
    min_similarity : float
        Candidates need at least this template similarity.

    Returns
    -------
    spike_time : ndarray (n,) int64
        Times of merged spikes shifted by the template lag (unsorted order kept).
    spike_unit : ndarray (n,) int64
        Unit of each spike after merging (ids of the surviving seeds, not yet relabelled).
    parent : ndarray (K,) int64
        For each original unit, the unit it ended up in.
    """
    K = len(templates)
    t = spike_time.astype(np.int64).copy()
    u = spike_unit.astype(np.int64).copy()
    parent = np.arange(K)
    if K < 2:
        return t, u, parent
    nt = templates.shape[2]
    sim, lag = template_similarity(templates, max_lag if max_lag is not None else nt // 2)
    counts = np.bincount(u, minlength=K)
    members = {k: np.flatnonzero(u == k) for k in range(K)}
    fs = float(sampling_rate)
    order = np.argsort(-counts, kind="stable")
    for a in order:
        if parent[a] != a or counts[a] == 0:
            continue
        if not is_refractory(t[members[a]] / fs, acg_threshold)[0]:
            continue
        changed = True
        while changed:
            changed = False
            cands = [b for b in np.argsort(-sim[a], kind="stable")
                     if b != a and parent[b] == b and counts[b] > 0 and sim[a, b] >= min_similarity]
            for b in cands:
                if is_cross_refractory(t[members[a]] / fs, t[members[b]] / fs, ccg_threshold):
                    t[members[b]] += lag[a, b]
                    u[members[b]] = a
                    members[a] = np.concatenate([members[a], members[b]])
                    members[b] = members[b][:0]
                    counts[a] += counts[b]
                    counts[b] = 0
                    parent[parent == b] = a
                    changed = True
                    break
    return t, u, parent


def remove_duplicates(spike_time: np.ndarray, spike_unit: np.ndarray, min_gap: int) -> np.ndarray:
    """Boolean mask of spikes kept: a spike closer than ``min_gap`` samples after the last kept spike of the
    same unit is a duplicate (Kilosort4's ``duplicate_spike_ms`` rule). Input must be sorted by time."""
    keep = np.ones(len(spike_time), bool)
    if min_gap <= 0 or len(spike_time) == 0:
        return keep
    order = np.lexsort((spike_time, spike_unit))
    t = spike_time[order]
    u = spike_unit[order]
    last_t = None
    last_u = None
    for i in range(len(t)):
        if last_u == u[i] and t[i] - last_t < min_gap:
            keep[order[i]] = False
            continue
        last_t, last_u = t[i], u[i]
    return keep
