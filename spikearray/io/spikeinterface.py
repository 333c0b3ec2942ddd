"""SpikeInterface interop: any SpikeInterface recording as a lazy DataArray, a sorting as a ``BaseSorting``.

SpikeInterface is an optional dependency (``pip install spikearray[interop]``): it is imported only inside these
functions. Through it, every format SpikeInterface reads (Open Ephys, NWB, Intan, Maxwell, ...) can be sorted.
"""

from __future__ import annotations

import inspect
import os
import uuid
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from ..errors import RecordingError, SpikearrayError
from .probes import ProbeLayout, _from_probeinterface
from .recording import _chunk_rows, make_recording

__all__ = ["from_spikeinterface", "to_spikeinterface", "SIChunkReader"]


def _uv_kwarg(recording: Any) -> str:
    # SpikeInterface renamed return_scaled -> return_in_uV (0.103).
    params = inspect.signature(type(recording).get_traces).parameters
    return "return_in_uV" if "return_in_uV" in params else "return_scaled"


class SIChunkReader:
    """Picklable array-like view ``reader[i0:i1, cols]`` of one segment of a SpikeInterface recording.

    Each access calls ``recording.get_traces`` for the requested rows only (so dask workers read their own
    chunks; SpikeInterface recordings pickle by their construction kwargs).
    """

    def __init__(self, recording: Any, *, segment_index: int, in_uV: bool, dtype: Any) -> None:
        self.recording = recording
        self.segment_index = int(segment_index)
        self.in_uV = bool(in_uV)
        self.dtype = np.dtype(dtype)
        self.shape = (int(recording.get_num_samples(segment_index)), int(recording.get_num_channels()))
        self.ndim = 2

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key, slice(None))
        rows, cols = key
        start, stop, step = rows.indices(self.shape[0]) if isinstance(rows, slice) else (None, None, None)
        if start is None:
            raise IndexError("SIChunkReader supports slices along time only.")
        kw = {_uv_kwarg(self.recording): self.in_uV}
        tr = self.recording.get_traces(segment_index=self.segment_index, start_frame=start, end_frame=stop, **kw)
        return np.asarray(tr[::step, cols], dtype=self.dtype)


def from_spikeinterface(recording: Any, *, chunk_seconds: float = 2.0) -> xr.DataArray:
    """Wrap a SpikeInterface recording as a lazy spikearray recording.

    Parameters
    ----------
    recording : spikeinterface.BaseRecording
        One segment (select one with ``recording.select_segments([i])``).
    chunk_seconds : float
        Dask chunk length along time (s).

    Returns
    -------
    xarray.DataArray
        ``traces`` (time, channel), like :func:`open_recording` gives. Integer recordings with µV gains and zero
        offsets stay integer (``units = "counts"``, per-channel ``gain_to_uV``); every other recording is read as
        float32 µV (``get_traces(return_in_uV=True)`` when it has gains; float data without gains are taken as
        µV). Geometry from ``get_channel_locations()``; shanks and contact ids from the attached probe. The
        ``channel`` coordinate is the channel's position 0..C-1 (SpikeInterface ids are in the attr
        ``si_channel_ids``).

    Raises
    ------
    RecordingError
        Several segments, or no channel locations.
    """
    n_seg = int(recording.get_num_segments())
    if n_seg != 1:
        raise RecordingError(
            f"the SpikeInterface recording has {n_seg} segments; spikearray sorts one continuous segment. Pass "
            "recording.select_segments([i]) or concatenate them (spikeinterface.concatenate_recordings)."
        )
    fs = float(recording.get_sampling_frequency())
    C = int(recording.get_num_channels())
    n = int(recording.get_num_samples(0))
    dt = np.dtype(recording.get_dtype())
    try:
        locs = np.asarray(recording.get_channel_locations(), dtype=np.float64)
    except Exception as e:  # SpikeInterface raises a bare ValueError without a probe
        raise RecordingError(f"the SpikeInterface recording has no channel locations ({e}); attach a probe with "
                             "recording.set_probe(...) first.") from None
    shank = np.zeros(C, np.int64)
    ids = np.asarray(recording.get_channel_ids()).astype(str)
    contact_id = ids.copy()
    name = "spikeinterface"
    if recording.has_probe():
        layout = _from_probeinterface(recording.get_probegroup(), "").sorted_by_channel()
        if np.array_equal(layout.channel, np.arange(C)):
            shank = layout.shank
            contact_id = np.where(layout.contact_id != "", layout.contact_id, ids)
            name = layout.name
    probe = ProbeLayout(np.arange(C), locs[:, 0], locs[:, 1], shank, contact_id, name)

    scaleable = bool(getattr(recording, "has_scaleable_traces", getattr(recording, "has_scaled_traces", None))())
    gains = np.asarray(recording.get_channel_gains(), np.float64) if scaleable else None
    offsets = np.asarray(recording.get_channel_offsets(), np.float64) if scaleable else None
    if dt.kind in "iu" and (gains is None or not np.any(offsets)):
        in_uV, out_dtype, gain, units = False, dt, (gains if gains is not None else 1.0), None
    else:
        in_uV, out_dtype, gain, units = gains is not None, np.dtype(np.float32), 1.0, "uV"
    reader = SIChunkReader(recording, segment_index=0, in_uV=in_uV, dtype=out_dtype)
    rows = _chunk_rows(fs, chunk_seconds, n)
    data = da.from_array(reader, chunks=(rows, -1), name=f"si-{uuid.uuid4().hex}", lock=False, asarray=True,
                         meta=np.empty((0, 0), out_dtype))
    try:
        t0 = float(recording.get_start_time(0))
    except Exception:
        t0 = 0.0
    attrs = {"format": "spikeinterface", "n_file_channels": C, "si_class": type(recording).__name__,
             "si_channel_ids": ids.tolist()}
    return make_recording(data, sampling_rate=fs, probe=probe, gain_to_uV=gain, units=units,
                          source=f"spikeinterface:{type(recording).__name__}", dtype_on_disk=dt.name,
                          time_start=t0, attrs=attrs)


def to_spikeinterface(sorting: xr.Dataset | str | os.PathLike) -> Any:
    """A Sorting Dataset as a SpikeInterface ``NumpySorting`` (one segment).

    Parameters
    ----------
    sorting : xarray.Dataset or path
        The Sorting Dataset, or an output folder / ``sorting.zarr``.

    Returns
    -------
    spikeinterface.core.NumpySorting
        Unit ids = the ``unit`` coordinate; spike trains in samples; unit properties ``quality`` (label),
        ``contamination``, ``firing_rate`` (Hz), ``depth`` (µm), ``amplitude`` (µV), ``n_spikes``,
        ``best_channel``, where the Dataset has them.
    """
    from spikeinterface.core import NumpySorting

    if not isinstance(sorting, xr.Dataset):
        from ..export.zarr_store import open_sorting

        sorting = open_sorting(sorting)
    if "sampling_rate" not in sorting.attrs:
        raise SpikearrayError("the sorting has no 'sampling_rate' attr; it is not a Sorting Dataset.")
    st = np.asarray(sorting["spike_time"].values, dtype=np.int64)
    su = np.asarray(sorting["spike_unit"].values, dtype=np.int64)
    unit_ids = sorting["unit"].values.astype(np.int64)
    out = NumpySorting.from_samples_and_labels([st], [su], float(sorting.attrs["sampling_rate"]),
                                               unit_ids=unit_ids)
    props = {"label": "quality", "contamination": "contamination", "firing_rate": "firing_rate", "depth": "depth",
             "amplitude": "amplitude", "n_spikes": "n_spikes", "best_channel": "best_channel"}
    for var, key in props.items():
        if var in sorting and sorting[var].dims == ("unit",):
            v = sorting[var].values
            out.set_property(key, v.astype(str) if v.dtype.kind in "OU" else v)
    return out
