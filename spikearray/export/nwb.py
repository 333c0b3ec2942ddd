"""A Sorting Dataset as an NWB file (for DANDI): probe, electrodes, units with µV mean waveforms, optional raw data.

Layout written (pynwb names):

- one ``Device`` for the probe (part and serial number from the SpikeGLX ``.meta`` when there is one) and one
  ``ElectrodeGroup`` per shank;
- the ``electrodes`` table, one row per sorted channel in the Dataset's ``channel`` order: ``rel_x``, ``rel_y``
  (µm on the probe), ``location``, ``group``, ``group_name`` and spikearray's columns ``shank``, ``contact_id``,
  ``gain_to_uV`` (µV per integer step of the raw file), ``channel_index`` (the channel's row in the raw binary)
  and ``channel_name`` (the same, as text: SpikeInterface's channel id);
- the ``units`` table, ``id`` = the Dataset's unit ids (Phy's ids after curation): ``spike_times`` (s),
  ``electrodes`` (the unit's ``n_waveform_channels`` largest-amplitude channels, in table order), ``waveform_mean``
  (µV, ``(sample, electrode)`` over those electrodes, ``waveform_time_before_peak_in_ms`` and ``waveform_rate``
  set on the table), ``quality`` (the label: good / mua / noise / unsorted), ``contamination``, ``firing_rate``
  (Hz), ``amplitude`` (µV), ``depth`` and ``unit_x`` (µm), ``best_channel`` (raw-file row), ``n_spikes`` and, per
  spike, ``spike_amplitudes`` (µV); ``resolution`` = 1 / sampling rate;
- optionally the raw recording as ``acquisition/ElectricalSeriesAP`` (int16 counts with their µV→V conversion),
  copied chunk by chunk through hdmf's :class:`~hdmf.data_utils.GenericDataChunkIterator`, never loaded whole.

Spike times are seconds from the first sample of the sorted file (plus the recording's ``time_start``); the
session start time is the SpikeGLX ``fileCreateTime`` unless given.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .._version import __version__
from ..errors import MetadataError, OutputError, OutputExistsError
from ..geometry import uV_gains
from ._atomic import atomic_file
from ._extras import require

__all__ = ["export_nwb", "NWB_UNIT_COLUMNS"]

#: Dataset variable -> (units-table column, description)
NWB_UNIT_COLUMNS = {
    "label": ("quality", "curation label: good / mua (Kilosort4's rule), noise / unsorted (Phy)"),
    "contamination": ("contamination", "Kilosort4's refractory ratio R12 (fraction; NaN for clusters Phy changed)"),
    "firing_rate": ("firing_rate", "n_spikes / recording duration, Hz"),
    "amplitude": ("amplitude", "template peak-to-peak on the best channel, microvolts"),
    "depth": ("depth", "unit position along the probe (template centre of mass, y), micrometres"),
    "unit_x": ("unit_x", "unit position across the probe (template centre of mass, x), micrometres"),
    "best_channel": ("best_channel", "row in the raw binary file of the channel with the largest template energy"),
    "n_spikes": ("n_spikes", "number of spikes of the unit"),
}


def _meta_for(sorting: xr.Dataset, recording: xr.DataArray | None) -> dict[str, str]:
    from ..io.spikeglx import read_meta

    candidates = []
    if recording is not None and recording.attrs.get("meta"):
        candidates.append(Path(str(recording.attrs["meta"])))
    for src in (recording.attrs.get("source") if recording is not None else None, sorting.attrs.get("source")):
        if src:
            candidates.append(Path(str(src)).with_suffix(".meta"))
    for p in candidates:
        if p.is_file():
            return read_meta(p)
    return {}


def _session_start(value: Any, meta: dict[str, str]) -> _dt.datetime:
    if value is None:
        text = meta.get("fileCreateTime")
        if not text:
            raise MetadataError(
                "the NWB file needs a session start time and the recording has no SpikeGLX .meta with "
                "fileCreateTime; pass session_start_time=datetime.datetime(2024, 5, 1, 13, 30, "
                "tzinfo=datetime.timezone.utc) (command line: --session-start-time 2024-05-01T13:30:00+00:00)."
            )
        value = text
    if isinstance(value, str):
        try:
            value = _dt.datetime.fromisoformat(value)
        except ValueError:
            raise MetadataError(f"session_start_time={value!r} is not an ISO 8601 date-time; pass e.g. "
                                "'2024-05-01T13:30:00+02:00'.") from None
    if not isinstance(value, _dt.datetime):
        raise MetadataError(f"session_start_time must be a datetime or an ISO 8601 string, got "
                            f"{type(value).__name__}.")
    if value.tzinfo is None:
        value = value.astimezone()  # a naive time is local time (SpikeGLX writes the acquisition PC's clock)
    return value


_SUBJECT_HELP = ("pass subject={'subject_id': 'mouse01', 'species': 'Mus musculus', 'sex': 'F', 'age': 'P90D'} "
                 "(sex one of M, F, U, O; age as an ISO 8601 duration; or a pynwb.file.Subject) — command line: "
                 "--subject-id mouse01 --species 'Mus musculus' --sex F --age P90D")


def _subject(subject: Any, pynwb: Any) -> Any:
    if subject is None:
        raise MetadataError("the NWB file needs its subject (DANDI requires subject_id, species, sex and age or "
                            "date of birth), and SpikeGLX .meta files do not record it; " + _SUBJECT_HELP + ".")
    if isinstance(subject, pynwb.file.Subject):
        return subject
    if not isinstance(subject, dict):
        raise MetadataError(f"subject must be a dict or a pynwb.file.Subject, got {type(subject).__name__}; "
                            + _SUBJECT_HELP + ".")
    missing = [k for k in ("subject_id", "species", "sex") if not subject.get(k)]
    if not (subject.get("age") or subject.get("date_of_birth")):
        missing.append("age (or date_of_birth)")
    if missing:
        raise MetadataError(f"subject lacks {', '.join(missing)}; " + _SUBJECT_HELP + ".")
    if str(subject["sex"]) not in ("M", "F", "U", "O"):
        raise MetadataError(f"subject sex={subject['sex']!r}; expected one of 'M', 'F', 'U' (unknown), 'O' (other).")
    try:
        return pynwb.file.Subject(**subject)
    except TypeError as e:
        raise MetadataError(f"subject={subject!r} is not accepted by pynwb.file.Subject ({e}).") from None


def _channel_gains(sorting: xr.Dataset, recording: xr.DataArray | None) -> np.ndarray:
    C = sorting.sizes["channel"]
    if recording is not None:
        pos = {int(c): i for i, c in enumerate(recording["channel"].values)}
        g = uV_gains(recording, np.float64)
        return np.array([g[pos[int(c)]] for c in sorting["channel"].values])
    g = np.asarray(sorting.attrs.get("gain_to_uV", 1.0), np.float64)
    return np.broadcast_to(g, (C,)).astype(np.float64) if g.ndim == 0 or g.size != C else g


def _nt0min(sorting: xr.Dataset) -> int:
    from ..settings import Settings

    return int(Settings.of_sorting(sorting).nt0min_)


def _unit_electrodes(template: np.ndarray, n: int) -> np.ndarray:
    """(K, n) channel positions: each unit's n largest peak-to-peak channels, ascending position order."""
    ptp = np.ptp(template, axis=1) if template.shape[1] else np.zeros(template.shape[::2])
    n = min(n, template.shape[2])
    top = np.argsort(-ptp, axis=1, kind="stable")[:, :n]
    return np.sort(top, axis=1)


def _raw_iterator(recording: xr.DataArray, channels: np.ndarray, buffer_gb: float) -> Any:
    from hdmf.data_utils import GenericDataChunkIterator

    pos = {int(c): i for i, c in enumerate(recording["channel"].values)}
    cols = np.array([pos[int(c)] for c in channels])
    data = recording.data
    dtype = np.dtype(recording.dtype)

    class _DaskChunks(GenericDataChunkIterator):
        """Hands hdmf one (time, channel) block at a time, read from the lazy recording."""

        def _get_data(self, selection: tuple) -> np.ndarray:
            rows, colsel = selection
            block = data[rows][:, cols[colsel]]
            return np.asarray(block.compute() if hasattr(block, "compute") else block)

        def _get_maxshape(self) -> tuple:
            return (int(data.shape[0]), len(cols))

        def _get_dtype(self) -> np.dtype:
            return dtype

    n_ch = len(cols)
    rows_per_chunk = max(1, min(int(data.shape[0]), (1 << 20) // max(1, n_ch * dtype.itemsize)))  # ~1 MB chunks
    return _DaskChunks(buffer_gb=buffer_gb, chunk_shape=(rows_per_chunk, n_ch), display_progress=False)


def export_nwb(sorting: xr.Dataset | str | os.PathLike, path: str | os.PathLike, *,
               recording: xr.DataArray | str | os.PathLike | None = None, session_description: str | None = None,
               session_start_time: Any = None, subject: Any = None, identifier: str | None = None,
               experimenter: str | list[str] | None = None, lab: str | None = None, institution: str | None = None,
               session_id: str | None = None, location: str | list[str] = "unknown", write_raw: bool = False,
               n_waveform_channels: int = 12, buffer_gb: float = 0.25, overwrite: bool = False) -> Path:
    """Write a Sorting Dataset (and optionally its raw recording) as an NWB file.

    Parameters
    ----------
    sorting : xarray.Dataset or path
        The Sorting Dataset (from :func:`spikearray.sort`, :func:`spikearray.open_sorting` or
        :func:`spikearray.read_phy` after curation), or an output folder / ``sorting.zarr``.
    path : path
        The ``.nwb`` file to write (HDF5). Written under a temporary name and renamed when complete.
    recording : xarray.DataArray or path, optional
        The sorted recording: its ``.meta`` gives the session start time and probe identity, its per-channel
        gains the ``gain_to_uV`` column, and with ``write_raw`` its samples the ``ElectricalSeries``. Default:
        the sorting's ``source`` file when it is there.
    session_description : str, optional
        Default: ``"Spike sorting of <file> with spikearray <version>"``.
    session_start_time : datetime or ISO 8601 str, optional
        Default: ``fileCreateTime`` of the SpikeGLX ``.meta`` (a naive time is taken as this machine's local
        time). Without either, :class:`~spikearray.errors.MetadataError` says what to pass.
    subject : dict or pynwb.file.Subject
        Required (SpikeGLX does not record it): ``{"subject_id", "species", "sex", "age" or "date_of_birth"}``
        plus any other :class:`pynwb.file.Subject` field.
    identifier : str, optional
        Unique file identifier; default a random UUID.
    experimenter, lab, institution, session_id : optional
        NWB file metadata.
    location : str or list of str
        Brain area of every electrode, or one per sorted channel (``electrodes.location``). For mice DANDI's
        best practice is an Allen CCF name or acronym (``"VISp"``, ``"CA1"``; ``"root"`` for "in the brain");
        nwbinspector flags the default ``"unknown"`` as a best-practice violation.
    write_raw : bool
        Also copy the raw recording into ``acquisition/ElectricalSeriesAP``, chunk by chunk (gzip-compressed).
    n_waveform_channels : int
        Electrodes per unit (its largest-amplitude channels) in ``units.electrodes`` and ``waveform_mean``.
    buffer_gb : float
        Memory for one block of raw data while copying.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    MissingExtraError
        pynwb is not installed (``pip install 'spikearray[nwb]'``).
    MetadataError
        No session start time or subject.
    OutputExistsError
        ``path`` exists and ``overwrite`` is False.

    Examples
    --------
    >>> import spikearray as sa
    >>> subject = {"subject_id": "m1", "species": "Mus musculus", "sex": "F", "age": "P90D"}
    >>> sa.export_nwb("DIR", "DIR/session.nwb", subject=subject, location="VISp")  # doctest: +SKIP
    >>> from pynwb import NWBHDF5IO
    >>> units = NWBHDF5IO("DIR/session.nwb").read().units.to_dataframe()  # doctest: +SKIP
    """
    pynwb = require("pynwb", "nwb", "export_nwb")
    from hdmf.backends.hdf5.h5_utils import H5DataIO
    from pynwb.ecephys import ElectricalSeries

    if not isinstance(sorting, xr.Dataset):
        from .zarr_store import open_sorting

        sorting = open_sorting(sorting)
    if "sampling_rate" not in sorting.attrs or "spike_time" not in sorting:
        raise OutputError("export_nwb needs a Sorting Dataset (spike_time, spike_unit, attrs sampling_rate); see "
                          "docs/outputs.md.")
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{str(path)!r} exists; pass overwrite=True (--overwrite) to replace it.")
    if recording is not None and not isinstance(recording, xr.DataArray):
        from ..io import open_recording

        recording = open_recording(recording)
    if recording is None and write_raw:
        src = Path(str(sorting.attrs.get("source", "")))
        if not src.is_file():
            raise MetadataError(f"write_raw=True needs the recording, and the sorting's source {str(src)!r} is not "
                                "a file; pass recording= (command line: --recording PATH).")
        from ..io import open_recording

        recording = open_recording(src)
    if recording is not None:
        missing = sorted(set(map(int, sorting["channel"].values)) - set(map(int, recording["channel"].values)))
        if missing:
            raise MetadataError(f"the recording lacks sorted channels (file rows) {missing[:8]}; pass the recording "
                                "that was sorted.")
        if float(recording.attrs["sampling_rate"]) != float(sorting.attrs["sampling_rate"]):
            raise MetadataError(f"the recording's rate {recording.attrs['sampling_rate']} Hz differs from the "
                                f"sorting's {sorting.attrs['sampling_rate']} Hz; pass the recording that was sorted.")

    meta = _meta_for(sorting, recording)
    start = _session_start(session_start_time, meta)
    subj = _subject(subject, pynwb)
    fs = float(sorting.attrs["sampling_rate"])
    t0 = float(sorting.attrs.get("time_start", 0.0))
    source = str(sorting.attrs.get("source", "") or "an in-memory recording")
    nwb = pynwb.NWBFile(
        session_description=session_description or f"Spike sorting of {Path(source).name} with spikearray "
                                                    f"{__version__}.",
        identifier=identifier or str(uuid.uuid4()), session_start_time=start, subject=subj,
        experimenter=experimenter, lab=lab, institution=institution, session_id=session_id,
        source_script=f"spikearray {__version__} export_nwb", source_script_file_name="spikearray/export/nwb.py",
        notes=json.dumps({"spikearray_version": str(sorting.attrs.get("spikearray_version", __version__)),
                          "source": source, "settings": json.loads(sorting.attrs.get("settings", "{}") or "{}")}),
    )

    # --- probe: one device, one electrode group per shank
    pn, sn = meta.get("imDatPrb_pn", ""), meta.get("imDatPrb_sn", "")
    probe_name = str((recording.attrs.get("probe") if recording is not None else None) or pn or "probe")
    model = None
    if pn:
        model = nwb.create_device_model(name=pn, manufacturer="IMEC", model_number=pn,
                                        description=f"Neuropixels probe, part number {pn}")
    device = nwb.create_device(
        name="probe", description=f"{probe_name} (part number {pn or 'unknown'}); channel geometry from the "
                                  "sorting, SpikeGLX coordinates in micrometres",
        serial_number=sn or None, model=model)
    shank = np.asarray(sorting["shank"].values, np.int64)
    locs = [location] * len(shank) if isinstance(location, str) else [str(v) for v in location]
    if len(locs) != len(shank):
        raise MetadataError(f"location has {len(locs)} values for {len(shank)} sorted channels; pass one string or "
                            "one per channel (in the sorting's channel order).")
    groups = {}
    for s in np.unique(shank):
        areas = sorted({a for a, k in zip(locs, shank) if k == s})
        groups[int(s)] = nwb.create_electrode_group(
            name=f"shank{int(s)}", description=f"shank {int(s)} of the probe", location=", ".join(areas),
            device=device)
    gains = _channel_gains(sorting, recording)
    contact = np.asarray(sorting["contact_id"].values).astype(str) if "contact_id" in sorting.coords else \
        np.array([""] * sorting.sizes["channel"])
    for name, desc in (("shank", "shank index of the contact"),
                       ("contact_id", "contact name on the probe (empty when the probe has none)"),
                       ("gain_to_uV", "microvolts per integer step of the raw file"),
                       ("channel_index", "row of the channel in the raw binary file (spikearray's channel id)"),
                       ("channel_name", "channel_index as text (SpikeInterface's channel id)")):
        nwb.add_electrode_column(name=name, description=desc)
    chan = np.asarray(sorting["channel"].values, np.int64)
    xs, ys = np.asarray(sorting["x"].values, float), np.asarray(sorting["y"].values, float)
    for i in range(len(chan)):
        nwb.add_electrode(group=groups[int(shank[i])], location=locs[i], rel_x=float(xs[i]), rel_y=float(ys[i]),
                          shank=int(shank[i]), contact_id=str(contact[i]), gain_to_uV=float(gains[i]),
                          channel_index=int(chan[i]), channel_name=str(chan[i]))

    # --- units
    nt0min = _nt0min(sorting)
    units_tbl = pynwb.misc.Units(
        name="units", description="units sorted by spikearray (Kilosort4-class); spike times in seconds from the "
                                  "first sample of the sorted file; waveform_mean in microvolts, filtered, not "
                                  "whitened, on the unit's electrodes",
        waveform_rate=fs, waveform_unit="microvolts", waveform_time_before_peak_in_ms=1000.0 * nt0min / fs,
        resolution=1.0 / fs, electrode_table=nwb.electrodes)
    nwb.units = units_tbl
    columns = [(var, col, desc) for var, (col, desc) in NWB_UNIT_COLUMNS.items() if var in sorting]
    for _, col, desc in columns:
        nwb.add_unit_column(name=col, description=desc)
    has_amp = "spike_amplitude" in sorting
    if has_amp:
        nwb.add_unit_column(name="spike_amplitudes", description="per spike: fitted amplitude, microvolts "
                                                                 "(same order as spike_times)", index=True)
    st = np.asarray(sorting["spike_time"].values, np.int64)
    su = np.asarray(sorting["spike_unit"].values, np.int64)
    amps = np.asarray(sorting["spike_amplitude"].values, np.float64) if has_amp else None
    order = np.lexsort((st, su))
    ids = np.asarray(sorting["unit"].values, np.int64)
    b = np.searchsorted(su[order], ids, side="left")
    e = np.searchsorted(su[order], ids, side="right")
    tmpl = np.asarray(sorting["template"].values, np.float32) if "template" in sorting else None
    elec = _unit_electrodes(tmpl, n_waveform_channels) if tmpl is not None else None
    per_unit = {var: np.asarray(sorting[var].values) for var, _, _ in columns}
    for k, uid in enumerate(ids):
        rows = order[b[k]:e[k]]
        kw: dict[str, Any] = {"id": int(uid), "spike_times": t0 + st[rows] / fs}
        if elec is not None:
            kw["electrodes"] = elec[k].tolist()
            kw["waveform_mean"] = tmpl[k][:, elec[k]].astype(np.float32)
        for var, col, _ in columns:
            v = per_unit[var][k]
            kw[col] = str(v) if var == "label" else (int(v) if np.issubdtype(type(v), np.integer) else float(v))
        if has_amp:
            kw["spike_amplitudes"] = amps[rows]
        nwb.add_unit(**kw)

    # --- raw data
    if write_raw:
        region = nwb.create_electrode_table_region(region=list(range(len(chan))),
                                                   description="all sorted channels")
        ints = np.dtype(recording.dtype).kind in "iu" and recording.attrs.get("units") != "uV"
        if ints:
            same = bool(np.all(gains == gains[0]))
            conv = {"conversion": float(gains[0]) * 1e-6} if same else \
                {"conversion": 1e-6, "channel_conversion": gains.astype(np.float32)}
        else:
            conv = {"conversion": 1e-6}
        it = _raw_iterator(recording, chan, buffer_gb)
        nwb.add_acquisition(ElectricalSeries(
            name="ElectricalSeriesAP", data=H5DataIO(it, compression="gzip", compression_opts=4),
            electrodes=region, rate=fs, starting_time=float(recording.attrs.get("time_start", 0.0)),
            filtering="none (raw samples of the file)", description=f"raw samples of {source}", **conv))

    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}.nwb")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, tmp, what="NWB file"):  # h5py's OSError on a full disk carries errno 28
        with pynwb.NWBHDF5IO(str(tmp), "w") as io:
            io.write(nwb)
    return path
