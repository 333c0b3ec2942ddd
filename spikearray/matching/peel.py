"""Template matching (matching pursuit with learned templates), per chunk in torch.

Kilosort4 (§2.8) correlates the data with every template, then repeatedly accepts the time points where the
best template explains a local maximum of variance above ``Th_learned²`` and subtracts the fitted templates
(from the data and, through precomputed template cross-correlations, from the correlation scores), up to
``max_peels`` times. We do the same with changes that make it cheap on a CPU, and one that keeps the spikes of
small units:

* each template is stored in low-rank spatio-temporal form (SVD, as few components as leave less than one
  noise SD out), so the correlation is one small matrix product over channels, one FFT per component and
  one inverse FFT per template, instead of a projection of every channel on every temporal basis;
* each template keeps only the channels that carry its energy (the weakest ones are dropped up to a left-out
  norm of half the threshold), so on a 384-channel probe the correlation is a product over a few dozen
  channels per group of templates, and a fitted spike updates only the templates it overlaps;
* a spike whose amplitude scale is that of the template itself (``BOUNDED_SCALE``, 0.7–1.4) is accepted from
  the lower score ``Th_bounded`` (4.5): a 28 µV unit's template has a norm of only ~6–7 whitened SD, so at
  ``Th_learned`` = 6 half its spikes were lost to noise (recall 0.54–0.77 at precision ~1 on the dense paper
  set), while Kilosort4's single threshold, lowered to 5 for everyone, let large templates fit partial
  residuals and raised false-positive units. Judging a fit by its amplitude as well as its score is
  SpikeInterface's idea (Lupin's "wobble" prior on the scale, circus-omp's bounds); the two-threshold rule
  is ours;
* subtraction from the score array uses the exact template cross-correlations of the low-rank sparse templates
  (consistent algebra: what is subtracted is what was fitted), and after the first pass the best template is
  re-evaluated only at the samples those subtractions changed.

Every accepted spike gets its sample time (trough), template id, amplitude scale ``B/|U|²`` and score
``sqrt(Cf)``; its PC features are computed from the residual plus its own fitted template on the
``nearest_chans`` channels around the template's peak channel (Kilosort4's ``tF``), and the chunk also returns
the per-template sums of (residual + own template) waveforms on all channels, from which the final templates
are the means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from .._compute import (channels_first, default_torch_threads, gather_windows, irfft, ols_blocks, ols_outputs,
                        resolve_device, rfft, torch_threads, wide_matmul)
from .._engine import ChunkInfo, as_dask, chunk_kernel, memo, run_chunks
from ..errors import DataError
from ..geometry import nearest_channels, positions, shanks
from ..settings import Settings

__all__ = ["match", "low_rank"]


def low_rank(templates: np.ndarray, rank: int, tol: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spatio-temporal factors of each template ``(K, C, nt)``, as few as needed.

    Template ``k`` keeps the smallest number of SVD components (at most ``rank``) whose residual norm is at
    most ``tol`` (whitened SD). :func:`match` uses half the matching threshold: what is left out of a fitted
    spike can then never pass the threshold on its own (the left-out part of a mean template is mostly the
    estimation noise of the mean, which has high rank and does not need fitting).

    Returns
    -------
    spatial : ndarray (n_rows, C)
        Spatial factors scaled by their singular values.
    temporal : ndarray (n_rows, nt)
    row_template : ndarray (n_rows,) int64
        The template of each row.
    """
    K, C, nt = templates.shape
    R = min(rank, C, nt)
    u, sv, vh = np.linalg.svd(templates.astype(np.float64), full_matrices=False)
    tail = np.sqrt(np.maximum((sv ** 2).sum(1, keepdims=True) - np.cumsum(sv ** 2, axis=1), 0.0))  # (K, min(C,nt))
    keep = np.minimum(1 + (tail > tol).sum(1), R)
    rows_k = np.repeat(np.arange(K), keep)
    rows_r = np.concatenate([np.arange(n) for n in keep]) if K else np.zeros(0, int)
    spatial = u[rows_k, :, rows_r] * sv[rows_k, rows_r][:, None]
    temporal = vh[rows_k, rows_r, :]
    return spatial.astype(np.float32), temporal.astype(np.float32), rows_k.astype(np.int64)


def sparsify(spatial: np.ndarray, rows: np.ndarray, n_templates: int, tol: float,
             positions: np.ndarray) -> np.ndarray:
    """Restrict each template to the channels around its peak, leaving out at most a norm of ``tol``.

    Channel ``c`` of template ``k`` holds ``e_c = Σ_rows(k) spatial[r, c]²`` of its energy (the temporal factors
    are orthonormal). Channels are dropped from the farthest from the template's peak channel inwards while the
    dropped energy stays at most ``tol² + n_dropped · floor``, where ``floor`` is the template's mean channel
    energy over the farthest quarter of the probe (its noise floor: a mean template holds about
    ``nt / n_spikes`` of estimation noise on every channel, which only adds noise to the matched filter). The
    sweep stops at the first channel that carries real signal, so the support is a compact disc around the
    peak, and every later product can skip the rest of the probe. On 8 s of a 384-channel, 197-template set
    this kept a median of 14 channels (95th percentile 27) and made matching 1.4× faster with slightly higher
    accuracy (docs/benchmarks.md). Channels farther than :data:`MAX_RADIUS_UM` from the peak are dropped
    whatever the sweep says.

    Parameters
    ----------
    spatial : ndarray (n_rows, C)
    rows : ndarray (n_rows,) — the template of each row
    tol : float — whitened-SD norm that may be left out per template (≤ 0: keep everything)
    positions : ndarray (C, 2) — channel positions, µm

    Returns
    -------
    ndarray (n_rows, C), float32: ``spatial`` with the dropped entries set to 0.
    """
    if spatial.size == 0 or tol <= 0:
        return spatial.copy()
    energy = np.zeros((n_templates, spatial.shape[1]))
    np.add.at(energy, rows, spatial.astype(np.float64) ** 2)
    peak = energy.argmax(1)
    dist = np.linalg.norm(positions[peak][:, None, :] - positions[None, :, :], axis=2)  # (K, C)
    order = np.argsort(-dist + energy * 1e-12, axis=1, kind="stable")  # farthest first
    # far noise alone never stops the sweep; on a short probe where a unit reaches every channel, the floor
    # is high only if the signal really is everywhere, and the signal channels still stop it
    far_first = np.take_along_axis(energy, order, axis=1)
    floor = far_first[:, :max(1, energy.shape[1] // 4)].mean(1, keepdims=True)
    allowed = tol ** 2 + _NOISE_FACTOR * floor * np.arange(1, energy.shape[1] + 1)[None, :]
    within = np.cumsum(far_first, axis=1) <= allowed
    dropped = np.cumprod(within, axis=1).astype(bool)  # a prefix of the far-to-near order: a compact disc
    keep = np.ones_like(energy, dtype=bool)
    np.put_along_axis(keep, order, ~dropped, axis=1)
    keep &= dist <= MAX_RADIUS_UM
    return (spatial * keep[rows]).astype(np.float32)


_ROW_GROUP = 48  # rows per correlation product (bounds the (rows, frequency) arrays)
_SLICE_SLACK = 1.25  # a group's channels are read as one slice when their span is at most this × their number
_SPAN_SLACK = 8  # channels a row group may reach beyond its widest template's range (four rows of a 2-column probe)
#: Amplitude scales (``B / |U|²``) at which a spike needs only ``Th_bounded`` instead of ``Th_learned``: a
#: spike of a unit's own size. Noise alone reaches a scale of 0.7 on a template only if its score is 0.7 |U|,
#: so the lower threshold changes nothing for templates with |U| above Th_learned / 0.7 (8.6 whitened SD at
#: the default 6): it reaches only the small units, whose full-size spikes score close to the threshold.
BOUNDED_SCALE = (0.7, 1.4)
_DROP_FRACTION = 0.5  # sparsify's tol as a fraction of Th_learned: what is left out can never pass on its own
_NOISE_FACTOR = 1.0  # dropped energy allowed per channel, in units of the template's noise floor
#: No template reaches farther than this from its peak channel (µm). A unit's whitened signal is at the noise
#: floor ~150 µm from its peak on the 384-channel paper set; what a mean template holds beyond is estimation
#: noise and other units' coincident spikes, unevenly spread along the probe, which the floor sweep alone
#: took for signal: on 12 s of that set 5 % of the templates kept 180–260 channels (out to 1.3 mm), and every
#: row group holding one spanned most of the probe. A 250 µm cap lost two 76–80 µV units of the drifting
#: 128-channel set (141 well detected instead of 143); 400 µm loses none there.
MAX_RADIUS_UM = 400.0
#: Transform length of the correlation's overlap-save blocks (:func:`_scores`). Over a 2 s chunk of the dense
#: 128-channel set (one thread): the channels' forward transforms 46-63 ms whole (60,750 points), 14-16 ms in
#: blocks of 4,096, 19-27 ms of 2,048; the templates' inverse transforms 59-122 ms whole, ~40 ms in blocks of
#: 2,048 or 4,096. 4,096 adds 1 % frequency bins to the spatial products over a whole transform, 2,048 adds 5 %.
OLS_BLOCK = 4096
_SPIKE_BATCH = 512  # spikes per batched score/residual update (bounds the index arrays)


def _row_groups(spatial: np.ndarray, rows: np.ndarray, group: int = _ROW_GROUP,
                slack: int = _SPAN_SLACK) -> tuple[np.ndarray, list[tuple[int, int, np.ndarray]]]:
    """Row order and ``(r0, r1, channels)`` groups of up to ``group`` rows with the channels they read.

    A group's spatial product ``S[g][:, channels] @ x[channels]`` costs its rows times its channels, so a
    group holds whole templates (``rows``: the template of each row) whose channel ranges nearly coincide:
    templates are taken in the order of their first and last channel, and the next one joins the group while
    the group's range stays within ``slack`` channels of its widest member's. Rows that lost every channel to
    :func:`sparsify` are left out.
    """
    nz = spatial != 0
    live = np.flatnonzero(nz.any(1))
    if live.size == 0:
        return live, []
    templates = np.unique(rows[live])
    # each template's first and last channel (a range in the channel order, which on a probe read in depth
    # order is a stretch of the probe)
    ranges = np.array([np.flatnonzero(nz[live[rows[live] == k]].any(0))[[0, -1]] for k in templates])  # (T, 2)
    by_range = np.lexsort((ranges[:, 1], ranges[:, 0]))
    members = {int(k): live[rows[live] == k] for k in templates}
    order, groups = [], []
    cur: list[int] = []
    g_lo = g_hi = widest = 0
    for i in by_range:
        k, a, b = int(templates[i]), int(ranges[i, 0]), int(ranges[i, 1])
        n_rows = sum(len(members[j]) for j in cur)
        if cur and (n_rows + len(members[k]) <= group
                    and max(g_hi, b) - min(g_lo, a) + 1 <= max(widest, b - a + 1) + slack):
            cur.append(k)
            g_lo, g_hi, widest = min(g_lo, a), max(g_hi, b), max(widest, b - a + 1)
            continue
        if cur:
            groups.append(cur)
        cur, g_lo, g_hi, widest = [k], a, b, b - a + 1
    groups.append(cur)
    out = []
    r0 = 0
    for ks in groups:
        rr = np.concatenate([members[k] for k in ks])
        order.append(rr)
        chans = np.flatnonzero(nz[rr].any(0))
        if chans[-1] - chans[0] + 1 <= _SLICE_SLACK * chans.size:
            # (nearly) a contiguous stretch: read it as a slice of the chunk, the few gaps with zero weights,
            # rather than copying the rows out (index_select was 0.85 s of a 3.5 s 384-channel chunk)
            chans = np.arange(chans[0], chans[-1] + 1)
        out.append((r0, r0 + len(rr), chans))
        r0 += len(rr)
    return np.concatenate(order), out


def _rows(x: torch.Tensor, chans: torch.Tensor) -> torch.Tensor:
    """``x[chans]``: a view when ``chans`` is a contiguous range (as :func:`_row_groups` makes most), else a copy."""
    n = chans.numel()
    if n and int(chans[-1] - chans[0]) + 1 == n:
        return x[int(chans[0]):int(chans[0]) + n]
    return x.index_select(0, chans)


def _padded_lists(mask: np.ndarray) -> np.ndarray:
    """Per row of a boolean ``(K, M)`` mask, the indices of its true entries, padded with the row's first index
    (so every list is valid; the caller pads the matching values with 0)."""
    width = max(1, int(mask.sum(1).max())) if mask.size else 1
    out = np.zeros((mask.shape[0], width), np.int64)
    for k, row in enumerate(mask):
        sel = np.flatnonzero(row)
        if sel.size:
            out[k, :sel.size] = sel
            out[k, sel.size:] = sel[0]
    return out


@dataclass(frozen=True, eq=False)
class _MatchContext:
    """What every chunk of :func:`match` needs besides its samples, built once by :func:`_context`.

    numpy arrays and scalars only, so that the engine tokenizes it once, cheaply, and ships it as one graph
    key; the kernel gets the arrays as tensors on its own device from :func:`_tensors`.
    """

    device: str  # the settings' device; "auto" is resolved where the chunk runs
    threads: int | None  # torch threads (None: cores / dask threads, on the machine running the chunk)
    nt: int
    nt0: int
    th: float
    th_low: float  # a spike whose scale lies in amp_range needs only this score (>= th: off)
    amp_range: tuple[float, float]
    max_peels: int
    Tm: np.ndarray  # (n_rows, nt) temporal factors
    rows: np.ndarray  # (n_rows,) template of each row
    row_ranges: tuple[tuple[int, int], ...]  # row groups
    group_channels: tuple[np.ndarray, ...]  # each group's channels
    S_groups: tuple[np.ndarray, ...]  # each group's spatial factors on its channels
    Ur: np.ndarray  # (K, C, nt) low-rank sparse templates
    inv_norm: np.ndarray  # (K,) 1 / |U_k|
    nb_ptr: np.ndarray  # (K + 1,) template k's overlapping templates are nb[nb_ptr[k]:nb_ptr[k + 1]]
    nb: np.ndarray  # (n_pairs,) overlapping templates, template by template
    ctc_nb: np.ndarray  # (n_pairs, 2nt-1) their scaled cross-correlations
    chan_ptr: np.ndarray  # (K + 1,) template k's channels are chan[chan_ptr[k]:chan_ptr[k + 1]]
    chan: np.ndarray  # (n_entries,) each template's channels, template by template
    ur_nb: np.ndarray  # (n_entries, nt) its waveform there
    nearU: np.ndarray  # (K, nC) feature channels
    ur_near: np.ndarray  # (K, nC, nt) the template on them
    mean_chan: np.ndarray  # (K, M) channels of each template's mean waveform (padded)
    mean_valid: np.ndarray  # (K, M) 1 where mean_chan holds a real channel
    near_in_mean: np.ndarray  # (K, nC) where each feature channel sits in mean_chan
    block: int  # templates per block of the running maximum (consecutive ids)
    blk_ptr: np.ndarray  # (K + 1,) the blocks holding the templates that overlap template k are ...
    blk: np.ndarray  # ... blk[blk_ptr[k]:blk_ptr[k + 1]]
    pcs: np.ndarray  # (P, nt)


_TENSORS = ("Tm", "rows", "Ur", "inv_norm", "nb_ptr", "nb", "ctc_nb", "chan_ptr", "chan", "ur_nb", "nearU",
            "ur_near", "mean_chan", "mean_valid", "near_in_mean", "blk_ptr", "blk", "pcs")


def _tensors(ctx: _MatchContext, dev: torch.device) -> dict[str, Any]:
    """The context's arrays as tensors on ``dev`` (the group lists as lists), made once per process and device."""
    def make() -> dict[str, Any]:
        out: dict[str, Any] = {k: torch.from_numpy(getattr(ctx, k)).to(dev) for k in _TENSORS}
        out["group_channels"] = [torch.from_numpy(ch).to(dev) for ch in ctx.group_channels]
        out["S_groups"] = [torch.from_numpy(sg).to(dev) for sg in ctx.S_groups]
        return out

    return memo(ctx, ("tensors", str(dev)), make)


def _context(templates: np.ndarray, pcs: np.ndarray, nearU: np.ndarray, positions: np.ndarray, *, th: float,
             max_peels: int, nt0: int, device: str | torch.device, threads: int | None, rank: int,
             drop_tol: float, th_low: float | None = None,
             amp_range: tuple[float, float] = (1.0, 1.0)) -> _MatchContext:
    """Everything a chunk needs, computed once: low-rank sparse factors, their row groups, the exact template
    cross-correlations restricted to overlapping pairs, and the per-template channel supports."""
    K, C, nt = templates.shape
    spatial, temporal, rows = low_rank(templates, rank, tol=0.5 * th)
    spatial = sparsify(spatial, rows, K, drop_tol, positions)
    order, groups = _row_groups(spatial, rows)
    spatial, temporal, rows = spatial[order], temporal[order], rows[order]
    Ur = np.zeros((K, C, nt), np.float64)
    np.add.at(Ur, rows, spatial[:, :, None].astype(np.float64) * temporal[:, None, :])
    Ur = Ur.astype(np.float32)
    nm = (Ur.astype(np.float64) ** 2).sum((1, 2))
    inv_norm = np.where(nm > 0, 1.0 / np.sqrt(np.maximum(nm, 1e-30)), 0.0).astype(np.float32)
    chan_mask = (Ur != 0).any(2)
    overlap = chan_mask.astype(np.float32) @ chan_mask.T.astype(np.float32) > 0  # (K, K): a channel in common
    # score update of template j after fitting k: scaled by 1/|U_j| since the loop keeps B_j/|U_j|
    nb_ptr, nb_list, ctc_nb = _cross_correlations(Ur, chan_mask, overlap, inv_norm)
    block = max(1, int(np.ceil(np.sqrt(K))))
    n_blocks = -(-K // block)
    blk_ptr, blk = _compressed(np.pad(overlap, ((0, 0), (0, n_blocks * block - K))).reshape(K, n_blocks, block).any(2)
                               if K else np.zeros((0, 0), bool))
    chan_ptr, chan = _compressed(chan_mask)
    ur_nb = Ur[np.repeat(np.arange(K), np.diff(chan_ptr)), chan]
    ur_near = np.take_along_axis(Ur, nearU[:, :, None], axis=1) if K else np.zeros((0, nearU.shape[1], nt), np.float32)
    # the mean waveforms cover the disc of MAX_RADIUS_UM around each template's peak (and whatever the template
    # or its feature channels reach beyond): a 384-channel mean over every channel was a quarter of matching's
    # time, for channels that hold only noise
    if K:
        peak = (templates.astype(np.float64) ** 2).sum(2).argmax(1)
        mean_mask = np.linalg.norm(positions[peak][:, None, :] - positions[None, :, :], axis=2) <= MAX_RADIUS_UM
        mean_mask |= chan_mask
        mean_mask[np.arange(K)[:, None], nearU] = True
    else:
        mean_mask = np.zeros((0, C), bool)
    mean_chan = _padded_lists(mean_mask) if K else np.zeros((0, 1), np.int64)
    near_in_mean = np.zeros(nearU.shape, np.int64)
    for j in range(K):  # mean_chan[j] lists its channels in increasing order before the padding
        near_in_mean[j] = np.searchsorted(mean_chan[j, :mean_mask[j].sum()], nearU[j])
    return _MatchContext(
        device=str(device), threads=threads, nt=nt, nt0=int(nt0), th=float(th),
        th_low=float(th if th_low is None else th_low), amp_range=(float(amp_range[0]), float(amp_range[1])),
        max_peels=int(max_peels),
        Tm=np.ascontiguousarray(temporal), rows=np.ascontiguousarray(rows),
        row_ranges=tuple((int(r0), int(r1)) for r0, r1, _ in groups),
        group_channels=tuple(ch for _, _, ch in groups),
        S_groups=tuple(np.ascontiguousarray(spatial[r0:r1][:, ch]) for r0, r1, ch in groups),
        Ur=Ur, inv_norm=inv_norm, nb_ptr=nb_ptr, nb=nb_list, ctc_nb=np.ascontiguousarray(ctc_nb, np.float32),
        chan_ptr=chan_ptr, chan=chan, ur_nb=np.ascontiguousarray(ur_nb, np.float32),
        nearU=np.asarray(nearU, np.int64),
        ur_near=np.ascontiguousarray(ur_near, np.float32), mean_chan=mean_chan,
        mean_valid=_valid_mask(mean_mask) if K else np.zeros((0, 1), np.float32), near_in_mean=near_in_mean,
        pcs=np.asarray(pcs, np.float32), block=block, blk_ptr=blk_ptr, blk=blk,
    )


def _cross_correlations(Ur: np.ndarray, chan_mask: np.ndarray, overlap: np.ndarray,
                        inv_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cross-correlations of every pair of templates that share a channel (``overlap``, (K, K) bool, from
    ``chan_mask``, (K, C): each template's channels), scaled by the second's ``1/|U|``.

    ``ctc[k, j, δ] = Σ_c Σ_τ U_k[c, τ + δ - (nt - 1)] · U_j[c, τ] / |U_j|`` for ``δ`` in ``0 .. 2nt - 2``, as
    compressed lists (:func:`_compressed`): template ``k``'s overlapping templates are
    ``nb[ptr[k]:ptr[k + 1]]`` (increasing, ``k`` itself included) and ``ctc[ptr[k]:ptr[k + 1]]`` their
    correlations. Pairs without a common channel correlate to exactly 0 and are left out. Each template's
    correlations are one product over its own channels only: the dense ``(K, K)`` product over every channel
    took 4.2 s of the driver's time before the first chunk on 60 s of the 384-channel set (K ≈ 450), for
    pairs that mostly share no channel.
    """
    K, C, nt = Ur.shape
    ptr, nb = _compressed(overlap)
    ctc = np.zeros((nb.size, 2 * nt - 1), np.float32)
    Ut = torch.from_numpy(Ur)
    # one thread: a single-input convolution may split its sum over channels and taps among threads, in an
    # order that changes from run to run (float32 results 1 ulp apart, and so every later score); the whole
    # loop takes ~1 s on the 384-channel set
    with torch_threads(1):
        for k in range(K):
            if ptr[k + 1] == ptr[k]:  # a template sparsify left without channels overlaps nothing
                continue
            chans = torch.from_numpy(np.flatnonzero(chan_mask[k]))
            others = torch.from_numpy(nb[ptr[k]:ptr[k + 1]])
            # conv1d correlates: out[j, δ] = Σ_c Σ_τ padded(U_k)[c, δ + τ] · U_j[c, τ], summed over k's channels
            # only (U_k is 0 elsewhere)
            x = F.pad(Ut[k:k + 1, chans], (nt - 1, nt - 1))
            ctc[ptr[k]:ptr[k + 1]] = F.conv1d(x, Ut[others][:, chans])[0].numpy()
    ctc *= inv_norm[nb][:, None]
    return ptr, nb, ctc


def _valid_mask(mask: np.ndarray) -> np.ndarray:
    """For :func:`_padded_lists` of ``mask``: which padded slots hold a real entry (float32 0/1)."""
    counts = mask.sum(1)
    width = max(1, int(counts.max())) if mask.size else 1
    return (np.arange(width)[None, :] < counts[:, None]).astype(np.float32)


def _compressed(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a boolean ``(K, M)`` mask, the indices of its true entries, one list after the other:
    ``(ptr, idx)`` with row ``k``'s entries in ``idx[ptr[k]:ptr[k + 1]]`` (increasing)."""
    ptr = np.zeros(mask.shape[0] + 1, np.int64)
    np.cumsum(mask.sum(1), out=ptr[1:])
    return ptr, np.nonzero(mask)[1].astype(np.int64)


def _entries(ptr: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(owner, e)``: every entry ``e`` of the compressed lists of templates ``k`` (``ptr[k[i]] <= e <
    ptr[k[i] + 1]``, :func:`_compressed`), with ``owner`` the index ``i`` it belongs to, spike by spike."""
    first, count = ptr[k], ptr[k + 1] - ptr[k]
    owner = torch.repeat_interleave(torch.arange(len(k), device=k.device), count)
    # entry of spike i: first[i] + (its rank among spike i's entries)
    e = torch.arange(owner.numel(), device=k.device) - (torch.cumsum(count, 0) - count)[owner] + first[owner]
    return owner, e


def _subtract_windows(target: torch.Tensor, t: torch.Tensor, k: torch.Tensor, a: torch.Tensor, ptr: torch.Tensor,
                      rows: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor) -> None:
    """``target[rows[e], t + offsets[d]] -= a · values[e, d]`` for every fitted spike ``(t, k, a)`` and every
    entry ``e`` of its template, ``ptr[k] <= e < ptr[k + 1]``.

    ``target`` is a contiguous ``(R, L)`` tensor; ``(ptr, rows, values)`` list, template by template, the rows
    it touches and its values there (:func:`_compressed`). Used for the scores (rows: overlapping templates,
    values: their cross-correlations) and for the residual (rows: the template's channels, values: its
    waveform there). Only real entries are visited: padded per-template lists were as wide as the widest one,
    3× the mean for the overlaps and 7× for the channels on the dense 128-channel set (134 vs 45, 79 vs 11),
    and their zero updates were 20 % of matching's time. Spikes go in batches so the index arrays stay small.
    """
    L = target.shape[1]
    flat = target.view(-1)
    for b0 in range(0, len(t), _SPIKE_BATCH):
        tb, kb, ab = t[b0:b0 + _SPIKE_BATCH], k[b0:b0 + _SPIKE_BATCH], a[b0:b0 + _SPIKE_BATCH]
        owner, e = _entries(ptr, kb)
        if owner.numel() == 0:
            continue
        idx = rows[e][:, None] * L + (tb[owner][:, None] + offsets[None, :])
        flat.index_add_(0, idx.reshape(-1), (values[e] * (-ab[owner])[:, None]).reshape(-1))


def _refresh_maxima(bs: torch.Tensor, gmax: torch.Tensor, gidx: torch.Tensor, Cfmax: torch.Tensor,
                    kbest: torch.Tensor, valid: torch.Tensor, t: torch.Tensor, k: torch.Tensor, blk_ptr: torch.Tensor,
                    blk: torch.Tensor, B: int, nt: int) -> None:
    """Recompute the running maxima in the ``2·nt - 1`` columns around each fitted spike ``(t, k)``.

    ``gmax[g]``/``gidx[g]`` hold the best score and template of block ``g`` (templates ``g·B`` to ``g·B + B - 1``)
    per column; ``blk[blk_ptr[k]:blk_ptr[k + 1]]`` lists the blocks whose templates overlap template ``k``, the
    scores a fit of ``k`` changed. Each spike's window is read as a whole
    (:func:`~spikearray._compute.gather_windows`) for each of its blocks, then for all blocks, and
    ``Cfmax``/``kbest`` are set on the valid columns. Windows of nearby spikes overlap; their shared columns get
    the same values from either. Gathering the union of touched columns block by block instead was 23 % of the
    kernel on P128-static (line timings: index_select of scattered columns, nonzero, masks).
    """
    K, L = bs.shape
    width = 2 * nt - 1
    dev = bs.device
    span = torch.arange(width, device=dev)
    n_blocks = gmax.shape[0]
    in_block = torch.arange(B, device=dev)
    for b0 in range(0, len(t), _SPIKE_BATCH):
        start = t[b0:b0 + _SPIKE_BATCH] - (nt - 1)
        kb = k[b0:b0 + _SPIKE_BATCH]
        owner, e = _entries(blk_ptr, kb)
        g = blk[e]
        s0 = start[owner]
        rows = (g[:, None] * B + in_block).clamp_max(K - 1)  # (pairs, B); the last block may be short
        v, j = gather_windows(bs, rows, s0, width).max(1)  # (pairs, width)
        at = (g[:, None] * L + s0[:, None] + span).reshape(-1)
        gmax.view(-1).index_copy_(0, at, v.reshape(-1))
        gidx.view(-1).index_copy_(0, at, torch.gather(rows, 1, j).reshape(-1))
        every = torch.arange(n_blocks, device=dev).expand(len(kb), n_blocks)
        v, gb = gather_windows(gmax, every, start, width).max(1)  # (n, width)
        cols = (start[:, None] + span).reshape(-1)
        best = torch.gather(gather_windows(gidx, every, start, width), 1, gb[:, None, :])[:, 0].reshape(-1)
        ok = valid[cols]
        Cfmax[cols[ok]] = (torch.relu(v) ** 2).reshape(-1)[ok]
        kbest[cols[ok]] = best[ok]


def _scores(x: torch.Tensor, ctx: _MatchContext, c: dict[str, Any], dev: torch.device) -> torch.Tensor:
    """``B[k, t] / |U_k|`` with ``B[k, t] = Σ_c Σ_τ U_k[c, τ] · x[c, t − nt0 + τ]`` (zero outside ``x``): the
    correlation of the chunk ``x`` (C, L) with every low-rank template, in whitened SD units.

    All in the frequency domain, by overlap-save blocks of :data:`OLS_BLOCK` samples: one FFT per channel and
    block, then per group of rows the spatial product over its channel range only (S is real, so it acts on the
    real and imaginary parts as one real product), the rows' temporal filters, and the sum over each template's
    rows (K inverse FFTs per block). Transforming the C channels instead of the R ≈ K·rank rows of S·x: on the
    dense 128-channel set (K ≈ 190, R ≈ 1100) the row FFTs were 40 % of a chunk (0.59 of 1.49 s).
    """
    C, L = x.shape
    nt, nt0 = ctx.nt, ctx.nt0
    K = c["Ur"].shape[0]
    n = OLS_BLOCK
    nf = n // 2 + 1
    filt = _filter_spectrum(ctx, n, dev)  # (R, nf)
    blocks = ols_blocks(x, n, nt, nt0)  # (C, nb, n)
    nb = blocks.shape[1]
    Xr = torch.view_as_real(rfft(blocks, n=n)).reshape(C, nb * 2 * nf)  # per block: re, im interleaved
    Bf = torch.zeros((K, nb, nf), dtype=filt.dtype, device=dev)
    Bf_real = torch.view_as_real(Bf).view(K, nb * 2 * nf)
    rows = c["rows"]
    # one output buffer for every group; the sum over a template's rows is an index_add on the real view:
    # torch's complex index_add took 8-12 ms for a (48, 60,750) group against 1.4-3 ms for the same numbers as
    # real pairs (one thread); with the buffer and wide_matmul a group's product, filter and sum took 23-24 ms
    # instead of 32-50 ms
    y = torch.empty((max((r1 - r0 for r0, r1 in ctx.row_ranges), default=0), nb * 2 * nf), device=dev)
    for (r0, r1), chans, s_g in zip(ctx.row_ranges, c["group_channels"], c["S_groups"]):
        yg = wide_matmul(s_g, _rows(Xr, chans), y[:r1 - r0])
        torch.view_as_complex(yg.view(r1 - r0, nb, nf, 2)).mul_(filt[r0:r1, None, :])
        Bf_real.index_add_(0, rows[r0:r1], yg)
    del Xr, y
    return ols_outputs(irfft(Bf, n=n), nt, L) * c["inv_norm"][:, None]


def _halo(ctx: _MatchContext) -> int:
    return 3 * ctx.nt


@chunk_kernel(halo=_halo)
def _match_block(block: np.ndarray, info: ChunkInfo, ctx: _MatchContext) -> dict[str, Any]:
    dev = resolve_device(ctx.device)
    c = _tensors(ctx, dev)
    with torch_threads(ctx.threads or default_torch_threads()):
        x = channels_first(block, dev)  # (C, L)
        C, L = x.shape
        nt, nt0 = ctx.nt, ctx.nt0
        inv_norm = c["inv_norm"]
        K = c["Ur"].shape[0]
        # the loop keeps bs = B / |U| so that Cf = relu(bs)² and the best template is an argmax of bs
        bs = _scores(x, ctx, c, dev)  # (K, L)
        th2 = ctx.th ** 2
        thl2 = ctx.th_low ** 2
        a_lo, a_hi = ctx.amp_range
        lo, hi = nt, L - nt
        valid = torch.zeros(L, dtype=torch.bool, device=dev)
        valid[lo:max(lo, hi)] = True
        # the best template per sample, through the maximum of each block of ``ctx.block`` consecutive templates:
        # after a peel only the blocks holding templates that overlap a fitted one are re-evaluated, so the
        # refresh reads about (overlapping blocks × block + n_blocks) scores per changed sample instead of K
        # (which grows with the probe's length)
        B = ctx.block
        n_blocks = -(-K // B)
        gmax = torch.empty((n_blocks, L), device=dev)
        gidx = torch.empty((n_blocks, L), dtype=torch.long, device=dev)
        for g in range(n_blocks):
            torch.max(bs[g * B:(g + 1) * B], 0, out=(gmax[g], gidx[g]))
            gidx[g] += g * B
        if K:
            best, gb = gmax.max(0)
            kbest = gidx.gather(0, gb[None])[0]
        else:
            best, kbest = torch.zeros(L, device=dev), torch.zeros(L, dtype=torch.long, device=dev)
        Cfmax = torch.where(valid, torch.relu(best) ** 2, torch.zeros((), device=dev))
        dl = torch.arange(-(nt - 1), nt, device=dev)
        tau = torch.arange(nt, device=dev)
        times, ids, amps, scores = [], [], [], []
        for _ in range(ctx.max_peels):
            pooled = F.max_pool1d(Cfmax[None, None], 2 * nt + 1, stride=1, padding=nt)[0, 0]
            t = torch.nonzero((Cfmax >= pooled) & (Cfmax > min(th2, thl2)), as_tuple=True)[0]
            if thl2 < th2:  # below Th_learned only a spike of its template's own size passes (scale at peaks only)
                scale = Cfmax[t].sqrt() * inv_norm[kbest[t]]
                t = t[(Cfmax[t] > th2) | ((scale >= a_lo) & (scale <= a_hi))]
            if len(t) == 0:
                break
            k = kbest[t]
            a = bs[k, t] * inv_norm[k]  # = B[k, t] / |U_k|²
            times.append(t)
            ids.append(k)
            amps.append(a)
            scores.append(Cfmax[t].sqrt())
            # scores: bs[j, t+δ] -= a · ctc[k, j, δ] / |U_j| over the templates j overlapping k
            _subtract_windows(bs, t, k, a, c["nb_ptr"], c["nb"], c["ctc_nb"], dl)
            # residual data: x[c, t - nt0 + τ] -= a · U_k[c, τ] on k's own channels
            _subtract_windows(x, t - nt0, k, a, c["chan_ptr"], c["chan"], c["ur_nb"], tau)
            # only the columns within one template length of a fitted spike changed: refresh their maximum there
            _refresh_maxima(bs, gmax, gidx, Cfmax, kbest, valid, t, k, c["blk_ptr"], c["blk"], B, nt)
        if not times:
            return _empty(ctx)
        t = torch.cat(times)
        k = torch.cat(ids)
        a = torch.cat(amps)
        sc = torch.cat(scores)
        t_glob = info.start - info.left + t
        core = (t_glob >= info.start) & (t_glob < info.stop)
        t, k, a, sc, t_glob = t[core], k[core], a[core], sc[core], t_glob[core]
        # features and means from residual + own fitted template; the own part of the sums is Σa · U_k
        pcs, near, ur_near = c["pcs"], c["near_in_mean"], c["ur_near"]
        mc = c["mean_chan"]
        local = torch.zeros((K, mc.shape[1], nt), device=dev)  # (K, M, nt) residual sums on mean_chan
        feats = []
        for b0 in range(0, len(t), _SPIKE_BATCH):
            tb, kb, ab = t[b0:b0 + _SPIKE_BATCH], k[b0:b0 + _SPIKE_BATCH], a[b0:b0 + _SPIKE_BATCH]
            res = gather_windows(x, mc[kb], tb - nt0, nt)  # (b, M, nt) residual
            local.index_add_(0, kb, res)
            nearest = torch.gather(res, 1, near[kb][:, :, None].expand(-1, -1, nt)) + ab[:, None, None] * ur_near[kb]
            feats.append(nearest @ pcs.T)  # (b, nC, P)
        sums = torch.zeros(K, device=dev).index_add_(0, k, a)[:, None, None] * c["Ur"]
        flat_rows = (torch.arange(K, device=dev)[:, None] * C + mc).reshape(-1)  # padded slots add 0
        sums.view(K * C, nt).index_add_(0, flat_rows, (local * c["mean_valid"][:, :, None]).reshape(-1, nt))
        counts = torch.bincount(k, minlength=K)
        feat = torch.cat(feats) if feats else torch.zeros((0, near.shape[1], pcs.shape[0]), device=dev)
        return {
            "time": t_glob.cpu().numpy().astype(np.int64),
            "template": k.cpu().numpy().astype(np.int64),
            "amplitude": a.cpu().numpy().astype(np.float32),
            "score": sc.cpu().numpy().astype(np.float32),
            "features": feat.cpu().numpy().astype(np.float32),
            "sums": sums.cpu().numpy(),
            "counts": counts.cpu().numpy(),
        }


class _SumFold:
    """Adds each chunk's ``sums`` and ``counts`` into running totals (float64, in chunk order) and returns
    the chunk's result without them (:func:`~spikearray._engine.compute_tasks`'s ``fold``)."""

    def __init__(self, K: int, C: int, nt: int) -> None:
        self.sums = np.zeros((K, C, nt), np.float64)
        self.counts = np.zeros(K, np.int64)

    def __call__(self, part: dict[str, Any]) -> dict[str, Any]:
        self.sums += part["sums"]
        self.counts += part["counts"]
        return {k: v for k, v in part.items() if k not in ("sums", "counts")}


def _filter_spectrum(ctx: _MatchContext, n: int, dev: torch.device) -> torch.Tensor:
    """FFT of the reversed temporal factors at length ``n`` (made once per process, length and device)."""
    return memo(ctx, ("spectrum", n, str(dev)),
                lambda: rfft(torch.flip(_tensors(ctx, dev)["Tm"], dims=(-1,)), n=n))


def _empty(ctx: _MatchContext) -> dict[str, Any]:
    K, C, nt = ctx.Ur.shape
    nC = ctx.nearU.shape[1]
    P = ctx.pcs.shape[0]
    return {"time": np.zeros(0, np.int64), "template": np.zeros(0, np.int64), "amplitude": np.zeros(0, np.float32),
            "score": np.zeros(0, np.float32), "features": np.zeros((0, nC, P), np.float32),
            "sums": np.zeros((K, C, nt), np.float32), "counts": np.zeros(K, np.int64)}


def match(white: xr.DataArray, templates: xr.DataArray, bases: xr.Dataset, settings: Settings | None = None, *,
          rank: int | None = None, sparse: bool = True) -> xr.Dataset:
    """Find every spike of every template by matching pursuit.

    Parameters
    ----------
    white : xarray.DataArray (time, channel)
        Whitened, drift-corrected recording.
    templates : xarray.DataArray (unit, channel, sample) float32
        Whitened templates, trough at ``nt0min`` (:func:`spikearray.clustering.full_templates`).
    bases : xarray.Dataset
        Temporal PCs (``pc``) for the spike features.
    settings : Settings
        Uses ``Th_learned``, ``Th_bounded``, ``max_peels``, ``nt``, ``nt0min``, ``nearest_chans``, ``device``,
        ``torch_threads``.
    rank : int, optional
        Largest rank of the spatio-temporal template approximation (default ``n_pcs``); each template uses
        the fewest components that leave less than one noise SD out (see :func:`low_rank`). What is fitted
        is exactly what is subtracted, so nothing of a fitted spike is left for other templates to "find".
    sparse : bool
        Drop each template's weakest channels, up to a left-out norm of ``Th_learned / 2`` (see
        :func:`sparsify`); the correlation, score and residual updates then touch only the channels and the
        templates that overlap. False keeps every channel (slower on long probes; for comparisons).

    Returns
    -------
    xarray.Dataset
        Per spike (sorted by time): ``spike_time`` (int64 samples), ``spike_template`` (int64),
        ``spike_scale`` (fitted amplitude relative to the template), ``spike_score`` (sqrt of explained
        variance, whitened SD units), ``spike_features`` (spike, nearest, pc); per template:
        ``template_mean`` (template, channel, sample) mean of residual + own fit over its spikes (0 farther
        than :data:`MAX_RADIUS_UM` from the template's peak, beyond its own channels),
        ``template_count``, ``template_channels`` (template, nearest) the feature channels (positions).
    """
    s = Settings.coerce(settings)
    if not isinstance(templates, xr.DataArray) or set(templates.dims) != {"unit", "channel", "sample"}:
        raise DataError("match: templates must be a DataArray with dims (unit, channel, sample), as "
                        f"full_templates returns; got {type(templates).__name__} "
                        f"{getattr(templates, 'dims', getattr(templates, 'shape', ''))}.")
    templates = np.asarray(templates.transpose("unit", "channel", "sample").values, dtype=np.float32)
    K, C, nt = templates.shape
    pos = positions(white)
    shank = shanks(white)
    rank = rank or s.n_pcs
    best = (templates.astype(np.float64) ** 2).sum(2).argmax(1) if K else np.zeros(0, int)
    near = nearest_channels(pos, min(s.nearest_chans, C), shank)
    nC = near.shape[1]  # fewer than nearest_chans where a shank has fewer channels
    nearU = near[best] if K else np.zeros((0, nC), int)
    # templates in depth order inside the matcher: its blocks of consecutive templates are then local, and a
    # fitted spike touches few of them (ids go back to the caller's order below)
    by_depth = np.lexsort((pos[best, 0], pos[best, 1], shank[best])) if K else np.zeros(0, np.int64)
    ctx = _context(templates[by_depth], bases["pc"].values, nearU[by_depth], pos, th=float(s.Th_learned), th_low=float(s.Th_bounded),
                   amp_range=BOUNDED_SCALE, max_peels=int(s.max_peels),
                   nt0=s.nt0min_, device=s.device, threads=s.torch_threads,
                   rank=rank, drop_tol=_DROP_FRACTION * float(s.Th_learned) if sparse else 0.0)
    # one task per chunk on the current dask client or the threaded scheduler; ctx is one graph key
    # the per-template waveform sums (K, C, nt) of every chunk are folded as the chunks finish: kept per chunk
    # they were 47 MB each on a 384-channel, 500-unit recording, 14 GB over 600 s
    means = _SumFold(K, C, nt)
    data = as_dask(white)
    parts = run_chunks(_match_block, data, ctx, name="match", fold=means) if K else []
    empty = _empty(ctx)
    cat = {k: np.concatenate([p[k] for p in parts]) if parts else empty[k]
           for k in ("time", "template", "amplitude", "score", "features")}
    cat["template"] = by_depth[cat["template"]]
    sums, counts = np.empty_like(means.sums), np.empty_like(means.counts)
    sums[by_depth], counts[by_depth] = means.sums, means.counts
    order = np.lexsort((cat["template"], cat["time"]))
    mean = (sums / np.maximum(counts, 1)[:, None, None]).astype(np.float32)
    return xr.Dataset(
        {
            "spike_time": ("spike", cat["time"][order]),
            "spike_template": ("spike", cat["template"][order]),
            "spike_scale": ("spike", cat["amplitude"][order]),
            "spike_score": ("spike", cat["score"][order]),
            "spike_features": (("spike", "nearest", "pc"), cat["features"][order]),
            "template_mean": (("template", "channel", "sample"), mean),
            "template_count": ("template", counts.astype(np.int64)),
            "template_channels": (("template", "nearest"), nearU.astype(np.int64)),
        },
        attrs={"threshold": float(s.Th_learned), "rank": int(rank)},
    )
