"""Spike detection on the whitened, drift-corrected recording: a space-time matched filter per chunk.

Kilosort4 convolves every channel with 6 waveform prototypes, then sums neighbouring channels under 5
Gaussian envelopes for every point of a dense grid of positions — the 559 s it spends here on GT-A. We keep
the idea (a matched filter in time and space, thresholded in noise-SD units) in a far cheaper form:

1. one temporal filter (the first learned PC, i.e. the typical spike shape) applied by FFT;
2. spatial pooling with Gaussian envelopes centred on the channels themselves (``template_sizes`` widths,
   multiples of ``min_template_size``), each normalised to unit L2 norm over the ``nearest_chans`` closest
   channels, as one small matrix product;
3. a peak is a sample where the pooled score is the maximum over the channels within ~100 µm and over
   ±``nt0min`` samples, and exceeds ``Th_universal`` (negative-going spikes, as Kilosort4's templates).

Because the filters have unit norm and whitened noise is white, the score is N(0, 1) under noise, so
``Th_universal`` keeps Kilosort4's meaning (SD units of a matched filter).
Each spike gets its time, position (x, y by centre of mass of the filtered amplitudes), score and PC features
on its ``nearest_chans`` channels, which the clustering uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr
from scipy.fft import next_fast_len

from .._compute import (band_blocks, band_matmul, channels_first, default_torch_threads, gather_windows, irfft,
                        ols_blocks, ols_outputs, resolve_device, rfft, torch_threads)
from .._engine import ChunkInfo, as_dask, chunk_kernel, memo, run_chunks
from ..geometry import channel_distances, nearest_channels, positions, shanks
from ..settings import Settings

__all__ = ["detect", "correlate_fft"]


#: Transform length of :func:`correlate_fft`'s overlap-save blocks. One transform over a whole 2 s chunk
#: (60,750 points) took 55-61 ms for 128 channels; blocks of 1,024-4,096 points 34-41 ms, 8,192 63-69 ms
#: (one thread, 2-core EPYC): a short transform stays in cache.
OLS_BLOCK = 2048


def correlate_fft(x: torch.Tensor, w: torch.Tensor, nt0: int) -> torch.Tensor:
    """``out[r, t] = sum_tau w[r, tau] * x[r, t - nt0 + tau]`` (zero outside ``x``), by FFT.

    Rows longer than two :data:`OLS_BLOCK` are filtered block by block (overlap-save: each block of
    ``OLS_BLOCK`` samples gives ``OLS_BLOCK - nt + 1`` outputs), all blocks in one batched transform.

    Parameters
    ----------
    x : tensor (R, L)
    w : tensor (R, nt) or (1, nt)
    nt0 : int
        Index of ``w`` aligned with output sample ``t``.

    Returns
    -------
    tensor (R, L), float32.
    """
    L = x.shape[-1]
    nt = w.shape[-1]
    # spikearray's rfft/irfft: the same bits whatever the torch thread count (a 1-row filter transform is
    # otherwise split across threads by MKL, and every score with it)
    flipped = torch.flip(w, dims=(-1,))  # correlation = convolution with the reversed filter
    if L + nt <= 2 * OLS_BLOCK:
        n = next_fast_len(L + nt, real=True)  # 2^a·3^b·5^c: FFT-friendly
        y = irfft(rfft(x, n=n) * rfft(flipped, n=n), n=n)
        shift = nt - 1 - nt0  # the reversed filter's index nt-1-tau sits at lag nt0
        return y[..., shift:shift + L]
    N = OLS_BLOCK
    blocks = ols_blocks(x, N, nt, nt0)  # (R, nb, N)
    return ols_outputs(irfft(rfft(blocks, n=N) * rfft(flipped, n=N)[..., None, :], n=N), nt, L)


def _spatial_weights(pos: np.ndarray, shank: np.ndarray, n_near: int, sizes: list[float]) -> np.ndarray:
    """(S, C, C) Gaussian envelopes centred on each channel, unit L2 norm over its nearest channels."""
    C = len(pos)
    d = channel_distances(pos, shank)
    near = nearest_channels(pos, n_near, shank)
    mask = np.zeros((C, C), bool)
    mask[np.arange(C)[:, None], near] = True
    out = np.zeros((len(sizes), C, C))
    for i, sig in enumerate(sizes):
        w = np.exp(-(d ** 2) / sig ** 2) * mask
        out[i] = w / np.linalg.norm(w, axis=1, keepdims=True)
    return out


@dataclass(frozen=True, eq=False)
class _DetectContext:
    """What every chunk of :func:`detect` needs besides its samples (numpy: cheap to tokenize and ship)."""

    device: str  # the settings' device; "auto" is resolved where the chunk runs
    threads: int | None  # torch threads (None: cores / dask threads, on the machine running the chunk)
    nt: int
    nt0: int
    th: float
    w: np.ndarray  # (1, nt) temporal filter: the first learned PC
    W: np.ndarray  # (S, C, C) spatial envelopes
    W_blocks: tuple[tuple[int, int, int, int], ...]  # their band structure (nearest channels only)
    near: np.ndarray  # (C, n_peak) channels of the local-maximum test
    nearC: np.ndarray  # (C, nC) feature channels
    pos: np.ndarray  # (C, 2) µm
    pcs: np.ndarray  # (P, nt)


def _tensors(ctx: _DetectContext, dev: torch.device) -> dict[str, torch.Tensor]:
    """The context's arrays as tensors on ``dev``, made once per process and device."""
    names = ("w", "W", "near", "nearC", "pos", "pcs")
    return memo(ctx, ("tensors", str(dev)), lambda: {k: torch.from_numpy(getattr(ctx, k)).to(dev) for k in names})


@chunk_kernel(halo=lambda ctx: 2 * ctx.nt)
def _detect_block(block: np.ndarray, info: ChunkInfo, ctx: _DetectContext) -> dict[str, np.ndarray]:
    dev = resolve_device(ctx.device)
    g = _tensors(ctx, dev)
    with torch_threads(ctx.threads or default_torch_threads()):
        x = channels_first(block, dev)  # (C, L)
        C, L = x.shape
        nt, nt0 = ctx.nt, ctx.nt0
        y = correlate_fft(x, g["w"], nt0)  # (C, L) matched in time
        # matched in space: the best of the envelope sizes, one size at a time so that only one (C, L) score
        # array is alive. Negative-going spikes only: whitening gives big units positive spatial side lobes,
        # which |A| would turn into spurious detections far from the unit.
        # Each envelope reaches only the nearest_chans channels: on a depth-ordered probe a block of output
        # channels reads a short band of inputs (384 channels: 0.72 s of dense products per 2 s chunk, 0.23 s banded)
        Wsp, blocks = g["W"], list(ctx.W_blocks)
        Amax = band_matmul(Wsp[0], y, blocks, channels_first=True)
        for i in range(1, Wsp.shape[0]):
            torch.maximum(Amax, band_matmul(Wsp[i], y, blocks, channels_first=True), out=Amax)
        # a peak: above threshold and the largest score within ±nt0 samples on its channel and on the channels
        # within ~100 µm. Tested only where the score crosses the threshold and beats its two neighbours in
        # time, by gathering windows there; pooling the whole (C, L) array (max_pool1d) and comparing it took
        # 5.3 of 22.5 s of this kernel on 60 s of the 384-channel set, for the same peaks.
        t_glob0 = info.start - info.left
        # the trough window must fit inside the block, and the peak inside the core range
        lo = max(nt, info.left) if info.start > 0 else nt
        core_end = info.left + (info.stop - info.start)
        hi = min(core_end, L - nt)
        c, t = torch.nonzero(Amax[:, lo:hi] > ctx.th, as_tuple=True)
        t = t + lo
        a = Amax[c, t]
        up = (a >= Amax[c, t - 1]) & (a >= Amax[c, t + 1])
        c, t, a = c[up], t[up], a[up]
        w = 2 * nt0 + 1  # lo >= nt > nt0 and hi <= L - nt keep every window inside the block
        own = gather_windows(Amax, c[:, None], t - nt0, w)[:, 0].max(1).values
        up = a >= own
        c, t, a = c[up], t[up], a[up]
        if len(t):
            best_nb = gather_windows(Amax, g["near"][c], t - nt0, w).amax(dim=(1, 2))
            ok = a >= best_nb
            c, t, a = c[ok], t[ok], a[ok]
        n = len(t)
        nC = ctx.nearC.shape[1]
        if n == 0:
            return _empty(nC, ctx.pcs.shape[0])
        chans = g["nearC"][c]  # (n, nC)
        vals = y[chans, t[:, None]].clamp_min(0)
        pos = g["pos"]
        wsum = vals.sum(1).clamp_min(1e-12)
        sx = (vals * pos[chans, 0]).sum(1) / wsum
        sy = (vals * pos[chans, 1]).sum(1) / wsum
        snip = gather_windows(x, chans, t - nt0, nt)  # (n, nC, nt)
        feat = snip @ g["pcs"].T  # (n, nC, P)
        return {
            "time": (t_glob0 + t).cpu().numpy().astype(np.int64),
            "channel": c.cpu().numpy().astype(np.int64),
            "x": sx.cpu().numpy().astype(np.float32),
            "y": sy.cpu().numpy().astype(np.float32),
            "amplitude": a.abs().cpu().numpy().astype(np.float32),
            "features": feat.cpu().numpy().astype(np.float32),
        }


def _empty(nC: int, P: int) -> dict[str, np.ndarray]:
    return {"time": np.zeros(0, np.int64), "channel": np.zeros(0, np.int64), "x": np.zeros(0, np.float32),
            "y": np.zeros(0, np.float32), "amplitude": np.zeros(0, np.float32),
            "features": np.zeros((0, nC, P), np.float32)}


def detect(white: xr.DataArray, bases: xr.Dataset, settings: Settings | None = None, *,
           peak_radius_um: float = 100.0) -> xr.Dataset:
    """Detect spikes with a space-time matched filter and give each its position and PC features.

    Parameters
    ----------
    white : xarray.DataArray (time, channel)
        Whitened (and drift-corrected) recording, noise SD ≈ 1.
    bases : xarray.Dataset
        From :func:`learn_bases`: ``pc`` (pc, sample).
    settings : Settings
        Uses ``Th_universal``, ``nt``, ``nt0min``, ``nearest_chans``, ``min_template_size``,
        ``template_sizes``, ``device``, ``torch_threads``.
    peak_radius_um : float
        A peak must be the largest score within this distance (and ±``nt0min`` samples).

    Returns
    -------
    xarray.Dataset
        dims ``spike``, ``nearest``, ``pc``: ``spike_time`` (int64 samples, trough), ``spike_channel``
        (int64, position in the ``channel`` dim of the peak centre), ``spike_x``/``spike_depth`` (µm),
        ``spike_score`` (matched-filter SD units), ``spike_features`` (spike, nearest, pc) float32, and
        ``neighbours`` (channel, nearest): the channel positions the features live on. Sorted by time.
    """
    s = Settings.coerce(settings)
    pos = positions(white)
    shank = shanks(white)
    C = len(pos)
    sizes = [s.min_template_size * (i + 1) for i in range(s.template_sizes)]
    # (a shank smaller than nearest_chans clips every neighbourhood to its size: nC is what they hold)
    near = nearest_channels(pos, min(s.nearest_chans, C), shank)
    nC = near.shape[1]
    # the local-maximum test spans ~100 µm (Kilosort4 compares each position with its 100 nearest grid positions)
    d = channel_distances(pos, shank)
    n_peak = int(max(nC, (d <= peak_radius_um).sum(1).max()))
    near_peak = nearest_channels(pos, n_peak, shank)
    pcs = bases["pc"].values.astype(np.float32)
    W = _spatial_weights(pos, shank, nC, sizes).astype(np.float32)
    ctx = _DetectContext(
        device=s.device, threads=s.torch_threads, nt=s.nt, nt0=s.nt0min_, th=float(s.Th_universal),
        w=np.ascontiguousarray(pcs[:1]), W=W, W_blocks=tuple(band_blocks(W.any(0))),
        near=near_peak, nearC=near, pos=pos.astype(np.float32), pcs=pcs,
    )
    # runs on the current dask client or the threaded scheduler (spikearray._engine)
    parts = run_chunks(_detect_block, as_dask(white), ctx, name="detect")
    empty = _empty(nC, len(pcs))
    cat = {k: np.concatenate([p[k] for p in parts]) if parts else empty[k] for k in empty}
    order = np.lexsort((cat["channel"], cat["time"]))
    ds = xr.Dataset(
        {
            "spike_time": ("spike", cat["time"][order]),
            "spike_channel": ("spike", cat["channel"][order]),
            "spike_x": ("spike", cat["x"][order]),
            "spike_depth": ("spike", cat["y"][order]),
            "spike_score": ("spike", cat["amplitude"][order]),
            "spike_features": (("spike", "nearest", "pc"), cat["features"][order]),
            "neighbours": (("channel", "nearest"), near),
        },
        attrs={"sampling_rate": float(white.attrs["sampling_rate"]), "threshold": float(s.Th_universal)},
    )
    return ds
