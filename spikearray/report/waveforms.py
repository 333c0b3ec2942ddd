"""Individual spike waveforms read back from the raw recording, for the "spread" under each template.

Only short windows around ~50 spikes per unit are read (a few kB each), high-passed on their own with a
zero-phase Butterworth filter, and cut to the template's window, so this stays cheap on hour-long recordings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import xarray as xr

from ..errors import SpikearrayError
from ..geometry import uV_gains

__all__ = ["RecordingUnavailable", "window_reader", "sample_spike_waveforms"]


class RecordingUnavailable(SpikearrayError):
    """The raw recording of a sorting cannot be read (moved, synthetic, or does not match the sorting)."""


Reader = Callable[[int, int, np.ndarray], np.ndarray]


def _from_dataarray(rec: xr.DataArray, sorting: xr.Dataset) -> Reader:
    chans = np.asarray(rec["channel"].values)
    pos_of = {int(c): i for i, c in enumerate(chans)}
    missing = [int(c) for c in sorting["channel"].values if int(c) not in pos_of]
    if missing:
        raise RecordingUnavailable(f"the recording lacks sorted channels {missing[:5]} (file rows).")
    if float(rec.attrs.get("sampling_rate", np.nan)) != float(sorting.attrs["sampling_rate"]):
        raise RecordingUnavailable(f"the recording's rate {rec.attrs.get('sampling_rate')!r} Hz differs from the "
                                   f"sorting's {sorting.attrs['sampling_rate']!r} Hz.")
    n = int(rec.sizes["time"])
    st = np.asarray(sorting["spike_time"].values)
    if st.size and int(st.max()) >= n:
        raise RecordingUnavailable(f"the recording has {n} samples but the sorting has spikes at sample "
                                   f"{int(st.max())}.")
    gain = uV_gains(rec)
    data = rec.data

    def read(t0: int, t1: int, rows: np.ndarray) -> np.ndarray:
        pos = np.array([pos_of[int(r)] for r in rows])
        block = data[t0:t1][:, pos]
        block = block.compute() if hasattr(block, "compute") else np.asarray(block)
        return np.asarray(block, np.float32) * gain[pos]

    return read


def _from_file(sorting: xr.Dataset, path: Path) -> Reader:
    a = sorting.attrs
    dtype = np.dtype(a.get("dtype_on_disk", "int16"))
    n_file = int(a["n_file_channels"])
    offset = int(a.get("offset", 0))
    n_rows = (path.stat().st_size - offset) // (dtype.itemsize * n_file)
    need = int(a.get("n_samples", 0)) + int(a.get("time_offset_samples", 0))
    if n_rows < need:
        raise RecordingUnavailable(f"{str(path)!r} holds {n_rows} samples; the sorting covers {need}.")
    gain = np.asarray(a.get("gain_to_uV", 1.0), np.float32)
    chans = np.asarray(sorting["channel"].values)
    if gain.ndim and gain.size != len(chans):
        raise RecordingUnavailable(f"gain_to_uV has {gain.size} values for {len(chans)} channels.")
    gain_of = {int(c): float(gain if not gain.ndim else gain[i]) for i, c in enumerate(chans)}
    mm = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(n_rows, n_file))

    def read(t0: int, t1: int, rows: np.ndarray) -> np.ndarray:
        g = np.array([gain_of[int(r)] for r in rows], np.float32)
        return np.asarray(mm[t0:t1, rows], np.float32) * g

    return read


def window_reader(sorting: xr.Dataset, recording: Any = None) -> Reader:
    """A function ``read(t0, t1, rows) -> (t1 - t0, len(rows))`` float32 µV of the sorted recording.

    Parameters
    ----------
    sorting : xarray.Dataset
        Sorting Dataset (attrs ``source``, ``sampling_rate``, ``n_file_channels``, ``dtype_on_disk``, ``offset``,
        ``gain_to_uV``; ``channel`` coordinate = file rows).
    recording : xarray.DataArray or path, optional
        The recording that was sorted; default the sorting's ``source`` attr (opened with
        :func:`spikearray.open_recording`, or read directly as a binary file when that needs more arguments).

    Raises
    ------
    RecordingUnavailable
        With the reason: no source, file missing, or a recording that does not match the sorting.
    """
    from ..io import open_recording

    if isinstance(recording, xr.DataArray):
        return _from_dataarray(recording, sorting)
    source = recording if recording is not None else sorting.attrs.get("source", "")
    if not source:
        raise RecordingUnavailable("the sorting records no source file (it was sorted from an in-memory recording).")
    path = Path(str(source))
    if not path.is_file():
        raise RecordingUnavailable(f"the raw file {str(path)!r} is not there (moved or deleted).")
    try:
        rec = open_recording(path)
    except SpikearrayError:
        return _from_file(sorting, path)  # a raw binary that needs its layout: the sorting's attrs carry it
    return _from_dataarray(rec, sorting)


def sample_spike_waveforms(sorting: xr.Dataset, reader: Reader, channels: Mapping[int, np.ndarray], *,
                           n_per_unit: int = 50, highpass_hz: float = 300.0, seed: int = 0,
                           progress: bool = False, pad_ms: float = 4.0,
                           common_reference: bool = False) -> dict[int, np.ndarray]:
    """Up to ``n_per_unit`` random spikes of each unit, high-passed, in µV, on that unit's channels.

    Parameters
    ----------
    sorting : xarray.Dataset
        Sorting Dataset (``spike_time``, ``spike_unit``, ``template`` for the window length; settings attr for
        the trough position ``nt0min``).
    reader : callable
        From :func:`window_reader`.
    channels : mapping unit -> ndarray of int
        Channel positions (into the ``channel`` dim) to read for each unit.
    n_per_unit : int
    highpass_hz : float
        Cutoff of the 3rd-order Butterworth high-pass, applied forward and backward on each padded window.
    seed : int
    progress : bool
        Show a progress bar over units.
    pad_ms : float
        Samples read on each side of a window (ms) and dropped after filtering, to absorb edge transients.
    common_reference : bool
        After filtering, subtract the median across the channels read at each sample (Kilosort4's CAR; pass all
        channels in ``channels`` for it to match the sorter's).

    Returns
    -------
    dict unit -> ndarray (n, n_sample, len(channels[unit])) float32 µV
        Aligned with the template: sample ``i`` is ``spike_time - nt0min + i``.
    """
    from scipy.signal import butter, sosfiltfilt

    from ..settings import Settings

    fs = float(sorting.attrs["sampling_rate"])
    nt = int(sorting.sizes["sample"])
    nt0min = Settings.of_sorting(sorting).nt0min_
    pad = int(round(pad_ms * 1e-3 * fs))  # each side: absorbs the filter's edge transients
    sos = butter(3, highpass_hz, btype="highpass", fs=fs, output="sos")
    st = np.asarray(sorting["spike_time"].values, np.int64)
    su = np.asarray(sorting["spike_unit"].values)
    rows_all = np.asarray(sorting["channel"].values)
    n_total = int(sorting.attrs.get("n_samples", 0)) + int(sorting.attrs.get("time_offset_samples", 0))
    rng = np.random.default_rng(seed)
    order = np.argsort(su, kind="stable")
    bounds = np.searchsorted(su[order], np.asarray(sorting["unit"].values), side="left")
    ends = np.searchsorted(su[order], np.asarray(sorting["unit"].values), side="right")
    units = list(map(int, sorting["unit"].values))
    it = units
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(units, desc="report: sampling spikes", unit="unit")
    out: dict[int, np.ndarray] = {}
    for u, b, e in zip(it, bounds, ends):
        times = st[order[b:e]]
        times = times[(times - nt0min - pad >= 0) & (times - nt0min + nt + pad <= (n_total or np.inf))]
        if len(times) > n_per_unit:
            times = np.sort(rng.choice(times, n_per_unit, replace=False))
        rows = rows_all[np.asarray(channels[u])]
        if len(times) == 0:
            out[u] = np.zeros((0, nt, len(rows)), np.float32)
            continue
        win = np.stack([reader(int(t) - nt0min - pad, int(t) - nt0min + nt + pad, rows) for t in times])
        win -= np.median(win, axis=1, keepdims=True)
        win = sosfiltfilt(sos, win, axis=1)
        if common_reference:
            win -= np.median(win, axis=2, keepdims=True)
        out[u] = np.ascontiguousarray(win[:, pad:pad + nt], np.float32)
    return out
