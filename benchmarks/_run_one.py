"""Run one sorter on one ground-truth set and save its spikes (child process of the benchmarks).

The parent measures this whole process tree (wall time, peak RSS), so this
script does the sorting and nothing else: no scoring, no plotting. It writes a
compressed npz with

- ``spike_samples`` (int64) and ``spike_labels`` (int64 index into ``unit_ids``),
  all units, not only those the sorter calls good;
- ``unit_ids`` (str) and ``unit_quality`` (str, the sorter's own label or "");
- ``meta`` (a JSON string): versions, seconds spent inside the sorter call and
  any per-stage timings the sorter reports.

spikearray runs in the project's Python; the peers in ``benchmarks/.peers-venv``.

Usage::

    python benchmarks/_run_one.py --sorter spykingcircus2 --set gt_data/GT-A --out X.npz --work DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from _common import N_JOBS, SORTERS, read_params

Spikes = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]

#: Packages besides SpikeInterface whose version decides a peer's result.
_EXTRA_MODULES = {"mountainsort5": ("mountainsort5", "isosplit6"), "tridesclous2": ("hdbscan",),
                  "spykingcircus2": ("hdbscan", "scikit-learn")}


def _as_unit_index(unit_of_spike: np.ndarray, unit_ids: np.ndarray) -> np.ndarray:
    """Map each spike's unit id to its index in ``unit_ids``.

    Raises
    ------
    ValueError
        If a spike's unit is not in ``unit_ids`` (a sorter output that
        contradicts itself must not be scored as if it were fine).
    """
    order = np.argsort(unit_ids)
    pos = np.clip(np.searchsorted(unit_ids, unit_of_spike, sorter=order), 0, max(len(unit_ids) - 1, 0))
    index = order[pos].astype(np.int64)
    if len(unit_of_spike) and not np.array_equal(unit_ids[index], unit_of_spike):
        raise ValueError("some spikes belong to units missing from the unit list")
    return index


def run_spikearray(set_dir: Path, params: dict, work: Path) -> Spikes:
    """Sort with spikearray through its public ``open_recording``/``sort`` API.

    ``sa.sort`` returns an ``xarray.Dataset`` with ``spike_time`` and
    ``spike_unit`` along ``spike`` and ``label`` ('good'/'mua') along ``unit``;
    ``attrs['timings']`` holds seconds per stage (a dict or its JSON text).
    """
    import spikearray as sa

    rec = sa.open_recording(
        set_dir / "recording.bin",
        probe=set_dir / "probe.json",
        n_channels=params["n_channels"],
        sampling_rate=params["sampling_rate"],
        dtype=params["dtype"],
        gain_to_uV=params["gain_to_uV"],
    )
    t0 = time.perf_counter()
    sorting = sa.sort(rec, progress=False)
    # .values computes anything still lazy, so it belongs inside the timed span.
    samples = np.asarray(sorting["spike_time"].values, dtype=np.int64)
    unit_of_spike = np.asarray(sorting["spike_unit"].values)
    if "unit" in sorting.coords:
        unit_ids = np.asarray(sorting["unit"].values)
    else:
        unit_ids = np.unique(unit_of_spike)
    quality = (np.asarray(sorting["label"].values).astype(str) if "label" in sorting
               else np.full(len(unit_ids), "", dtype=str))
    sort_s = time.perf_counter() - t0
    timings = sorting.attrs.get("timings")
    if isinstance(timings, str):
        timings = json.loads(timings)
    meta = {"sort_seconds": sort_s, "timings": timings,
            "versions": _versions("spikearray", "numpy", "xarray", "dask", "torch")}
    return samples, _as_unit_index(unit_of_spike, unit_ids), unit_ids.astype(str), quality, meta


def _ks_probe(probe_json: Path) -> dict:
    """Build Kilosort4's probe dict from a probeinterface JSON.

    Kilosort's own JSON loader expects its format, not probeinterface's, so the
    dict is made here: contacts in the order of their channel in the binary file.
    """
    from probeinterface import read_probeinterface

    probe = read_probeinterface(probe_json).probes[0]
    order = np.argsort(probe.device_channel_indices)
    pos = probe.contact_positions[order]
    return {
        "chanMap": np.asarray(probe.device_channel_indices)[order].astype(np.int32),
        "xc": pos[:, 0].astype(np.float32),
        "yc": pos[:, 1].astype(np.float32),
        "kcoords": np.zeros(len(order), dtype=np.float32),
        "n_chan": len(order),
    }


def run_kilosort4(set_dir: Path, params: dict, work: Path) -> Spikes:
    """Sort with Kilosort4 on the CPU, default settings, as the README's peers row."""
    import torch
    from kilosort import run_kilosort

    torch.set_num_threads(N_JOBS)
    results_dir = work / "kilosort4"
    shutil.rmtree(results_dir, ignore_errors=True)
    t0 = time.perf_counter()
    ops = run_kilosort(
        settings={"n_chan_bin": params["n_channels"], "fs": float(params["sampling_rate"])},
        probe=_ks_probe(set_dir / "probe.json"),
        filename=set_dir / "recording.bin",
        results_dir=results_dir,
        data_dtype=params["dtype"],
        device=torch.device("cpu"),
    )[0]
    sort_s = time.perf_counter() - t0
    # The saved files are what Phy and users see: duplicates removed, times
    # shifted to file samples; the in-memory st/clu are not.
    samples = np.load(results_dir / "spike_times.npy").astype(np.int64).ravel()
    clusters = np.load(results_dir / "spike_clusters.npy").ravel()
    unit_ids = np.unique(clusters)
    quality = np.full(len(unit_ids), "", dtype=object)
    labels_tsv = results_dir / "cluster_KSLabel.tsv"
    if labels_tsv.exists():
        rows = [line.split("\t") for line in labels_tsv.read_text().splitlines()[1:] if line]
        by_id = {int(cid): lab.strip() for cid, lab in rows}
        quality = np.array([by_id.get(int(u), "") for u in unit_ids], dtype=object)
    timings = {k: float(v) for k, v in ops.items() if k.startswith("runtime")}
    meta = {"sort_seconds": sort_s, "timings": timings,
            "versions": _versions("kilosort", "torch", "numpy")}
    return (samples, _as_unit_index(clusters, unit_ids), unit_ids.astype(str),
            quality.astype(str), meta)


def run_spikeinterface(name: str, set_dir: Path, params: dict, work: Path, motion_correction: bool = False) -> Spikes:
    """Sort with one of SpikeInterface's sorters, defaults, ``n_jobs`` = :data:`N_JOBS`; with
    ``motion_correction``, ``apply_motion_correction=True`` for the sorters that have that switch."""
    import spikeinterface as si
    import spikeinterface.sorters as ss
    from probeinterface import read_probeinterface

    rec = si.BinaryRecordingExtractor(
        file_paths=[set_dir / "recording.bin"],
        sampling_frequency=params["sampling_rate"],
        dtype=params["dtype"],
        num_channels=params["n_channels"],
        gain_to_uV=params["gain_to_uV"],
        offset_to_uV=params.get("offset_to_uV", 0.0),
        time_axis=0,
    )
    rec.set_probegroup(read_probeinterface(set_dir / "probe.json"))  # in place since SI 0.104
    # Internal sorters take a job_kwargs dict, wrapped ones a flat n_jobs; the
    # global setting covers whatever the sorter runs without passing either.
    si.set_global_job_kwargs(n_jobs=N_JOBS)
    defaults = ss.get_default_sorter_params(name)
    kwargs = {}
    if "job_kwargs" in defaults:
        kwargs["job_kwargs"] = {"n_jobs": N_JOBS}
    elif "n_jobs" in defaults:
        kwargs["n_jobs"] = N_JOBS
    if motion_correction and "apply_motion_correction" in defaults:
        kwargs["apply_motion_correction"] = True
    t0 = time.perf_counter()
    sorting = ss.run_sorter(name, rec, folder=work / name, remove_existing_folder=True, **kwargs)
    sort_s = time.perf_counter() - t0
    spikes = sorting.to_spike_vector()
    unit_ids = np.asarray(sorting.unit_ids)
    quality = np.full(len(unit_ids), "", dtype=str)
    meta = {"sort_seconds": sort_s, "timings": None, "sorter_kwargs": kwargs,
            "versions": _versions("spikeinterface", "numpy", "numba", "torch", *_EXTRA_MODULES.get(name, ()))}
    return (spikes["sample_index"].astype(np.int64), spikes["unit_index"].astype(np.int64),
            unit_ids.astype(str), quality, meta)


def _versions(*names: str) -> dict[str, str]:
    """Versions of the named distributions (module ``__version__`` as fallback)."""
    from importlib import import_module, metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            # spikearray runs from the working tree (PYTHONPATH), not installed.
            try:
                out[name] = str(import_module(name).__version__)
            except (ImportError, AttributeError):
                out[name] = "not installed"
    return out


def main() -> None:
    """Parse arguments, run the sorter, write the npz."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sorter", required=True, choices=SORTERS)
    parser.add_argument("--set", required=True, type=Path, help="ground-truth set folder")
    parser.add_argument("--out", required=True, type=Path, help="npz to write")
    parser.add_argument("--work", required=True, type=Path, help="scratch folder for the sorter")
    parser.add_argument("--motion-correction", action="store_true",
                        help="SpikeInterface sorters with an apply_motion_correction switch run with it on")
    args = parser.parse_args()

    params = read_params(args.set)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.sorter == "spikearray":
        result = run_spikearray(args.set, params, args.work)
    elif args.sorter == "kilosort4":
        result = run_kilosort4(args.set, params, args.work)
    else:
        result = run_spikeinterface(args.sorter, args.set, params, args.work, args.motion_correction)
    samples, labels, unit_ids, quality, meta = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, spike_samples=samples, spike_labels=labels, unit_ids=unit_ids,
                        unit_quality=quality, meta=json.dumps(meta, default=str))
    print(f"{args.sorter}: {len(unit_ids)} units, {len(samples)} spikes, {meta['sort_seconds']:.1f} s in the sorter")


if __name__ == "__main__":
    main()
