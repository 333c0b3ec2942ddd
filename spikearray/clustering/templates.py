"""Full-waveform templates: the mean whitened waveform of each cluster, read back from the data.

Templates built from PC features live in the span of the ``n_pcs`` temporal PCs, which can miss a large share
of a sharp spike's energy (we measured 12 % for the largest unit of GT-A). In matching pursuit that missing
part stays in the residual after every fitted spike, where other templates then "find" it — duplicated,
spurious spikes on every big unit. So before matching we average each cluster's actual waveforms (all
channels, ``nt`` samples, trough at ``nt0min``) over a deterministic sample of chunks.
"""

from __future__ import annotations

from typing import Any

import dask
import numpy as np
import xarray as xr

from ..detection.bases import sample_chunks

__all__ = ["mean_waveforms", "full_templates"]


def _sum_block(block: np.ndarray, start: int, times: np.ndarray, labels: np.ndarray, K: int, nt: int,
               nt0: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(block, dtype=np.float32)
    rel = times - start - nt0
    ok = (rel >= 0) & (rel + nt <= len(x))
    rel, lab = rel[ok], labels[ok]
    sums = np.zeros((K, nt, x.shape[1]), np.float64)
    if len(rel):
        win = x[rel[:, None] + np.arange(nt)[None, :]]  # (n, nt, C)
        np.add.at(sums, lab, win)
    return sums, np.bincount(lab, minlength=K)


def mean_waveforms(white: xr.DataArray, spike_time: np.ndarray, spike_label: np.ndarray, n_templates: int, *,
                   nt: int, nt0: int, n_chunks: int = 24, max_per_template: int = 400,
                   client: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean waveform of every label, from spikes in a deterministic, evenly spaced sample of chunks.

    Parameters
    ----------
    white : xarray.DataArray (time, channel)
        Whitened (drift-corrected) recording.
    spike_time : ndarray (n,) int64
        Trough samples.
    spike_label : ndarray (n,) int64
        Template index (−1 = ignore).
    n_templates : int
    nt, nt0 : int
        Window length and trough index.
    n_chunks : int
        Chunks read (evenly spaced).
    max_per_template : int
        Spikes used per template at most (evenly thinned).

    Returns
    -------
    means : ndarray (K, C, nt) float32
        Mean waveforms (zeros where no spike was sampled).
    counts : ndarray (K,) int64
        Spikes averaged per template.
    """
    data = white.data
    starts = np.cumsum((0,) + data.chunks[0])
    chosen = sample_chunks(len(data.chunks[0]), n_chunks)
    keep = spike_label >= 0
    t_all, l_all = spike_time[keep], spike_label[keep]
    in_chunk = np.isin(np.searchsorted(starts, t_all, side="right") - 1, chosen)
    t_all, l_all = t_all[in_chunk], l_all[in_chunk]
    # evenly thin each template to max_per_template spikes
    sel = np.zeros(len(t_all), bool)
    for k in range(n_templates):
        idx = np.flatnonzero(l_all == k)
        if len(idx):
            sel[idx[np.unique(np.linspace(0, len(idx) - 1, min(len(idx), max_per_template)).astype(int))]] = True
    t_all, l_all = t_all[sel], l_all[sel]
    tasks = []
    for i in chosen:
        m = (t_all >= starts[i]) & (t_all < starts[i + 1])
        if m.any():
            tasks.append(dask.delayed(_sum_block)(data.blocks[int(i)], int(starts[i]), t_all[m], l_all[m],
                                                  n_templates, nt, nt0))
    C = white.sizes["channel"]
    sums = np.zeros((n_templates, nt, C))
    counts = np.zeros(n_templates, np.int64)
    if tasks:
        parts = client.gather(client.compute(tasks)) if client is not None else dask.compute(*tasks,
                                                                                          scheduler="threads")
        for s_, c_ in parts:
            sums += s_
            counts += c_
    means = sums / np.maximum(counts, 1)[:, None, None]
    return np.ascontiguousarray(means.transpose(0, 2, 1), dtype=np.float32), counts


def full_templates(white: xr.DataArray, spikes: xr.Dataset, clusters: xr.Dataset, settings: Any, *,
                   min_count: int = 20, client: Any = None) -> np.ndarray:
    """Templates for matching: each cluster's mean waveform from the data where at least ``min_count`` of its
    spikes were sampled, its PC-feature template otherwise.

    Returns
    -------
    ndarray (K, C, nt) float32, whitened units
    """
    K = clusters.sizes["template"]
    pc_templates = clusters["template"].values
    if K == 0:
        return pc_templates
    means, counts = mean_waveforms(white, spikes["spike_time"].values, clusters["spike_cluster"].values, K,
                                   nt=settings.nt, nt0=settings.nt0min_, client=client)
    return np.where((counts >= min_count)[:, None, None], means, pc_templates).astype(np.float32)
