"""Per-block kernels: numpy in, work on the torch device, numpy out (float32).

Each public function here is what one dask task runs on one chunk. The device decides the implementation:

* high-pass — on ``cpu`` the compiled forward-backward IIR of :mod:`._cpu_kernels` (torch has no recursive
  filter op; the IIR costs ~20 flops per sample and pass, far less than an FFT); on any other device a torch
  FFT filter with the same zero-phase magnitude response ``|H(f)|²`` (what ``filtfilt`` applies away from edges).
  Both are available on CPU (``method=``) so the tests check them against each other and against scipy.
* common median reference — compiled exact selection on ``cpu``, ``torch.median`` elsewhere (both the lower
  middle value for an even channel count, as Kilosort4).
* whitening — ``torch`` matmuls on every device, restricted to the band of non-zero columns of the (local) matrix.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.signal
import torch

from .._compute import band_blocks, band_matmul, irfft, resolve_device, rfft, torch_threads
from ._cpu_kernels import median_subtract_block, sosfiltfilt_block

__all__ = ["butter_sos", "highpass_halo", "highpass_block", "median_subtract", "whiten_block", "band_blocks",
           "covariance_block", "reference_whiten_inplace"]


@lru_cache(maxsize=32)
def _butter_sos(order: int, cutoff: float, fs: float) -> np.ndarray:
    return scipy.signal.butter(order, cutoff, btype="highpass", fs=fs, output="sos").astype(np.float64)


def butter_sos(order: int, cutoff: float, fs: float) -> np.ndarray:
    """Second-order sections of the Butterworth high-pass (Kilosort4's design: ``butter(order, cutoff, 'high')``)."""
    return _butter_sos(int(order), float(cutoff), float(fs)).copy()


@lru_cache(maxsize=32)
def highpass_halo(order: int, cutoff: float, fs: float, tol: float = 1e-10) -> int:
    """Samples of context needed on each side of a block so that the filtered block does not depend on its edges.

    The start-up transient of each causal pass decays like the filter's impulse response ``h``; the FFT variant
    wraps around by the two-sided response of ``filtfilt``. The halo is the length after which the remaining
    absolute mass of either response is below ``tol`` (relative to a unit input step), rounded up to 64.
    At 300 Hz, order 3 and 30 kHz this is ~830 samples (28 ms).
    """
    sos = _butter_sos(order, cutoff, fs)
    n = int(min(max(20 * fs / cutoff, 2000), 2_000_000))
    imp = np.zeros(n)
    imp[0] = 1.0
    h = scipy.signal.sosfilt(sos, imp)
    h[0] -= 1.0  # the high-pass is delta minus a smooth kernel; only the smooth part decays
    hh = scipy.signal.sosfilt(sos, h[::-1])[::-1]  # the second (backward) pass on the decaying part
    halo = 0
    for r in (h, hh):
        tail = np.cumsum(np.abs(r)[::-1])[::-1]
        below = np.flatnonzero(tail < tol)
        halo = max(halo, int(below[0]) if below.size else n)
    return int(-(-halo // 64) * 64)


@lru_cache(maxsize=16)
def _fft_response(order: int, cutoff: float, fs: float, nfft: int) -> np.ndarray:
    """``|H(f)|²`` of the Butterworth high-pass at the ``rfft`` bins of length ``nfft`` (float32)."""
    sos = _butter_sos(order, cutoff, fs)
    _, h = scipy.signal.sosfreqz(sos, worN=np.fft.rfftfreq(nfft, d=1.0 / fs), fs=fs)
    return (np.abs(h) ** 2).astype(np.float32)


def _odd_extend(x: np.ndarray, gain: np.ndarray, left: int, right: int) -> np.ndarray:
    """Scale to µV and add odd (point-symmetric) extensions at the recording's ends, as scipy's ``filtfilt``."""
    xf = x.astype(np.float32) * gain
    parts = []
    left = min(left, len(xf) - 1)
    right = min(right, len(xf) - 1)
    if left > 0:
        parts.append(2 * xf[:1] - xf[left:0:-1])
    parts.append(xf)
    if right > 0:
        parts.append(2 * xf[-1:] - xf[-2:-right - 2:-1])
    return np.concatenate(parts, axis=0) if len(parts) > 1 else xf, left


def highpass_block(x: np.ndarray, gain: np.ndarray, *, order: int, cutoff: float, fs: float, extend_left: int,
                   extend_right: int, device: str | torch.device, method: str = "auto",
                   threads: int | None = None) -> np.ndarray:
    """Zero-phase Butterworth high-pass of one block along time.

    Parameters
    ----------
    x : ndarray (n, c), int16 or float
        Samples including any halo (the caller trims it).
    gain : ndarray (c,), float32
        µV per unit of ``x``.
    extend_left, extend_right : int
        Length of the odd extension to add at the recording's start/end (0 inside the recording, where the halo
        holds real samples).
    method : {"auto", "iir", "fft"}
        ``auto``: compiled IIR on CPU, torch FFT on other devices.

    Returns
    -------
    ndarray (n, c), float32, µV.
    """
    if extend_left or extend_right:
        x, left = _odd_extend(x, gain, extend_left, extend_right)
        gain = np.ones_like(gain)
        n_out = len(x) - left - min(extend_right, max(0, len(x) - left - 1))
    else:
        left, n_out = 0, len(x)
    device = resolve_device(device)  # "auto" is resolved here, on the machine that runs the block
    if method == "auto":
        method = "iir" if device.type == "cpu" else "fft"
    if method == "iir":
        src = np.ascontiguousarray(x)
        out = np.empty(src.shape, dtype=np.float32)
        sosfiltfilt_block(src, np.ascontiguousarray(gain, np.float32), _butter_sos(order, cutoff, fs), out)
    elif method == "fft":
        n = len(x)
        nfft = scipy.fft.next_fast_len(n, real=True)
        h2 = torch.from_numpy(_fft_response(order, cutoff, fs, nfft)).to(device)
        with torch_threads(threads):
            xt = torch.as_tensor(np.ascontiguousarray(x), device=device).to(torch.float32)
            xt = xt * torch.as_tensor(gain, device=device)
            xt = xt - xt.mean(dim=0, keepdim=True)  # smaller numbers → smaller float32 FFT round-off
            spec = rfft(xt, n=nfft, dim=0)  # thread-count independent, see _compute.rfft
            spec *= h2[:, None]
            out = irfft(spec, n=nfft, dim=0)[:n].cpu().numpy()
    else:
        raise ValueError(f"method={method!r}; expected 'auto', 'iir' or 'fft'.")
    return out[left:left + n_out]


def median_subtract(x: np.ndarray, *, device: str | torch.device, threads: int | None = None,
                    out: np.ndarray | None = None) -> np.ndarray:
    """``x`` minus, at every sample, the median across channels (lower middle value for an even count).

    ``x`` is ``(n, c)`` float32; returns a new float32 array, or ``out`` (which may be ``x``) filled on CPU.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    device = resolve_device(device)  # "auto" is resolved here, on the machine that runs the block
    if device.type == "cpu":
        out = np.empty_like(x) if out is None else out
        median_subtract_block(x, out, np.empty(len(x), dtype=np.float32))
        return out
    with torch_threads(threads):
        xt = torch.as_tensor(x, device=device)
        return (xt - torch.median(xt, dim=1, keepdim=True).values).cpu().numpy()


def whiten_block(x: np.ndarray, w: np.ndarray, blocks: list[tuple[int, int, int, int]], *,
                 device: str | torch.device, threads: int | None = None) -> np.ndarray:
    """``out[t, i] = sum_j w[i, j] x[t, j]`` (i.e. ``x @ w.T``) with the band structure ``blocks``; float32."""
    device = resolve_device(device)  # "auto" is resolved here, on the machine that runs the block
    with torch_threads(threads):
        xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)
        # w as the transpose of a contiguous w.T: the products read w.T's rows, as BLAS prefers
        wt = torch.as_tensor(np.ascontiguousarray(w.T, dtype=np.float32), device=device)
        return band_matmul(wt.T, xt, blocks, channels_first=False).cpu().numpy()


def reference_whiten_inplace(y: np.ndarray, w: np.ndarray, blocks: list[tuple[int, int, int, int]], *,
                             median: bool, tile: int = 1024, threads: int | None = None) -> np.ndarray:
    """CPU: subtract the per-sample median across channels (if ``median``), then whiten, in place, tile by tile.

    Same result as :func:`median_subtract` followed by :func:`whiten_block` (bit for bit with torch's CPU BLAS:
    tiling rows does not change any dot product's summation order), but each tile of
    ``tile`` rows (~1.5 MB at 384 channels) is referenced into a scratch buffer and multiplied back into ``y``
    while it is still in cache, and no block-sized temporaries are allocated (their page faults cost as much as
    the arithmetic on a 2 s chunk).

    Parameters
    ----------
    y : ndarray (n, c), float32, C-contiguous
        Filtered µV; overwritten with the whitened values.
    w : ndarray (c, c)
        Whitening matrix (``out = y @ w.T``).
    blocks : list of (o0, o1, i0, i1)
        Its band structure, from :func:`band_blocks`.

    Returns
    -------
    ndarray
        ``y`` itself.
    """
    if not (y.dtype == np.float32 and y.flags.c_contiguous):
        raise ValueError("reference_whiten_inplace needs a C-contiguous float32 array.")
    n, c = y.shape
    rows = min(int(tile), max(n, 1))
    scratch = np.empty((rows, c), dtype=np.float32)
    med = np.empty(rows, dtype=np.float32)
    with torch_threads(threads):
        wt = torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float32))
        yt = torch.from_numpy(y)
        st = torch.from_numpy(scratch)
        for r0 in range(0, n, rows):
            m = min(rows, n - r0)
            if median:
                median_subtract_block(y[r0:r0 + m], scratch[:m], med[:m])
            else:
                scratch[:m] = y[r0:r0 + m]
            src, dst = st[:m], yt[r0:r0 + m]
            for o0, o1, i0, i1 in blocks:
                # out= a column slice: BLAS writes it in place with the row stride (no temporary)
                torch.matmul(src[:, i0:i1], wt[i0:i1, o0:o1], out=dst[:, o0:o1])
    return y


def covariance_block(x: np.ndarray, *, device: str | torch.device, threads: int | None = None,
                     blocks: list[tuple[int, int, int, int]] | None = None) -> np.ndarray:
    """``x.T @ x`` (not centred, as Kilosort4) of a ``(n, c)`` block, float64 ``(c, c)``.

    With ``blocks`` (from :func:`band_blocks` of the needed-entries mask) only ``C[o0:o1, i0:i1]`` is computed;
    other entries are 0. On CPU it runs on one thread whatever ``threads``: each entry sums over all ``n``
    samples, and a multi-threaded GEMM splits that sum between threads, so the whitening matrix (and every
    spike after it) would change with the thread count; the windows are dask tasks of their own, which keeps
    the cores busy.
    """
    device = resolve_device(device)  # "auto" is resolved here, on the machine that runs the block
    with torch_threads(1 if device.type == "cpu" else threads):
        xt = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32), device=device)
        if blocks is None or len(blocks) == 1:
            return (xt.T @ xt).double().cpu().numpy()
        c = xt.shape[1]
        out = torch.zeros((c, c), dtype=torch.float64, device=device)
        for o0, o1, i0, i1 in blocks:
            out[o0:o1, i0:i1] = (xt[:, o0:o1].T @ xt[:, i0:i1]).double()
        return out.cpu().numpy()
