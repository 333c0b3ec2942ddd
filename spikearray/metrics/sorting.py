"""Turn the matched spikes into the Sorting Dataset (see ``docs/outputs.md``): merges, duplicate removal,
µV templates and amplitudes, positions, firing rates, contamination and labels."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import xarray as xr

from .._version import __version__
from ..clustering.merge import absorb_fragments, ccg_merge, drift_merge, redundant_units, remove_duplicates
from ..geometry import positions
from ..settings import Settings
from .units import ptp_best, refractory_labels, spike_positions, unit_positions, unwhiten_templates

__all__ = ["build_sorting", "empty_sorting"]


def _displacement(drift: xr.Dataset | None) -> xr.DataArray:
    """The drift estimate as stored in a sorting: block centres as ``block_depth`` (``depth`` is per unit)."""
    if drift is not None and "displacement" in drift:
        d = drift["displacement"].astype(np.float32)
        d = d.drop_vars([c for c in d.coords if c not in ("time", "depth")])
        return d.rename({"depth": "block_depth"}) if "depth" in d.coords else d
    return xr.DataArray(np.zeros((1, 1), np.float32), dims=("time", "block"),
                        coords={"time": [0.0], "block_depth": ("block", [0.0])})


def _drift_spikes(drift: xr.Dataset | None) -> dict[str, Any]:
    """The spikes the drift estimate used (uncorrected depths), for drift maps in reports."""
    out = {}
    if drift is not None and "spike_time" in drift:
        for src, dst in (("spike_time", "drift_spike_time"), ("spike_depth", "drift_spike_depth"),
                         ("spike_amplitude", "drift_spike_amplitude")):
            if src in drift:
                out[dst] = ("drift_spike", np.asarray(drift[src].values))
    return out


def _channel_coords(white: xr.DataArray) -> dict[str, Any]:
    out = {"channel": ("channel", white["channel"].values)}
    for k in ("x", "y", "shank", "contact_id"):
        if k in white.coords:
            out[k] = ("channel", white[k].values)
    return out


def _base_attrs(recording: xr.DataArray, settings: Settings, timings: dict[str, float]) -> dict[str, Any]:
    fs = float(recording.attrs["sampling_rate"])
    n = int(recording.sizes["time"])
    gain = recording.attrs.get("gain_to_uV", 1.0)
    return {
        "spikearray_version": __version__,
        "settings": settings.to_json(),
        "source": str(recording.attrs.get("source", "")),
        "sampling_rate": fs,
        "n_samples": n,
        "duration_s": n / fs,
        "time_start": float(recording.attrs.get("time_start", 0.0)),
        "dtype_on_disk": str(recording.attrs.get("dtype_on_disk", recording.dtype)),
        "n_file_channels": int(recording.attrs.get("n_file_channels", recording.sizes["channel"])),
        "offset": int(recording.attrs.get("offset", 0)),
        "gain_to_uV": gain if isinstance(gain, (int, float, list)) else float(gain),
        "timings": json.dumps({k: round(v, 3) for k, v in timings.items()}),
    }


def empty_sorting(recording: xr.DataArray, white: xr.DataArray, whitening: xr.DataArray, drift: xr.Dataset | None,
                  settings: Settings, timings: dict[str, float], nt: int, n_pcs: int, n_near: int) -> xr.Dataset:
    """A valid Sorting Dataset with 0 units and 0 spikes (a recording with no spikes)."""
    C = white.sizes["channel"]
    ds = xr.Dataset(
        {
            "spike_time": ("spike", np.zeros(0, np.int64)),
            "spike_unit": ("spike", np.zeros(0, np.int64)),
            "spike_amplitude": ("spike", np.zeros(0, np.float32)),
            "spike_x": ("spike", np.zeros(0, np.float32)),
            "spike_depth": ("spike", np.zeros(0, np.float32)),
            "spike_pc": (("spike", "pc", "nearest"), np.zeros((0, n_pcs, n_near), np.float32)),
            "template": (("unit", "sample", "channel"), np.zeros((0, nt, C), np.float32)),
            "template_whitened": (("unit", "sample", "channel"), np.zeros((0, nt, C), np.float32)),
            "best_channel": ("unit", np.zeros(0, np.int64)),
            "unit_x": ("unit", np.zeros(0)),
            "depth": ("unit", np.zeros(0)),
            "amplitude": ("unit", np.zeros(0, np.float32)),
            "firing_rate": ("unit", np.zeros(0)),
            "n_spikes": ("unit", np.zeros(0, np.int64)),
            "contamination": ("unit", np.zeros(0)),
            "label": ("unit", np.zeros(0, dtype="<U4")),
            "unit_pc_channel": (("unit", "nearest"), np.zeros((0, n_near), np.int64)),
            "whitening_matrix": (("channel", "channel_out"), whitening.values.astype(np.float32)),
            "displacement": _displacement(drift),
            **_drift_spikes(drift),
        },
        coords={"unit": np.zeros(0, np.int64), **_channel_coords(white),
                "channel_out": ("channel_out", white["channel"].values)},
        attrs={**_base_attrs(recording, settings, timings), "n_units_good": 0},
    )
    return ds


def build_sorting(matched: xr.Dataset, *, recording: xr.DataArray, white: xr.DataArray, whitening: xr.DataArray,
                  drift: xr.Dataset | None, settings: Settings, timings: dict[str, float]) -> xr.Dataset:
    """Merge, deduplicate and measure matched spikes; return the Sorting Dataset.

    Parameters
    ----------
    matched : xarray.Dataset
        From :func:`spikearray.matching.match`.
    recording : xarray.DataArray
        The raw recording (for attrs: source, dtype, rate, duration).
    white : xarray.DataArray
        The whitened recording (channel coords).
    whitening : xarray.DataArray (channel, channel_out)
    drift : xarray.Dataset or None
    settings : Settings
    timings : dict
        Stage → seconds, stored as a JSON attr.
    """
    s = settings
    fs = float(recording.attrs["sampling_rate"])
    pos = positions(white)
    W = whitening.values
    t = matched["spike_time"].values
    k = matched["spike_template"].values
    scale = matched["spike_scale"].values
    feat = matched["spike_features"].values  # (n, nC, P)
    tchan = matched["template_channels"].values  # (K, nC)
    tmean = matched["template_mean"].values  # (K, C, nt) whitened
    K = tmean.shape[0]
    nt = tmean.shape[2]
    P = feat.shape[2]
    nC = tchan.shape[1] if K else min(s.nearest_chans, len(pos))
    if len(t) == 0:
        return empty_sorting(recording, white, whitening, drift, s, timings, nt, P, nC)

    t, unit, parent = ccg_merge(t, k, tmean, sampling_rate=fs, acg_threshold=s.acg_threshold,
                                ccg_threshold=s.ccg_threshold)
    if drift is not None:
        t, unit, parent2 = drift_merge(t, unit, tmean, bin_samples=int(s.batch_size))
        parent = parent2[parent]
    t, unit, parent3 = absorb_fragments(t, unit, tmean, sampling_rate=fs, acg_threshold=s.acg_threshold)
    parent = parent3[parent]
    # merged spikes keep their features on their original template's channels: move them onto the survivor's
    moved = unit != k
    if moved.any():
        src = tchan[k[moved]]  # (m, nC)
        dst = tchan[unit[moved]]
        match_ = src[:, None, :] == dst[:, :, None]  # (m, nC_dst, nC_src)
        has = match_.any(2)
        idx = match_.argmax(2)
        f = feat[moved]
        feat[moved] = np.where(has[:, :, None], np.take_along_axis(f, idx[:, :, None], 1), 0.0)
    gone = redundant_units(t, unit, K, delta=int(round(0.4e-3 * fs)))
    keep = ~gone[unit]
    t, unit, k, scale, feat = t[keep], unit[keep], k[keep], scale[keep], feat[keep]
    order = np.lexsort((unit, t))
    t, unit, k, scale, feat = t[order], unit[order], k[order], scale[order], feat[order]
    keep = remove_duplicates(t, unit, s.duplicate_spike_bins(fs))
    t, unit, k, scale, feat = t[keep], unit[keep], k[keep], scale[keep], feat[keep]
    ok = (t >= 0) & (t < recording.sizes["time"])
    t, unit, k, scale, feat = t[ok], unit[ok], k[ok], scale[ok], feat[ok]

    survivors = np.unique(unit)
    relabel = -np.ones(K, np.int64)
    relabel[survivors] = np.arange(len(survivors))
    u = relabel[unit]
    n_units = len(survivors)
    counts = np.bincount(u, minlength=n_units)
    # whitened template of a merged unit: spike-count-weighted mean of its members' matched means
    tw = np.zeros((n_units, nt, tmean.shape[1]), np.float64)
    wsum = np.zeros(n_units)
    orig_counts = np.bincount(k, minlength=K)
    for j in range(K):
        dst = relabel[parent[j]]
        if dst < 0 or orig_counts[j] == 0:
            continue
        tw[dst] += orig_counts[j] * tmean[j].T
        wsum[dst] += orig_counts[j]
    tw = (tw / np.maximum(wsum, 1)[:, None, None]).astype(np.float32)
    t_uV = unwhiten_templates(tw, W)
    best, amp_uV = ptp_best(t_uV)
    upos = unit_positions(t_uV, pos, best, s.position_limit)
    spos = spike_positions(feat, tchan[survivors][u], pos, s.position_limit)
    contam, label = refractory_labels(t, u, n_units, fs, s.acg_threshold)
    duration = recording.sizes["time"] / fs
    chan_ids = white["channel"].values
    ds = xr.Dataset(
        {
            "spike_time": ("spike", t.astype(np.int64)),
            "spike_unit": ("spike", u.astype(np.int64)),
            "spike_amplitude": ("spike", (scale * amp_uV[u]).astype(np.float32)),
            "spike_x": ("spike", spos[:, 0]),
            "spike_depth": ("spike", spos[:, 1]),
            "spike_pc": (("spike", "pc", "nearest"), np.ascontiguousarray(feat.transpose(0, 2, 1), np.float32)),
            "template": (("unit", "sample", "channel"), t_uV),
            "template_whitened": (("unit", "sample", "channel"), tw),
            "best_channel": ("unit", chan_ids[best].astype(np.int64)),
            "unit_x": ("unit", upos[:, 0]),
            "depth": ("unit", upos[:, 1]),
            "amplitude": ("unit", amp_uV),
            "firing_rate": ("unit", counts / duration),
            "n_spikes": ("unit", counts.astype(np.int64)),
            "contamination": ("unit", contam),
            "label": ("unit", label),
            "unit_pc_channel": (("unit", "nearest"), tchan[survivors].astype(np.int64)),
            "whitening_matrix": (("channel", "channel_out"), W.astype(np.float32)),
            "displacement": _displacement(drift),
            **_drift_spikes(drift),
        },
        coords={"unit": np.arange(n_units, dtype=np.int64), **_channel_coords(white),
                "channel_out": ("channel_out", chan_ids)},
        attrs={**_base_attrs(recording, s, timings), "n_units_good": int((label == "good").sum())},
    )
    ds["spike_amplitude"].attrs["units"] = "uV"
    ds["template"].attrs["units"] = "uV"
    ds["amplitude"].attrs["units"] = "uV"
    ds["firing_rate"].attrs["units"] = "Hz"
    ds["spike_depth"].attrs["units"] = "um"
    ds["depth"].attrs["units"] = "um"
    ds["contamination"].attrs["description"] = "Kilosort4 R12: refractory-window rate / baseline rate of the ACG"
    return ds
