"""Probe geometry and per-channel helpers shared by every stage: positions, shanks, µV gains, distances and
neighbourhoods (one implementation each)."""

from __future__ import annotations

import numpy as np
import xarray as xr

__all__ = ["positions", "shanks", "uV_gains", "nearest_channels", "neighbourhoods", "vertical_pitch",
           "channel_distances"]

# units of recordings whose samples are already in their final scale (no gain applied)
_SCALED_UNITS = ("uV", "whitened")


def positions(rec: xr.DataArray | xr.Dataset) -> np.ndarray:
    """Contact positions ``(n_channels, 2)`` in µm (x, y), in the order of the ``channel`` dim."""
    return np.stack([np.asarray(rec["x"].values, float), np.asarray(rec["y"].values, float)], axis=1)


def shanks(obj: xr.DataArray | xr.Dataset) -> np.ndarray:
    """Shank index of every channel, int64 ``(C,)`` in the order of the ``channel`` dim; all 0 without a
    ``shank`` coordinate (a single-shank probe).

    Examples
    --------
    >>> import xarray as xr
    >>> shanks(xr.DataArray(np.zeros((2, 3)), dims=("time", "channel"))).tolist()
    [0, 0, 0]
    """
    if "shank" in obj.coords:
        return np.asarray(obj["shank"].values).astype(np.int64)
    return np.zeros(obj.sizes["channel"], np.int64)


def uV_gains(rec: xr.DataArray, dtype: type = np.float32) -> np.ndarray:
    """Per-channel factor (shape ``(n_channels,)``, float32 unless ``dtype`` says otherwise) that turns the stored
    samples into µV.

    Recordings in ``"counts"`` are scaled by the ``gain_to_uV`` coordinate (or attr, a number or one per
    channel); recordings already in µV (or whitened units) get 1. The stages multiply float32 blocks; file
    metadata (NWB's ``conversion``) asks for float64.
    """
    if rec.attrs.get("units") in _SCALED_UNITS:
        return np.ones(rec.sizes["channel"], dtype=dtype)
    if "gain_to_uV" in rec.coords:
        g = np.asarray(rec["gain_to_uV"].values, dtype=dtype)
    else:
        g = np.broadcast_to(np.asarray(rec.attrs.get("gain_to_uV", 1.0), dtype=dtype), (rec.sizes["channel"],))
    return np.ascontiguousarray(g, dtype=dtype)


def neighbourhoods(x: np.ndarray, y: np.ndarray, *, k: int | None = None, radius_um: float | None = None,
                   shank: np.ndarray | None = None, exclude: np.ndarray | None = None) -> np.ndarray:
    """Each channel's neighbouring channels in (x, y), nearest first: the ``k`` nearest, or all within
    ``radius_um``.

    Parameters
    ----------
    x, y : ndarray (C,)
        Positions, µm.
    k : int, optional
        The ``k`` nearest usable channels (clipped to their count, and with ``shank`` to the smallest shank's),
        the channel itself first; ties by channel order (local whitening's neighbourhoods).
    radius_um : float, optional
        Instead of ``k``: every channel within this distance, by distance (ties by channel order); rows are
        padded with the channel itself to the longest row (peak-detection neighbourhoods).
    shank : ndarray (C,), optional
        Channels on other shanks are infinitely far.
    exclude : bool ndarray (C,), optional
        Channels never listed as a neighbour; with ``k``, an excluded channel's own row is itself then -1.

    Returns
    -------
    ndarray of int64, shape (C, k) or (C, longest row)

    Examples
    --------
    >>> x, y = np.zeros(4), np.array([0.0, 20.0, 40.0, 60.0])
    >>> neighbourhoods(x, y, k=2).tolist()
    [[0, 1], [1, 0], [2, 1], [3, 2]]
    >>> neighbourhoods(x, y, radius_um=20.0).tolist()
    [[0, 1, 0], [1, 0, 2], [2, 1, 3], [3, 2, 3]]
    """
    if (k is None) == (radius_um is None):
        raise ValueError("neighbourhoods: give exactly one of k (nearest channels) or radius_um.")
    x, y = np.asarray(x, float), np.asarray(y, float)
    c = len(x)
    exclude = np.zeros(c, bool) if exclude is None else np.asarray(exclude, bool)
    keep = np.flatnonzero(~exclude)
    d = np.hypot(x[:, None] - x[None, keep], y[:, None] - y[None, keep])  # (C, n_keep)
    if shank is not None:
        shank = np.asarray(shank)
        d[shank[:, None] != shank[None, keep]] = np.inf
    if k is not None:
        d[keep, np.arange(keep.size)] = -1.0  # self first
        n = keep.size
        if shank is not None and keep.size:
            # never a neighbour from another shank: at most as many as the smallest shank has usable channels
            n = int(np.unique(shank[keep], return_counts=True)[1].min())
        nb = keep[np.argsort(d, axis=1, kind="stable")[:, :min(int(k), n)]]
        nb[exclude] = -1
        nb[exclude, 0] = np.flatnonzero(exclude)
        return nb
    within = d <= radius_um
    m = int(within.sum(1).max()) if c else 0
    out = np.empty((c, m), dtype=np.int64)
    for i in range(c):
        idx = np.flatnonzero(within[i])
        idx = idx[np.argsort(d[i, idx], kind="stable")]
        out[i] = np.concatenate([keep[idx], np.full(m - len(idx), i)])
    return out


def channel_distances(pos: np.ndarray, shank: np.ndarray | None = None) -> np.ndarray:
    """Euclidean distances ``(C, C)`` in µm; channels on different shanks are infinitely far apart."""
    d = np.sqrt(((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1))
    if shank is not None:
        d = np.where(shank[:, None] == shank[None, :], d, np.inf)
    return d


def nearest_channels(pos: np.ndarray, n: int, shank: np.ndarray | None = None) -> np.ndarray:
    """Indices ``(C, n)`` of each channel's ``n`` nearest channels (itself first, ties by channel order), same
    shank preferred: :func:`neighbourhoods` with ``k=n`` for positions ``(C, 2)``."""
    pos = np.asarray(pos, float)
    return neighbourhoods(pos[:, 0], pos[:, 1], k=n, shank=shank)


def vertical_pitch(pos: np.ndarray) -> float:
    """Median difference between sorted unique contact y's (Kilosort4's default ``dmin``); 1 for a single row."""
    ys = np.unique(np.round(pos[:, 1], 3))
    if len(ys) < 2:
        return 1.0
    return float(np.median(np.diff(ys)))
