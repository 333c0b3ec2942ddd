"""``open_recording``: any supported recording as one lazy, labelled ``xarray.DataArray``.

The DataArray (name ``traces``, dims ``(time, channel)``) wraps a dask array over a memory map of the file,
chunked along time only. Nothing is read at open. The graph holds a small picklable reader
(:class:`BinaryReader`: path, offset, shape, dtype, columns), so dask-distributed workers read the file
themselves.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from xarray.indexes import RangeIndex

from ..errors import (
    EmptyRecordingError,
    FileSizeError,
    RecordingError,
    RecordingNotFoundError,
    UnsupportedDtypeError,
)
from .probes import ProbeLayout, as_probe_layout, linear_layout, mismatch
from .spikeglx import spikeglx_info

__all__ = ["open_recording", "make_recording", "BinaryReader", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = ("int16", "uint16", "int32", "float32")


class BinaryReader:
    """Picklable, array-like view of selected columns of a time-major binary file.

    ``reader[i0:i1, j0:j1]`` opens a memory map, reads rows ``i0:i1`` and returns the requested columns
    (positions into ``columns``) as a numpy array. Only that slice is touched on disk.

    Parameters
    ----------
    path : Path
    dtype : numpy dtype
    n_file_channels : int
        Columns per sample in the file.
    n_samples : int
    columns : ndarray of int
        File columns exposed, in order.
    offset : int
        Header bytes to skip.
    """

    def __init__(self, path: Path, dtype: Any, n_file_channels: int, n_samples: int, columns: np.ndarray,
                 offset: int = 0) -> None:
        self.path = str(path)
        self.dtype = np.dtype(dtype)
        self.n_file_channels = int(n_file_channels)
        self.n_samples = int(n_samples)
        self.columns = np.asarray(columns, dtype=np.int64)
        self.offset = int(offset)
        self.shape = (self.n_samples, len(self.columns))
        self.ndim = 2
        self._all = len(self.columns) == self.n_file_channels and bool(
            (self.columns == np.arange(self.n_file_channels)).all()
        )

    def _memmap(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset,
                         shape=(self.n_samples, self.n_file_channels))

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key, slice(None))
        rows, cols = key
        mm = self._memmap()
        block = mm[rows]
        if self._all:
            out = np.array(block[:, cols])
        else:
            out = np.array(block[:, self.columns[cols]])
        del mm
        return out

    def __reduce__(self):  # keep pickles small and free of memmaps
        return (BinaryReader, (Path(self.path), self.dtype, self.n_file_channels, self.n_samples, self.columns,
                               self.offset))


def _chunk_rows(sampling_rate: float, chunk_seconds: float, n_samples: int) -> int:
    if chunk_seconds <= 0:
        raise RecordingError(f"chunk_seconds = {chunk_seconds}; expected a positive duration in seconds (e.g. 2.0).")
    return max(1, min(n_samples, int(round(chunk_seconds * sampling_rate))))


def make_recording(data: Any, *, sampling_rate: float, probe: ProbeLayout, gain_to_uV: Any = 1.0,
                   units: str | None = None, source: str = "", dtype_on_disk: str | None = None,
                   time_start: float = 0.0, attrs: dict | None = None) -> xr.DataArray:
    """Wrap a ``(time, channel)`` array (dask or numpy) as a spikearray recording.

    Parameters
    ----------
    data : dask.array.Array or ndarray, shape (n_samples, n_channels)
        Samples in the file's units (int16 counts or µV floats).
    sampling_rate : float
        Hz.
    probe : ProbeLayout
        Geometry, in the same channel order as the columns of ``data``.
    gain_to_uV : float or array of shape (n_channels,)
        µV per unit of ``data`` (1.0 when ``data`` are already µV).
    units : str, optional
        ``"uV"`` when the data are already scaled; otherwise the attr ``gain_to_uV`` applies.

    Returns
    -------
    xarray.DataArray
        name ``traces``, dims ``(time, channel)``, ``time`` a RangeIndex in seconds, channel coords
        ``channel``, ``x``, ``y``, ``shank``, ``contact_id``, ``gain_to_uV``.
    """
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=(max(1, int(2 * sampling_rate)), -1))
    n, c = data.shape
    if n == 0:
        raise EmptyRecordingError(f"{source or 'the recording'} has 0 samples; nothing to sort.")
    if probe.n_channels != c:
        raise mismatch(probe.n_channels, c, source or "the data")
    gains = np.broadcast_to(np.asarray(gain_to_uV, dtype=np.float64), (c,)).copy()
    index = RangeIndex.linspace(time_start, time_start + n / sampling_rate, num=n, endpoint=False, dim="time")
    coords = xr.Coordinates.from_xindex(index)
    arr = xr.DataArray(data, dims=("time", "channel"), coords=coords, name="traces")
    arr = arr.assign_coords(
        channel=("channel", probe.channel),
        x=("channel", probe.x),
        y=("channel", probe.y),
        shank=("channel", probe.shank),
        contact_id=("channel", probe.contact_id),
        gain_to_uV=("channel", gains),
    )
    arr.x.attrs["units"] = "um"
    arr.y.attrs["units"] = "um"
    arr.time.attrs["units"] = "s"
    base = {
        "sampling_rate": float(sampling_rate),
        "probe": probe.name,
        "source": str(source),
        "dtype_on_disk": dtype_on_disk or str(data.dtype),
        "time_start": float(time_start),
    }
    if units == "uV":
        base["units"] = "uV"
    else:
        base["gain_to_uV"] = float(gains[0]) if np.all(gains == gains[0]) else gains.tolist()
        base["units"] = "counts"
    base.update(attrs or {})
    arr.attrs.update(base)
    return arr


def _lazy(reader: BinaryReader, rows: int) -> da.Array:
    st = os.stat(reader.path)
    name = "binary-" + tokenize(reader.path, st.st_size, st.st_mtime_ns, reader.dtype.str, reader.columns.tobytes(),
                                reader.offset, rows)
    return da.from_array(reader, chunks=(rows, -1), name=name, lock=False, asarray=True, meta=np.empty((0, 0), reader.dtype))


def _open_spikeglx(path: Path, probe: Any, chunk_seconds: float, n_channels: int | None,
                   wired_only: bool = False) -> xr.DataArray:
    info = spikeglx_info(path)
    if n_channels is not None and n_channels != info.n_saved:
        raise FileSizeError(
            f"n_channels={n_channels} was given but {info.meta_path.name} says nSavedChans={info.n_saved}; "
            "for SpikeGLX files leave n_channels out: it comes from the .meta."
        )
    layout = info.probe
    unwired = np.zeros(0, np.int64)
    if probe is not None:
        # the sync word is not a neural column: the reader drops it whatever the probe says
        layout = as_probe_layout(probe, info.n_saved, info.bin_path.name, neural_columns=info.neural_columns,
                                 wired_only=wired_only)
        if set(layout.channel.tolist()) - set(info.neural_columns.tolist()):
            raise mismatch(layout.n_channels, len(info.neural_columns), info.bin_path.name)
        unwired = layout.unwired(info.neural_columns)
    reader = BinaryReader(info.bin_path, np.int16, info.n_saved, info.n_samples, layout.channel)
    gains = info.gain_to_uV[np.searchsorted(info.neural_columns, layout.channel)]
    data = _lazy(reader, _chunk_rows(info.sampling_rate, chunk_seconds, info.n_samples))
    m = info.meta
    extra = {
        "format": "spikeglx",
        "n_file_channels": info.n_saved,
        "sync_columns": info.sync_columns.tolist(),
        "meta": str(info.meta_path),
        "probe_part_number": m.get("imDatPrb_pn", ""),
        "probe_serial": m.get("imDatPrb_sn", ""),
        "coordinates": "SpikeGLX global: x = shank*shankPitch + x on shank, y = z above the lowest row (um)",
    }
    if len(unwired):
        extra["unwired_channels"] = unwired.tolist()
    return make_recording(data, sampling_rate=info.sampling_rate, probe=layout, gain_to_uV=gains,
                          source=str(info.bin_path), dtype_on_disk="int16", attrs=extra)


def _open_raw(path: Path, probe: Any, n_channels: int | None, sampling_rate: float | None, dtype: Any,
              gain_to_uV: Any, chunk_seconds: float, offset: int, wired_only: bool = False) -> xr.DataArray:
    if n_channels is None:
        raise RecordingError(
            f"{path.name} has no SpikeGLX .meta beside it, so its channel count is unknown. Pass n_channels= "
            "(the number of interleaved columns in the file, sync included), sampling_rate=, gain_to_uV= and probe=; "
            "or put the SpikeGLX .meta next to it."
        )
    if sampling_rate is None:
        raise RecordingError(f"{path.name}: pass sampling_rate= (Hz) to open a raw binary file.")
    if not sampling_rate > 0:
        raise RecordingError(f"sampling_rate={sampling_rate}; expected a positive rate in Hz.")
    if not isinstance(n_channels, (int, np.integer)) or n_channels < 1:
        raise RecordingError(f"n_channels={n_channels!r}; expected a positive integer (columns in the file).")
    dt = np.dtype(dtype or "int16")
    if dt.name not in SUPPORTED_DTYPES:
        raise UnsupportedDtypeError(
            f"dtype {dt.name!r} is not supported for raw binaries; expected one of {', '.join(SUPPORTED_DTYPES)}."
        )
    size = path.stat().st_size - offset
    if size <= 0:
        raise EmptyRecordingError(f"{path} is empty ({size + offset} bytes, offset {offset}); nothing to sort.")
    frame = dt.itemsize * n_channels
    if size % frame:
        n_values = size // dt.itemsize
        fits = [c for c in range(1, 1025) if n_values % c == 0 and size % dt.itemsize == 0]
        near = sorted(fits, key=lambda c: abs(c - n_channels))[:6]
        raise FileSizeError(
            f"{path.name} holds {size} bytes of data, not a whole number of {n_channels}-channel {dt.name} samples "
            f"({size % frame} bytes left over). Channel counts that divide it exactly: {sorted(near)}. Check "
            "n_channels (count every column, e.g. 385 for Neuropixels with the sync channel) and dtype."
        )
    n_samples = size // frame
    if probe is None:
        if n_channels == 1:
            layout = linear_layout(1)
        else:
            raise RecordingError(
                f"{path.name}: a raw binary needs probe= (probeinterface JSON, .prb, Kilosort .mat/.json) so that "
                "channels have positions; sorting depends on geometry."
            )
    else:
        layout = as_probe_layout(probe, n_channels, path.name, wired_only=wired_only)
    if gain_to_uV is None:
        if dt.kind == "f":
            gain_to_uV = 1.0
        else:
            raise RecordingError(
                f"{path.name}: pass gain_to_uV= (µV per integer step) for {dt.name} data so amplitudes come out in µV."
            )
    g = np.asarray(gain_to_uV, dtype=float)
    if g.ndim == 1 and len(g) == n_channels and layout.n_channels != n_channels:
        g = g[layout.channel]
    unwired = layout.unwired(np.arange(n_channels))
    reader = BinaryReader(path, dt, n_channels, n_samples, layout.channel, offset)
    data = _lazy(reader, _chunk_rows(sampling_rate, chunk_seconds, n_samples))
    units = "uV" if dt.kind == "f" and np.all(g == 1.0) else None
    return make_recording(data, sampling_rate=float(sampling_rate), probe=layout, gain_to_uV=g, units=units,
                          source=str(path), dtype_on_disk=dt.name,
                          attrs={"format": "raw", "n_file_channels": int(n_channels), "offset": int(offset),
                                 **({"unwired_channels": unwired.tolist()} if len(unwired) else {})})


def open_recording(path: Any, *, probe: Any = None, n_channels: int | None = None, sampling_rate: float | None = None,
                   dtype: Any = None, gain_to_uV: Any = None, chunk_seconds: float = 2.0,
                   offset: int = 0, wired_only: bool = False) -> xr.DataArray:
    """Open a recording lazily as a labelled ``(time, channel)`` DataArray.

    Parameters
    ----------
    path : str, Path or spikeinterface BaseRecording
        A SpikeGLX ``*.ap.bin`` (or its ``.meta``): channel count, rate, µV gains and geometry come from the
        ``.meta`` and the sync channel is dropped. A raw ``.bin``/``.dat``/``.raw`` file: ``n_channels``,
        ``sampling_rate``, ``gain_to_uV`` (integer dtypes) and ``probe`` are required. A SpikeInterface
        recording object is converted with :func:`spikearray.from_spikeinterface`.
    probe : path or probe object, optional
        Overrides the ``.meta`` geometry for SpikeGLX; required for raw files. See :func:`read_probe`.
    n_channels : int, optional
        Columns per sample in a raw file (sync included).
    sampling_rate : float, optional
        Hz, raw files.
    dtype : str, optional
        ``int16`` (default), ``uint16``, ``int32`` or ``float32``, raw files.
    gain_to_uV : float or array, optional
        µV per integer step (raw integer files; float32 data are taken as µV when omitted).
    chunk_seconds : float
        Length of the dask chunks along time (s).
    offset : int
        Header bytes to skip (raw files).
    wired_only : bool
        Sort only the file channels the probe wires to a contact. By default a probe that leaves data channels
        without a contact (a 32-column file with a 28-contact probe) raises :class:`ProbeMismatchError`, which
        lists them; with ``wired_only=True`` they are left out and listed in the attr ``unwired_channels``.
        SpikeGLX's sync channel is never a data channel: it is dropped either way.

    Returns
    -------
    xarray.DataArray
        ``traces`` with dims ``(time, channel)``, int16 (or the file dtype) until a stage needs floats.

    Raises
    ------
    RecordingNotFoundError, MetaFileError, FileSizeError, EmptyRecordingError, UnsupportedDtypeError,
    ProbeFormatError, ProbeMismatchError, RecordingError

    Examples
    --------
    >>> rec = open_recording("run_g0_t0.imec0.ap.bin")  # doctest: +SKIP
    >>> rec.sizes  # doctest: +SKIP
    {'time': 108000000, 'channel': 384}
    """
    if hasattr(path, "get_traces") and hasattr(path, "get_sampling_frequency"):
        from .spikeinterface import from_spikeinterface

        return from_spikeinterface(path, chunk_seconds=chunk_seconds)
    if not isinstance(path, (str, os.PathLike)):
        raise RecordingError(f"cannot open a {type(path).__name__}; pass a file path or a SpikeInterface recording.")
    p = Path(path)
    if not p.exists():
        hint = ""
        if p.parent.exists():
            cands = sorted(q.name for q in p.parent.glob("*.bin"))[:5]
            if cands:
                hint = f" Binary files in that folder: {', '.join(cands)}."
        raise RecordingNotFoundError(f"recording {str(p)!r} does not exist.{hint}")
    if p.is_dir():
        metas = sorted(p.glob("*.ap.meta")) + sorted(p.glob("*/*.ap.meta"))
        if len(metas) == 1:
            p = metas[0].with_suffix(".bin")
        else:
            raise RecordingError(
                f"{p} is a folder with {len(metas)} SpikeGLX .ap.meta files; pass one .ap.bin path"
                + (f" (found: {', '.join(m.name for m in metas[:5])})." if metas else ".")
            )
    if p.suffix == ".meta" or p.with_suffix(".meta").exists() or p.name.endswith(".ap.bin"):
        if p.suffix != ".meta" and not p.with_suffix(".meta").exists() and n_channels is not None:
            return _open_raw(p, probe, n_channels, sampling_rate, dtype, gain_to_uV, chunk_seconds, offset,
                             wired_only)
        return _open_spikeglx(p, probe, chunk_seconds, n_channels, wired_only)
    return _open_raw(p, probe, n_channels, sampling_rate, dtype, gain_to_uV, chunk_seconds, offset, wired_only)
