"""Probe geometry: one small table per recording, read from every format users have.

Every format reduces to :class:`ProbeLayout`: for each neural channel, its row in the binary file
(``channel``), its position ``x``, ``y`` in µm, its ``shank`` and an optional ``contact_id``. Formats that
are code (``.prb``) are parsed with :mod:`ast`, never executed.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ProbeFormatError, ProbeMismatchError, RecordingNotFoundError

__all__ = ["ProbeLayout", "read_probe", "as_probe_layout"]


@dataclass(frozen=True)
class ProbeLayout:
    """Contact geometry of the recorded channels.

    Attributes
    ----------
    channel : ndarray of int64, shape (n,)
        Row (column index in a time-major file) of each contact in the binary file.
    x, y : ndarray of float64, shape (n,)
        Contact centres in µm (``y`` is depth along the shank, increasing upwards).
    shank : ndarray of int64, shape (n,)
        Shank index of each contact.
    contact_id : ndarray of str, shape (n,)
        Contact names (``""`` where the source has none).
    name : str
        Probe model or file name.
    unused : ndarray of int64, shape (m,)
        File rows the probe file names but marks as not to be sorted (Kilosort ``connected = false``, e.g. the
        NP1.0 reference channel 191). Their omission is deliberate, so :meth:`unwired` does not report them.
    """

    channel: np.ndarray
    x: np.ndarray
    y: np.ndarray
    shank: np.ndarray
    contact_id: np.ndarray = field(default=None)  # type: ignore[assignment]
    name: str = ""
    unused: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = len(self.channel)
        cid = self.contact_id if self.contact_id is not None else np.array([""] * n)
        object.__setattr__(self, "channel", np.asarray(self.channel, dtype=np.int64))
        object.__setattr__(self, "x", np.asarray(self.x, dtype=np.float64))
        object.__setattr__(self, "y", np.asarray(self.y, dtype=np.float64))
        object.__setattr__(self, "shank", np.asarray(self.shank, dtype=np.int64))
        object.__setattr__(self, "contact_id", np.asarray(cid, dtype=str))
        unused = np.zeros(0, np.int64) if self.unused is None else np.asarray(self.unused, dtype=np.int64).ravel()
        object.__setattr__(self, "unused", np.setdiff1d(unused, self.channel))
        for k in ("x", "y", "shank", "contact_id"):
            if len(getattr(self, k)) != n:
                raise ProbeFormatError(
                    f"probe {self.name!r}: {k} has {len(getattr(self, k))} entries but there are {n} channels;"
                    " every per-contact list must have the same length."
                )
        if n == 0:
            raise ProbeFormatError(f"probe {self.name!r} has no connected contacts; expected at least one.")
        if len(np.unique(self.channel)) != n:
            dup = np.unique(self.channel[np.unique(self.channel, return_counts=True)[1][np.searchsorted(np.unique(self.channel), self.channel)] > 1])
            raise ProbeFormatError(
                f"probe {self.name!r} maps several contacts to the same file channel(s) {dup[:10].tolist()};"
                " each recorded channel must appear once."
            )
        if (self.channel < 0).any():
            raise ProbeFormatError(f"probe {self.name!r} has negative channel indices; expected file rows >= 0.")

    @property
    def n_channels(self) -> int:
        """Number of contacts."""
        return len(self.channel)

    def sorted_by_channel(self) -> "ProbeLayout":
        """The same probe with contacts in file order (the order of the recording's columns)."""
        o = np.argsort(self.channel, kind="stable")
        return ProbeLayout(self.channel[o], self.x[o], self.y[o], self.shank[o], self.contact_id[o], self.name,
                           self.unused)

    def unwired(self, columns: np.ndarray) -> np.ndarray:
        """The entries of ``columns`` (file rows that hold neural data) that no contact of this probe names.

        Parameters
        ----------
        columns : array of int, shape (k,)
            File rows expected to carry neural data (all columns of a raw file; the AP columns of SpikeGLX).

        Returns
        -------
        ndarray of int64
            Sorted rows neither wired to a contact nor marked unused by the probe file.

        Examples
        --------
        >>> ProbeLayout(np.arange(28), np.zeros(28), np.arange(28.0), np.zeros(28, int)).unwired(np.arange(32))
        array([28, 29, 30, 31])
        """
        return np.setdiff1d(np.asarray(columns, dtype=np.int64), np.union1d(self.channel, self.unused))

    def check_fits(self, n_file_channels: int, source: str = "the recording") -> None:
        """Raise :class:`ProbeMismatchError` if a channel index does not exist in a file of that width."""
        if self.channel.max() >= n_file_channels:
            bad = self.channel[self.channel >= n_file_channels]
            raise ProbeMismatchError(
                f"probe {self.name!r} refers to file channel(s) {bad[:10].tolist()} but {source} has only "
                f"{n_file_channels} channels (0..{n_file_channels - 1}). Check n_channels, or pass the probe that "
                "matches this recording."
            )


def _from_probeinterface(pg: Any, name: str) -> ProbeLayout:
    """Convert a probeinterface Probe or ProbeGroup to a ProbeLayout (connected contacts only)."""
    from probeinterface import Probe, ProbeGroup

    probes = [pg] if isinstance(pg, Probe) else list(pg.probes)
    chans, xs, ys, shanks, ids = [], [], [], [], []
    shank_offset = 0
    for p in probes:
        pos = np.asarray(p.contact_positions, dtype=float)
        if pos.ndim != 2 or pos.shape[1] < 2:
            raise ProbeFormatError(f"probe {name!r}: contact positions must be (n, 2) or (n, 3); got {pos.shape}.")
        if p.si_units == "mm":
            pos = pos * 1000.0
        dci = p.device_channel_indices
        n = len(pos)
        if dci is None:
            dci = np.arange(n) + len(chans)
        dci = np.asarray(dci)
        sh = np.asarray(p.shank_ids) if p.shank_ids is not None else np.array([""] * n)
        sh_int = np.zeros(n, dtype=int)
        labels = [s for s in dict.fromkeys(sh.tolist()) if s != ""]
        for i, s in enumerate(labels):
            sh_int[sh == s] = int(s) if str(s).lstrip("-").isdigit() else i
        cid = np.asarray(p.contact_ids) if p.contact_ids is not None else np.array([""] * n)
        keep = dci >= 0
        chans.extend(dci[keep].tolist())
        xs.extend(pos[keep, 0].tolist())
        ys.extend(pos[keep, 1].tolist())
        shanks.extend((sh_int[keep] + shank_offset).tolist())
        ids.extend(cid[keep].astype(str).tolist())
        shank_offset += max(1, len(labels))
    model = probes[0].annotations.get("model_name", "") if probes else ""
    return ProbeLayout(np.array(chans), np.array(xs), np.array(ys), np.array(shanks), np.array(ids),
                       name or model or "probeinterface")


def _read_prb(path: Path) -> ProbeLayout:
    """Parse a Phy/klusta ``.prb`` file without executing it."""
    try:
        tree = ast.parse(path.read_text())
    except SyntaxError as e:
        raise ProbeFormatError(f"{path}: not valid Python syntax ({e.msg}, line {e.lineno}).") from None

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("range", "list"):
            args = [ev(a) for a in node.args]
            return list(range(*args)) if node.func.id == "range" else list(args[0])
        if isinstance(node, ast.Dict):
            return {ev(k): ev(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.Constant):
            return node.value
        raise ProbeFormatError(
            f"{path}: only literal dicts, lists, numbers and range()/list(range()) are allowed in a .prb file; "
            f"found {ast.dump(node)[:60]!r} on line {getattr(node, 'lineno', '?')}."
        )

    groups = None
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "channel_groups" for t in stmt.targets):
            groups = ev(stmt.value)
    if not isinstance(groups, dict) or not groups:
        raise ProbeFormatError(f"{path}: no 'channel_groups = {{...}}' dict found; a .prb file must define one.")
    chans, xs, ys, shanks = [], [], [], []
    for key in sorted(groups):
        g = groups[key]
        geom = g.get("geometry", {})
        for ch in g.get("channels", []):
            if ch not in geom:
                raise ProbeFormatError(f"{path}: channel {ch} of group {key} has no entry in 'geometry'.")
            chans.append(int(ch))
            xs.append(float(geom[ch][0]))
            ys.append(float(geom[ch][1]))
            shanks.append(int(key) if isinstance(key, int) else len(set(shanks)))
    return ProbeLayout(np.array(chans), np.array(xs), np.array(ys), np.array(shanks), None, path.stem)


def _read_mat(path: Path) -> ProbeLayout:
    """Kilosort channel map ``.mat`` (``chanMap`` 1-based, ``connected`` mask)."""
    from scipy.io import loadmat

    try:
        m = loadmat(str(path))
    except NotImplementedError:
        raise ProbeFormatError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; re-save with save(..., '-v7').") from None
    except Exception as e:
        raise ProbeFormatError(f"{path}: not a readable MATLAB .mat file ({e}).") from None
    for k in ("chanMap", "xcoords", "ycoords"):
        if k not in m:
            raise ProbeFormatError(f"{path}: Kilosort channel map lacks variable {k!r}; expected chanMap, xcoords, ycoords.")
    chan = np.asarray(m["chanMap"]).ravel().astype(np.int64) - 1
    x = np.asarray(m["xcoords"], dtype=float).ravel()
    y = np.asarray(m["ycoords"], dtype=float).ravel()
    k = np.asarray(m["kcoords"], dtype=float).ravel() if "kcoords" in m else np.zeros_like(x)
    conn = np.asarray(m["connected"]).ravel().astype(bool) if "connected" in m else np.ones(len(chan), bool)
    k = k - k[conn].min() if conn.any() else k
    return ProbeLayout(chan[conn], x[conn], y[conn], k[conn].astype(np.int64), None, path.stem, chan[~conn])


def _read_ks_json(data: dict, path: Path) -> ProbeLayout:
    for k in ("chanMap", "xc", "yc"):
        if k not in data:
            raise ProbeFormatError(f"{path}: Kilosort probe JSON lacks {k!r}; expected chanMap, xc, yc, n_chan.")
    n = len(data["chanMap"])
    k = np.asarray(data.get("kcoords", np.zeros(n)), dtype=float)
    return ProbeLayout(np.asarray(data["chanMap"]), data["xc"], data["yc"], k.astype(np.int64), None, path.stem)


def read_probe(source: Any) -> ProbeLayout:
    """Read a probe from a file or object.

    Parameters
    ----------
    source : str, Path, probeinterface.Probe, probeinterface.ProbeGroup or ProbeLayout
        probeinterface JSON (``{"specification": "probeinterface", ...}``), Kilosort JSON (``chanMap``,
        ``xc``, ``yc``), Kilosort ``.mat`` channel map, Phy ``.prb``, or a probe object.

    Returns
    -------
    ProbeLayout
        Connected contacts with their file rows and µm positions, in file-row order.

    Raises
    ------
    RecordingNotFoundError
        The path does not exist.
    ProbeFormatError
        Unknown format or malformed content.

    Examples
    --------
    >>> probe = read_probe("probe.json")  # doctest: +SKIP
    >>> probe.n_channels  # doctest: +SKIP
    64
    """
    if isinstance(source, ProbeLayout):
        return source.sorted_by_channel()
    try:
        from probeinterface import Probe, ProbeGroup

        if isinstance(source, (Probe, ProbeGroup)):
            return _from_probeinterface(source, "").sorted_by_channel()
    except ImportError:  # pragma: no cover - probeinterface is a dependency
        pass
    if not isinstance(source, (str, Path)):
        raise ProbeFormatError(
            f"cannot read a probe from a {type(source).__name__}; pass a path (.json, .prb, .mat) or a "
            "probeinterface Probe/ProbeGroup."
        )
    path = Path(source)
    if not path.exists():
        raise RecordingNotFoundError(f"probe file {str(path)!r} does not exist; check the path.")
    suffix = path.suffix.lower()
    if suffix == ".prb":
        return _read_prb(path).sorted_by_channel()
    if suffix == ".mat":
        return _read_mat(path).sorted_by_channel()
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ProbeFormatError(f"{path}: not valid JSON ({e}).") from None
        if isinstance(data, dict) and data.get("specification") == "probeinterface":
            from probeinterface import read_probeinterface

            try:
                pg = read_probeinterface(str(path))
            except Exception as e:
                raise ProbeFormatError(f"{path}: probeinterface could not read it ({e}).") from None
            return _from_probeinterface(pg, path.stem).sorted_by_channel()
        if isinstance(data, dict) and "chanMap" in data:
            return _read_ks_json(data, path).sorted_by_channel()
        raise ProbeFormatError(
            f"{path}: JSON is neither a probeinterface file (\"specification\": \"probeinterface\") nor a "
            "Kilosort probe (chanMap, xc, yc)."
        )
    raise ProbeFormatError(
        f"unknown probe format {suffix!r} for {path}; expected .json (probeinterface or Kilosort), .prb or .mat."
    )


def as_probe_layout(probe: Any, n_file_channels: int, source: str, *, neural_columns: Any = None,
                    wired_only: bool = False) -> ProbeLayout:
    """Read ``probe`` and check that it fits a file with ``n_file_channels`` columns.

    Parameters
    ----------
    probe : path or probe object
        See :func:`read_probe`.
    n_file_channels : int
        Columns per sample in the binary file.
    source : str
        The file's name, for messages.
    neural_columns : array of int, optional
        File columns that hold neural data (default: all ``n_file_channels``). Each must be wired to a contact
        (or marked unused by the probe file), unless ``wired_only``.
    wired_only : bool
        Sort only the wired channels: columns without a contact are left out knowingly instead of raising.

    Raises
    ------
    ProbeMismatchError
        A contact names a column the file does not have, or (without ``wired_only``) a neural column has no
        contact; the message gives both counts and the unwired columns.
    """
    layout = read_probe(probe)
    layout.check_fits(n_file_channels, source)
    columns = np.arange(n_file_channels) if neural_columns is None else np.asarray(neural_columns, dtype=np.int64)
    missing = layout.unwired(columns)
    if len(missing) and not wired_only:
        raise unwired_error(layout, missing, len(columns), source)
    return layout


def _index_list(values: np.ndarray, limit: int = 20) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return f"[{shown}{f', ... ({len(values) - limit} more)' if len(values) > limit else ''}]"


def unwired_error(layout: ProbeLayout, missing: np.ndarray, n_columns: int, source: str) -> ProbeMismatchError:
    """The error for a probe that leaves some of the recording's data channels without a contact."""
    n_wired = n_columns - len(missing)
    return ProbeMismatchError(
        f"probe {layout.name!r} wires {n_wired} of the {n_columns} data channels of {source}; file channel(s) "
        f"{_index_list(missing)} have no contact in it, and sorting would silently leave them out. Pass the probe "
        f"file that belongs to this recording, or, if those columns are not neural (sync, aux, a broken "
        f"headstage channel), pass wired_only=True (command line: --wired-only) to sort only the {n_wired} wired "
        "channels."
    )


def linear_layout(n: int, pitch: float = 20.0) -> ProbeLayout:
    """A single-column probe at ``pitch`` µm, used when a raw file comes without geometry and one channel."""
    return ProbeLayout(np.arange(n), np.zeros(n), np.arange(n) * pitch, np.zeros(n, int), None, "linear")


def mismatch(n_probe: int, n_rec: int, source: str) -> ProbeMismatchError:
    """The error for a probe whose channel count differs from the recording's."""
    return ProbeMismatchError(
        f"the probe has {n_probe} channels but {source} has {n_rec}; pass the probe file that belongs to this "
        "recording (or set n_channels to the file's column count)."
    )
