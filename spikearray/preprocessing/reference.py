"""Common reference: subtract, at every sample, the median (or mean) across channels (Kilosort4's CAR)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import xarray as xr

from .._compute import default_torch_threads, resolve_device
from ..errors import SettingsError
from ._common import check_finite, check_recording, derive_attrs, uV_gains
from ._graph import as_dask, map_time_blocks, wrap_like
from ._kernels import median_subtract

__all__ = ["common_reference", "reference_stage"]


def reference_stage(rec: xr.DataArray, *, operator: str, device: torch.device,
                    threads: int | None) -> tuple[Callable[[np.ndarray, int], np.ndarray], dict]:
    """Block function ``fn(x_uV_float32, start)`` and stage record of the common reference for ``rec``."""
    if operator not in ("median", "mean"):
        raise SettingsError(f"common_reference operator={operator!r}; expected 'median' (Kilosort4) or 'mean'.")

    def run(x: np.ndarray, start: int) -> np.ndarray:
        if operator == "median":
            return median_subtract(x, device=device, threads=threads)
        return (x - x.mean(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)).astype(np.float32)

    return run, {"stage": "common_reference", "operator": operator}


def common_reference(rec: xr.DataArray, *, operator: str = "median", device: str = "auto",
                     torch_threads: int | None = None) -> xr.DataArray:
    """Subtract the median across channels at every sample (Kilosort4's ``do_CAR``), lazily per chunk.

    The median of an even number of channels is the lower middle value, as ``torch.median`` in Kilosort4. The
    median is taken over the data as given: apply it to high-passed data (as :func:`preprocess` does), because
    per-channel DC offsets in raw data would decide which channel supplies the median.

    Parameters
    ----------
    rec : xarray.DataArray, dims (time, channel)
        int16 counts (scaled to µV first) or float µV.
    operator : {"median", "mean"}
    device : str
        CPU runs a compiled exact selection per sample; other devices ``torch.median``.
    torch_threads : int, optional

    Returns
    -------
    xarray.DataArray
        Lazy float32 µV, same coords and chunks; ``stages`` += ``{"stage": "common_reference", ...}``. NaN/inf
        raise :class:`~spikearray.errors.DataError` when the chunk is computed.
    """
    rec = check_recording(rec, "common_reference")
    dev = resolve_device(device)
    threads = torch_threads or default_torch_threads()
    run, record = reference_stage(rec, operator=operator, device=dev, threads=threads)
    gain = uV_gains(rec)
    fs = float(rec.attrs["sampling_rate"])
    ids = rec["channel"].values
    t0 = float(rec.attrs.get("time_start", 0.0))
    scaled = bool(np.all(gain == 1))

    def block(x: np.ndarray, start: int) -> np.ndarray:
        check_finite(x, start=start, sampling_rate=fs, channel_ids=ids, time_start=t0, stage="common_reference")
        xf = np.asarray(x, dtype=np.float32) if scaled else x.astype(np.float32) * gain
        return run(xf, start)

    data = map_time_blocks(block, as_dask(rec))
    return wrap_like(rec, data, derive_attrs(rec, units="uV", stages=[record]))
