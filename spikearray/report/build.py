"""``write_report``: the figures and the static HTML page of one sorting, written atomically to ``DIR/report``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..export._atomic import atomic_dir
from .page import Figure, Section, json_compact, render_page, units_table
from .waveforms import RecordingUnavailable, sample_spike_waveforms, window_reader

__all__ = ["write_report", "UNITS_PER_PAGE"]

#: Units drawn per waveform-grid image (4 columns × 4 rows).
UNITS_PER_PAGE = 16


class _Progress:
    """Stage lines like ``sort()``'s (``[spikearray] report: …``) when enabled; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[spikearray] report: {msg} ({time.perf_counter() - self.t0:.1f} s)", flush=True)


def _save(fig: Any, folder: Path, name: str, dpi: int = 110) -> str:
    fig.savefig(folder / name, dpi=dpi)
    fig.clear()
    return name


def _changed_settings(sorting: xr.Dataset) -> str:
    from ..settings import PARAMETERS, Settings

    try:
        s = Settings.from_json(sorting.attrs.get("settings", "{}"))
    except Exception:  # an unreadable settings attr must not stop the report
        return "unknown"
    d = s.to_dict()
    default = Settings().to_dict()
    changed = [f"{p.name}={d[p.name]!r}" for p in PARAMETERS if d[p.name] != default[p.name]]
    return ", ".join(changed) or "all defaults"


def _summary(sorting: xr.Dataset) -> dict[str, str]:
    a = sorting.attrs
    K = sorting.sizes.get("unit", 0)
    lab = np.asarray(sorting["label"].values).astype(str) if K else np.array([], str)
    out = {
        "recording": str(a.get("source", "") or "(in memory)"),
        "duration": f"{float(a.get('duration_s', 0.0)):.1f} s at {float(a.get('sampling_rate', 0.0)):.0f} Hz",
        "channels": f"{sorting.sizes.get('channel', 0)} sorted",
        "units": f"{K} (" + ", ".join(f"{int((lab == v).sum())} {v}" for v in
                                      ["good", "mua"] + sorted(set(lab.tolist()) - {"good", "mua"})) + ")",
        "spikes": f"{sorting.sizes.get('spike', 0)}",
        "settings changed": _changed_settings(sorting),
        "spikearray": str(a.get("spikearray_version", "")),
    }
    if a.get("timings"):
        out["stage timings"] = json_compact(a["timings"])
    if a.get("phy_folder"):
        redone = a.get("templates_recomputed", [])
        out["curation"] = (f"read back from the Phy folder {a['phy_folder']} (labels from cluster_group.tsv; "
                           f"templates of {len(redone)} merged/split units recomputed from the recording)")
    return out


def write_report(out_dir: str | os.PathLike, *, sorting: xr.Dataset | None = None, recording: Any = None,
                 progress: bool = False, n_waveforms: int = 50, n_channels: int = 12,
                 curated: bool = False) -> Path:
    """Write ``out_dir/report/index.html`` and its PNG figures: a picture of one sorting that opens from disk.

    Figures: probe layout with unit positions; drift maps before and after correction with the displacement
    of each block (when drift correction ran); all spikes by depth coloured by µV amplitude; pages of unit
    templates (µV, on the channels around the best one, over ~``n_waveforms`` sampled raw spikes when the
    recording can be read) with their auto-correlograms; histograms of firing rate, amplitude and contamination
    (good vs mua); and a table of the units. The folder is built under a temporary name and renamed into place,
    replacing an earlier report.

    Parameters
    ----------
    out_dir : path
        The sorting's output folder (``sort(..., output=out_dir)``); the report goes to ``out_dir/report``.
    sorting : xarray.Dataset, optional
        The Sorting Dataset; default ``spikearray.open_sorting(out_dir)``.
    recording : xarray.DataArray or path, optional
        The sorted recording, for the sampled spikes; default the sorting's ``source`` attr. When it cannot be
        read the templates are drawn alone and the page says why.
    progress : bool
        Print a line per step and a progress bar over units.
    n_waveforms : int
        Raw spikes sampled per unit.
    n_channels : int
        Channels drawn around each unit's best channel.
    curated : bool
        Draw the Phy-curated sorting instead: ``sorting`` defaults to ``spikearray.read_phy(out_dir/"phy")``
        (merges, splits and Phy's labels, noise units included and labelled) and the page goes to
        ``out_dir/report-curated`` so the sorter's own report stays.

    Returns
    -------
    Path
        ``out_dir/report/index.html`` (``out_dir/report-curated/index.html`` when ``curated``).

    Raises
    ------
    OutputError
        ``out_dir`` holds no sorting (when ``sorting`` is not given).
    """
    # matplotlib Figure objects draw with Agg whatever pyplot's backend is: no display needed
    from matplotlib.figure import Figure as MplFigure

    from ..export import open_sorting
    from ..plotting.probe import plot_probe
    from ..plotting.raster import has_drift, plot_raster, plot_sorting_drift
    from ..plotting.summary import plot_unit_histograms
    from ..plotting.units import plot_unit_grid, unit_channels

    out_dir = Path(out_dir)
    say = _Progress(progress)
    name = "report-curated" if curated else "report"
    if sorting is None and curated:
        from ..export import read_phy

        sorting = read_phy(out_dir / "phy", recording=recording if recording is not None else "auto")
    if sorting is None:
        sorting = open_sorting(out_dir)
    # every variable the figures use is small next to the raw data: read it once
    sorting = sorting.load()
    K = sorting.sizes.get("unit", 0)
    sections: list[Section] = []
    with atomic_dir(out_dir / name, overwrite=True, what="report") as tmp:
        # --- probe
        fig = MplFigure(figsize=(5, 9), layout="constrained")
        plot_probe(sorting, fig.add_subplot())
        sections.append(Section("probe", "Probe and units", [Figure(
            _save(fig, tmp, "probe.png"), "probe layout with unit positions",
            "Contacts (grey) and each unit at its estimated position (template centre of mass; x = unit_x, "
            "y = depth). Circle area is proportional to the unit's amplitude (µV); colour is its label.")]))
        say("probe")
        # --- drift
        sec = Section("drift", "Drift")
        if has_drift(sorting):
            fig = plot_sorting_drift(sorting)
            sec.figures.append(Figure(_save(fig, tmp, "drift.png"), "drift maps before and after correction",
                                      "Top: the spikes used for the drift estimate at their detected depths. "
                                      "Middle: the same spikes moved by the estimated displacement at their "
                                      "time and depth. Bottom: the displacement of each depth block (µm)."))
        else:
            sec.notes.append("Drift correction did not run for this sorting (nblocks = 0, or no drift spikes "
                             "were kept), so there is no before/after drift map.")
        say("drift maps")
        fig = MplFigure(figsize=(14, 5.5), layout="constrained")
        plot_raster(sorting, fig.add_subplot())
        sec.figures.append(Figure(_save(fig, tmp, "raster.png"), "spike raster by depth",
                                  "Every sorted spike at its time and estimated depth"
                                  + (" (drift-corrected coordinates)" if has_drift(sorting) else "")
                                  + ", coloured by its amplitude in µV (colour range clipped to the 5th–99th "
                                  "percentile)."))
        sections.append(sec)
        say("raster")
        # --- units
        sec = Section("units", "Units: waveforms and auto-correlograms")
        order = [int(u) for u in sorting["unit"].values[np.argsort(-np.asarray(sorting["depth"].values),
                                                                    kind="stable")]] if K else []
        chans = {u: unit_channels(sorting, u, n=n_channels) for u in order}
        spikes = None
        if K:
            try:
                reader = window_reader(sorting, recording)
                spikes = sample_spike_waveforms(sorting, reader, chans, n_per_unit=n_waveforms, progress=progress)
                sec.notes.append(f"Grey: up to {n_waveforms} randomly sampled spikes per unit read from the raw "
                                 "recording, high-passed (300 Hz, 3rd-order Butterworth, zero phase) on short "
                                 "windows; no common reference or drift correction, so they scatter more than "
                                 "the template.")
            except (RecordingUnavailable, OSError) as e:
                sec.notes.append(f"Templates are drawn without the spread of sampled spikes: the raw recording "
                                 f"could not be read ({e}). Pass recording= to write_report (or --recording) to "
                                 "add them.")
            say("sampled spikes" if spikes is not None else "no raw recording")
        else:
            sec.notes.append("The sorting has no units.")
        pages = [order[i:i + UNITS_PER_PAGE] for i in range(0, len(order), UNITS_PER_PAGE)]
        it = enumerate(pages, 1)
        if progress and len(pages) > 1:
            from tqdm.auto import tqdm

            it = tqdm(it, total=len(pages), desc="report: unit pages", unit="page")
        for p, units in it:
            fig = plot_unit_grid(sorting, units, spikes=spikes, channels=chans)
            sec.figures.append(Figure(
                _save(fig, tmp, f"units_{p:03d}.png", dpi=90), f"unit waveforms and ACGs, page {p}",
                f"Units {', '.join(map(str, units))} (largest depth y first, as on the probe figure). Each: "
                f"template (mean waveform, µV) on the "
                f"{n_channels} channels nearest its best channel, drawn at the contacts' positions, scale bars "
                "µV and 1 ms; below, the auto-correlogram (Hz, 1 ms bins, ±50 ms; grey band ±1.5 ms) with the "
                "contamination R12."))
        sections.append(sec)
        say(f"{len(pages)} unit pages")
        # --- population
        fig = plot_unit_histograms(sorting)
        sections.append(Section("population", "Population", [Figure(
            _save(fig, tmp, "histograms.png"), "histograms of firing rate, amplitude and contamination",
            "Firing rate (n_spikes / recording duration), template peak-to-peak amplitude on the best channel "
            "(µV) and contamination (Kilosort4's refractory ratio R12), stacked by label; the dashed line is "
            "the acg_threshold a good unit must stay under.")]))
        say("histograms")
        sections.append(Section("table", "Units table", html_blocks=[units_table(sorting)]))
        title = f"spikearray {'curated ' if curated else ''}sorting report: {out_dir.resolve().name}"
        (tmp / "index.html").write_text(render_page(title, _summary(sorting), sections), encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps({"figures": [f.src for s in sections for f in s.figures],
                                                     "n_units": K, "sampled_spikes": spikes is not None}))
    say(f"written to {out_dir / name / 'index.html'}")
    return out_dir / name / "index.html"
