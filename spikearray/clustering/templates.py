"""Full-waveform templates: the mean whitened waveform of each cluster, read back from the data.

Templates built from PC features live in the span of the ``n_pcs`` temporal PCs, which can miss a large share
of a sharp spike's energy (we measured 12 % for the largest unit of GT-A). In matching pursuit that missing
part stays in the residual after every fitted spike, where other templates then "find" it — duplicated,
spurious spikes on every big unit. So before matching we average each cluster's actual waveforms (all
channels, ``nt`` samples, trough at ``nt0min``) over a deterministic sample of chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr

from .._compute import default_torch_threads, torch_threads
from .._engine import ChunkInfo, as_dask, chunk_kernel, run_chunks
from ..detection.bases import sample_chunks

__all__ = ["mean_waveforms", "full_templates"]


#: Spike windows gathered at once by :func:`_sum_block` (256 × 61 samples × 384 channels: 24 MB as float32).
_WINDOW_BATCH = 256


@dataclass(frozen=True, eq=False)
class _SumContext:
    times: np.ndarray  # (n,) int64 trough samples of the sampled spikes, sorted
    labels: np.ndarray  # (n,) int64 their templates
    n_templates: int
    nt: int
    nt0: int
    threads: int | None = None  # torch threads (None: cores / dask threads, on the machine running the chunk)


@chunk_kernel(halo=lambda ctx: 0)  # spikes whose window leaves the chunk are skipped: no halo needed
def _sum_block(block: np.ndarray, info: ChunkInfo, ctx: _SumContext) -> tuple[np.ndarray, np.ndarray]:
    """Per-template sums ``(K, nt, C)`` float64 and counts ``(K,)`` of the chunk's sampled spike windows."""
    K, nt, nt0 = ctx.n_templates, ctx.nt, ctx.nt0
    m = (ctx.times >= info.start) & (ctx.times < info.stop)
    times, labels = ctx.times[m], ctx.labels[m]
    x = np.asarray(block, dtype=np.float32)
    rel = times - info.start - nt0
    ok = (rel >= 0) & (rel + nt <= len(x))
    rel, lab = rel[ok], labels[ok]
    sums = np.zeros((K, nt, x.shape[1]), np.float64)
    if len(rel):
        # torch's index_add_ adds the windows one after another in spike order, as np.add.at did (same sums),
        # but 60x faster: np.add.at took 10.1 s for 4,000 spikes of a 2 s, 384-channel chunk. Batches keep the
        # gathered windows small (all at once they were 375 MB there).
        xs, out = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(sums)
        tau = torch.arange(nt)
        with torch_threads(ctx.threads or default_torch_threads()):
            for b0 in range(0, len(rel), _WINDOW_BATCH):
                rb = torch.from_numpy(rel[b0:b0 + _WINDOW_BATCH])
                out.index_add_(0, torch.from_numpy(lab[b0:b0 + _WINDOW_BATCH]),
                               xs[rb[:, None] + tau[None, :]].to(torch.float64))  # (b, nt, C)
    return sums, np.bincount(lab, minlength=K)


def _top_up(chunk_of: np.ndarray, label: np.ndarray, taken: np.ndarray, n_chunks: int, n_labels: int,
            least: int, max_chunks: int) -> np.ndarray:
    """Spikes to add to ``taken`` so that every label has ``least`` of them (or all it has), from as few
    further chunks as a greedy choice finds, at most ``max_chunks``: each step reads the chunk that supplies
    most of what is still missing. Only the short labels' spikes in those chunks are added, so the others'
    means do not change."""
    have = np.bincount(label[taken], minlength=n_labels)
    short = have < least
    pool = ~taken & short[label]
    if not pool.any():
        return np.zeros(len(label), bool)
    # (label, chunk) counts of the short labels' spikes outside the taken ones
    avail = np.zeros((n_labels, n_chunks), np.int64)
    np.add.at(avail, (label[pool], chunk_of[pool]), 1)
    missing = np.where(short, least - have, 0)
    chosen = []
    while missing.any() and len(chosen) < max_chunks:
        gain = np.minimum(avail, missing[:, None]).sum(0)
        c = int(np.argmax(gain))
        if gain[c] == 0:
            break
        chosen.append(c)
        missing = np.maximum(missing - avail[:, c], 0)
        avail[:, c] = 0
    return pool & np.isin(chunk_of, chosen)


def mean_waveforms(white: xr.DataArray, spike_time: np.ndarray, spike_label: np.ndarray, n_templates: int, *,
                   nt: int, nt0: int, n_chunks: int = 24, max_per_template: int = 400, min_per_template: int = 0,
                   torch_threads_: int | None = None) -> tuple[np.ndarray, np.ndarray]:
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
    min_per_template : int
        A label with fewer spikes than this in the sampled chunks gets more from other chunks, up to this many
        (or all it has): the chunks holding most of the missing spikes are read first, at most ``n_chunks``
        more. A low-rate unit of a few dozen spikes otherwise gets about half of them from 24 of 50 chunks.
        Unbounded, the top-up took re-clustering on the 600 s, 384-channel paper set from 11 to 32 s.
    torch_threads_ : int, optional
        Torch threads per chunk (default: cores / dask threads).

    Returns
    -------
    means : ndarray (K, C, nt) float32
        Mean waveforms (zeros where no spike was sampled).
    counts : ndarray (K,) int64
        Spikes averaged per template.
    """
    data = as_dask(white)
    starts = np.cumsum((0,) + data.chunks[0])
    chosen = sample_chunks(len(data.chunks[0]), n_chunks)
    keep = spike_label >= 0
    t_all, l_all = spike_time[keep], spike_label[keep]
    chunk_of = np.searchsorted(starts, t_all, side="right") - 1
    in_chunk = np.isin(chunk_of, chosen)
    if min_per_template > 0:
        in_chunk |= _top_up(chunk_of, l_all, in_chunk, len(data.chunks[0]), n_templates, min_per_template,
                            n_chunks)
    t_all, l_all, c_all = t_all[in_chunk], l_all[in_chunk], chunk_of[in_chunk]
    # evenly thin each template to max_per_template spikes
    sel = np.zeros(len(t_all), bool)
    for k in range(n_templates):
        idx = np.flatnonzero(l_all == k)
        if len(idx):
            sel[idx[np.unique(np.linspace(0, len(idx) - 1, min(len(idx), max_per_template)).astype(int))]] = True
    t_all, l_all, c_all = t_all[sel], l_all[sel], c_all[sel]
    C = white.sizes["channel"]
    sums = np.zeros((n_templates, nt, C))
    counts = np.zeros(n_templates, np.int64)
    # only the chunks that hold a chosen spike (sampled, or added by the top-up) are read
    used = [int(i) for i in np.unique(c_all)]
    if used:
        ctx = _SumContext(times=np.ascontiguousarray(t_all, np.int64), labels=np.ascontiguousarray(l_all, np.int64),
                          n_templates=int(n_templates), nt=int(nt), nt0=int(nt0), threads=torch_threads_)
        def add(part: tuple[np.ndarray, np.ndarray]) -> None:  # folded as chunks finish, in chunk order
            sums[...] += part[0]
            counts[...] += part[1]

        run_chunks(_sum_block, data, ctx, name="waveforms", select=used, fold=add)
    means = sums / np.maximum(counts, 1)[:, None, None]
    return np.ascontiguousarray(means.transpose(0, 2, 1), dtype=np.float32), counts


def full_templates(white: xr.DataArray, spikes: xr.Dataset, clusters: xr.Dataset, settings: Any, *,
                   min_count: int = 20) -> xr.DataArray:
    """Templates for matching: each cluster's mean waveform from the data where at least ``min_count`` of its
    spikes were sampled, its PC-feature template otherwise.

    Parameters
    ----------
    white : xarray.DataArray (time, channel)
        Whitened (drift-corrected) recording.
    spikes : xarray.Dataset
        From :func:`spikearray.detection.detect` (``spike_time``).
    clusters : xarray.Dataset
        From :func:`spikearray.clustering.cluster_spikes`: ``template`` (template, channel, sample) PC-feature
        templates and ``spike_cluster`` (spike,).
    settings : Settings
        Uses ``nt``, ``nt0min`` and ``torch_threads``.

    Returns
    -------
    xarray.DataArray ``templates``, dims (unit, channel, sample), float32 in whitened units, trough at sample
    ``nt0min`` (attr ``trough_sample``); ``unit`` numbers the clusters 0..K-1.

    Examples
    --------
    >>> import spikearray as sa  # doctest: +SKIP
    >>> full_templates(white, spikes, clusters, sa.Settings()).dims  # doctest: +SKIP
    ('unit', 'channel', 'sample')
    """
    K = clusters.sizes["template"]
    pc_templates = clusters["template"].transpose("template", "channel", "sample").values
    if K == 0:
        values = pc_templates.astype(np.float32)
    else:
        means, counts = mean_waveforms(white, spikes["spike_time"].values, clusters["spike_cluster"].values, K,
                                       nt=settings.nt, nt0=settings.nt0min_,
                                       torch_threads_=settings.torch_threads)
        values = np.where((counts >= min_count)[:, None, None], means, pc_templates).astype(np.float32)
    return xr.DataArray(values, dims=("unit", "channel", "sample"), name="templates",
                        coords={"unit": np.arange(K, dtype=np.int64)},
                        attrs={"units": "whitened", "trough_sample": int(settings.nt0min_)})
