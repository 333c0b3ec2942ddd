"""Turn the matched spikes into the Sorting Dataset (see ``docs/outputs.md``): merges, duplicate removal,
µV templates and amplitudes, positions, firing rates, contamination and labels."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import xarray as xr

from .._version import __version__
from ..clustering.merge import (_unit_members, absorb_fragments, ccg_merge, drift_merge, redundant_units,
                               remove_duplicates, same_waveform_merge)
from ..geometry import positions, shanks
from ..outputs import empty_variable, sorting_dataset
from ..settings import Settings
from .units import ptp_best, refractory_labels, spike_positions, unit_positions, unwhiten_templates

__all__ = ["build_sorting", "empty_sorting"]


#: Units with at most this many spikes after the merges are dropped (see build_sorting).
MIN_UNIT_SPIKES = 10


def _displacement(drift: xr.Dataset | None) -> xr.DataArray:
    """The drift estimate as stored in a sorting: block centres as ``block_depth`` (``depth`` is per unit), and
    on a multi-shank probe each block's shank as ``block_shank`` (every shank has its own estimate)."""
    if drift is not None and "displacement" in drift:
        d = drift["displacement"].astype(np.float32)
        d = d.drop_vars([c for c in d.coords if c not in ("time", "depth", "block_shank")])
        return d.rename({"depth": "block_depth"}) if "depth" in d.coords else d
    return xr.DataArray(np.zeros((1, 1), np.float32), dims=("time", "block"),
                        coords={"time": [0.0], "block_depth": ("block", [0.0])})


def _spike_displacement(drift: xr.Dataset, spike_time: np.ndarray, spike_template: np.ndarray,
                        templates: np.ndarray, pos: np.ndarray, shank: np.ndarray, sampling_rate: float,
                        time_start: float) -> np.ndarray:
    """The drift estimate (µm) at each spike's time and at the depth of its template's peak channel, from the
    blocks of that channel's shank (0 on a shank without blocks)."""
    from ..drift.evaluate import displacement_at

    out = np.zeros(len(spike_time))
    peak = (templates.astype(np.float64) ** 2).sum(2).argmax(1)
    has_blocks = (set(np.asarray(drift["block_shank"].values).tolist()) if "block_shank" in drift.coords
                  else None)
    for j, idx in _unit_members(spike_template, len(templates)).items():
        sh = int(shank[peak[j]])
        if len(idx) == 0 or (has_blocks is not None and sh not in has_blocks):
            continue
        times = spike_time[idx] / sampling_rate + time_start
        out[idx] = displacement_at(drift, times, pos[peak[j], 1:2],
                                   shank=sh if has_blocks is not None else None)[:, 0]
    return out


def _drift_spikes(drift: xr.Dataset | None) -> dict[str, Any]:
    """The spikes the drift estimate used (uncorrected depths), for drift maps in reports."""
    out = {}
    if drift is not None and "spike_time" in drift:
        for src, dst in (("spike_time", "drift_spike_time"), ("spike_depth", "drift_spike_depth"),
                         ("spike_amplitude", "drift_spike_amplitude")):
            if src in drift:
                out[dst] = np.asarray(drift[src].values)
    return out


def _channel_coords(white: xr.DataArray) -> dict[str, Any]:
    out = {"channel": white["channel"].values, "channel_out": white["channel"].values}
    for k in ("x", "y", "shank", "contact_id"):
        if k in white.coords:
            out[k] = white[k].values
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
    """A valid Sorting Dataset with 0 units and 0 spikes (a recording with no spikes).

    Every variable of :data:`spikearray.outputs.OUTPUTS` that a sorting always has (plus ``spike_pc`` and
    ``unit_pc_channel``) is present with length 0 along ``spike`` and ``unit`` and the table's dtype and attrs.
    """
    sizes = {"sample": nt, "channel": white.sizes["channel"], "pc": n_pcs, "nearest": n_near}
    names = ("spike_time", "spike_unit", "spike_amplitude", "spike_x", "spike_depth", "spike_pc", "template",
             "template_whitened", "best_channel", "unit_x", "depth", "amplitude", "firing_rate", "n_spikes",
             "contamination", "label", "unit_pc_channel")
    data: dict[str, Any] = {n: empty_variable(n, sizes) for n in names}
    data.update(whitening_matrix=whitening.values, displacement=_displacement(drift), **_drift_spikes(drift))
    return sorting_dataset(data, {"unit": np.zeros(0, np.int64), **_channel_coords(white)},
                           {**_base_attrs(recording, settings, timings), "n_units_good": 0})


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
        disp = _spike_displacement(drift, t, k, tmean, pos, shanks(white), fs,
                                   float(white.attrs.get("time_start", 0.0)))
        t, unit, parent2 = drift_merge(t, unit, tmean, bin_samples=int(s.batch_size), spike_displacement=disp)
        parent = parent2[parent]
    t, unit, parent3 = absorb_fragments(t, unit, tmean, sampling_rate=fs, acg_threshold=s.acg_threshold)
    parent = parent3[parent]
    t, unit, parent4 = same_waveform_merge(t, unit, k, feat, tchan, sampling_rate=fs, acg_threshold=s.acg_threshold,
                                           positions=pos)
    parent = parent4[parent]
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
    gone = redundant_units(t, unit, K, delta=int(round(0.4e-3 * fs)),
                           norms=np.linalg.norm(tmean.reshape(K, -1), axis=1))
    keep = ~gone[unit]
    t, unit, k, scale, feat = t[keep], unit[keep], k[keep], scale[keep], feat[keep]
    order = np.lexsort((unit, t))
    t, unit, k, scale, feat = t[order], unit[order], k[order], scale[order], feat[order]
    keep = remove_duplicates(t, unit, s.duplicate_spike_bins(fs))
    t, unit, k, scale, feat = t[keep], unit[keep], k[keep], scale[keep], feat[keep]
    ok = (t >= 0) & (t < recording.sizes["time"])
    t, unit, k, scale, feat = t[ok], unit[ok], k[ok], scale[ok], feat[ok]
    # a unit needs more than MIN_UNIT_SPIKES spikes to be one: with fewer, its template is a few noisy waveforms
    # spread over the whole probe and its refractory test cannot run (Kilosort4's is_ref needs > 10 spikes).
    # On a four-shank test recording the only two such units held 1 and 2 spikes, both false positives.
    ok = np.bincount(unit, minlength=K)[unit] > MIN_UNIT_SPIKES
    t, unit, k, scale, feat = t[ok], unit[ok], k[ok], scale[ok], feat[ok]
    if len(t) == 0:
        return empty_sorting(recording, white, whitening, drift, s, timings, nt, P, nC)

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
    data = {
        "spike_time": t,
        "spike_unit": u,
        "spike_amplitude": scale * amp_uV[u],
        "spike_x": spos[:, 0],
        "spike_depth": spos[:, 1],
        "spike_pc": np.ascontiguousarray(feat.transpose(0, 2, 1), np.float32),
        "template": t_uV,
        "template_whitened": tw,
        "best_channel": chan_ids[best],
        "unit_x": upos[:, 0],
        "depth": upos[:, 1],
        "amplitude": amp_uV,
        "firing_rate": counts / duration,
        "n_spikes": counts,
        "contamination": contam,
        "label": label,
        "unit_pc_channel": tchan[survivors],
        "whitening_matrix": W,
        "displacement": _displacement(drift),
        **_drift_spikes(drift),
    }
    return sorting_dataset(data, {"unit": np.arange(n_units, dtype=np.int64), **_channel_coords(white)},
                           {**_base_attrs(recording, s, timings), "n_units_good": int((label == "good").sum())})
