"""Cheap per-chunk spike detection and localisation for drift estimation.

Drift registration only needs, per spike, a time, a depth and an amplitude, and it needs them fast: this is not
Kilosort4's universal-template detector (which it reruns for drift, at most of its drift-stage cost) but a
negative-peak detector on the whitened data:

* a peak is a sample whose negated value exceeds ``threshold`` and is the largest in a window of
  ``±window_ms`` × the channels within ``radius_um`` (same shank): one peak per spike and neighbourhood;
* its depth (and x) is a Gaussian-windowed centre of mass (window ``loc_sigma_um``, iterated so the window
  follows the estimate) of the channels within ``loc_radius_um``, each weighted by the projection of its trace
  on the peak channel's waveform over ±``loc_ms`` (clipped at 0);
* its amplitude is the negated peak value (whitened units).

Each dask chunk is processed with a halo of ``window_ms`` samples either side and keeps only the peaks of its own
core, so the spike table does not depend on the chunking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import xarray as xr

from .._compute import default_torch_threads, resolve_device, torch_threads
from .._engine import ChunkInfo, as_dask, chunk_kernel, run_chunks
from ..errors import DataError
from ..geometry import neighbourhoods, shanks

__all__ = ["detect_peaks"]

#: Samples per slab of the peak search (6 MB of float32 at 384 channels); see _detect_block.
_SLAB_ROWS = 4096

_FIELDS = ("time", "channel", "depth", "x", "amplitude")


def _running_max(v: torch.Tensor, half: int) -> torch.Tensor:
    """Maximum of ``v`` (time, channel) over ``t - half .. t + half`` at every ``t`` (the edges see fewer samples).

    A sparse table: maxima over windows of 1, 2, 4, ... samples by shifted pairs, then the window of
    ``2 half + 1`` as the maximum of two overlapping power-of-two windows. Five passes along time instead of
    max_pool1d, which needs a (channel, time) copy and took 0.22 s for a 2 s, 384-channel chunk at half = 15.
    Exact, as any maximum.
    """
    w = 2 * half + 1
    pad = torch.full((half, v.shape[1]), -torch.inf, dtype=v.dtype, device=v.device)
    m = torch.cat([pad, v, pad])
    p = 1
    while 2 * p <= w:
        m = torch.maximum(m[:-p], m[p:])  # row t: max over t .. t + 2p - 1
        p *= 2
    return torch.maximum(m[: len(v)], m[w - p: w - p + len(v)])


def _detect_block(x: np.ndarray, *, start: int, core: tuple[int, int], neigh: np.ndarray, loc_neigh: np.ndarray,
                  cx: np.ndarray, cy: np.ndarray, threshold: float, half: int, loc_half: int, loc_sigma: float,
                  loc_iters: int, device: torch.device) -> np.ndarray:
    """Peaks of one chunk (with halo) as a structured array; ``start`` is the global sample of row 0."""
    n, c = x.shape
    dtype = [("time", "i8"), ("channel", "i4"), ("depth", "f4"), ("x", "f4"), ("amplitude", "f4")]
    if n == 0 or c == 0:
        return np.zeros(0, dtype=dtype)
    # Kept in the chunk's own (time, channel) layout: every step below is a shift along time or a gather along
    # channels, so no transposing copy is needed (0.14 s of a 2 s, 384-channel chunk).
    xt = torch.as_tensor(x, dtype=torch.float32).to(device)  # (n, C); no copy for a float32 chunk on the CPU
    # One reduction instead of a boolean copy of the chunk: a NaN or an inf anywhere makes the sum non-finite
    # (whitened values are far too small for a finite sum to overflow).
    if not bool(torch.isfinite(xt.sum())):
        raise DataError("drift peak detection found NaN or inf in the preprocessed data; check the input stage.")
    # A peak is a sample of -x above threshold and at least as large as the running maximum (±half samples) of
    # every neighbour. The spatial test runs only at candidates (above threshold and the running maximum of
    # their own channel): a spatial maximum of the whole chunk cost 7 full gathers, 0.3 s of a 2 s,
    # 384-channel chunk, for the ~1 % of samples that can be peaks. Same peaks as comparing with
    # ``max_k tmax[nb[c, k]]``, since ``tmax[c] >= -x`` and nb[c, 0] = c.
    # Slabs of _SLAB_ROWS samples: a whole-chunk temporary (92 MB at 384 channels) is a fresh mmap that the
    # CPU faults in page by page at every allocation (0.1 s per pass); slab temporaries are reused heap memory
    # and stay in cache.
    lo, hi = core
    nb_all = torch.as_tensor(neigh, device=device)
    found_t, found_ch = [], []
    for a in range(lo, hi, _SLAB_ROWS):
        b = min(a + _SLAB_ROWS, hi)
        s0, s1 = max(0, a - half), min(n, b + half)
        neg = xt[s0:s1].neg()
        tmax = _running_max(neg, half)[a - s0: b - s0]
        core_neg = neg[a - s0: b - s0]
        t, ch = torch.nonzero((core_neg > threshold) & (core_neg == tmax), as_tuple=True)
        if len(ch):
            keep = (tmax.reshape(-1)[t[:, None] * c + nb_all[ch]] <= core_neg[t, ch][:, None]).all(1)
            found_t.append(t[keep] + a)
            found_ch.append(ch[keep])
    if not found_t:
        return np.zeros(0, dtype=dtype)
    t, ch = torch.cat(found_t), torch.cat(found_ch)
    out = np.zeros(len(ch), dtype=dtype)
    if len(ch) == 0:
        return out
    # Amplitude of each neighbour: projection of its trace on the peak channel's waveform within ±loc_half
    # samples. Unlike a per-channel maximum this is zero-mean on noise, so noise adds no pull towards the
    # neighbourhood's centre.
    lag = torch.arange(-loc_half, loc_half + 1, device=device)
    tt = (t[:, None] + lag[None, :]).clamp(0, n - 1)  # (P, L)
    flat = xt.reshape(-1)
    ref = flat[tt * c + ch[:, None]]  # (P, L) peak-channel waveform
    lnb = torch.as_tensor(loc_neigh, device=device)[ch]  # (P, K)
    seg = flat[(tt * c)[:, None, :] + lnb[:, :, None]]  # (P, K, L): flat gathers, 3x faster than 2-d indexing
    amp_k = torch.relu((seg * ref[:, None, :]).sum(-1) / ref.norm(dim=1).clamp_min(1e-6)[:, None])
    amp_k = torch.where(lnb == ch[:, None], torch.zeros_like(amp_k), amp_k)
    amp_k[:, 0] = torch.relu(ref.norm(dim=1))  # the peak channel itself (first column of its row)
    ty = torch.as_tensor(cy, dtype=torch.float32, device=device)[lnb]
    tx = torch.as_tensor(cx, dtype=torch.float32, device=device)[lnb]
    # Gaussian-windowed centre of mass iterated to its fixed point (mean shift): the window follows the
    # estimate instead of the peak channel, which removes most of the jump when the peak channel changes.
    py, px = ty[:, 0].clone(), tx[:, 0].clone()
    for _ in range(loc_iters):
        g = amp_k * torch.exp(-((ty - py[:, None]) ** 2 + (tx - px[:, None]) ** 2) / (2 * loc_sigma ** 2))
        gs = g.sum(1).clamp_min(1e-12)
        py = (g * ty).sum(1) / gs
        px = (g * tx).sum(1) / gs
    out["time"] = (t + start).cpu().numpy()
    out["channel"] = ch.cpu().numpy()
    out["depth"] = py.cpu().numpy()
    out["x"] = px.cpu().numpy()
    out["amplitude"] = (-flat[t * c + ch]).cpu().numpy()
    order = np.lexsort((out["channel"], out["time"]))
    return out[order]


@dataclass(frozen=True, eq=False)
class _PeakContext:
    """What every chunk of :func:`detect_peaks` needs besides its samples."""

    device: str  # "auto" is resolved where the chunk runs
    threads: int | None  # torch threads (None: cores / dask threads, on the machine running the chunk)
    neigh: np.ndarray  # (C, k) peak neighbourhoods
    loc_neigh: np.ndarray  # (C, k') localisation neighbourhoods
    cx: np.ndarray  # (C,) µm
    cy: np.ndarray  # (C,) µm
    threshold: float
    half: int  # samples: a peak is the largest within ±half
    loc_half: int
    loc_sigma: float
    loc_iters: int


@chunk_kernel(halo=lambda ctx: ctx.half)  # the local-maximum window: peaks near the core's edge need it
def _peak_block(block: np.ndarray, info: ChunkInfo, ctx: _PeakContext) -> np.ndarray:
    with torch_threads(ctx.threads or default_torch_threads()):
        core = (info.left, info.left + info.stop - info.start)
        return _detect_block(block, start=info.start - info.left, core=core, neigh=ctx.neigh,
                             loc_neigh=ctx.loc_neigh, cx=ctx.cx, cy=ctx.cy, threshold=ctx.threshold,
                             half=ctx.half, loc_half=ctx.loc_half, loc_sigma=ctx.loc_sigma,
                             loc_iters=ctx.loc_iters, device=resolve_device(ctx.device))


def _table(parts: list[np.ndarray], white: xr.DataArray) -> xr.Dataset:
    arr = np.concatenate(parts) if parts else np.zeros(0, dtype=[(f, "f4") for f in _FIELDS])
    fs = float(white.attrs["sampling_rate"])
    shank = shanks(white)
    ds = xr.Dataset(
        {
            "spike_time": ("spike", arr["time"].astype(np.int64)),
            "spike_channel": ("spike", arr["channel"].astype(np.int64)),
            "spike_shank": ("spike", shank[arr["channel"].astype(np.int64)].astype(np.int64)),
            "spike_depth": ("spike", arr["depth"].astype(np.float32)),
            "spike_x": ("spike", arr["x"].astype(np.float32)),
            "spike_amplitude": ("spike", arr["amplitude"].astype(np.float32)),
        },
        attrs={"sampling_rate": fs},
    )
    ds["spike_time"].attrs["units"] = "samples"
    ds["spike_depth"].attrs["units"] = "um"
    ds["spike_x"].attrs["units"] = "um"
    ds["spike_amplitude"].attrs["units"] = "whitened"
    return ds


def detect_peaks(white: xr.DataArray, *, threshold: float = 5.0, radius_um: float = 50.0, window_ms: float = 0.5,
                 loc_ms: float = 0.17, loc_radius_um: float = 100.0, loc_sigma_um: float = 30.0, loc_iters: int = 5,
                 device: str = "auto", torch_threads_: int | None = None) -> xr.Dataset:
    """Detect and localise negative peaks of a whitened recording (computes it, chunk by chunk).

    Parameters
    ----------
    white : xarray.DataArray, (time, channel) float32
        Preprocessed (high-passed, referenced, whitened) recording, noise SD ≈ 1, with channel coords
        ``x``, ``y`` (µm) and optionally ``shank``; attr ``sampling_rate``.
    threshold : float
        Detection threshold on ``-x`` (whitened units).
    radius_um : float
        Neighbourhood radius within which a peak must be the largest (same shank only).
    window_ms : float
        Half-width of the time window in which a peak must be the largest.
    loc_ms : float
        Half-width of the waveform window whose projection gives each neighbour's amplitude.
    loc_radius_um, loc_sigma_um, loc_iters : float, float, int
        Channels used for localisation, width of the Gaussian window and number of window updates.
    device : str
        Torch device ("auto", "cpu", "cuda", ...).
    torch_threads_ : int, optional
        Torch threads while computing (default: cores / dask threads).

    Returns
    -------
    xarray.Dataset
        dim ``spike`` (sorted by time, then channel): ``spike_time`` (int64 samples from the recording start),
        ``spike_channel`` (positional channel index), ``spike_shank``, ``spike_depth`` and ``spike_x`` (µm,
        centre of mass), ``spike_amplitude`` (whitened units, positive).

    Examples
    --------
    >>> from spikearray.synthetic import generate_recording
    >>> rec, truth = generate_recording(duration=2.0, n_channels=16, n_units=3, seed=1)
    >>> white = (rec.astype("float32") - rec.astype("float32").mean("time")) / 20  # crude stand-in
    >>> peaks = detect_peaks(white, threshold=5.0)
    >>> sorted(peaks.data_vars)[:2]
    ['spike_amplitude', 'spike_channel']
    """
    fs = float(white.attrs["sampling_rate"])
    cx = np.asarray(white["x"].values, dtype=np.float64)
    cy = np.asarray(white["y"].values, dtype=np.float64)
    shank = shanks(white)
    ctx = _PeakContext(
        device=str(device), threads=torch_threads_, neigh=neighbourhoods(cx, cy, radius_um=radius_um, shank=shank),
        loc_neigh=neighbourhoods(cx, cy, radius_um=loc_radius_um, shank=shank), cx=cx, cy=cy, threshold=float(threshold),
        half=max(1, int(round(window_ms * 1e-3 * fs))), loc_half=max(0, int(round(loc_ms * 1e-3 * fs))),
        loc_sigma=float(loc_sigma_um), loc_iters=int(loc_iters),
    )
    return _table(run_chunks(_peak_block, as_dask(white), ctx, name="peaks"), white)
