"""A Sorting Dataset as a SpikeInterface ``SortingAnalyzer``, with spikearray's results already in its extensions.

SpikeInterface's quality metrics and widgets read templates, spike amplitudes and locations from a
``SortingAnalyzer``'s extensions. :func:`to_sorting_analyzer` fills those extensions from the Dataset (nothing is
re-extracted from the raw data except the noise levels, a few seconds of samples), the way SpikeInterface's own
``read_kilosort_as_analyzer`` fills them from a Kilosort folder; that idea is SpikeInterface's, the code is ours.

The analyzer's recording is the sorted file as SpikeInterface reads it (``BinaryRecordingExtractor`` on the
SpikeGLX/raw binary, so a saved analyzer reopens with its recording), restricted to the sorted channels, with
their µV gains and the probe geometry, then high-passed (3rd-order Butterworth, zero phase, the sorting's
``highpass_cutoff``) and median-referenced when the sorting was (``do_CAR``) — the space the templates live in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xarray as xr

from ..errors import OutputError, OutputExistsError, RecordingError
from ..geometry import uV_gains
from ._extras import require

__all__ = ["to_sorting_analyzer", "to_spikeinterface_recording", "unit_sparsity"]

FORMATS = ("memory", "binary_folder", "zarr")


def unit_sparsity(sorting: xr.Dataset, threshold: float = 0.1, radius_um: float = 100.0) -> np.ndarray:
    """Each unit's channels, from its template: the channels near its best channel where the template is large.

    A channel belongs to a unit when it is on the best channel's shank, within ``radius_um`` of it, and the
    unit's template peak-to-peak there is at least ``threshold`` × its largest. (The radius alone is
    SpikeInterface's default sparsity; the threshold drops channels the unit barely reaches.)

    Parameters
    ----------
    sorting : xarray.Dataset
        Sorting Dataset with ``template`` (unit, sample, channel) in µV, ``best_channel``, and channel coords
        ``x``, ``y`` (µm), ``shank``.
    threshold : float
        Fraction of the unit's largest channel peak-to-peak.
    radius_um : float
        Distance from the best channel (µm).

    Returns
    -------
    ndarray of bool, shape (unit, channel)
        The best channel is always included.

    Examples
    --------
    >>> from spikearray.export.analyzer import unit_sparsity
    >>> mask = unit_sparsity(sorting)  # doctest: +SKIP
    >>> mask.sum(axis=1)  # channels per unit  # doctest: +SKIP
    """
    t = np.asarray(sorting["template"].values, np.float32)
    K, C = t.shape[0], t.shape[2]
    ptp = np.ptp(t, axis=1) if t.shape[1] else np.zeros((K, C), np.float32)
    pos = {int(c): i for i, c in enumerate(sorting["channel"].values)}
    if "best_channel" in sorting:
        best = np.array([pos[int(c)] for c in sorting["best_channel"].values], np.int64)
    else:
        best = ptp.argmax(axis=1) if C else np.zeros(K, np.int64)
    x, y = np.asarray(sorting["x"].values, float), np.asarray(sorting["y"].values, float)
    shank = np.asarray(sorting["shank"].values)
    near = (np.hypot(x[None, :] - x[best][:, None], y[None, :] - y[best][:, None]) <= radius_um) & \
        (shank[None, :] == shank[best][:, None])
    mask = near & (ptp > 0) & (ptp >= threshold * ptp.max(axis=1, keepdims=True))
    mask[np.arange(K), best] = True
    return mask


def _dataarray_recording(rec: xr.DataArray, channels: np.ndarray) -> Any:
    from spikeinterface.core import BaseRecording, BaseRecordingSegment

    pos = {int(c): i for i, c in enumerate(rec["channel"].values)}
    cols = np.array([pos[int(c)] for c in channels])
    data = rec.data

    class Segment(BaseRecordingSegment):
        def __init__(self) -> None:
            super().__init__(sampling_frequency=float(rec.attrs["sampling_rate"]),
                             t_start=float(rec.attrs.get("time_start", 0.0)) or None)

        def get_num_samples(self) -> int:
            return int(data.shape[0])

        def get_traces(self, start_frame=None, end_frame=None, channel_indices=None):
            c = cols if channel_indices is None else cols[channel_indices]
            block = data[start_frame:end_frame][:, c]
            return np.asarray(block.compute() if hasattr(block, "compute") else block)

    class DataArrayRecording(BaseRecording):
        """A spikearray recording (lazy DataArray) read by SpikeInterface chunk by chunk."""

        def __init__(self) -> None:
            super().__init__(float(rec.attrs["sampling_rate"]), np.asarray(channels), np.dtype(rec.dtype))
            self._serializability["json"] = False
            self._serializability["pickle"] = False
            self.add_recording_segment(Segment())
            self._kwargs = {}

    return DataArrayRecording()


def to_spikeinterface_recording(recording: xr.DataArray, channels: np.ndarray | None = None, *,
                                highpass_hz: float | None = None, common_reference: bool = False) -> Any:
    """A spikearray recording as a SpikeInterface recording (µV gains, probe), optionally filtered.

    Parameters
    ----------
    recording : xarray.DataArray
        From :func:`spikearray.open_recording` (a file: read by SpikeInterface's ``BinaryRecordingExtractor``,
        serialisable) or any other lazy recording (read through its dask array; not serialisable).
    channels : array of int, optional
        Channel ids (file rows) to keep, in this order; default all of the recording's.
    highpass_hz : float, optional
        Zero-phase 3rd-order Butterworth high-pass cutoff (Hz); None: no filter.
    common_reference : bool
        Subtract the median across channels (after the filter).

    Returns
    -------
    spikeinterface.BaseRecording
        Channel ids = file rows (int); gains = µV per step; locations = (x, y) µm; probe with shank ids and
        contact ids.
    """
    import probeinterface as pi
    import spikeinterface.core as sic

    chans = np.asarray(recording["channel"].values if channels is None else channels, np.int64)
    pos = {int(c): i for i, c in enumerate(recording["channel"].values)}
    missing = [int(c) for c in chans if int(c) not in pos]
    if missing:
        raise RecordingError(f"the recording lacks channels (file rows) {missing[:8]}; pass the recording that was "
                             "sorted.")
    idx = np.array([pos[int(c)] for c in chans])
    a = recording.attrs
    fs = float(a["sampling_rate"])
    gains = uV_gains(recording, np.float64)[idx]
    src = Path(str(a.get("source", "")))
    if a.get("format") in ("spikeglx", "raw") and src.is_file():
        n_file = int(a["n_file_channels"])
        si_rec = sic.BinaryRecordingExtractor(
            file_paths=[str(src)], sampling_frequency=fs, num_channels=n_file, dtype=str(a["dtype_on_disk"]),
            file_offset=int(a.get("offset", 0)), channel_ids=np.arange(n_file), is_filtered=False)
        si_rec = si_rec.select_channels(chans)
    else:
        si_rec = _dataarray_recording(recording, chans)
    si_rec.set_channel_gains(gains)
    si_rec.set_channel_offsets(np.zeros(len(chans)))
    probe = pi.Probe(ndim=2, si_units="um")
    xy = np.stack([recording["x"].values[idx], recording["y"].values[idx]], axis=1).astype(np.float64)
    probe.set_contacts(positions=xy, shapes="square", shape_params={"width": 12.0},
                       shank_ids=np.asarray(recording["shank"].values[idx]).astype(str))
    cid = np.asarray(recording["contact_id"].values[idx]).astype(str) if "contact_id" in recording.coords else None
    if cid is not None and np.all(cid != "") and len(set(cid)) == len(cid):
        probe.set_contact_ids(cid)
    probe.set_device_channel_indices(np.arange(len(chans)))
    si_rec.set_probe(probe)  # in place (SpikeInterface >= 0.105)
    if highpass_hz:
        import spikeinterface.preprocessing as spre

        si_rec = spre.highpass_filter(si_rec, freq_min=float(highpass_hz), filter_order=3, dtype="float32")
        if common_reference:
            si_rec = spre.common_reference(si_rec, reference="global", operator="median")
    return si_rec


def _fill(analyzer: Any, cls: Any, params: dict, data: dict) -> None:
    ext = cls(analyzer)
    ext.params = params
    ext.data = data
    ext.run_info = {"run_completed": True, "runtime_s": 0.0}
    analyzer.extensions[ext.extension_name] = ext
    if analyzer.format != "memory":
        ext.save()


def to_sorting_analyzer(sorting: xr.Dataset | str | os.PathLike, recording: xr.DataArray | str | os.PathLike |
                        None = None, folder: str | os.PathLike | None = None,
                        format: Literal["memory", "binary_folder", "zarr"] = "memory", *, preprocess: bool = True,
                        sparsity_threshold: float = 0.1, sparsity_radius_um: float = 100.0, noise_levels: bool = True,
                        template_std: bool = True,
                        overwrite: bool = False) -> Any:
    """A SpikeInterface ``SortingAnalyzer`` of a sorting, with its templates, amplitudes and locations filled in.

    Parameters
    ----------
    sorting : xarray.Dataset or path
        Sorting Dataset (or an output folder / ``sorting.zarr``; a curated one from :func:`read_phy` works too).
    recording : xarray.DataArray or path, optional
        The sorted recording; default the sorting's ``source`` file.
    folder : path, optional
        Where a ``"binary_folder"`` or ``"zarr"`` analyzer is written (required for those formats; a zarr
        folder gets the suffix ``.zarr`` when it lacks it, as SpikeInterface names it).
    format : {"memory", "binary_folder", "zarr"}
        SpikeInterface's storage. ``"zarr"`` is written with the zarr-python SpikeInterface runs on (it pins
        ``zarr<3``); all three reopen with ``spikeinterface.load_sorting_analyzer(folder)``.
    preprocess : bool
        Attach the recording high-passed and common-referenced like the sorting (the space of its templates);
        False attaches the raw µV recording.
    sparsity_threshold, sparsity_radius_um : float
        Unit sparsity (:func:`unit_sparsity`): channels within ``sparsity_radius_um`` of the best channel whose
        template peak-to-peak is at least ``sparsity_threshold`` of the unit's largest.
    noise_levels : bool
        Also compute SpikeInterface's ``noise_levels`` extension from the recording (random chunks; needed by
        the SNR metric).
    template_std : bool
        Also give the ``templates`` extension its ``std`` operator (SpikeInterface's template widgets draw it),
        estimated by SpikeInterface from the ``random_spikes`` (up to 500 per unit) in the attached recording;
        the ``average`` stays the Dataset's.
    overwrite : bool
        Replace an existing ``folder``.

    Returns
    -------
    spikeinterface.core.SortingAnalyzer
        Unit ids = the Dataset's; channel ids = file rows. Extensions: ``random_spikes`` (SpikeInterface's
        default selection), ``templates`` (``average`` = the Dataset's µV ``template``, dense, ``ms_before`` =
        ``nt0min`` samples; ``std`` see ``template_std``), ``spike_amplitudes`` (the Dataset's
        ``spike_amplitude`` in SpikeInterface's convention: signed µV at the template's extremum on the main
        channel, i.e. ``spike_amplitude × extremum / amplitude``), ``spike_locations`` (``spike_x``,
        ``spike_depth``), ``unit_locations`` (``unit_x``, ``depth``), and ``noise_levels``.

    Raises
    ------
    MissingExtraError
        SpikeInterface is not installed (``pip install 'spikearray[interop]'``).
    OutputError
        Unknown ``format``, or a disk format without ``folder``.
    OutputExistsError
        ``folder`` exists and ``overwrite`` is False.
    RecordingError
        No recording can be found (pass ``recording=``).

    Examples
    --------
    >>> import spikearray as sa
    >>> analyzer = sa.to_sorting_analyzer(sa.open_sorting("DIR"))  # doctest: +SKIP
    >>> metrics = analyzer.compute("quality_metrics").get_data()  # doctest: +SKIP
    """
    require("spikeinterface.core", "interop", "to_sorting_analyzer")
    require("probeinterface", "interop", "to_sorting_analyzer")
    import spikeinterface.core as sic
    from spikeinterface.core.analyzer_extension_core import ComputeTemplates
    from spikeinterface.postprocessing import ComputeSpikeAmplitudes, ComputeSpikeLocations, ComputeUnitLocations

    from ..io.spikeinterface import to_spikeinterface
    from ..settings import Settings

    if format not in FORMATS:
        raise OutputError(f"format={format!r}; expected one of {', '.join(FORMATS)}.")
    if format != "memory" and folder is None:
        raise OutputError(f"format={format!r} writes to disk; pass folder=.")
    if not isinstance(sorting, xr.Dataset):
        from .zarr_store import open_sorting

        sorting = open_sorting(sorting)
    sorting = sorting.load()
    if recording is None:
        src = Path(str(sorting.attrs.get("source", "")))
        if not src.is_file():
            raise RecordingError(f"the sorting's source {str(src)!r} is not a file; pass recording= (the sorted "
                                 "recording, e.g. spikearray.open_recording(path)).")
        recording = src
    if not isinstance(recording, xr.DataArray):
        from ..io import open_recording

        recording = open_recording(recording)
    if float(recording.attrs["sampling_rate"]) != float(sorting.attrs["sampling_rate"]):
        raise RecordingError(f"the recording's rate {recording.attrs['sampling_rate']} Hz differs from the "
                             f"sorting's {sorting.attrs['sampling_rate']} Hz; pass the recording that was sorted.")
    s = Settings.of_sorting(sorting)
    cutoff, car, nt0min = float(s.highpass_cutoff), bool(s.do_CAR), int(s.nt0min_)
    chans = np.asarray(sorting["channel"].values, np.int64)
    si_rec = to_spikeinterface_recording(recording, chans, highpass_hz=cutoff if preprocess else None,
                                         common_reference=car and preprocess)
    si_sorting = to_spikeinterface(sorting)
    unit_ids = si_sorting.unit_ids
    mask = unit_sparsity(sorting, sparsity_threshold, sparsity_radius_um)
    sparsity = sic.ChannelSparsity(mask, unit_ids=unit_ids, channel_ids=si_rec.channel_ids)
    chan_pos = {int(c): i for i, c in enumerate(chans)}
    best = np.array([chan_pos[int(c)] for c in sorting["best_channel"].values], np.int64)
    kw: dict[str, Any] = {}
    if format != "memory":
        folder = Path(folder)
        if format == "zarr" and folder.suffix != ".zarr":
            folder = folder.with_name(folder.name + ".zarr")  # SpikeInterface appends it otherwise
        if folder.exists() and not overwrite:
            raise OutputExistsError(f"{str(folder)!r} exists; pass overwrite=True to replace it.")
        kw = {"folder": str(folder), "overwrite": overwrite}
    analyzer = sic.create_sorting_analyzer(si_sorting, si_rec, format=format, sparse=True, sparsity=sparsity,
                                           main_channel_indices=best, return_in_uV=True, **kw)
    analyzer.compute("random_spikes", seed=0)

    fs = float(sorting.attrs["sampling_rate"])
    nt = int(sorting.sizes["sample"])
    tmpl = np.asarray(sorting["template"].values, np.float32)
    tdata: dict[str, np.ndarray] = {"average": tmpl}
    if template_std:
        from spikeinterface.core.waveform_tools import estimate_templates_with_accumulator

        some = analyzer.get_extension("random_spikes").get_random_spikes()
        _, std = estimate_templates_with_accumulator(si_rec, some, unit_ids, nt0min, nt - nt0min, return_in_uV=True,
                                                     sparsity_mask=mask, return_std=True, n_jobs=1,
                                                     progress_bar=False)
        tdata["std"] = sparsity.densify_templates(std).astype(np.float32)
    _fill(analyzer, ComputeTemplates, {"operators": list(tdata), "ms_before": 1000.0 * nt0min / fs,
                                       "ms_after": 1000.0 * (nt - nt0min) / fs}, tdata)

    vec = analyzer.sorting.to_spike_vector()
    st = np.asarray(sorting["spike_time"].values, np.int64)
    su = np.asarray(sorting["spike_unit"].values, np.int64)
    ids = np.asarray(unit_ids, np.int64)
    by_id = np.argsort(ids, kind="stable")
    uidx = by_id[np.searchsorted(ids[by_id], su)]  # unit index (position in unit_ids) of each spike
    ours = np.lexsort((st, uidx))
    theirs = np.lexsort((vec["sample_index"], vec["unit_index"]))
    if not (np.array_equal(vec["sample_index"][theirs], st[ours])
            and np.array_equal(vec["unit_index"][theirs], uidx[ours])):
        raise OutputError("internal: SpikeInterface's spike vector does not hold the Dataset's spikes.")
    to_vec = np.empty(len(st), np.int64)
    to_vec[theirs] = ours  # spike-vector position -> Dataset spike
    if "spike_amplitude" in sorting:
        K = tmpl.shape[0]
        on_best = tmpl[np.arange(K), :, best]  # (K, nt)
        extremum = on_best[np.arange(K), np.abs(on_best).argmax(axis=1)] if nt else np.zeros(K)
        amp = np.asarray(sorting["amplitude"].values, np.float64)
        factor = np.divide(extremum, amp, out=np.zeros(K), where=amp > 0)
        signed = (np.asarray(sorting["spike_amplitude"].values, np.float64) * factor[uidx]).astype(np.float32)
        _fill(analyzer, ComputeSpikeAmplitudes, {}, {"amplitudes": signed[to_vec]})
    if "spike_x" in sorting and "spike_depth" in sorting:
        locs = np.zeros(len(st), dtype=[("x", "float32"), ("y", "float32")])
        locs["x"] = np.asarray(sorting["spike_x"].values, np.float32)[to_vec]
        locs["y"] = np.asarray(sorting["spike_depth"].values, np.float32)[to_vec]
        _fill(analyzer, ComputeSpikeLocations, ComputeSpikeLocations(analyzer)._set_params(),
              {"spike_locations": locs})
    if "unit_x" in sorting and "depth" in sorting:
        ul = np.stack([sorting["unit_x"].values, sorting["depth"].values], axis=1).astype(np.float64)
        _fill(analyzer, ComputeUnitLocations, {"method": "center_of_mass"}, {"unit_locations": ul})
    if noise_levels:
        analyzer.compute("noise_levels", random_slices_kwargs={"seed": 0})
    return analyzer
