"""Accuracy of a drift estimate against a known displacement."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import DataError
from .registration import depth_weights, time_weights

__all__ = ["displacement_at", "rms_error"]


def displacement_at(drift: xr.Dataset, times_s: np.ndarray, depths_um: np.ndarray,
                    shank: int | None = None) -> np.ndarray:
    """The estimate at ``times_s`` (s) × ``depths_um`` (µm): linear in time between batch centres (constant
    beyond the first and last), linear in depth between block centres (extrapolated beyond the outer ones).

    Returns
    -------
    ndarray, (len(times_s), len(depths_um)), µm
    """
    disp = np.asarray(drift["displacement"].values, dtype=np.float64)
    centres = np.asarray(drift["depth"].values, dtype=np.float64)
    if shank is not None and "block_shank" in drift.coords:
        keep = np.asarray(drift["block_shank"].values) == shank
        disp, centres = disp[:, keep], centres[keep]
    k0, k1, f = time_weights(np.asarray(times_s, float), np.asarray(drift["time"].values, float))
    pt = (1.0 - f)[:, None] * disp[k0] + f[:, None] * disp[k1]  # (n_t, n_blocks)
    return pt @ depth_weights(np.asarray(depths_um, float), centres).T


def rms_error(drift: xr.Dataset, truth: np.ndarray, *, times_s: np.ndarray, unit_depths_um: np.ndarray,
              allow_sign_flip: bool = False) -> float:
    """RMS error (µm) between an estimate and the true displacement of units, after removing one constant offset.

    Parameters
    ----------
    drift : xarray.Dataset
        Output of :func:`spikearray.drift.estimate`.
    truth : ndarray, (n_times, n_units), µm
        True displacement of each unit (positive towards larger y) at ``times_s``.
    times_s : ndarray, (n_times,)
        Seconds (same clock as ``drift["time"]``).
    unit_depths_um : ndarray, (n_units,)
        Rest depth of each unit.
    allow_sign_flip : bool
        Also try ``-truth`` and keep the smaller error (for truths that give probe motion instead).

    Returns
    -------
    float
    """
    truth = np.asarray(truth, dtype=np.float64)
    times_s = np.asarray(times_s, dtype=np.float64)
    unit_depths_um = np.asarray(unit_depths_um, dtype=np.float64)
    if truth.shape != (len(times_s), len(unit_depths_um)):
        raise DataError(f"truth has shape {truth.shape}; expected (n_times, n_units) = "
                        f"({len(times_s)}, {len(unit_depths_um)}).")
    est = displacement_at(drift, times_s, unit_depths_um)
    best = np.inf
    for sign in ((1.0, -1.0) if allow_sign_flip else (1.0,)):
        e = est - sign * truth
        best = min(best, float(np.sqrt(np.mean((e - e.mean()) ** 2))))
    return best
