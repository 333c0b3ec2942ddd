"""Traces offset by channel depth, with a µV scale bar."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from ..errors import RecordingError

__all__ = ["plot_traces"]


def plot_traces(rec: xr.DataArray, start: float, stop: float, *, channels: Any = None, ax: Any = None,
                scale: float | None = None, color: str = "k", linewidth: float = 0.5):
    """Plot ``rec`` between ``start`` and ``stop`` seconds, one line per channel at its depth ``y``.

    Only that window is computed. Counts are shown in µV; whitened traces in noise SDs.

    Parameters
    ----------
    rec : xarray.DataArray, dims (time, channel)
    start, stop : float
        Seconds (in the recording's time coordinate).
    channels : sequence of channel ids, optional
        Default all.
    ax : matplotlib Axes, optional
        Drawn into; a new figure otherwise.
    scale : float, optional
        Data units per µm of depth. Default: the gap between neighbouring depths holds ~8 noise SDs.

    Returns
    -------
    matplotlib.figure.Figure
        One ``Line2D`` per channel (label = channel id) plus the scale bar (a line labelled ``"scale bar"``).
    """
    import matplotlib.pyplot as plt

    if stop <= start:
        raise RecordingError(f"plot_traces: stop={stop!r} <= start={start!r}; expected a positive window (s).")
    win = rec.sa.seconds(start, stop)
    if channels is not None:
        win = win.sel(channel=list(np.atleast_1d(channels)))
    if win.sizes["time"] == 0:
        raise RecordingError(f"plot_traces: no samples between {start} and {stop} s.")
    units = win.attrs.get("units", "counts")
    data = win.sa.to_uV() if units == "counts" else win
    values = np.asarray(data.values, dtype=np.float32)
    unit_label = "µV" if units in ("counts", "uV") else ("noise SD" if units == "whitened" else units)
    fs = float(rec.attrs["sampling_rate"])
    t0 = float(rec.attrs.get("time_start", 0.0))
    t = t0 + (np.arange(values.shape[0]) + max(0, int(round((start - t0) * fs)))) / fs
    y = np.asarray(win["y"].values, dtype=float) if "y" in win.coords else np.arange(values.shape[1], dtype=float)
    uniq = np.unique(y)
    pitch = float(np.median(np.diff(uniq))) if uniq.size > 1 else 20.0
    # channels sharing a depth (NP1/NP2 columns) are spread evenly within the row, ordered by x
    x = np.asarray(win["x"].values, dtype=float) if "x" in win.coords else np.zeros_like(y)
    base = y.copy()
    for depth in uniq:
        same = np.flatnonzero(y == depth)
        if same.size > 1:
            base[same[np.argsort(x[same], kind="stable")]] += pitch * np.arange(same.size) / same.size
    centred = values - np.median(values, axis=0)
    noise = float(np.median(np.median(np.abs(centred), axis=0))) / 0.6745 or 1.0
    if scale is None:
        n_per_row = max(1, int(np.max(np.unique(y, return_counts=True)[1])))
        scale = 8.0 * noise * n_per_row / pitch  # data units per µm: ~8 noise SDs between neighbouring lines
    if ax is None:
        fig, ax = plt.subplots(figsize=(10, 6))
    else:
        fig = ax.figure
    ids = win["channel"].values
    for k in range(values.shape[1]):
        ax.plot(t, base[k] + centred[:, k] / scale, color=color, lw=linewidth, label=str(ids[k]))
    # scale bar: a round number of data units, about two channel pitches tall
    target = 2 * pitch * scale
    decade = float(10 ** np.floor(np.log10(target)))
    bar = max(m * decade for m in (1, 2, 5) if m * decade <= target)
    x0 = t[-1] + 0.01 * (t[-1] - t[0] + 1.0 / fs)
    ax.plot([x0, x0], [base.min(), base.min() + bar / scale], color="C3", lw=2.5, label="scale bar",
            solid_capstyle="butt")
    ax.text(x0, base.min() + 0.5 * bar / scale, f" {bar:g} {unit_label}", color="C3", va="center", ha="left")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("depth y (µm)")
    ax.set_title(f"{rec.attrs.get('probe', '')} {start:g}–{stop:g} s ({unit_label})".strip())
    ax.margins(x=0.08)
    return fig
