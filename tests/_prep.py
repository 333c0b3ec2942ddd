"""Private stand-in for ``spikearray.preprocessing.preprocess`` until that stage lands on main.

High-pass (3rd-order Butterworth at 300 Hz, forward-backward) on µV, median common reference per sample, and
one global ZCA whitening matrix estimated from a few chunks: a lazy float32 ``(time, channel)`` DataArray in
whitened units (noise SD ≈ 1), like the real stage returns. Used by the drift tests and benchmark only.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import scipy.signal
import xarray as xr

_HALO = 3000  # samples of filter context either side of a chunk (100 ms at 30 kHz)


def prep(rec: xr.DataArray, *, n_cov_chunks: int = 8) -> xr.DataArray:
    fs = float(rec.attrs["sampling_rate"])
    sos = scipy.signal.butter(3, 300.0, btype="highpass", fs=fs, output="sos")
    gain = np.asarray(rec["gain_to_uV"].values, dtype=np.float32) if rec.attrs.get("units") != "uV" else None

    def filt(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)
        if gain is not None:
            x = x * gain
        if x.shape[0] > 12:
            x = scipy.signal.sosfiltfilt(sos, x, axis=0)
        x = x - np.median(x, axis=1, keepdims=True)
        return x.astype(np.float32)

    data = rec.data if isinstance(rec.data, da.Array) else da.from_array(rec.values, chunks=(int(2 * fs), -1))
    halo = min(_HALO, max(0, min(data.chunks[0]) - 1))
    f = data.map_overlap(filt, depth={0: halo, 1: 0}, boundary="none", dtype=np.float32, trim=True)
    nb = f.numblocks[0]
    pick = np.unique(np.linspace(0, nb - 1, min(nb, n_cov_chunks)).round().astype(int))
    sample = np.concatenate([f.blocks[int(i)].compute() for i in pick]).astype(np.float64)
    cov = sample.T @ sample / len(sample)
    e, v = np.linalg.eigh(cov)
    w = (v @ np.diag(1.0 / np.sqrt(np.maximum(e, 0) + 1e-6)) @ v.T).astype(np.float32)
    white = f.map_blocks(lambda x: x @ w.T, dtype=np.float32)
    out = xr.DataArray(white, dims=rec.dims, coords=rec.coords, name="traces", attrs=dict(rec.attrs))
    out.attrs["units"] = "whitened"
    out.attrs.pop("gain_to_uV", None)
    return out
