"""``estimate``: drift of the tissue along the probe, per batch and depth block, from a preprocessed recording."""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

from .._compute import resolve_device
from ..errors import RecordingError
from ..geometry import shanks as channel_shanks
from ..settings import Settings
from .peaks import detect_peaks
from .registration import block_layout, register

__all__ = ["estimate", "batch_edges"]


def batch_edges(n_samples: int, batch_size: int) -> np.ndarray:
    """Sample boundaries of Kilosort4's batches ``[b·NT, (b+1)·NT)``; a last batch shorter than a tenth of
    ``batch_size`` is merged into the one before (too few spikes to register on its own)."""
    edges = list(range(0, n_samples, batch_size)) + [n_samples]
    if len(edges) > 2 and edges[-1] - edges[-2] < batch_size // 10:
        del edges[-2]
    return np.asarray(edges, dtype=np.int64)


def _empty_spikes() -> dict:
    return {
        "spike_time": ("spike", np.zeros(0, np.int64)),
        "spike_channel": ("spike", np.zeros(0, np.int64)),
        "spike_shank": ("spike", np.zeros(0, np.int64)),
        "spike_depth": ("spike", np.zeros(0, np.float32)),
        "spike_x": ("spike", np.zeros(0, np.float32)),
        "spike_amplitude": ("spike", np.zeros(0, np.float32)),
    }


def estimate(rec: xr.DataArray, settings: Settings | dict | None = None) -> xr.Dataset:
    """Estimate the displacement of the tissue relative to the probe along ``y``.

    Per chunk (lazy, in parallel): negative peaks of the whitened data above ``drift_threshold``, localised
    by a centre of mass (:func:`spikearray.drift.detect_peaks`). Then one global step per shank: per-batch
    depth × log-amplitude fingerprints registered against each other (pairwise cross-correlations solved by
    robust least squares and refined iteratively; see :mod:`spikearray.drift.registration`). ``nblocks = 1``
    gives one rigid trace, ``nblocks > 1`` ``2·nblocks − 1`` half-overlapping blocks per shank, ``nblocks = 0``
    no estimate (zeros, one block, and no spike detection).

    Probes with several shanks: each shank is estimated on its own spikes (a shank's blocks carry its
    ``block_shank`` coordinate); :func:`spikearray.drift.correct` moves each shank's channels by its own blocks.

    Parameters
    ----------
    rec : xarray.DataArray, (time, channel) float32
        The preprocessed recording (high-passed, common-referenced, whitened; noise SD ≈ 1) with channel coords
        ``x``, ``y`` (µm) and ``shank``; attr ``sampling_rate``.
    settings : Settings or dict, optional
        Reads ``nblocks``, ``batch_size`` (samples per time bin of the estimate), ``binning_depth`` (µm),
        ``drift_smoothing`` (Gaussian sigmas along shift, batch and block), ``drift_threshold``, ``device`` and
        ``torch_threads``. Deterministic: no random choices are made.

    Returns
    -------
    xarray.Dataset
        ``displacement`` (time, block) float32 µm: positive when units move towards larger ``y``; zero-mean
        over time per block (the reference is the mean position). Coords ``time`` (s, batch centres,
        including the recording's ``time_start``), ``depth`` (block; µm, block centres), ``block_shank``.
        The detected spikes, dim ``spike``: ``spike_time`` (samples), ``spike_channel`` (positional),
        ``spike_shank``, ``spike_depth`` and ``spike_x`` (µm, where seen, uncorrected), ``spike_amplitude``
        (whitened units). Attrs: ``nblocks``, ``batch_size``, ``binning_depth``, ``drift_threshold``,
        ``sampling_rate``, ``n_samples``, ``time_start``, ``shanks`` (how shanks were handled), ``settings``
        (JSON).

    Examples
    --------
    >>> import spikearray as sa
    >>> from spikearray.synthetic import generate_recording
    >>> rec, truth = generate_recording(duration=4.0, n_channels=16, n_units=4, seed=1)
    >>> white = ((rec - rec.mean("time")) / 25.0).astype("float32")   # crude stand-in for preprocess
    >>> drift = sa.drift.estimate(white, {"batch_size": 30000})
    >>> drift["displacement"].dims
    ('time', 'block')
    """
    s = Settings.coerce(settings)
    if rec.dims != ("time", "channel"):
        raise RecordingError(f"drift.estimate expects dims ('time', 'channel'); got {rec.dims}.")
    fs = float(rec.attrs["sampling_rate"])
    n = int(rec.sizes["time"])
    t_start = float(rec.attrs.get("time_start", 0.0))
    edges = batch_edges(n, int(s.batch_size))
    T = len(edges) - 1
    t_centres = (edges[:-1] + edges[1:]) / 2.0
    cy = np.asarray(rec["y"].values, dtype=np.float64)
    shank = channel_shanks(rec)
    shanks = np.unique(shank)
    attrs = {
        "nblocks": int(s.nblocks), "batch_size": int(s.batch_size), "binning_depth": float(s.binning_depth),
        "drift_threshold": float(s.drift_threshold), "sampling_rate": fs, "n_samples": n, "time_start": t_start,
        "shanks": "estimated per shank" if len(shanks) > 1 else "single shank",
        "settings": s.to_json(), "units": "um",
    }
    coords_t = {"time": ("time", t_start + t_centres / fs)}
    if s.nblocks == 0:
        disp = np.zeros((T, 1), np.float32)
        ds = xr.Dataset({"displacement": (("time", "block"), disp), **_empty_spikes()},
                        coords={**coords_t, "depth": ("block", [float(np.mean(cy))]), "block_shank": ("block", [int(shanks[0])])},
                        attrs={**attrs, "drift_correction": "off"})
        return _annotate(ds)

    spikes = detect_peaks(rec, threshold=float(s.drift_threshold), device=s.device, torch_threads_=s.torch_threads)
    dev = resolve_device(s.device)
    blocks, depths, shank_of = [], [], []
    for sh in shanks:
        ys = cy[shank == sh]
        lay = block_layout(ys.min(), ys.max(), float(s.binning_depth), int(s.nblocks))
        sel = spikes["spike_shank"].values == sh
        p = register(spikes["spike_time"].values[sel], spikes["spike_depth"].values[sel].astype(np.float64),
                     spikes["spike_amplitude"].values[sel].astype(np.float64), batch_edges=edges,
                     t_centres=t_centres, lay=lay, threshold=float(s.drift_threshold),
                     smoothing=tuple(s.drift_smoothing), device=dev)
        blocks.append(p)
        depths.append(lay.centres)
        shank_of.append(np.full(len(lay.centres), sh))
    disp = np.concatenate(blocks, axis=1).astype(np.float32)
    ds = xr.Dataset({"displacement": (("time", "block"), disp), **{k: spikes[k] for k in spikes.data_vars}},
                    coords={**coords_t, "depth": ("block", np.concatenate(depths)),
                            "block_shank": ("block", np.concatenate(shank_of).astype(np.int64))},
                    attrs={**attrs, "drift_correction": "rigid" if s.nblocks == 1 else "nonrigid"})
    return _annotate(ds)


def _annotate(ds: xr.Dataset) -> xr.Dataset:
    ds["displacement"].attrs.update(units="um", long_name="tissue displacement along y (towards larger y > 0)")
    ds["time"].attrs["units"] = "s"
    ds["depth"].attrs["units"] = "um"
    ds.attrs["settings"] = json.dumps(json.loads(ds.attrs["settings"]), sort_keys=True)
    return ds
