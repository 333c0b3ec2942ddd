"""Drift figures: the drift map (spike depth over time coloured by amplitude) and the displacement traces."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..drift.evaluate import displacement_at

__all__ = ["plot_drift_map", "plot_displacement"]


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(10, 5))
    return ax


def plot_drift_map(drift_or_spikes: xr.Dataset, ax=None, *, corrected: bool = False, max_spikes: int = 200_000,
                   min_amplitude: float | None = None, cmap: str = "viridis_r", s: float = 1.0, seed: int = 0):
    """Spike raster of depth against time, coloured by amplitude (Kilosort's drift map).

    Parameters
    ----------
    drift_or_spikes : xarray.Dataset
        The output of :func:`spikearray.drift.estimate` (or :func:`spikearray.drift.detect_peaks`): variables
        ``spike_time`` (samples), ``spike_depth`` (µm), ``spike_amplitude``; attr ``sampling_rate``.
    ax : matplotlib Axes, optional
    corrected : bool
        Plot each spike at its registered depth (its depth minus the estimated displacement there), i.e. the
        drift map after correction. Needs ``displacement`` in the Dataset.
    max_spikes : int
        Plot at most this many spikes (a fixed-seed random subset; the largest-amplitude ones are kept first).
    min_amplitude : float, optional
        Hide spikes below this amplitude.
    cmap, s : str, float
        Colour map and marker size.
    seed : int
        Seed of the subset.

    Returns
    -------
    matplotlib Axes
    """
    ax = _axes(ax)
    ds = drift_or_spikes
    fs = float(ds.attrs["sampling_rate"])
    t0 = float(ds.attrs.get("time_start", 0.0))
    t = np.asarray(ds["spike_time"].values, np.float64) / fs + t0
    y = np.asarray(ds["spike_depth"].values, np.float64)
    a = np.asarray(ds["spike_amplitude"].values, np.float64)
    if corrected:
        if "displacement" not in ds:
            raise ValueError("corrected=True needs the 'displacement' of drift.estimate in the Dataset.")
        shank = np.asarray(ds["spike_shank"].values) if "spike_shank" in ds else np.zeros(len(t), int)
        for sh in np.unique(shank):
            m = shank == sh
            # Displacement at each spike's own time and depth (diagonal of the time × depth evaluation).
            y[m] -= _at_points(ds, t[m], y[m], int(sh))
    keep = np.ones(len(t), bool) if min_amplitude is None else a >= min_amplitude
    idx = np.flatnonzero(keep)
    if len(idx) > max_spikes:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(idx, max_spikes, replace=False))
    order = idx[np.argsort(a[idx], kind="stable")]  # large amplitudes drawn last, on top
    lo, hi = (np.percentile(a[order], [5, 99]) if len(order) else (0.0, 1.0))
    sc = ax.scatter(t[order], y[order], c=np.clip(a[order], lo, hi), s=s, cmap=cmap, linewidths=0, rasterized=True)
    ax.figure.colorbar(sc, ax=ax, label="amplitude (whitened units)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("registered depth (µm)" if corrected else "depth (µm)")
    ax.set_title("drift map, after correction" if corrected else "drift map")
    return ax


def _at_points(ds: xr.Dataset, t: np.ndarray, y: np.ndarray, shank: int) -> np.ndarray:
    out = np.empty(len(t))
    step = 4096
    for i in range(0, len(t), step):
        sl = slice(i, i + step)
        out[sl] = np.diagonal(displacement_at(ds, t[sl], y[sl], shank=shank))
    return out


def plot_displacement(drift: xr.Dataset, ax=None, *, cmap: str = "coolwarm"):
    """Displacement of each depth block over time (µm; positive: tissue moves towards larger y).

    Parameters
    ----------
    drift : xarray.Dataset
        Output of :func:`spikearray.drift.estimate`.
    ax : matplotlib Axes, optional

    Returns
    -------
    matplotlib Axes
    """
    import matplotlib.pyplot as plt

    ax = _axes(ax)
    d = drift["displacement"]
    t = np.asarray(drift["time"].values)
    depths = np.asarray(drift["depth"].values)
    colours = plt.get_cmap(cmap)(np.linspace(0, 1, max(1, len(depths))))
    shanks = np.asarray(drift["block_shank"].values) if "block_shank" in drift.coords else np.zeros(len(depths), int)
    for k in range(d.sizes["block"]):
        label = f"{depths[k]:.0f} µm" + (f" (shank {shanks[k]})" if len(np.unique(shanks)) > 1 else "")
        ax.plot(t, d.values[:, k], color=colours[k], label=label)
    ax.axhline(0.0, color="0.7", lw=0.5)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("displacement (µm)")
    ax.set_title("estimated drift per depth block")
    ax.legend(title="block centre", fontsize="small", loc="best")
    return ax
