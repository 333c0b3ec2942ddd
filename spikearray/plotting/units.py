"""Unit figures of a Sorting Dataset: template waveforms laid out on the probe, auto-correlograms, a paged grid."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import xarray as xr

from ..metrics.refractory import correlogram

__all__ = ["unit_channels", "plot_unit_waveform", "plot_acg", "plot_unit_grid", "LABEL_COLOURS"]

#: Colour of each label in every unit figure of the report.
LABEL_COLOURS = {"good": "#1b9e77", "mua": "#d95f02"}
_OTHER = "#7570b3"


def label_colour(label: str) -> str:
    """Colour used for a unit label (``good``, ``mua``; anything else, e.g. Phy's ``noise``, shares one colour)."""
    return LABEL_COLOURS.get(str(label), _OTHER)


def unit_channels(sorting: xr.Dataset, unit: int, *, n: int = 12) -> np.ndarray:
    """Positions (into the ``channel`` dim) of the ``n`` channels nearest the unit's best channel, same shank.

    Parameters
    ----------
    sorting : xarray.Dataset
        Sorting Dataset (needs ``best_channel`` and the channel coords ``x``, ``y``; ``shank`` if present).
    unit : int
        Unit id (a value of the ``unit`` coordinate).
    n : int
        Number of channels.

    Returns
    -------
    ndarray of int, (min(n, n_channels_on_shank),)
        Sorted by depth, then x.
    """
    chans = np.asarray(sorting["channel"].values)
    x = np.asarray(sorting["x"].values, float)
    y = np.asarray(sorting["y"].values, float)
    best = int(sorting["best_channel"].sel(unit=unit).values)
    b = int(np.flatnonzero(chans == best)[0])
    d = np.hypot(x - x[b], y - y[b])
    if "shank" in sorting.coords:
        shank = np.asarray(sorting["shank"].values)
        d = np.where(shank == shank[b], d, np.inf)
    order = np.argsort(d, kind="stable")
    keep = order[: min(n, int(np.isfinite(d).sum()))]
    return keep[np.lexsort((x[keep], y[keep]))]


def _pitch(v: np.ndarray, default: float) -> float:
    u = np.unique(np.round(v, 3))
    return float(np.min(np.diff(u))) if u.size > 1 else default


def plot_unit_waveform(sorting: xr.Dataset, unit: int, ax: Any = None, *, channels: np.ndarray | None = None,
                       spikes: np.ndarray | None = None, colour: str | None = None, scale_uV: float | None = None,
                       title: bool = True):
    """Template (µV) of one unit on the channels around its best one, drawn at the contacts' positions.

    Each channel's trace sits at the contact's (x, y): time runs left to right across ~80 % of the lateral
    pitch, voltage is scaled so the largest peak-to-peak spans ~1.8 vertical pitches (a scale bar gives µV).

    Parameters
    ----------
    sorting : xarray.Dataset
        Sorting Dataset (``template`` (unit, sample, channel) µV, ``best_channel``, channel coords ``x``, ``y``).
    unit : int
        Unit id.
    ax : matplotlib Axes, optional
    channels : ndarray of int, optional
        Channel positions to draw (default :func:`unit_channels`).
    spikes : ndarray, (n_spikes, n_sample, len(channels)) µV, optional
        Individual spikes on the same channels and time window, drawn thin and grey under the template.
    colour : str, optional
        Template colour (default: the label's colour).
    scale_uV : float, optional
        Length of the vertical scale bar, µV (default: a round number near half the template's peak-to-peak).
    title : bool
        Put the unit's id, label, amplitude and rate in the title.

    Returns
    -------
    matplotlib Axes
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(3, 4))
    if channels is None:
        channels = unit_channels(sorting, unit)
    tpl = np.asarray(sorting["template"].sel(unit=unit).values, float)[:, channels]  # (sample, nch)
    x = np.asarray(sorting["x"].values, float)[channels]
    y = np.asarray(sorting["y"].values, float)[channels]
    px, py = _pitch(x, 32.0), _pitch(y, 20.0)
    width = 0.8 * px if np.unique(x).size > 1 else 40.0
    ptp = float(np.ptp(tpl, axis=0).max()) or 1.0
    gain = 1.8 * py / ptp  # µm of plot per µV
    ns = tpl.shape[0]
    tt = np.linspace(-width / 2, width / 2, ns)
    label = str(sorting["label"].sel(unit=unit).values) if "label" in sorting else ""
    colour = colour or label_colour(label)
    if spikes is not None and len(spikes):
        sp = np.asarray(spikes, float)
        for c in range(len(channels)):
            xs = np.broadcast_to(x[c] + tt, (sp.shape[0], ns)).T
            ax.plot(xs, y[c] + gain * sp[:, :, c].T, color="0.6", lw=0.3, alpha=0.35, zorder=1)
    for c in range(len(channels)):
        ax.plot(x[c] + tt, y[c] + gain * tpl[:, c], color=colour, lw=1.2, zorder=3)
    # scale bar: a round µV value near half the peak-to-peak, and 1 ms
    if scale_uV is None:
        raw = ptp / 2
        mag = 10 ** np.floor(np.log10(raw)) if raw > 0 else 1.0
        scale_uV = float(min((1, 2, 5, 10), key=lambda m: abs(m * mag - raw)) * mag)
    fs = float(sorting.attrs.get("sampling_rate", 30000.0))
    ms = width / ns * fs / 1000.0  # plot units per ms
    x0, y0 = x.min() - width / 2 - 0.15 * px, y.min() - py
    ax.plot([x0, x0], [y0, y0 + gain * scale_uV], color="k", lw=1.5, zorder=4)
    ax.plot([x0, x0 + ms], [y0, y0], color="k", lw=1.5, zorder=4)
    ax.text(x0 - 0.05 * px, y0 + gain * scale_uV / 2, f"{scale_uV:g} µV", ha="right", va="center", fontsize=6)
    ax.text(x0 + ms / 2, y0 - 0.1 * py, "1 ms", ha="center", va="top", fontsize=6)
    ax.set_xlim(x0 - 0.6 * px, x.max() + width / 2 + 0.1 * px)
    ax.set_ylim(y0 - 0.6 * py, y.max() + 1.2 * py)
    ax.set_axis_off()
    if title:
        amp = float(sorting["amplitude"].sel(unit=unit).values) if "amplitude" in sorting else np.nan
        rate = float(sorting["firing_rate"].sel(unit=unit).values) if "firing_rate" in sorting else np.nan
        best = int(sorting["best_channel"].sel(unit=unit).values)
        ax.set_title(f"unit {unit} · {label}\n{amp:.0f} µV · {rate:.1f} Hz · ch {best}", fontsize=7, color=colour)
    return ax


def plot_acg(sorting: xr.Dataset, unit: int, ax: Any = None, *, window_ms: float = 50.0, bin_ms: float = 1.0,
             refractory_ms: float = 1.5, colour: str | None = None):
    """Auto-correlogram of one unit as a rate (Hz), ±``window_ms``, the refractory window shaded.

    Counts from :func:`spikearray.metrics.refractory.correlogram` (the self-pairs at lag 0 are removed) divided
    by ``n_spikes × bin`` give the unit's firing rate conditional on a spike at lag 0.

    Parameters
    ----------
    sorting : xarray.Dataset
        Sorting Dataset (``spike_time`` samples, ``spike_unit``, attr ``sampling_rate``).
    unit : int
    ax : matplotlib Axes, optional
    window_ms, bin_ms, refractory_ms : float
        Half width, bin width and the shaded refractory half width, ms.
    colour : str, optional

    Returns
    -------
    matplotlib Axes
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(3, 1.2))
    fs = float(sorting.attrs["sampling_rate"])
    su = np.asarray(sorting["spike_unit"].values)
    t = np.asarray(sorting["spike_time"].values)[su == unit] / fs
    nb = int(round(window_ms / bin_ms))
    k = correlogram(t, t, tbin=bin_ms / 1000.0, nbins=nb).astype(float)
    k[nb] = max(0.0, k[nb] - len(t))  # each spike paired with itself
    rate = k / max(1, len(t)) / (bin_ms / 1000.0)
    lags = (np.arange(2 * nb + 1) - nb) * bin_ms
    if colour is None:
        colour = label_colour(str(sorting["label"].sel(unit=unit).values)) if "label" in sorting else "k"
    ax.axvspan(-refractory_ms, refractory_ms, color="0.85", zorder=0)
    ax.bar(lags, rate, width=bin_ms, color=colour, linewidth=0, zorder=2)
    ax.set_xlim(-window_ms, window_ms)
    ax.tick_params(labelsize=6)
    ax.set_xlabel("lag (ms)", fontsize=6, labelpad=1)
    ax.set_ylabel("Hz", fontsize=6, labelpad=1)
    if "contamination" in sorting:
        c = float(sorting["contamination"].sel(unit=unit).values)
        ax.text(0.99, 0.97, f"R12 {c:.2f}", transform=ax.transAxes, ha="right", va="top", fontsize=6)
    return ax


def plot_unit_grid(sorting: xr.Dataset, units: Sequence[int], *, spikes: Mapping[int, np.ndarray] | None = None,
                   channels: Mapping[int, np.ndarray] | None = None, ncols: int = 4, n_channels: int = 12):
    """A page of units: for each, the template on its channels (with sampled spikes if given) above its ACG.

    Parameters
    ----------
    sorting : xarray.Dataset
    units : sequence of int
        Unit ids, in reading order.
    spikes : mapping unit -> ndarray (n, n_sample, n_chan) µV, optional
        Sampled spikes per unit on ``channels[unit]`` (see :func:`spikearray.report.sample_spike_waveforms`).
    channels : mapping unit -> ndarray of int, optional
        Channel positions per unit (default :func:`unit_channels`).
    ncols : int
    n_channels : int
        Channels per unit when ``channels`` is not given.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure
    from matplotlib.gridspec import GridSpec

    units = list(units)
    nrows = max(1, -(-len(units) // ncols))
    fig = Figure(figsize=(3.0 * ncols, 4.6 * nrows))
    gs = GridSpec(2 * nrows, ncols, figure=fig, height_ratios=[3.4, 1.0] * nrows, hspace=0.45, wspace=0.25,
                  left=0.03, right=0.99, top=1 - 0.15 / nrows, bottom=0.04 / nrows)
    for i, u in enumerate(units):
        r, c = divmod(i, ncols)
        chans = channels[u] if channels is not None and u in channels else unit_channels(sorting, u, n=n_channels)
        plot_unit_waveform(sorting, u, fig.add_subplot(gs[2 * r, c]), channels=chans,
                           spikes=None if spikes is None else spikes.get(u))
        plot_acg(sorting, u, fig.add_subplot(gs[2 * r + 1, c]))
    return fig
