"""Population histograms of a sorting: firing rate, µV amplitude and contamination, good vs mua."""

from __future__ import annotations

import numpy as np
import xarray as xr

from .units import label_colour

__all__ = ["plot_unit_histograms"]


def _bins(values: np.ndarray, *, log: bool, n: int = 20, low: float | None = None) -> np.ndarray:
    v = values[np.isfinite(values)]
    if log:
        v = v[v > 0]
    if v.size == 0:
        return np.linspace(0, 1, n + 1)
    lo, hi = float(v.min()), float(v.max())
    if log:
        return np.geomspace(lo / 1.05, hi * 1.05, n + 1)
    if low is not None:  # a quantity with a natural origin (contamination): start the axis there
        lo = min(lo, low)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n + 1)


def plot_unit_histograms(sorting: xr.Dataset, *, acg_threshold: float | None = None):
    """Four panels: firing rate (Hz, log bins), amplitude (µV), contamination (R12), and units per label.

    Histograms are stacked by label (good / mua, and any other label a curated sorting carries).

    Parameters
    ----------
    sorting : xarray.Dataset
        Sorting Dataset with per-unit ``firing_rate``, ``amplitude``, ``contamination``, ``label``.
    acg_threshold : float, optional
        Drawn as a dashed line on the contamination panel (default: the sorting's own setting when recorded).

    Returns
    -------
    matplotlib.figure.Figure
    """
    import json

    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 3.4))
    axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1, 1, 1, 0.6]})
    lab = np.asarray(sorting["label"].values).astype(str) if sorting.sizes.get("unit", 0) else np.array([], str)
    labels = [v for v in ("good", "mua") if v in lab] + sorted(set(lab) - {"good", "mua"})
    if acg_threshold is None:
        try:
            acg_threshold = float(json.loads(sorting.attrs.get("settings", "{}")).get("acg_threshold", 0.2))
        except (ValueError, TypeError):
            acg_threshold = 0.2
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    panels = [("firing_rate", "firing rate (Hz)", True), ("amplitude", "amplitude (µV, template ptp)", False),
              ("contamination", "contamination R12 (fraction)", False)]
    for ax, (name, xlabel, log) in zip(axes, panels):
        vals = np.asarray(sorting[name].values, float) if name in sorting else np.array([], float)
        pos = vals[np.isfinite(vals) & (vals > 0)]
        log = log and pos.size > 1 and pos.max() > 10 * pos.min()  # log bins only over a decade or more
        if name == "contamination":
            # the threshold stays in view, with the distribution from zero
            bins = _bins(np.append(vals, 1.5 * acg_threshold), log=False, low=0.0)
        else:
            bins = _bins(vals, log=log)
        data = [vals[(lab == v) & np.isfinite(vals)] for v in labels]
        if any(len(d) for d in data):
            ax.hist(data, bins=bins, stacked=True, color=[label_colour(v) for v in labels], label=labels)
        else:
            ax.text(0.5, 0.5, "no units", transform=ax.transAxes, ha="center", va="center")
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if name == "contamination":
            ax.axvline(acg_threshold, color="k", ls="--", lw=1)
            ax.text(acg_threshold, 1.0, f" acg_threshold {acg_threshold:g}", transform=ax.get_xaxis_transform(),
                    fontsize=7, va="top")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("units")
    if labels:
        axes[0].legend(fontsize=8)
    counts = [int((lab == v).sum()) for v in labels]
    bars = axes[3].bar(labels, counts, color=[label_colour(v) for v in labels])
    axes[3].bar_label(bars, fontsize=8)
    axes[3].set_ylabel("units")
    axes[3].set_title("units per label", fontsize=9)
    fig.tight_layout()
    return fig
