"""SpikeGLX ``.ap.bin`` + ``.meta``: everything needed to open a probe stream comes from the ``.meta``.

Channel count, sampling rate, per-channel µV gain and contact geometry are read from the metadata
(``nSavedChans``, ``imSampRate``, ``~imroTbl``, ``~snsGeomMap`` / ``~snsShankMap``); the sync word is
recognised from ``snsSaveChanSubset`` + ``acqApLfSy`` and dropped from the neural traces.
Coordinates are SpikeGLX-global: ``x = shank * shankPitch + x_on_shank``, ``y = z`` (µm above the lowest row).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FileSizeError, MetaFileError, RecordingError, RecordingNotFoundError
from .probes import ProbeLayout

__all__ = ["read_meta", "SpikeGLXInfo", "spikeglx_info", "find_meta"]

NP1_TYPES = {0, 1020, 1030, 1100, 1120, 1121, 1122, 1123, 1200, 1300}
NP2_1SHANK = {21, 2003, 2000, 2010}
NP2_4SHANK = {24, 2013, 2014, 2020}


def read_meta(path: str | Path) -> dict[str, str]:
    """Parse a ``.meta`` file into a dict of strings (``~`` stripped from table keys)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise MetaFileError(f"cannot read {path}: {e}.") from None
    meta: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip("\r\n")
        if not line.strip() or "=" not in line:
            continue
        k, v = line.split("=", 1)
        meta[k.strip().lstrip("~")] = v.strip()
    if not meta:
        raise MetaFileError(f"{path} holds no key=value lines; it is not a SpikeGLX .meta file.")
    return meta


def find_meta(path: Path) -> Path:
    """The ``.meta`` beside a ``.bin`` (or the ``.meta`` itself)."""
    if path.suffix == ".meta":
        return path
    return path.with_suffix(".meta")


def _parse_subset(text: str, n_saved: int) -> np.ndarray:
    if text.strip().lower() == "all":
        return np.arange(n_saved)
    out: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if ":" in item:
            a, b = item.split(":")
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(item))
    return np.asarray(out, dtype=np.int64)


def _entries(table: str) -> tuple[str, list[str]]:
    parts = [p for p in (s.strip().lstrip("(") for s in table.split(")")) if p]
    if not parts:
        raise MetaFileError("empty table in .meta")
    return parts[0], parts[1:]


def _probe_type(meta: dict[str, str]) -> int:
    if "imDatPrb_type" in meta:
        return int(meta["imDatPrb_type"])
    if "imroTbl" in meta:
        head, _ = _entries(meta["imroTbl"])
        first = head.split(",")[0]
        if first.isdigit():
            return int(first)
        pn = re.sub(r"\D", "", first)
        pn_map = {"1000": 0, "2003": 2003, "2004": 2003, "2013": 2013, "2014": 2013, "2020": 2020, "2010": 21}
        return pn_map.get(pn, -1)
    return 0


def _need(meta: dict[str, str], key: str, path: Path) -> str:
    if key not in meta:
        raise MetaFileError(
            f"{path} lacks the key {key!r}, which spikearray needs to open the binary. The .meta may be truncated "
            "or from another stream type; re-export it from SpikeGLX, or open the .bin as raw with n_channels, "
            "sampling_rate, gain_to_uV and probe given."
        )
    return meta[key]


def _ap_gains(meta: dict[str, str], ptype: int, readout: np.ndarray, path: Path) -> np.ndarray:
    """AP gain of each readout channel, by the first rule of formats.md §1.4 that applies."""
    if ptype in NP1_TYPES and "imroTbl" in meta:
        _, rows = _entries(meta["imroTbl"])
        gains = {}
        for r in rows:
            f = r.split()
            if len(f) >= 5:
                gains[int(f[0])] = float(f[3])
        if gains:
            try:
                return np.array([gains[int(c)] for c in readout])
            except KeyError as e:
                raise MetaFileError(f"{path}: ~imroTbl has no entry for readout channel {e}.") from None
    if "imChan0apGain" in meta:
        return np.full(len(readout), float(meta["imChan0apGain"]))
    if ptype in (21, 24):
        return np.full(len(readout), 80.0)
    if ptype in (2003, 2013, 2000, 2010, 2014, 2020):
        return np.full(len(readout), 100.0)
    if ptype == 1110 and "imroTbl" in meta:
        head, _ = _entries(meta["imroTbl"])
        return np.full(len(readout), float(head.split(",")[3]))
    raise MetaFileError(
        f"{path}: unknown probe type {ptype} and no per-channel gain (imroTbl/imChan0apGain); spikearray will not "
        "guess a µV scale. Open the .bin as raw with gain_to_uV given."
    )


def _geometry(meta: dict[str, str], ptype: int, readout: np.ndarray, path: Path) -> tuple[np.ndarray, ...]:
    """x, y (µm), shank and contact ids of the saved neural channels, in file order."""
    n = len(readout)
    if "snsGeomMap" in meta:
        head, rows = _entries(meta["snsGeomMap"])
        hf = head.split(",")
        pitch = float(hf[2]) if len(hf) > 2 else 0.0
        if len(rows) < n:
            raise MetaFileError(f"{path}: ~snsGeomMap lists {len(rows)} channels but the file has {n} neural channels.")
        sh, x, z = [], [], []
        for r in rows[:n]:
            s, xx, zz = r.split(":")[:3]
            sh.append(int(s))
            x.append(int(s) * pitch + float(xx))
            z.append(float(zz))
        sh_a = np.array(sh)
        ids = np.array([f"s{s}c{c}" for s, c in zip(sh, readout)])
        return np.array(x), np.array(z), sh_a, ids
    np1 = ptype in NP1_TYPES
    if "snsShankMap" in meta:
        _, rows = _entries(meta["snsShankMap"])
        if len(rows) >= n:
            sh, x, z = [], [], []
            for r in rows[:n]:
                s, c, rr = (int(v) for v in r.split(":")[:3])
                if np1:
                    xx, zz = (27 if rr % 2 == 0 else 11) + 32 * c, 20.0 * rr
                else:
                    xx, zz = 27 + 32 * c, 15.0 * rr
                sh.append(s)
                x.append(250.0 * s + xx)
                z.append(zz)
            return np.array(x, float), np.array(z, float), np.array(sh), np.array([""] * n)
    if "imroTbl" in meta:
        _, rows = _entries(meta["imroTbl"])
        by_chan = {int(r.split()[0]): r.split() for r in rows if r.split()}
        sh, x, z, ids = [], [], [], []
        for c in readout:
            f = by_chan.get(int(c))
            if f is None:
                break
            if np1:
                e, s = int(f[0]) + 384 * int(f[1]), 0
                row, col = e // 2, e % 2
                xx, zz = (27 if row % 2 == 0 else 11) + 32 * col, 20.0 * row
            elif ptype in NP2_4SHANK:
                s, e = int(f[1]), int(f[4])
                row, col = e // 2, e % 2
                xx, zz = 27 + 32 * col, 15.0 * row
            elif ptype in NP2_1SHANK:
                s, e = 0, int(f[3])
                row, col = e // 2, e % 2
                xx, zz = 27 + 32 * col, 15.0 * row
            else:
                break
            sh.append(s)
            x.append(250.0 * s + xx)
            z.append(zz)
            ids.append(f"s{s}e{e}")
        else:
            return np.array(x, float), np.array(z, float), np.array(sh), np.array(ids)
    raise MetaFileError(
        f"{path}: no contact geometry (no ~snsGeomMap, ~snsShankMap or usable ~imroTbl for probe type {ptype}); "
        "pass a probe file with probe=..."
    )


@dataclass(frozen=True)
class SpikeGLXInfo:
    """What the ``.meta`` says about its ``.bin``.

    Attributes
    ----------
    bin_path, meta_path : Path
    n_saved : int
        int16 columns per sample in the file (neural + sync).
    n_samples : int
    sampling_rate : float
    neural_columns : ndarray of int64
        File columns that hold neural (AP) channels, in file order.
    sync_columns : ndarray of int64
    gain_to_uV : ndarray of float64
        µV per bit of each neural column.
    probe : ProbeLayout
        Geometry of the neural columns (``channel`` = file column).
    meta : dict
    """

    bin_path: Path
    meta_path: Path
    n_saved: int
    n_samples: int
    sampling_rate: float
    neural_columns: np.ndarray
    sync_columns: np.ndarray
    gain_to_uV: np.ndarray
    probe: ProbeLayout
    meta: dict


def spikeglx_info(path: str | Path) -> SpikeGLXInfo:
    """Read and validate a SpikeGLX imec stream's ``.meta`` against its ``.bin``.

    Parameters
    ----------
    path : str or Path
        The ``.ap.bin`` or its ``.meta``.

    Raises
    ------
    RecordingNotFoundError, MetaFileError, FileSizeError
    """
    path = Path(path)
    meta_path = find_meta(path)
    bin_path = path if path.suffix != ".meta" else path.with_suffix(".bin")
    if not bin_path.exists():
        raise RecordingNotFoundError(f"binary file {str(bin_path)!r} does not exist; check the path.")
    if not meta_path.exists():
        raise MetaFileError(
            f"no .meta beside {bin_path.name} (looked for {meta_path.name}). SpikeGLX writes one next to each .bin; "
            "copy it there, or open the file as raw with n_channels, sampling_rate, gain_to_uV and probe given."
        )
    meta = read_meta(meta_path)
    stream = meta.get("typeThis", "imec")
    if stream != "imec":
        raise RecordingError(
            f"{meta_path.name} describes a {stream!r} stream; spikearray sorts imec probe streams (*.imecN.ap.bin)."
        )
    n_saved = int(_need(meta, "nSavedChans", meta_path))
    rate = float(_need(meta, "imSampRate", meta_path))
    if rate <= 0:
        raise MetaFileError(f"{meta_path}: imSampRate = {rate}; expected a positive rate in Hz.")
    size = bin_path.stat().st_size
    frame = 2 * n_saved
    if size == 0:
        from ..errors import EmptyRecordingError

        raise EmptyRecordingError(f"{bin_path} is empty (0 bytes); nothing to sort.")
    declared = int(meta["fileSizeBytes"]) if "fileSizeBytes" in meta else size
    if size % frame:
        raise FileSizeError(
            f"{bin_path.name} is {size} bytes, not a whole number of {n_saved}-channel int16 samples "
            f"({size % frame} bytes left over). The .meta says nSavedChans={n_saved} and fileSizeBytes={declared}; "
            "the file may be truncated or the .meta may belong to another file."
        )
    if declared != size:
        raise FileSizeError(
            f"{bin_path.name} is {size} bytes but its .meta says fileSizeBytes={declared} (nSavedChans={n_saved}). "
            "The .bin was cut short or grown after recording, or the .meta belongs to another file; pair the right "
            "files, or fix fileSizeBytes in a copy of the .meta if you know the data are intact."
        )
    counts = [int(v) for v in _need(meta, "snsApLfSy", meta_path).split(",")]
    if sum(counts) != n_saved:
        raise MetaFileError(f"{meta_path}: snsApLfSy={counts} sums to {sum(counts)} but nSavedChans={n_saved}.")
    acq = [int(v) for v in meta.get("acqApLfSy", meta["snsApLfSy"]).split(",")]
    orig = _parse_subset(meta.get("snsSaveChanSubset", "all"), n_saved)
    if len(orig) != n_saved:
        raise MetaFileError(
            f"{meta_path}: snsSaveChanSubset lists {len(orig)} channels but nSavedChans={n_saved}."
        )
    a, lf = acq[0], acq[1]
    is_ap = orig < a
    is_sync = orig >= a + lf
    neural = np.flatnonzero(is_ap)
    sync = np.flatnonzero(is_sync)
    if len(neural) == 0:
        raise RecordingError(f"{meta_path.name}: no AP channels in this file (snsApLfSy={counts}); open the .ap.bin.")
    readout = orig[neural]
    ptype = _probe_type(meta)
    rng_max = float(meta.get("imAiRangeMax", 0.6))
    max_int = float(meta.get("imMaxInt", 512))
    gains = _ap_gains(meta, ptype, readout, meta_path)
    uv = 1e6 * rng_max / max_int / gains
    x, y, sh, ids = _geometry(meta, ptype, readout, meta_path)
    probe = ProbeLayout(neural, x, y, sh, ids, meta.get("imDatPrb_pn", f"imec type {ptype}"))
    if len(np.unique(np.c_[x, y], axis=0)) != len(x):
        warnings.warn(f"{meta_path.name}: several channels share one position; check the probe geometry.", stacklevel=3)
    return SpikeGLXInfo(bin_path, meta_path, n_saved, size // frame, rate, neural, sync, uv, probe, meta)
