"""Key numbers of a saved sorting (``spikearray info DIR``); :func:`spikearray.io.summary.format_summary` prints
them, as it does a recording's."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xarray as xr

from .zarr_store import STORE_NAME

__all__ = ["is_sorting_path", "sorting_summary"]


def is_sorting_path(path: str | os.PathLike) -> bool:
    """True for an output folder holding ``sorting.zarr`` or for a ``*.zarr`` store folder."""
    p = Path(path)
    return p.is_dir() and (p.suffix == ".zarr" or (p / STORE_NAME).is_dir())


def sorting_summary(ds: xr.Dataset) -> dict:
    """Key numbers of a Sorting Dataset: units per label, spikes, duration, amplitude and rate ranges."""
    labels = ds["label"].values.astype(str) if "label" in ds else np.array(["?"] * ds.sizes.get("unit", 0))
    out = {
        "units": int(ds.sizes.get("unit", 0)),
        "units_by_label": {k: int((labels == k).sum()) for k in sorted(set(labels.tolist()))},
        "spikes": int(ds.sizes.get("spike", 0)),
        "duration_s": float(ds.attrs.get("duration_s", float("nan"))),
        "sampling_rate": float(ds.attrs.get("sampling_rate", float("nan"))),
        "channels": int(ds.sizes.get("channel", 0)),
        "source": str(ds.attrs.get("source", "")),
        "spikearray_version": str(ds.attrs.get("spikearray_version", "")),
    }
    for var in ("firing_rate", "amplitude", "contamination"):
        if var in ds and ds.sizes.get("unit", 0):
            v = np.asarray(ds[var].values, dtype=float)
            out[f"{var}_median"] = float(np.nanmedian(v)) if np.isfinite(v).any() else float("nan")
    return out
