"""Drift estimation on a ground-truth folder (GT-A / GT-B of ``shared/gt``): RMS error against the truth and time.

    nice python benchmarks/bench_drift.py --set /path/to/GT-B --nblocks 1 5

Reads ``recording.bin`` (int16), ``probe.json``, ``params.json`` (``gain_to_uV``) and ``ground_truth.npz``
(``unit_locations`` (x, y, z) µm, ``unit_displacements`` (n_t, n_units, 2) µm at
``displacement_sampling_frequency``; y is index 1). The error is :func:`spikearray.drift.rms_error` at each
unit's rest depth and the truth's time points, after one constant offset, with a sign flip allowed (as in
``shared/gt/README.md``). Times: preprocessing + estimation from the file (what Kilosort4's 528 s on GT-A
covers: it re-reads, filters and whitens every batch), and estimation alone on a preprocessed copy in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import dask
import numpy as np

import spikearray as sa
from spikearray.drift import estimate, rms_error


def preprocess(rec):
    white, _ = sa.preprocess(rec, sa.Settings())
    return white, "spikearray.preprocess"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", required=True, type=Path, help="ground-truth folder")
    ap.add_argument("--nblocks", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--threshold", type=float, default=None, help="drift_threshold (default: the Settings default)")
    ap.add_argument("--threads", type=int, default=2, help="dask threads (torch threads = cores / this)")
    ap.add_argument("--json", type=Path, default=None, help="append results as one JSON line here")
    a = ap.parse_args(argv)

    params = json.loads((a.set / "params.json").read_text())
    n_ch = int(params["n_channels"])
    rec = sa.open_recording(a.set / "recording.bin", probe=a.set / "probe.json", n_channels=n_ch,
                            sampling_rate=float(params["sampling_rate"]), dtype=params.get("dtype", "int16"),
                            gain_to_uV=float(params["gain_to_uV"]))
    gt = np.load(a.set / "ground_truth.npz")
    unit_y = gt["unit_locations"][:, 1].astype(float)
    if "unit_displacements" in gt.files:
        truth = gt["unit_displacements"][:, :, 1].astype(float)
        t_truth = np.arange(truth.shape[0]) / float(gt["displacement_sampling_frequency"])
    else:  # static set: the truth is no motion at all
        t_truth = np.arange(0.0, rec.sizes["time"] / float(params["sampling_rate"]), 0.2)
        truth = np.zeros((len(t_truth), len(unit_y)))
    base = float(np.sqrt(np.mean((truth - truth.mean()) ** 2)))
    print(f"set {a.set.name}: {rec.sizes['time'] / params['sampling_rate']:.0f} s x {n_ch} ch, "
          f"{len(unit_y)} units; no correction: {base:.2f} um; cores {os.cpu_count()}, dask threads {a.threads}")

    results = []
    with dask.config.set(scheduler="threads", num_workers=a.threads):
        for nb in a.nblocks:
            kw = dict(nblocks=nb)
            if a.threshold is not None:
                kw["drift_threshold"] = a.threshold
            settings = sa.Settings(**kw)
            t0 = time.perf_counter()
            white, how = preprocess(rec)
            drift = estimate(white, settings)
            t_total = time.perf_counter() - t0
            err = rms_error(drift, truth, times_s=t_truth, unit_depths_um=unit_y, allow_sign_flip=True)
            err_nf = rms_error(drift, truth, times_s=t_truth, unit_depths_um=unit_y)
            results.append(dict(set=a.set.name, nblocks=nb, rms_um=err, rms_um_no_flip=err_nf, baseline_um=base,
                                time_prep_and_estimate_s=t_total, n_spikes=int(drift.sizes["spike"]),
                                preprocessing=how, threads=a.threads))
            print(f"nblocks={nb}: RMS {err:.2f} um (no sign flip {err_nf:.2f}); preprocess+estimate "
                  f"{t_total:.1f} s; {drift.sizes['spike']} spikes")
        # Estimation alone, on a preprocessed copy held in memory.
        white, _ = preprocess(rec)
        white = white.copy(data=white.data.persist())
        for r in results:
            t0 = time.perf_counter()
            estimate(white, sa.Settings(nblocks=r["nblocks"], **(
                {"drift_threshold": a.threshold} if a.threshold is not None else {})))
            r["time_estimate_only_s"] = time.perf_counter() - t0
            print(f"nblocks={r['nblocks']}: estimation alone on preprocessed data {r['time_estimate_only_s']:.1f} s")
    if a.json:
        with open(a.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
