"""Human and machine summaries of a recording or a sorting (``spikearray info``).

:func:`summary` gives a recording's key facts as a dict (``spikearray.export.summary.sorting_summary`` does the
same for a sorting); :func:`format_summary` turns either into aligned ``label  value`` lines.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import xarray as xr

from .._format import format_bytes
from ..geometry import shanks, uV_gains

__all__ = ["summary", "format_summary", "text_table"]


def summary(rec: xr.DataArray) -> dict[str, Any]:
    """Key facts of a recording as a JSON-serialisable dict.

    Parameters
    ----------
    rec : xarray.DataArray
        A recording from :func:`open_recording`.

    Returns
    -------
    dict
        ``source``, ``probe``, ``n_channels``, ``n_shanks``, ``sampling_rate`` (Hz), ``n_samples``,
        ``duration_s``, ``dtype``, ``size_bytes``, ``uV_per_bit`` (min/max), ``x_um``/``y_um`` extents,
        ``chunk_seconds``.
    """
    fs = float(rec.attrs["sampling_rate"])
    n = int(rec.sizes["time"])
    gains = uV_gains(rec).astype(float)
    chunks = rec.chunks[0] if rec.chunks else (n,)
    return {
        "source": rec.attrs.get("source", ""),
        "format": rec.attrs.get("format", ""),
        "probe": rec.attrs.get("probe", ""),
        "n_channels": int(rec.sizes["channel"]),
        "n_shanks": int(len(np.unique(shanks(rec)))),
        "sampling_rate": fs,
        "n_samples": n,
        "duration_s": n / fs,
        "dtype": str(rec.dtype),
        "units": rec.attrs.get("units", ""),
        "size_bytes": int(n * rec.sizes["channel"] * rec.dtype.itemsize),
        "uV_per_bit": [float(gains.min()), float(gains.max())],
        "x_um": [float(rec["x"].min()), float(rec["x"].max())] if "x" in rec.coords else None,
        "y_um": [float(rec["y"].min()), float(rec["y"].max())] if "y" in rec.coords else None,
        "chunk_seconds": float(chunks[0]) / fs,
    }


def _duration(s: float) -> str:
    if s >= 3600:
        return f"{int(s // 3600)} h {int(s % 3600 // 60)} min {s % 60:.1f} s"
    if s >= 60:
        return f"{int(s // 60)} min {s % 60:.1f} s"
    return f"{s:.3f} s"


def text_table(rows: Sequence[Sequence[str]], *, header: Sequence[str] | None = None, right: Iterable[int] = (),
               max_chars: Mapping[int, int] | None = None) -> str:
    """Plain-text table: columns two spaces apart, each as wide as its widest cell, trailing spaces stripped.

    The one formatter behind the recording, sorting and recipe summaries.

    Parameters
    ----------
    rows : sequence of sequences of str
    header : sequence of str, optional
        Column names, printed above a line of dashes.
    right : iterable of int
        Columns right-justified (numbers); the others are left-justified.
    max_chars : dict, optional
        Column → longest cell; longer cells end in ``...``.

    Examples
    --------
    >>> print(text_table([["a", "1"], ["bcd", "22"]], header=["name", "n"], right=[1]))
    name   n
    ----  --
    a      1
    bcd   22
    """
    limit = dict(max_chars or {})
    cut = [[c if i not in limit or len(c) <= limit[i] else c[:limit[i] - 3] + "..." for i, c in enumerate(r)]
           for r in rows]
    lines = ([list(header)] if header is not None else []) + cut
    if not lines:
        return ""
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    if header is not None:
        lines.insert(1, ["-" * w for w in widths])
    right = set(right)
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in lines)


def _lines(rows: list[tuple[str, str]]) -> str:
    """``label  value`` lines, the values aligned two spaces after the longest label (an empty value: the label)."""
    return text_table(rows)


def format_summary(obj: xr.DataArray | xr.Dataset, path: str = "") -> str:
    """A few readable lines about a recording or a sorting.

    Parameters
    ----------
    obj : xarray.DataArray or xarray.Dataset
        A recording (source, probe, channels, rate, duration, size, µV scale, extent) or a Sorting Dataset
        (source, units per label, spikes, medians of rate/amplitude/contamination, version).
    path : str
        Shown as the sorting's location (sortings only).

    Examples
    --------
    >>> from spikearray.synthetic import generate_recording
    >>> rec, _ = generate_recording(duration=1.0, n_channels=8, n_units=1)
    >>> format_summary(rec).splitlines()[0]
    'recording  synthetic(seed=0)'
    """
    if isinstance(obj, xr.Dataset):
        return _format_sorting(obj, path)
    s = summary(obj)
    lo, hi = s["uV_per_bit"]
    scale = f"{lo:.6g} µV/bit" if lo == hi else f"{lo:.6g}–{hi:.6g} µV/bit"
    if s["units"] == "uV":
        scale = "data in µV"
    return _lines([
        ("recording", s["source"] or "(in memory)"),
        ("format", f"{s['format'] or '-'}   probe {s['probe'] or '-'}"),
        ("channels", f"{s['n_channels']} on {s['n_shanks']} shank(s)   x {s['x_um'][0]:.0f}–{s['x_um'][1]:.0f} µm, "
                     f"y {s['y_um'][0]:.0f}–{s['y_um'][1]:.0f} µm"),
        ("rate", f"{s['sampling_rate']:.6g} Hz   duration {_duration(s['duration_s'])} ({s['n_samples']} samples)"),
        ("data", f"{s['dtype']}, {format_bytes(s['size_bytes'])}, {scale}, chunks of {s['chunk_seconds']:.3g} s"),
    ])


def _format_sorting(ds: xr.Dataset, path: str) -> str:
    from ..export.summary import sorting_summary  # export imports io: import here, not at module level

    s = sorting_summary(ds)
    by = ", ".join(f"{n} {k}" for k, n in s["units_by_label"].items()) or "none"
    rows = [
        ("sorting", path),
        ("source", s["source"]),
        ("units", f"{s['units']} ({by})"),
        ("spikes", f"{s['spikes']} over {s['duration_s']:.1f} s at {s['sampling_rate']:g} Hz, {s['channels']} "
                   "channels"),
    ]
    if "firing_rate_median" in s:
        rows.append(("median", f"{s['firing_rate_median']:.2f} Hz, {s.get('amplitude_median', float('nan')):.1f} µV "
                               f"ptp, contamination {s.get('contamination_median', float('nan')):.3f}"))
    if s["spikearray_version"]:
        rows.append(("written by", f"spikearray {s['spikearray_version']}"))
    return _lines(rows)
