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


_MAX_CHANNEL_ID = 1 << 20  # far above any acquired channel id (a quad-base probe has 1536 + 4)


def _bad(path: Path, key: str, value: str, expected: str) -> MetaFileError:
    """The error for a ``.meta`` value that is not what SpikeGLX writes."""
    shown = value if len(value) <= 60 else value[:57] + "..."
    return MetaFileError(
        f"{path}: {key}={shown!r} is not valid; expected {expected}. The .meta may be damaged or hand-edited: "
        "re-export it from SpikeGLX, or open the .bin as raw with n_channels, sampling_rate, gain_to_uV and probe."
    )


def _int(meta: dict[str, str], key: str, path: Path, *, minimum: int | None = None, default: int | None = None) -> int:
    """``meta[key]`` as an int (``default`` when absent and given), else :class:`MetaFileError` naming the key."""
    if key not in meta and default is not None:
        return default
    text = _need(meta, key, path)
    try:
        value = int(text.strip())
    except ValueError:
        raise _bad(path, key, text, "an integer") from None
    if minimum is not None and value < minimum:
        raise _bad(path, key, text, f"an integer >= {minimum}")
    return value


def _float(meta: dict[str, str], key: str, path: Path, *, default: float | None = None) -> float:
    """``meta[key]`` as a finite positive float (``default`` when absent and given)."""
    if key not in meta and default is not None:
        return default
    text = _need(meta, key, path)
    try:
        value = float(text.strip())
    except ValueError:
        raise _bad(path, key, text, "a positive number") from None
    if not (np.isfinite(value) and value > 0):
        raise _bad(path, key, text, "a finite positive number")
    return value


def _counts(meta: dict[str, str], key: str, path: Path) -> list[int]:
    """``snsApLfSy``/``acqApLfSy``: three non-negative channel counts (AP, LF, SY)."""
    text = meta[key]
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        raise _bad(path, key, text, "three comma-separated channel counts AP,LF,SY (e.g. 384,0,1)") from None
    if len(counts) != 3 or min(counts) < 0 or max(counts) > _MAX_CHANNEL_ID:
        raise _bad(path, key, text, "three comma-separated channel counts AP,LF,SY (e.g. 384,0,1)")
    return counts


def _parse_subset(text: str, saved: list[int], acquired: list[int], path: Path) -> np.ndarray:
    """``snsSaveChanSubset`` (``all`` or a printer-style list such as ``0:383,768``) as acquired channel ids.

    ``saved``/``acquired``: the AP, LF, SY counts of ``snsApLfSy``/``acqApLfSy``. ``all`` is every saved channel
    in file order AP, LF, SY, each kind numbered from where it starts among the acquired ones.
    """
    if text.strip().lower() == "all":
        ap, lf = acquired[0], acquired[1]
        return np.r_[np.arange(saved[0]), ap + np.arange(saved[1]), ap + lf + np.arange(saved[2])].astype(np.int64)
    out: list[int] = []
    expected = "'all' or a list of channel ids and inclusive ranges such as 0:383,768"
    try:
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            if ":" in item:
                a, b = (int(v) for v in item.split(":"))
                if not 0 <= a <= b < _MAX_CHANNEL_ID:
                    raise ValueError(item)
                out.extend(range(a, b + 1))
            else:
                out.append(int(item))
                if not 0 <= out[-1] < _MAX_CHANNEL_ID:
                    raise ValueError(item)
    except ValueError:
        raise _bad(path, "snsSaveChanSubset", text, expected) from None
    if len(set(out)) != len(out):
        raise _bad(path, "snsSaveChanSubset", text, expected + ", each channel once")
    return np.asarray(out, dtype=np.int64)


def _entries(table: str, key: str = "table", path: Path | None = None) -> tuple[str, list[str]]:
    parts = [p for p in (s.strip().lstrip("(") for s in table.split(")")) if p]
    if not parts:
        raise _bad(path or Path(".meta"), f"~{key}", table, "a table (header)(entry)(entry)...")
    return parts[0], parts[1:]


class _TableError(Exception):
    """A field of a ``.meta`` table did not parse (turned into :class:`MetaFileError` naming the table)."""


def _table_int(field: str) -> int:
    try:
        value = int(field)
    except ValueError:
        raise _TableError(field) from None
    if abs(value) >= _MAX_CHANNEL_ID:  # channel, bank, shank and electrode ids are all small
        raise _TableError(field)
    return value


def _table_float(field: str) -> float:
    try:
        value = float(field)
    except ValueError:
        raise _TableError(field) from None
    if not np.isfinite(value):
        raise _TableError(field)
    return value


def _probe_type(meta: dict[str, str], path: Path | None = None) -> int:
    path = path or Path(".meta")
    if "imDatPrb_type" in meta:
        return _int(meta, "imDatPrb_type", path, minimum=0)
    if "imroTbl" in meta:
        head, _ = _entries(meta["imroTbl"], "imroTbl", path)
        first = head.split(",")[0].strip()
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
    try:
        return _ap_gains_unchecked(meta, ptype, readout, path)
    except _TableError as e:
        raise _bad(path, "~imroTbl", meta.get("imroTbl", ""),
                   f"integer fields in every entry (the field {str(e)!r} is not one)") from None
    except IndexError:  # entries shorter than this probe type's layout: the type or the table is wrong
        raise _bad(path, "~imroTbl", meta.get("imroTbl", ""),
                   f"entries laid out as probe type {ptype} has them (imDatPrb_type="
                   f"{meta.get('imDatPrb_type', 'absent')}); the table and imDatPrb_type disagree") from None


def _ap_gains_unchecked(meta: dict[str, str], ptype: int, readout: np.ndarray, path: Path) -> np.ndarray:
    if ptype in NP1_TYPES and "imroTbl" in meta:
        _, rows = _entries(meta["imroTbl"], "imroTbl", path)
        gains = {}
        for r in rows:
            f = r.split()
            if len(f) >= 5:
                gains[_table_int(f[0])] = _table_float(f[3])
        if gains:
            try:
                g = np.array([gains[int(c)] for c in readout], dtype=np.float64)
            except KeyError as e:
                raise MetaFileError(f"{path}: ~imroTbl has no entry for AP readout channel {e}, which "
                                    "snsSaveChanSubset and acqApLfSy/snsApLfSy say is in the file; the table may be "
                                    "cut short or the counts wrong.") from None
            if not np.all(g > 0):
                raise MetaFileError(f"{path}: ~imroTbl gives AP gain {g[g <= 0][0]:g} for a channel; expected "
                                    "positive gains (e.g. 500).")
            return g
    if "imChan0apGain" in meta:
        return np.full(len(readout), _float(meta, "imChan0apGain", path))
    if ptype in (21, 24):
        return np.full(len(readout), 80.0)
    if ptype in (2003, 2013, 2000, 2010, 2014, 2020):
        return np.full(len(readout), 100.0)
    if ptype == 1110 and "imroTbl" in meta:
        head, _ = _entries(meta["imroTbl"], "imroTbl", path)
        gain = _table_float(head.split(",")[3])
        if gain <= 0:
            raise _TableError(head)
        return np.full(len(readout), gain)
    raise MetaFileError(
        f"{path}: unknown probe type {ptype} (imDatPrb_type, or the ~imroTbl header) and no per-channel gain "
        "(~imroTbl/imChan0apGain); spikearray will not guess a µV scale. Open the .bin as raw with gain_to_uV given."
    )


def _geometry(meta: dict[str, str], ptype: int, readout: np.ndarray, path: Path) -> tuple[np.ndarray, ...]:
    """x, y (µm), shank and contact ids of the saved neural channels, in file order."""
    key = _geometry_table(meta, len(readout))
    try:
        out = _geometry_unchecked(meta, ptype, readout, path, key)
    except (_TableError, ValueError, IndexError) as e:
        if isinstance(e, MetaFileError):
            raise
        raise _bad(path, f"~{key}", meta.get(key, ""), f"numeric fields in every entry (could not read {str(e)!r})"
                   ) from None
    x, y, sh, _ = out
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))) or (len(sh) and sh.min() < 0):
        raise _bad(path, f"~{key}", meta.get(key, ""), "finite positions and shank indices >= 0")
    return out


def _geometry_table(meta: dict[str, str], n: int) -> str:
    """The table the positions come from: ``snsGeomMap``, else ``snsShankMap`` when it lists every saved neural
    channel, else ``imroTbl`` (so that an error names the table that was read, not one that was passed over)."""
    if "snsGeomMap" in meta:
        return "snsGeomMap"
    if "snsShankMap" in meta and len(_entries(meta["snsShankMap"], "snsShankMap")[1]) >= n:
        return "snsShankMap"
    return "imroTbl"


def _geometry_unchecked(meta: dict[str, str], ptype: int, readout: np.ndarray, path: Path,
                        table: str) -> tuple[np.ndarray, ...]:
    """Positions from ``table`` (the one :func:`_geometry_table` chose)."""
    n = len(readout)
    if table == "snsGeomMap":
        head, rows = _entries(meta["snsGeomMap"], "snsGeomMap", path)
        hf = head.split(",")
        pitch = _table_float(hf[2]) if len(hf) > 2 else 0.0
        if len(rows) < n:
            raise MetaFileError(f"{path}: ~snsGeomMap lists {len(rows)} channels but the file has {n} neural channels.")
        sh, x, z = [], [], []
        for r in rows[:n]:
            s, xx, zz = r.split(":")[:3]
            sh.append(_table_int(s))
            x.append(sh[-1] * pitch + _table_float(xx))
            z.append(_table_float(zz))
        sh_a = np.array(sh)
        ids = np.array([f"s{s}c{c}" for s, c in zip(sh, readout)])
        return np.array(x), np.array(z), sh_a, ids
    np1 = ptype in NP1_TYPES
    if table == "snsShankMap":
        _, rows = _entries(meta["snsShankMap"], "snsShankMap", path)
        sh, x, z = [], [], []
        for r in rows[:n]:
            s, c, rr = (_table_int(v) for v in r.split(":")[:3])
            if np1:
                xx, zz = (27 if rr % 2 == 0 else 11) + 32 * c, 20.0 * rr
            else:
                xx, zz = 27 + 32 * c, 15.0 * rr
            sh.append(s)
            x.append(250.0 * s + xx)
            z.append(zz)
        return np.array(x, float), np.array(z, float), np.array(sh), np.array([""] * n)
    if "imroTbl" in meta:
        _, rows = _entries(meta["imroTbl"], "imroTbl", path)
        by_chan = {_table_int(r.split()[0]): r.split() for r in rows if r.split()}
        sh, x, z, ids = [], [], [], []
        for c in readout:
            f = by_chan.get(int(c))
            if f is None:
                raise MetaFileError(
                    f"{path}: ~imroTbl has no entry for AP readout channel {int(c)}, which snsSaveChanSubset and "
                    "acqApLfSy/snsApLfSy say is in the file; the table may be cut short or the counts wrong."
                )
            if np1:
                e, s = _table_int(f[0]) + 384 * _table_int(f[1]), 0
                row, col = e // 2, e % 2
                xx, zz = (27 if row % 2 == 0 else 11) + 32 * col, 20.0 * row
            elif ptype in NP2_4SHANK:
                s, e = _table_int(f[1]), _table_int(f[4])
                row, col = e // 2, e % 2
                xx, zz = 27 + 32 * col, 15.0 * row
            elif ptype in NP2_1SHANK:
                s, e = 0, _table_int(f[3])
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


def _check_chan_map(meta: dict[str, str], n_saved: int, sync: np.ndarray, path: Path) -> None:
    """``~snsChanMap`` (labels only) must list every saved channel, with the SY word(s) where the sync columns are."""
    if "snsChanMap" not in meta:
        return
    text = meta["snsChanMap"]
    fix = ("the .meta is inconsistent (from another file, or hand-edited). Re-export it from SpikeGLX; this table "
           "only labels channels, so deleting its line from a copy of the .meta also works.")
    _, rows = _entries(text, "snsChanMap", path)
    names = []
    for r in rows:
        name, sep, rest = r.partition(";")
        if not sep or ":" not in rest:
            raise _bad(path, "~snsChanMap", text, "entries (NAME;channel:order) such as (AP12;12:12)")
        names.append(name.strip())
    if len(names) != n_saved:
        raise MetaFileError(f"{path}: ~snsChanMap lists {len(names)} channels but nSavedChans={n_saved}; {fix}")
    named_sync = [j for j, nm in enumerate(names) if nm.upper().startswith("SY")]
    if named_sync != sync.tolist():
        raise MetaFileError(
            f"{path}: ~snsChanMap names file column(s) {named_sync} SY, but snsSaveChanSubset and acqApLfSy put the "
            f"sync word in column(s) {sync.tolist()}; {fix}"
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
            f"{meta_path.name} describes a {stream!r} stream (typeThis={stream!r}); spikearray sorts imec probe "
            "streams (*.imecN.ap.bin)."
        )
    n_saved = _int(meta, "nSavedChans", meta_path, minimum=1)
    rate = _float(meta, "imSampRate", meta_path)
    size = bin_path.stat().st_size
    frame = 2 * n_saved
    if size == 0:
        from ..errors import EmptyRecordingError

        raise EmptyRecordingError(f"{bin_path} is empty (0 bytes); nothing to sort.")
    declared = _int(meta, "fileSizeBytes", meta_path, minimum=0, default=size)
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
    _need(meta, "snsApLfSy", meta_path)
    counts = _counts(meta, "snsApLfSy", meta_path)
    if sum(counts) != n_saved:
        raise MetaFileError(f"{meta_path}: snsApLfSy={counts} sums to {sum(counts)} but nSavedChans={n_saved}.")
    acq = _counts(meta, "acqApLfSy" if "acqApLfSy" in meta else "snsApLfSy", meta_path)
    orig = _parse_subset(meta.get("snsSaveChanSubset", "all"), counts, acq, meta_path)
    if len(orig) != n_saved:
        raise MetaFileError(
            f"{meta_path}: snsSaveChanSubset lists {len(orig)} channels but nSavedChans={n_saved}."
        )
    a, lf = acq[0], acq[1]
    is_ap = orig < a
    is_sync = orig >= a + lf
    got = [int(is_ap.sum()), int((~is_ap & ~is_sync).sum()), int(is_sync.sum())]
    if got != counts:
        raise MetaFileError(
            f"{meta_path}: snsSaveChanSubset={meta.get('snsSaveChanSubset', 'all')!r} holds {got[0]} AP, {got[1]} LF "
            f"and {got[2]} SY channels by acqApLfSy={acq}, but snsApLfSy={counts} says the file holds "
            f"{counts[0]}, {counts[1]} and {counts[2]}; the .meta is inconsistent (hand-edited, or from another file)."
        )
    neural = np.flatnonzero(is_ap)
    sync = np.flatnonzero(is_sync)
    if len(neural) == 0:
        raise RecordingError(f"{meta_path.name}: no AP channels in this file (snsApLfSy={counts}); open the .ap.bin.")
    _check_chan_map(meta, n_saved, sync, meta_path)
    readout = orig[neural]
    ptype = _probe_type(meta, meta_path)
    rng_max = _float(meta, "imAiRangeMax", meta_path, default=0.6)
    max_int = _float(meta, "imMaxInt", meta_path, default=512.0)
    gains = _ap_gains(meta, ptype, readout, meta_path)
    uv = 1e6 * rng_max / max_int / gains
    x, y, sh, ids = _geometry(meta, ptype, readout, meta_path)
    probe = ProbeLayout(neural, x, y, sh, ids, meta.get("imDatPrb_pn", f"imec type {ptype}"))
    if len(np.unique(np.c_[x, y], axis=0)) != len(x):
        warnings.warn(f"{meta_path.name}: several channels share one position; check the probe geometry.", stacklevel=3)
    return SpikeGLXInfo(bin_path, meta_path, n_saved, size // frame, rate, neural, sync, uv, probe, meta)
