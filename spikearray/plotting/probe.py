"""The probe's contacts with the sorted units at their estimated positions."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from .units import label_colour

__all__ = ["plot_probe"]


def plot_probe(sorting: xr.Dataset, ax: Any = None, *, annotate: bool = True, contact_um: float = 12.0):
    """Contacts (grey squares at ``x``, ``y``) and units (circles at ``unit_x``, ``depth``; area ∝ amplitude,
    colour = label).

    Parameters
    ----------
    sorting : xarray.Dataset
        Sorting Dataset: channel coords ``x``, ``y`` (µm); per unit ``unit_x``, ``depth`` (µm), ``amplitude`` (µV),
        ``label``.
    ax : matplotlib Axes, optional
    annotate : bool
        Write each unit's id beside it.
    contact_um : float
        Drawn contact size, µm.

    Returns
    -------
    matplotlib Axes
    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    x = np.asarray(sorting["x"].values, float)
    y = np.asarray(sorting["y"].values, float)
    if ax is None:
        span = max(1.0, float(np.ptp(y)))
        _, ax = plt.subplots(figsize=(4, min(14, 3 + span / 300)))
    h = contact_um / 2
    ax.add_collection(PatchCollection([Rectangle((a - h, b - h), 2 * h, 2 * h) for a, b in zip(x, y)],
                                      facecolor="0.85", edgecolor="0.55", linewidth=0.5, zorder=1))
    K = sorting.sizes.get("unit", 0)
    labels = sorted(set(map(str, sorting["label"].values))) if K else []
    if K:
        ux = np.asarray(sorting["unit_x"].values, float)
        uy = np.asarray(sorting["depth"].values, float)
        amp = np.asarray(sorting["amplitude"].values, float)
        lab = np.asarray(sorting["label"].values).astype(str)
        size = 20 + 180 * (amp / max(1e-9, np.nanmax(amp)))
        ax.scatter(ux, uy, s=size, c=[label_colour(v) for v in lab], alpha=0.75, edgecolors="k", linewidths=0.4,
                   zorder=3)
        if annotate:
            for u, a, b in zip(sorting["unit"].values, ux, uy):
                ax.annotate(str(int(u)), (a, b), xytext=(6, 0), textcoords="offset points", fontsize=6,
                            va="center", zorder=4)
    handles = [Line2D([], [], marker="s", ls="", color="0.85", markeredgecolor="0.55", label="contact")]
    handles += [Line2D([], [], marker="o", ls="", color=label_colour(v), label=f"{v} unit") for v in labels]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.06), fontsize=7, ncol=3, frameon=False)
    ax.set_xlim(x.min() - 4 * h, x.max() + 4 * h)
    ax.set_ylim(y.min() - 4 * h, y.max() + 4 * h)
    if np.ptp(y) + 8 * h <= 6 * (np.ptp(x) + 8 * h):
        ax.set_aspect("equal", adjustable="box")  # true geometry when the probe is not too tall to read
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("depth y (µm)")
    ax.set_title(f"probe: {len(x)} channels, {K} units (area ∝ amplitude)", fontsize=9)
    return ax
