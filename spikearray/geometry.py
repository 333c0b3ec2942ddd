"""Probe geometry helpers shared by detection, clustering, matching and metrics."""

from __future__ import annotations

import numpy as np
import xarray as xr

__all__ = ["positions", "nearest_channels", "vertical_pitch", "channel_distances"]


def positions(rec: xr.DataArray | xr.Dataset) -> np.ndarray:
    """Contact positions ``(n_channels, 2)`` in µm (x, y), in the order of the ``channel`` dim."""
    return np.stack([np.asarray(rec["x"].values, float), np.asarray(rec["y"].values, float)], axis=1)


def channel_distances(pos: np.ndarray, shank: np.ndarray | None = None) -> np.ndarray:
    """Euclidean distances ``(C, C)`` in µm; channels on different shanks are infinitely far apart."""
    d = np.sqrt(((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1))
    if shank is not None:
        d = np.where(shank[:, None] == shank[None, :], d, np.inf)
    return d


def nearest_channels(pos: np.ndarray, n: int, shank: np.ndarray | None = None) -> np.ndarray:
    """Indices ``(C, n)`` of each channel's ``n`` nearest channels (itself first), same shank preferred."""
    d = channel_distances(pos, shank)
    n = min(n, len(pos))
    order = np.argsort(d + np.arange(len(pos))[None, :] * 1e-9, axis=1, kind="stable")
    return order[:, :n]


def vertical_pitch(pos: np.ndarray) -> float:
    """Median difference between sorted unique contact y's (Kilosort4's default ``dmin``); 1 for a single row."""
    ys = np.unique(np.round(pos[:, 1], 3))
    if len(ys) < 2:
        return 1.0
    return float(np.median(np.diff(ys)))
