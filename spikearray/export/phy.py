"""Export a Sorting Dataset as the Phy / Kilosort 4 results folder.

The folder holds the files Kilosort 4 writes (``/work/shared/formats.md`` §3.2), in the dtypes phylib and
SpikeInterface read, plus ``cluster_amplitude_uV.tsv``, ``cluster_firing_rate.tsv`` and
``spikearray_settings.json`` (settings as JSON instead of Kilosort's pickled ``ops.npy``). It is written into a
temporary folder, checked against the cross-file consistency rules (formats.md §3.6), and renamed into place.

Whitening convention: Phy unwhitens ``templates.npy`` as ``template @ whitening_mat_inv`` and SpikeInterface's
``read_kilosort_as_analyzer`` as ``template @ whitening_mat_inv.T``; both are right only for a symmetric inverse.
A symmetric W is written as is (``whitening_mat_inv = inv(W)``); a non-symmetric W (e.g. Kilosort-style local
whitening) is replaced by the symmetric factor ``P`` of its polar decomposition ``W = U P`` and the templates are
rotated by ``U`` so that ``templates.npy @ whitening_mat_inv`` is the µV template for both readers.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from ..clustering.similarity import template_similarity
from ..errors import OutputError
from ..geometry import shanks
from ..settings import Settings
from ._atomic import atomic_dir, require_free_space
from .zarr_store import jsonable

__all__ = ["export_phy", "validate_phy_folder", "phy_whitening", "PHY_FOLDER"]

PHY_FOLDER = "phy"
NO_PATH = "no_path.bin"


# ---------------------------------------------------------------------------------------------- helpers
def phy_whitening(W: np.ndarray, templates_w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whitening matrix, its inverse and templates in the frame both Phy and SpikeInterface unwhiten correctly.

    Parameters
    ----------
    W : ndarray (C, C)
        ``whitened[t, i] = sum_j W[i, j] uV[t, j]`` (the contract's ``whitening_matrix``).
    templates_w : ndarray (K, nt, C)
        Templates whitened with ``W``.

    Returns
    -------
    whitening_mat, whitening_mat_inv : ndarray of float32 (C, C)
        Symmetric; ``whitening_mat_inv`` is ``inv(whitening_mat)`` (``inv(W + 1e-5 I)`` as Kilosort 4 does when
        W is too ill-conditioned to invert exactly).
    templates : ndarray of float32 (K, nt, C)
        ``templates @ whitening_mat_inv`` = the µV templates.
    """
    Wd = np.asarray(W, dtype=np.float64)
    scale = max(float(np.abs(Wd).max()), 1e-30)
    tw = np.asarray(templates_w, dtype=np.float32)
    if np.abs(Wd - Wd.T).max() > 1e-6 * scale:
        from scipy.linalg import polar

        U, P = polar(Wd, side="right")  # W = U P, U orthogonal, P symmetric positive semi-definite
        # uV @ W.T = uV @ P @ U.T, so templates_w @ U = uV @ P: templates whitened by the symmetric P.
        tw = np.einsum("ktj,ji->kti", tw.astype(np.float64), U).astype(np.float32)
        Wd = P
    Wd = 0.5 * (Wd + Wd.T)
    eye = np.eye(len(Wd))
    inv = None
    if np.linalg.cond(Wd) < 1e7:
        inv = np.linalg.inv(Wd)
    if inv is None or not np.all(np.isfinite(inv)):
        inv = np.linalg.inv(Wd + 1e-5 * eye)
    inv = 0.5 * (inv + inv.T)
    return Wd.astype(np.float32), inv.astype(np.float32), tw


def _tsv(path: Path, name: str, ids: np.ndarray, values: Any, fmt: str = "{}") -> None:
    rows = [f"cluster_id\t{name}"]
    rows += [f"{int(i)}\t{fmt.format(v)}" for i, v in zip(ids, values)]
    path.write_text("\n".join(rows) + "\n")


def _params_text(params: dict) -> str:
    lines = ["# Phy parameters written by spikearray (plain literals; read with ast.literal_eval)"]
    lines += [f"{k} = {v!r}" for k, v in params.items()]
    return "\n".join(lines) + "\n"


def _recording_info(sorting: xr.Dataset, recording: Any) -> dict:
    """Where the raw data are and how they are laid out (from the recording if given, else the sorting's attrs)."""
    a = dict(sorting.attrs)
    if recording is not None and not isinstance(recording, xr.DataArray):
        from ..io import open_recording

        recording = open_recording(recording)
    r = dict(recording.attrs) if recording is not None else {}
    get = lambda k, default=None: r.get(k, a.get(k, default))  # noqa: E731
    fs = a.get("sampling_rate", r.get("sampling_rate"))
    if fs is None:
        raise OutputError("the sorting has no 'sampling_rate' attr and no recording was given; cannot write params.py.")
    # Samples of the file dat_path names, which spike times count from: the whole recording, not the sorted range
    # (a sort with tmin/tmax covers part of the file, its spike times already offset by time_offset_samples).
    if recording is not None:
        n_samples = recording.sizes["time"]
        covered = int(a.get("n_samples", 0)) + int(a.get("time_offset_samples", 0))
        if covered > n_samples:
            raise OutputError(f"the sorting covers samples up to {covered} (n_samples + time_offset_samples) but "
                              f"the recording given has {n_samples}: pass the recording that was sorted.")
    elif "n_samples" in a and np.isinf(Settings.of_sorting(sorting).tmax):  # sorted to the file's end
        n_samples = int(a["n_samples"]) + int(a.get("time_offset_samples", 0))
    else:  # the file may go on past the sorted range: its length is unknown here
        n_samples = None
    return {
        "source": str(get("source", "") or ""),
        "n_channels_dat": int(get("n_file_channels", sorting.sizes.get("channel", 0))),
        "dtype": str(get("dtype_on_disk", "int16")),
        "offset": int(get("offset", 0)),
        "sample_rate": float(fs),
        "n_samples": None if n_samples is None else int(n_samples),
    }


def _dat_path(source: str, final: Path) -> tuple[list[str] | str, Path | None]:
    p = Path(source) if source else None
    if p is None or not p.is_file():
        return NO_PATH, None
    try:
        rel = os.path.relpath(p.resolve(), final.parent.resolve() / final.name)
        return [Path(rel).as_posix()], p
    except ValueError:  # another drive on Windows: no relative path exists
        return [p.resolve().as_posix()], p


def _np(x: Any) -> np.ndarray:
    return np.asarray(x.compute() if isinstance(x, da.Array) else x)


# ---------------------------------------------------------------------------------------------- validation
def validate_phy_folder(folder: str | os.PathLike, *, n_samples: int | None = None) -> None:
    """Check a Phy folder against the cross-file consistency rules (formats.md §3.6).

    Raises
    ------
    OutputError
        Listing every rule that fails.
    """
    from .phy_read import read_params, read_cluster_tables

    f = Path(folder)
    errs: list[str] = []
    load = lambda n: np.load(f / n, mmap_mode="r")  # noqa: E731
    st, stp, scl = load("spike_times.npy"), load("spike_templates.npy"), load("spike_clusters.npy")
    S = len(st)
    for name in sorted(p.name for p in f.glob("spike_*.npy")) + ["amplitudes.npy", "pc_features.npy"]:
        if (f / name).exists() and load(name).shape[0] != S:
            errs.append(f"{name} has {load(name).shape[0]} rows, spike_times.npy {S}")
    if st.dtype != np.int64 or (S and np.any(np.diff(st) < 0)):
        errs.append("spike_times.npy must be int64 and non-decreasing")
    if n_samples is not None and S and int(st.max()) >= n_samples:
        errs.append(f"spike_times.npy reaches {int(st.max())} >= n_samples {n_samples}")
    tpl = load("templates.npy")
    cm = load("channel_map.npy")
    C = len(cm)
    nT = tpl.shape[0]
    if tpl.ndim != 3 or tpl.shape[2] != C or tpl.dtype != np.float32:
        errs.append(f"templates.npy {tpl.shape} {tpl.dtype}: expected float32 (n_templates, nt, {C})")
    if S and (int(stp.max()) >= nT or int(stp.min()) < 0):
        errs.append("spike_templates.npy refers to templates that do not exist")
    if load("similar_templates.npy").shape != (nT, nT):
        errs.append("similar_templates.npy must be (n_templates, n_templates)")
    if load("templates_ind.npy").shape != (nT, C):
        errs.append("templates_ind.npy must be (n_templates, n_channels)")
    if (f / "pc_features.npy").exists():
        pfi = load("pc_feature_ind.npy")
        if pfi.shape != (nT, load("pc_features.npy").shape[2]) or (pfi.size and int(pfi.max()) >= C):
            errs.append("pc_feature_ind.npy must be (n_templates, nC) with values < n_channels")
    pos, sh = load("channel_positions.npy"), load("channel_shanks.npy")
    if pos.shape != (C, 2) or len(sh) != C:
        errs.append("channel_positions.npy / channel_shanks.npy do not match channel_map.npy")
    elif len(np.unique(np.asarray(pos), axis=0)) != C:
        errs.append("channel_positions.npy has repeated positions (phylib would replace them)")
    for n in ("whitening_mat.npy", "whitening_mat_inv.npy"):
        if load(n).shape != (C, C):
            errs.append(f"{n} must be ({C}, {C})")
    if cm.dtype not in (np.int32, np.int64, np.uint32):
        errs.append(f"channel_map.npy dtype {cm.dtype} is not int32/int64/uint32")
    params = read_params(f / "params.py")
    if C and int(cm.max()) >= params["n_channels_dat"]:
        errs.append(f"channel_map.npy reaches {int(cm.max())} but n_channels_dat = {params['n_channels_dat']}")
    ids = set(np.unique(scl).tolist())
    for name, table in read_cluster_tables(f).items():
        keys = set(next(iter(table.values())).keys()) if table else set()
        if not ids <= keys:
            errs.append(f"{name} lacks cluster ids {sorted(ids - keys)[:10]}")
    dat = params.get("dat_path")
    if isinstance(dat, list) and len(dat) == 1 and n_samples is not None:
        p = (f / dat[0]) if not Path(dat[0]).is_absolute() else Path(dat[0])
        itemsize = np.dtype(params["dtype"]).itemsize
        want = n_samples * params["n_channels_dat"] * itemsize + params.get("offset", 0)
        if p.is_file() and p.stat().st_size != want:
            errs.append(f"{p.name} has {p.stat().st_size} bytes; n_samples x n_channels_dat x itemsize + offset "
                        f"= {want}")
    if errs:
        raise OutputError(f"Phy folder {str(f)!r} is inconsistent: " + "; ".join(errs) + ".")


# ---------------------------------------------------------------------------------------------- export
def export_phy(sorting: xr.Dataset | str | os.PathLike, recording: Any = None,
               folder: str | os.PathLike | None = None, *, overwrite: bool = False) -> Path:
    """Write the Phy / Kilosort 4 results folder of a sorting.

    Parameters
    ----------
    sorting : xarray.Dataset or path
        The Sorting Dataset, or an output folder / ``sorting.zarr`` to open with :func:`open_sorting`.
    recording : xarray.DataArray or path, optional
        The sorted recording; gives ``params.py`` the raw file, its column count, dtype and offset. Default: the
        sorting's ``source``, ``n_file_channels``, ``dtype_on_disk`` and ``offset`` attrs.
    folder : path, optional
        Target folder (default: ``<output>/phy`` when ``sorting`` is a path).
    overwrite : bool
        Replace an existing folder (e.g. one curated in Phy!) instead of raising.

    Returns
    -------
    Path
        The folder. ``params.py`` points at the raw file by a relative path when it exists, else at
        ``no_path.bin`` (traces then do not show in Phy).

    Raises
    ------
    OutputExistsError, OutputError
    DiskFullError
        Too little free space for the folder (checked before writing, and on ``ENOSPC`` while writing: the
        partial folder is deleted and an existing ``folder`` is left as it was).
    """
    if not isinstance(sorting, xr.Dataset):
        from .zarr_store import open_sorting

        base = Path(sorting)
        sorting = open_sorting(base)
        if folder is None:
            folder = (base.parent if base.suffix == ".zarr" else base) / PHY_FOLDER
    if folder is None:
        raise OutputError("export_phy needs folder= when given a Dataset.")
    final = Path(folder)
    ds = sorting
    for k in ("spike_time", "spike_unit", "unit", "channel", "x", "y"):
        if k not in ds.variables:
            raise OutputError(f"the sorting lacks {k!r}; cannot export it for Phy (see docs/outputs.md).")
    if "template_whitened" not in ds and "template" not in ds:
        raise OutputError("the sorting has neither 'template_whitened' nor 'template'; Phy needs templates.")
    info = _recording_info(ds, recording)

    st = _np(ds["spike_time"].data).astype(np.int64)
    su = _np(ds["spike_unit"].data).astype(np.int64)
    order = np.lexsort((su, st))
    if np.all(order == np.arange(len(st))):
        order = None  # already sorted: spare the copies
    perm = (lambda a: a) if order is None else (lambda a: a[order])  # noqa: E731
    st, su = perm(st), perm(su)
    ids = ds["unit"].values.astype(np.int64)
    K, C = len(ids), ds.sizes["channel"]
    if len(ids) and np.any(np.diff(ids) <= 0):
        raise OutputError("the sorting's 'unit' coordinate must be strictly increasing.")
    tpos = np.searchsorted(ids, su)
    if len(su) and (tpos.max() >= K or np.any(ids[np.minimum(tpos, K - 1)] != su)):
        raise OutputError("some spike_unit values are not in the 'unit' coordinate.")
    if np.iinfo(np.int32).max < max(int(ids.max(initial=0)), 0):
        raise OutputError("unit ids do not fit int32 (Phy's spike_clusters dtype).")

    W = ds["whitening_matrix"].values if "whitening_matrix" in ds else np.eye(C, dtype=np.float32)
    if "template_whitened" in ds:
        tw = _np(ds["template_whitened"].data).astype(np.float32)
    else:
        tw = np.einsum("ktj,ij->kti", _np(ds["template"].data).astype(np.float64), W).astype(np.float32)
    wm, wmi, templates = phy_whitening(W, tw)
    if "template" in ds:
        uv = _np(ds["template"].data)
        err = float(np.abs(templates @ wmi - uv).max()) if uv.size else 0.0
        if err > 1e-3 * max(float(np.abs(uv).max()), 1e-12) + 1e-4:
            warnings.warn(f"template_whitened @ whitening_mat_inv differs from template (µV) by up to {err:.3g} µV; "
                          "the sorting's whitening matrix and templates disagree.", stacklevel=2)
    sim = (_np(ds["similarity"].data).astype(np.float32) if "similarity" in ds
           else template_similarity(templates, sample_axis=1, symmetric=True)[0])
    x, y = ds["x"].values, ds["y"].values
    shank = shanks(ds)

    n_spk = np.bincount(tpos, minlength=K) if len(su) else np.zeros(K, np.int64)
    dat_path, dat_file = _dat_path(info["source"], final)
    params = {"dat_path": dat_path, "n_channels_dat": info["n_channels_dat"], "dtype": info["dtype"],
              "offset": info["offset"], "sample_rate": info["sample_rate"], "hp_filtered": False}
    if dat_file is None and info["source"]:
        params["original_source"] = info["source"]

    attrs = jsonable(dict(ds.attrs), "sorting attrs")
    meta: dict[str, Any] = {"written_by": "spikearray.export_phy"}
    for k in ("settings", "timings"):
        if isinstance(attrs.get(k), str):
            try:
                meta[k] = json.loads(attrs.pop(k))
            except json.JSONDecodeError:
                pass
    meta["attrs"] = attrs
    meta["contact_id"] = ds["contact_id"].values.astype(str).tolist() if "contact_id" in ds.coords else None
    meta["amplitudes_units"] = "uV"

    S = len(st)
    needed = (28 * S + 4 * templates.size + 8 * K * C + 4 * sim.size + 12 * C * C + 20 * C
              + (4 * int(np.prod(ds["spike_pc"].shape)) + 4 * K * C if "spike_pc" in ds else 0) + 64 * K + 65536)
    require_free_space(final.parent, needed, "the Phy folder")  # npy files are uncompressed: the size is known
    with atomic_dir(final, overwrite=overwrite, what="Phy folder", needed=needed) as tmp:
        save = lambda name, arr: np.save(tmp / name, np.ascontiguousarray(arr))  # noqa: E731
        save("spike_times.npy", st)
        save("spike_templates.npy", tpos.astype(np.int32))
        save("spike_clusters.npy", su.astype(np.int32))
        if "spike_amplitude" in ds:
            save("amplitudes.npy", perm(_np(ds["spike_amplitude"].data)).astype(np.float32))
        if "spike_x" in ds and "spike_depth" in ds:
            pos = np.stack([_np(ds["spike_x"].data), _np(ds["spike_depth"].data)], axis=1)
            save("spike_positions.npy", perm(pos).astype(np.float32))
        save("templates.npy", templates)
        save("templates_ind.npy", np.tile(np.arange(C, dtype=np.int64), (K, 1)))
        save("similar_templates.npy", sim)
        save("whitening_mat.npy", wm)
        save("whitening_mat_dat.npy", wm)
        save("whitening_mat_inv.npy", wmi)
        save("channel_map.npy", ds["channel"].values.astype(np.int32))
        save("channel_positions.npy", np.stack([x, y], axis=1).astype(np.float32))
        save("channel_shanks.npy", np.asarray(shank, dtype=np.float32))
        if "spike_pc" in ds and "unit_pc_channel" in ds:
            _save_pc_features(tmp / "pc_features.npy", ds["spike_pc"].data, order)
            save("pc_feature_ind.npy", ds["unit_pc_channel"].values.astype(np.uint32))
        label = ds["label"].values.astype(str) if "label" in ds else np.full(K, "unsorted")
        _tsv(tmp / "cluster_KSLabel.tsv", "KSLabel", ids, label)
        _tsv(tmp / "cluster_group.tsv", "group", ids, label)
        if "contamination" in ds:
            _tsv(tmp / "cluster_ContamPct.tsv", "ContamPct", ids, 100 * ds["contamination"].values, "{:.6g}")
        if "spike_amplitude" in ds:
            amp = _np(ds["spike_amplitude"].data).astype(np.float64)
            mean_amp = np.bincount(np.searchsorted(ids, _np(ds["spike_unit"].data)), weights=amp, minlength=K)
            mean_amp = np.divide(mean_amp, n_spk, out=np.zeros(K), where=n_spk > 0)
            _tsv(tmp / "cluster_Amplitude.tsv", "Amplitude", ids, mean_amp, "{:.6g}")
        if "amplitude" in ds:
            _tsv(tmp / "cluster_amplitude_uV.tsv", "amplitude_uV", ids, ds["amplitude"].values, "{:.6g}")
        if "firing_rate" in ds:
            _tsv(tmp / "cluster_firing_rate.tsv", "firing_rate", ids, ds["firing_rate"].values, "{:.6g}")
        (tmp / "params.py").write_text(_params_text(params))
        (tmp / "spikearray_settings.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        # dat_path is relative to the final folder, a sibling of tmp: it resolves the same from here.
        validate_phy_folder(tmp, n_samples=info["n_samples"])
    return final


def _save_pc_features(path: Path, data: Any, order: np.ndarray | None) -> None:
    """Write (S, npc, nC) float32 features, streaming dask blocks when not reordering."""
    shape = tuple(int(s) for s in data.shape)
    if isinstance(data, da.Array) and order is None:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        i0 = 0
        for blk in data.rechunk({1: -1, 2: -1}).to_delayed().ravel():
            b = np.asarray(blk.compute(), dtype=np.float32)
            out[i0:i0 + len(b)] = b
            i0 += len(b)
        out.flush()
        del out
        return
    arr = _np(data).astype(np.float32)
    np.save(path, np.ascontiguousarray(arr if order is None else arr[order]))
