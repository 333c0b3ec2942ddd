"""Spike rasters of a Sorting Dataset by depth, and its drift maps before / after correction.

Both reuse :func:`spikearray.plotting.drift.plot_drift_map` / :func:`~spikearray.plotting.drift.plot_displacement`
through small Dataset views with the variable names those functions read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from .drift import plot_displacement, plot_drift_map

__all__ = ["plot_raster", "plot_sorting_drift", "drift_view", "has_drift"]


def has_drift(sorting: xr.Dataset) -> bool:
    """Whether drift correction ran (the Dataset keeps the drift spikes and a displacement)."""
    return "drift_spike_time" in sorting and "displacement" in sorting and sorting.sizes.get("drift_spike", 0) > 0


def drift_view(sorting: xr.Dataset) -> xr.Dataset:
    """The drift spikes and displacement of a sorting, named as :func:`spikearray.drift.estimate` names them.

    Returns
    -------
    xarray.Dataset
        ``spike_time`` (samples), ``spike_depth`` (µm, uncorrected), ``spike_amplitude`` (whitened SD) on dim
        ``spike``; ``displacement`` (time, block) µm with coords ``time`` (s) and ``depth`` (block centres, µm);
        attrs ``sampling_rate``, ``time_start``.
    """
    disp = sorting["displacement"]
    view = xr.Dataset(
        {
            "spike_time": ("spike", np.asarray(sorting["drift_spike_time"].values)),
            "spike_depth": ("spike", np.asarray(sorting["drift_spike_depth"].values)),
            "spike_amplitude": ("spike", np.asarray(sorting["drift_spike_amplitude"].values)),
            "displacement": (("time", "block"), np.asarray(disp.values)),
        },
        coords={"time": np.asarray(sorting["time"].values), "depth": ("block", _block_depths(sorting))},
    )
    view.attrs = {"sampling_rate": float(sorting.attrs["sampling_rate"]),
                  "time_start": float(sorting.attrs.get("time_start", 0.0))}
    return view


def _block_depths(sorting: xr.Dataset) -> np.ndarray:
    if "block_depth" in sorting.coords:
        return np.asarray(sorting["block_depth"].values, float)
    # a single block without a recorded centre: the middle of the probe
    return np.full(sorting.sizes["block"], float(np.mean(sorting["y"].values)))


def plot_raster(sorting: xr.Dataset, ax: Any = None, *, max_spikes: int = 200_000, s: float = 2.0):
    """Every sorted spike at its time and (drift-corrected) depth, coloured by its amplitude in µV.

    Parameters
    ----------
    sorting : xarray.Dataset
        Sorting Dataset: ``spike_time`` (samples), ``spike_depth`` (µm), ``spike_amplitude`` (µV).
    ax : matplotlib Axes, optional
    max_spikes : int
        Plot at most this many (a fixed-seed subset).
    s : float
        Marker size.

    Returns
    -------
    matplotlib Axes
    """
    view = xr.Dataset({k: ("spike", np.asarray(sorting[k].values))
                       for k in ("spike_time", "spike_depth", "spike_amplitude")},
                      attrs={"sampling_rate": float(sorting.attrs["sampling_rate"]),
                             "time_start": float(sorting.attrs.get("time_start", 0.0))})
    ax = plot_drift_map(view, ax, max_spikes=max_spikes, s=s)
    ax.collections[-1].colorbar.set_label("spike amplitude (µV)")
    corrected = has_drift(sorting)
    ax.set_ylabel("depth, drift-corrected (µm)" if corrected else "depth (µm)")
    ax.set_title(f"sorted spikes by depth ({sorting.sizes['spike']} spikes, {sorting.sizes['unit']} units)")
    _probe_limits(sorting, ax)
    return ax


def _probe_limits(sorting: xr.Dataset, ax: Any) -> None:
    y = np.asarray(sorting["y"].values, float)
    ax.set_ylim(y.min() - 20, y.max() + 20)
    dur = float(sorting.attrs.get("duration_s", 0.0))
    if dur > 0:
        t0 = float(sorting.attrs.get("time_start", 0.0))
        ax.set_xlim(t0, t0 + dur)


def plot_sorting_drift(sorting: xr.Dataset, *, max_spikes: int = 200_000):
    """Drift map before correction, the same spikes after correction, and the displacement of each block.

    "Before": the spikes the drift estimate used, at their detected depths. "After": the same spikes moved by
    the estimated displacement at their time and depth (what the corrected data shows); a good correction turns
    slanted or wavy bands into horizontal ones.

    Parameters
    ----------
    sorting : xarray.Dataset
        Sorting Dataset with ``drift_spike_time``/``drift_spike_depth``/``drift_spike_amplitude`` and
        ``displacement`` (see :func:`has_drift`).
    max_spikes : int

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    view = drift_view(sorting)
    fig = Figure(figsize=(14, 11), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [2, 2, 1.2]})
    plot_drift_map(view, axes[0], max_spikes=max_spikes, s=2.0)
    axes[0].set_title("drift map before correction (spikes used for the drift estimate, detected depths)")
    axes[0].collections[-1].colorbar.set_label("amplitude (whitened SD)")
    plot_drift_map(view, axes[1], corrected=True, max_spikes=max_spikes, s=2.0)
    axes[1].set_title("after correction (the same spikes, moved by the estimated displacement)")
    axes[1].collections[-1].colorbar.set_label("amplitude (whitened SD)")
    for ax in axes[:2]:
        _probe_limits(sorting, ax)
        ax.set_xlabel("")
    plot_displacement(view, axes[2])
    axes[2].set_title("estimated displacement per depth block (positive: tissue towards larger y)")
    # keep the time axes aligned with the two colour-barred panels above
    fig.colorbar(axes[0].collections[-1], ax=axes[2]).ax.set_visible(False)
    return fig
