"""High-pass filter: zero-phase Butterworth as Kilosort4, chunk-invariant via a halo (``map_overlap``)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import xarray as xr

from .._compute import default_torch_threads, resolve_device
from ..errors import SettingsError
from ._common import check_finite, check_recording, derive_attrs, uV_gains
from ._graph import as_dask, map_time_overlap, wrap_like
from ._kernels import highpass_block, highpass_halo

__all__ = ["highpass", "highpass_stage"]


def _validate(cutoff: float, order: int, fs: float) -> None:
    if not (isinstance(cutoff, (int, float)) and 0 < cutoff < fs / 2):
        raise SettingsError(f"highpass cutoff={cutoff!r} Hz; expected 0 < cutoff < fs/2 = {fs / 2:g} Hz "
                            "(Kilosort4 uses 300 Hz).")
    if not (isinstance(order, (int, np.integer)) and 1 <= order <= 10):
        raise SettingsError(f"highpass order={order!r}; expected an integer from 1 to 10 (Kilosort4 uses 3).")


def highpass_stage(rec: xr.DataArray, *, cutoff: float, order: int, device: torch.device,
                   threads: int | None, method: str = "auto",
                   sign: float = 1.0) -> tuple[Callable[..., np.ndarray], int, dict]:
    """The block function, halo and stage record of the high-pass for ``rec`` (used by :func:`highpass` and the
    fused chain). The block function has the :func:`._graph.map_time_overlap` signature and returns float32 µV
    (times ``sign``)."""
    fs = float(rec.attrs["sampling_rate"])
    _validate(cutoff, order, fs)
    if method not in ("auto", "iir", "fft"):
        raise SettingsError(f"highpass method={method!r}; expected 'auto', 'iir' or 'fft'.")
    halo = highpass_halo(int(order), float(cutoff), fs)
    gain = uV_gains(rec) * np.float32(sign)
    ids = rec["channel"].values
    t0 = float(rec.attrs.get("time_start", 0.0))

    def run(x: np.ndarray, start: int, pad_left: int, pad_right: int, at_start: bool, at_end: bool) -> np.ndarray:
        out = highpass_block(x, gain, order=int(order), cutoff=float(cutoff), fs=fs,
                             extend_left=halo if at_start else 0, extend_right=halo if at_end else 0,
                             device=device, method=method, threads=threads)
        # NaN/inf anywhere in a channel reach its first sample through the backward pass (FFT: every sample)
        if not np.isfinite(out[0]).all() or not np.isfinite(out[-1]).all():
            check_finite(np.asarray(x, dtype=np.float32) if x.dtype.kind not in "fc" else x, start=start,
                         sampling_rate=fs, channel_ids=ids, time_start=t0, stage="highpass")
            check_finite(out, start=start, sampling_rate=fs, channel_ids=ids, time_start=t0, stage="highpass")
        return out

    record = {"stage": "highpass", "cutoff": float(cutoff), "order": int(order), "filter": "butterworth",
              "zero_phase": True, "halo_samples": int(halo)}
    return run, halo, record


def highpass(rec: xr.DataArray, cutoff: float = 300.0, *, order: int = 3, device: str = "auto",
             method: str = "auto", torch_threads: int | None = None) -> xr.DataArray:
    """Zero-phase Butterworth high-pass along time (Kilosort4's filter), lazily and independent of chunking.

    The filter is scipy's ``butter(order, cutoff, 'highpass')`` applied forward then backward (``filtfilt``:
    zero phase, squared magnitude). Each dask chunk is filtered together with a halo of neighbouring samples
    long enough for the start-up transients to decay below 1e-10 of the input (768 samples at 300 Hz, 30 kHz),
    so the output does not depend on the chunk sizes. At the recording's two ends the data are extended by an
    odd reflection (as ``scipy.signal.filtfilt``), so the first/last few ms differ slightly from scipy's
    shorter padding.

    Parameters
    ----------
    rec : xarray.DataArray, dims (time, channel)
        int16 counts (scaled by the per-channel ``gain_to_uV`` coordinate) or float µV.
    cutoff : float
        Hz.
    order : int
        Butterworth order of one pass (the zero-phase result has twice the order).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``... On CPU a compiled forward-backward IIR runs per block; on a GPU a
        torch FFT filter with the same response.
    method : {"auto", "iir", "fft"}
        Force one implementation (both run on CPU; for tests and comparisons).
    torch_threads : int, optional
        Threads per block for torch (default: cores / dask threads).

    Returns
    -------
    xarray.DataArray
        Lazy float32 µV, same dims, coords and chunks; attrs ``units="uV"``, ``stages`` += the filter record.
        NaN/inf in the input raise :class:`~spikearray.errors.DataError` (naming channels and time) when the
        affected chunk is computed.

    Examples
    --------
    >>> from spikearray.synthetic import generate_recording
    >>> rec, _ = generate_recording(duration=1.0, n_channels=8, n_units=1)
    >>> hp = highpass(rec)
    >>> hp.dtype, hp.attrs["units"], hp.attrs["stages"][-1]["stage"]
    (dtype('float32'), 'uV', 'highpass')
    """
    rec = check_recording(rec, "highpass")
    dev = resolve_device(device)
    threads = torch_threads or default_torch_threads()
    run, halo, record = highpass_stage(rec, cutoff=cutoff, order=order, device=dev, threads=threads, method=method)
    data = map_time_overlap(run, as_dask(rec), halo)
    return wrap_like(rec, data, derive_attrs(rec, units="uV", stages=[record]))
