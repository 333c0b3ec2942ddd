"""Read a Phy / Kilosort results folder (curated or not) back as a Sorting Dataset.

Curation done in Phy comes back: labels from ``cluster_group.tsv`` (good / mua / noise / unsorted) and merges or
splits from ``spike_clusters.npy``. Units are the cluster ids present in ``spike_clusters.npy`` (Phy's ids are
kept, so they may not be contiguous after curation). The template of a cluster Phy changed (a merge or a split) is
recomputed in µV from its spikes in the raw recording when the recording can be read (the file ``params.py``
points at, or the ``recording`` argument); otherwise it is the spike-count-weighted mean of the templates its
spikes came from (a split cluster then keeps its parent's template). Metrics that depend on the spike set
(``contamination``) are NaN for clusters that Phy changed. ``params.py`` is parsed with :func:`ast.literal_eval`,
never executed.
"""

from __future__ import annotations

import ast
import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .._version import __version__
from ..errors import OutputError

__all__ = ["read_phy", "read_params", "read_cluster_tables"]


def read_params(path: str | os.PathLike) -> dict[str, Any]:
    """Parse Phy's ``params.py`` (literal assignments only; names lower-cased).

    Raises
    ------
    OutputError
        Missing file, a syntax error, or an assignment whose value is not a literal.
    """
    path = Path(path)
    if not path.is_file():
        raise OutputError(f"{str(path)!r} does not exist; a Phy folder needs params.py.")
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as e:
        raise OutputError(f"{path} is not valid Python ({e.msg}, line {e.lineno}).") from None
    out: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id.lower()] = ast.literal_eval(node.value)
            except ValueError:
                raise OutputError(f"{path.name}, line {node.lineno}: {node.targets[0].id} is not a literal value; "
                                  "spikearray reads params.py without executing it.") from None
    for k in ("sample_rate", "dtype"):
        if k not in out:
            raise OutputError(f"{path} has no {k} = ...; Phy folders need it.")
    out.setdefault("offset", 0)
    return out


def _parse(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def read_cluster_tables(folder: str | os.PathLike) -> dict[str, dict[str, dict[int, Any]]]:
    """Every ``*.tsv`` / ``*.csv`` with a ``cluster_id`` column (``cluster_info`` excluded), like phylib reads them.

    Returns
    -------
    dict
        file name -> column name -> {cluster id: value (int, float or str)}.
    """
    out: dict[str, dict[str, dict[int, Any]]] = {}
    for p in sorted(Path(folder).iterdir()):
        if p.suffix not in (".tsv", ".csv") or p.stem.startswith("cluster_info"):
            continue
        text = p.read_text().splitlines()
        if not text:
            continue
        delim = "\t" if "\t" in text[0] else ","
        rows = list(csv.reader(text, delimiter=delim))
        header = rows[0]
        if "cluster_id" not in header:
            continue
        key = header.index("cluster_id")
        cols: dict[str, dict[int, Any]] = {h: {} for i, h in enumerate(header) if i != key}
        for r in rows[1:]:
            if len(r) != len(header):
                continue
            cid = int(r[key])
            for i, h in enumerate(header):
                if i != key:
                    cols[h][cid] = _parse(r[i])
        out[p.name] = cols
    return out


def _load(folder: Path, name: str, required: bool = False) -> np.ndarray | None:
    p = folder / name
    if not p.exists():
        if required:
            raise OutputError(f"{str(folder)!r} lacks {name}; it is not a Phy/Kilosort folder.")
        return None
    return np.load(p)


def _template_geometry(uv: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, ...]:
    """Best channel position (largest energy), µV peak-to-peak there, and ptp²-weighted centre (x, depth µm)."""
    K = uv.shape[0]
    energy = (uv.astype(np.float64) ** 2).sum(axis=1)
    best_pos = energy.argmax(axis=1) if uv.shape[2] else np.zeros(K, np.int64)
    ptp = np.ptp(uv, axis=1) if uv.shape[1] else np.zeros((K, uv.shape[2]), np.float32)
    amplitude = ptp[np.arange(K), best_pos].astype(np.float32)
    w = ptp.astype(np.float64) ** 2
    wsum = np.maximum(w.sum(axis=1), 1e-30)
    return best_pos, amplitude, (w @ pos[:, 0]) / wsum, (w @ pos[:, 1]) / wsum


def _check_spike_lengths(folder: Path, lengths: dict[str, int]) -> None:
    """Every per-spike file must hold one row per spike (Phy rewrites spike_clusters.npy; a bad copy breaks it)."""
    if len(set(lengths.values())) <= 1:
        return
    ref_name, ref = next(iter(lengths.items()))
    bad = [(n, k) for n, k in lengths.items() if k != ref]
    detail = "; ".join(f"{n} has {k}" for n, k in bad)
    raise OutputError(
        f"{folder}: {ref_name} has {ref} spikes but {detail}. Every per-spike file of a Phy folder needs one row "
        "per spike; the folder was changed inconsistently (an interrupted Phy save, or files copied from different "
        "sortings). Restore the files from the same sorting, or re-export it with spikearray export-phy."
    )


def _remap_pc(pcf: np.ndarray, pfi: np.ndarray, tpl: np.ndarray, unit_chan: np.ndarray,
              unit_index: np.ndarray) -> np.ndarray:
    """Re-express each spike's features (on its template's channels) on its cluster's channel list (0 elsewhere)."""
    out = pcf.copy()
    pairs = np.unique(np.stack([unit_index, tpl], axis=1), axis=0)
    for u, t in pairs:
        src, dst = pfi[t], unit_chan[u]
        if np.array_equal(src, dst):
            continue
        rows = np.flatnonzero((unit_index == u) & (tpl == t))
        block = np.zeros((len(rows),) + pcf.shape[1:], pcf.dtype)
        for j, ch in enumerate(dst):
            k = np.flatnonzero(src == ch)
            if len(k):
                block[:, :, j] = pcf[rows][:, :, k[0]]
        out[rows] = block
    return out


def read_phy(folder: str | os.PathLike, *, recording: Any = "auto", max_spikes_per_unit: int = 2000,
             seed: int = 0) -> xr.Dataset:
    """Read a Phy / Kilosort folder, curated or not, as a Sorting Dataset (see ``docs/outputs.md``).

    Parameters
    ----------
    folder : path
        Holds ``params.py``, ``spike_times.npy``, ``spike_templates.npy`` (``spike_clusters.npy`` after Phy),
        ``templates.npy``, ``channel_map.npy``, ``channel_positions.npy`` and the ``cluster_*.tsv`` tables.
    recording : "auto", xarray.DataArray, path or None
        The sorted recording, to recompute the µV templates of clusters that Phy merged or split from their
        spikes. ``"auto"`` (default): the binary ``params.py``'s ``dat_path`` names, when it is there and its µV
        scale is known (a SpikeGLX ``.meta`` beside it, or a folder spikearray wrote); ``None``: never read raw
        data (changed clusters get the spike-count-weighted mean of their templates).
    max_spikes_per_unit : int
        Spikes (a seeded random subset) averaged per recomputed template.
    seed : int
        Seed of that subset.

    Returns
    -------
    xarray.Dataset
        Spikes sorted by time (ties by unit); ``unit`` = cluster ids; ``label`` from ``cluster_group.tsv``
        (else ``KSLabel``, else ``"unsorted"``); µV templates = ``templates.npy @ whitening_mat_inv`` (Phy's
        convention) for clusters Phy did not change; ``spike_amplitude`` = ``amplitudes.npy`` (µV when
        spikearray wrote the folder, Kilosort's arbitrary units otherwise, see the variable's ``units`` attr).
        No ``displacement`` (Phy folders lack it). Attr ``templates_recomputed``: the unit ids whose templates
        were recomputed from the recording. To drop ``noise`` units with their spikes use
        :func:`spikearray.drop_noise` (``sorting.sel(unit=...)`` alone keeps every spike).

    Raises
    ------
    OutputError
        Missing or inconsistent files (e.g. ``spike_times.npy`` and ``spike_clusters.npy`` of different lengths),
        ``params.py`` that is not literal assignments.

    Examples
    --------
    >>> import spikearray as sa
    >>> curated = sa.read_phy("DIR/phy")  # doctest: +SKIP
    >>> good = sa.select_units(curated, curated.label == "good")  # doctest: +SKIP
    """
    f = Path(folder)
    if not f.is_dir():
        raise OutputError(f"{str(f)!r} is not a folder; pass the Phy/Kilosort output folder.")
    params = read_params(f / "params.py")
    fs = float(params["sample_rate"])
    st = _load(f, "spike_times.npy", True).astype(np.int64).ravel()
    tpl = _load(f, "spike_templates.npy", True).astype(np.int64).ravel()
    scl = _load(f, "spike_clusters.npy")
    scl = tpl.copy() if scl is None else scl.astype(np.int64).ravel()
    _check_spike_lengths(f, {"spike_times.npy": len(st), "spike_templates.npy": len(tpl),
                             **({"spike_clusters.npy": len(scl)} if (f / "spike_clusters.npy").exists() else {})})
    order = np.lexsort((scl, st))
    st, tpl, scl = st[order], tpl[order], scl[order]
    cmap = _load(f, "channel_map.npy", True).astype(np.int64).ravel()
    C = len(cmap)
    pos = np.atleast_2d(_load(f, "channel_positions.npy", True)).astype(np.float64)
    shanks = _load(f, "channel_shanks.npy")
    shanks = np.zeros(C, np.int64) if shanks is None else np.asarray(shanks).ravel().astype(np.int64)
    T = _load(f, "templates.npy", True).astype(np.float32)
    tind = _load(f, "template_ind.npy")
    if tind is not None:  # sparse templates: columns are channels tind[t, j] (-1 = unused)
        dense = np.zeros((T.shape[0], T.shape[1], C), np.float32)
        for t in range(T.shape[0]):
            ok = tind[t] >= 0
            dense[t][:, tind[t][ok]] = T[t][:, ok]
        T = dense
    nT = T.shape[0]
    if len(tpl) and tpl.max() >= nT:
        raise OutputError(f"{f}: spike_templates.npy refers to template {int(tpl.max())} but templates.npy has {nT}.")
    wm = _load(f, "whitening_mat.npy")
    wm = np.eye(C, dtype=np.float32) if wm is None else wm.astype(np.float32)
    wmi = _load(f, "whitening_mat_inv.npy")
    wmi = np.linalg.inv(wm.astype(np.float64)).astype(np.float32) if wmi is None else wmi.astype(np.float32)
    meta_path = f / "spikearray_settings.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    mattrs = dict(meta.get("attrs", {}))

    ids, unit_index = np.unique(scl, return_inverse=True)
    K = len(ids)
    # Spike counts per (cluster, template): merged clusters average their templates by spike count.
    M = np.zeros((K, nT), np.float64)
    np.add.at(M, (unit_index, tpl), 1.0)
    n_spikes = M.sum(axis=1).astype(np.int64)
    tw = np.tensordot(M / np.maximum(n_spikes, 1)[:, None], T.astype(np.float64), axes=(1, 0)).astype(np.float32)
    main_t = M.argmax(axis=1) if K else np.zeros(0, np.int64)
    # A cluster is unchanged when it is exactly one template's spike set under that template's id.
    col_users = (M > 0).sum(axis=0)
    unchanged = np.array([(M[u] > 0).sum() == 1 and main_t[u] == ids[u] and col_users[main_t[u]] == 1
                          for u in range(K)], dtype=bool)
    uv = (tw @ wmi).astype(np.float32)
    best_pos, amplitude, unit_x, depth = _template_geometry(uv, pos)

    n_samples = mattrs.get("n_samples")
    dat = params.get("dat_path")
    dat_list = dat if isinstance(dat, list) else ([dat] if dat else [])
    dat_files = [(f / d) if not Path(d).is_absolute() else Path(d) for d in dat_list]
    itemsize = np.dtype(params["dtype"]).itemsize
    n_dat = int(params.get("n_channels_dat", C))
    if n_samples is None and dat_files and all(p.is_file() for p in dat_files):
        n_samples = sum((p.stat().st_size - int(params["offset"])) // (n_dat * itemsize) for p in dat_files)
    if n_samples is None:
        n_samples = int(st.max()) + 1 if len(st) else 0  # best available: up to the last spike
    duration = n_samples / fs

    tables = read_cluster_tables(f)
    col = lambda file, name: tables.get(file, {}).get(name, {})  # noqa: E731
    group = col("cluster_group.tsv", "group") or col("cluster_group.tsv", "KSLabel")
    kslabel = col("cluster_KSLabel.tsv", "KSLabel")
    contam_pct = col("cluster_ContamPct.tsv", "ContamPct")
    label = []
    for u, cid in enumerate(ids.tolist()):
        lab = group.get(cid)
        if lab is None and unchanged[u]:
            lab = kslabel.get(cid)
        label.append(str(lab) if lab is not None else "unsorted")
    contamination = np.array([float(contam_pct[c]) / 100 if unchanged[u] and c in contam_pct else np.nan
                              for u, c in enumerate(ids.tolist())], dtype=np.float64)

    sim_file = _load(f, "similar_templates.npy")
    # Phy's own similarity holds while no cluster changed; otherwise it is computed once, at the end, from the
    # final templates (after any recomputation from the recording)
    usable = sim_file is not None and unchanged.all() and sim_file.shape == (nT, nT)
    similarity = sim_file[np.ix_(ids, ids)].astype(np.float32) if usable else None

    data: dict[str, Any] = {
        "spike_time": ("spike", st),
        "spike_unit": ("spike", ids[unit_index] if K else scl),
    }
    amps = _load(f, "amplitudes.npy")
    sp = _load(f, "spike_positions.npy")
    # features of a subset of spikes (pc_feature_spike_ids.npy) are not per spike: never loaded (they can be GBs)
    pcf = None if (f / "pc_feature_spike_ids.npy").exists() else _load(f, "pc_features.npy")
    pfi = _load(f, "pc_feature_ind.npy")
    _check_spike_lengths(f, {"spike_times.npy": len(st), **{n: len(a) for n, a in
                                                           (("amplitudes.npy", amps), ("spike_positions.npy", sp),
                                                            ("pc_features.npy", pcf)) if a is not None}})
    if amps is not None:
        data["spike_amplitude"] = ("spike", amps.ravel()[order].astype(np.float32))
    if sp is not None and sp.ndim == 2 and sp.shape[1] >= 2:
        data["spike_x"] = ("spike", sp[order, 0].astype(np.float32))
        data["spike_depth"] = ("spike", sp[order, 1].astype(np.float32))
    if pcf is not None and pfi is not None:
        pcf = pcf.astype(np.float32)[order]
        pfi = pfi.astype(np.int64)
        unit_chan = pfi[main_t] if K else np.zeros((0, pfi.shape[1]), np.int64)
        data["spike_pc"] = (("spike", "pc", "nearest"), _remap_pc(pcf, pfi, tpl, unit_chan, unit_index))
        data["unit_pc_channel"] = (("unit", "nearest"), unit_chan)
    data.update({
        "template": (("unit", "sample", "channel"), uv),
        "template_whitened": (("unit", "sample", "channel"), tw),
        "best_channel": ("unit", cmap[best_pos].astype(np.int64)),
        "unit_x": ("unit", unit_x.astype(np.float64)),
        "depth": ("unit", depth.astype(np.float64)),
        "amplitude": ("unit", amplitude),
        "firing_rate": ("unit", n_spikes / duration if duration > 0 else np.zeros(K)),
        "n_spikes": ("unit", n_spikes),
        "contamination": ("unit", contamination),
        "label": ("unit", np.array(label, dtype=str) if K else np.zeros(0, "<U4")),
        **({"similarity": (("unit", "unit_b"), similarity)} if similarity is not None else {}),
        "whitening_matrix": (("channel", "channel_out"), wm),
    })
    cid = meta.get("contact_id")
    contact_id = np.asarray(cid, dtype=str) if cid is not None and len(cid) == C else np.array([""] * C)
    coords = {"unit": ids.astype(np.int64), "channel": cmap, "x": ("channel", pos[:, 0]),
              "y": ("channel", pos[:, 1]), "shank": ("channel", shanks), "contact_id": ("channel", contact_id)}
    ds = xr.Dataset(data, coords=coords)
    ds["template"].attrs["units"] = "uV"
    if "spike_amplitude" in ds:
        ds["spike_amplitude"].attrs["units"] = "uV" if meta.get("amplitudes_units") == "uV" else "arbitrary"
    attrs = {
        "spikearray_version": __version__,
        "settings": json.dumps(meta["settings"]) if "settings" in meta else "{}",
        "timings": json.dumps(meta["timings"]) if "timings" in meta else "{}",
        **{k: v for k, v in mattrs.items() if k not in ("settings", "timings")},
    }
    attrs.update({
        "source": str(dat_files[0].resolve()) if dat_files and dat_files[0].is_file()
        else str(params.get("original_source", mattrs.get("source", ""))),
        "sampling_rate": fs, "n_samples": int(n_samples), "duration_s": float(duration),
        "dtype_on_disk": str(np.dtype(params["dtype"])), "n_file_channels": n_dat,
        "offset": int(params["offset"]), "n_units_good": int(sum(lab == "good" for lab in label)),
        "phy_folder": str(f.resolve()),
    })
    attrs.setdefault("time_start", 0.0)
    scale_known = "gain_to_uV" in attrs
    attrs.setdefault("gain_to_uV", 1.0)
    attrs["templates_recomputed"] = []
    ds.attrs = attrs
    changed = [int(c) for c, u in zip(ids.tolist(), unchanged) if not u]
    if changed and recording is not None:
        ds = _recompute_templates(ds, changed, recording, scale_known=scale_known,
                                  max_spikes_per_unit=max_spikes_per_unit, seed=seed)
    if "similarity" not in ds:
        from ..clustering.similarity import template_similarity

        tw_final = np.asarray(ds["template_whitened"].values, np.float32)
        ds["similarity"] = (("unit", "unit_b"), template_similarity(tw_final, sample_axis=1, symmetric=True)[0])
    return ds


def _recording_for_templates(ds: xr.Dataset, recording: Any, scale_known: bool) -> Any:
    """The reader of the raw recording, or None when it cannot be read with a known µV scale."""
    from ..report.waveforms import RecordingUnavailable, window_reader

    if isinstance(recording, str) and recording == "auto":
        source = Path(str(ds.attrs.get("source", "")))
        if not source.is_file() or not (scale_known or source.with_suffix(".meta").is_file()):
            return None
        recording = None
    try:
        return window_reader(ds, recording)
    except RecordingUnavailable:
        if recording is None:
            return None
        raise


def _recompute_templates(ds: xr.Dataset, changed: list[int], recording: Any, *, scale_known: bool,
                         max_spikes_per_unit: int, seed: int) -> xr.Dataset:
    """Replace the templates of Phy-changed clusters by the mean of their spikes in the recording (µV).

    Windows of ``nt`` samples (``nt0min`` before the spike time) on every sorted channel, high-passed like the
    sorter (zero-phase 3rd-order Butterworth at the sorting's ``highpass_cutoff``) and common-referenced (median
    across channels) when the sorting's settings did; no drift correction.
    """
    from ..report.waveforms import sample_spike_waveforms
    from ..settings import Settings
    from .curation import select_units

    reader = _recording_for_templates(ds, recording, scale_known)
    if reader is None:
        return ds
    s = Settings.of_sorting(ds)
    cutoff, car = float(s.highpass_cutoff), bool(s.do_CAR)
    sub = select_units(ds, changed)
    C = ds.sizes["channel"]
    chans = {u: np.arange(C) for u in changed}
    wf = sample_spike_waveforms(sub, reader, chans, n_per_unit=max_spikes_per_unit, highpass_hz=cutoff, seed=seed,
                                pad_ms=10.0, common_reference=car)
    uv = np.asarray(ds["template"].values, np.float32).copy()
    pos_of = {int(u): i for i, u in enumerate(ds["unit"].values)}
    done = []
    for u in changed:
        if wf[u].shape[0]:
            uv[pos_of[u]] = wf[u].mean(axis=0)
            done.append(u)
    if not done:
        return ds
    W = np.asarray(ds["whitening_matrix"].values, np.float32)
    tw = np.asarray(ds["template_whitened"].values, np.float32).copy()
    idx = [pos_of[u] for u in done]
    tw[idx] = uv[idx] @ W.T
    pos = np.stack([ds["x"].values, ds["y"].values], axis=1).astype(np.float64)
    best_pos, amplitude, unit_x, depth = _template_geometry(uv, pos)
    out = ds.copy()
    out["template"] = (("unit", "sample", "channel"), uv, ds["template"].attrs)
    out["template_whitened"] = (("unit", "sample", "channel"), tw)
    out["best_channel"] = ("unit", np.asarray(ds["channel"].values)[best_pos].astype(np.int64))
    out["amplitude"] = ("unit", amplitude)
    out["unit_x"] = ("unit", unit_x)
    out["depth"] = ("unit", depth)
    out.attrs = {**ds.attrs, "templates_recomputed": done}
    return out
