"""Ground-truth benchmark: accuracy, wall time and peak memory of spike sorters, one row per run.

For each sorter, runs ``_run_one.py`` in a child process (spikearray in this
Python, peers in ``benchmarks/.peers-venv``), measures the child's wall time
and the peak RSS of its process tree, scores the spikes with ``_score.py`` and
writes into ``--out``:

- ``<set>_<sorter>.json``: metrics, wall, × real time, peak RSS, versions, machine;
- ``<set>_<sorter>_units.csv`` / ``_units.png``: per-unit accuracy against amplitude;
- ``<set>_<sorter>_sorting.npz``: the spikes, so a run can be rescored without resorting;
- ``table.md``: all runs in ``--out`` as one Markdown table (``make_table.py``).

Run by hand, never in CI: GT-A/GT-B take minutes per sorter, Kilosort4 ~20 min on 2 cores.

Example::

    python benchmarks/ground_truth.py --set GT-A --sorters spikearray,spykingcircus2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from _common import (BENCH_DIR, DEFAULT_DATA_DIR, DRIFTING_SETS, REPO_ROOT, SORTERS, child_env, machine_info,
                     now_iso, read_params, recording_seconds, require_peers_python, resolve_set, run_measured,
                     sorter_python, write_json)
from make_table import write_table

WORK_DIR = BENCH_DIR / "_work"


def _tail(path: Path, n: int = 30) -> str:
    """Last ``n`` lines of a log, for the JSON of a failed run."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def benchmark_one(set_name: str, set_dir: Path, sorter: str, out: Path, command: str,
                  motion_correction: bool = False) -> dict:
    """Sort, measure and score one sorter on one set; write its JSON, CSV and PNG.

    Parameters
    ----------
    set_name : str
        Name used in file names and the table (``GT-A``, or a folder's name).
    set_dir : pathlib.Path
        Folder of the set.
    sorter : str
        One of :data:`_common.SORTERS`.
    out : pathlib.Path
        Results folder.
    command : str
        Command line that reproduces this run, stored in the JSON.
    motion_correction : bool
        Peers with a motion-correction switch run with it on (drifting sets).

    Returns
    -------
    dict
        What was written to ``<set>_<sorter>.json``.
    """
    stem = f"{set_name}_{sorter}"
    work = WORK_DIR / set_name / sorter
    npz = out / f"{stem}_sorting.npz"
    params = read_params(set_dir)
    duration = recording_seconds(params)
    record = {
        "set": set_name, "set_dir": str(set_dir), "sorter": sorter, "date": now_iso(),
        "machine": machine_info(), "recording_seconds": duration,
        "n_channels": params["n_channels"], "command": command,
    }
    print(f"[{set_name}] {sorter}: sorting ...", flush=True)
    run = run_measured(
        [sorter_python(sorter), str(BENCH_DIR / "_run_one.py"), "--sorter", sorter,
         "--set", str(set_dir), "--out", str(npz), "--work", str(work)]
        + (["--motion-correction"] if motion_correction else []),
        env=child_env(sorter), log_path=work / "sort.log")
    record.update({
        "wall_s": run.wall_s, "x_real_time": run.wall_s / duration,
        "peak_rss_bytes": run.peak_rss_bytes, "peak_rss_gb": run.peak_rss_bytes / 1e9,
        "loadavg_before": run.loadavg_before, "loadavg_after": run.loadavg_after,
        "log": str(work / "sort.log"),
    })
    if run.returncode != 0:
        record.update(status="failed", returncode=run.returncode, log_tail=_tail(work / "sort.log"))
        write_json(out / f"{stem}.json", record)
        print(f"[{set_name}] {sorter}: FAILED (exit {run.returncode}), see {work / 'sort.log'}", flush=True)
        return record

    sorted_npz = np.load(npz)
    record.update(json.loads(str(sorted_npz["meta"])))
    # The sorter's own good/mua split, for context: scoring uses all units.
    labels, counts = np.unique(sorted_npz["unit_quality"].astype(str), return_counts=True)
    record["units_by_sorter_label"] = {str(k) or "unlabelled": int(c) for k, c in zip(labels, counts)}
    record["status"] = "ok"
    # Scoring needs SpikeInterface, which lives in the peers venv only.
    metrics_json = work / "metrics.json"
    subprocess.run(
        [str(require_peers_python()), str(BENCH_DIR / "_score.py"), "--set", str(set_dir),
         "--sorting", str(npz), "--metrics", str(metrics_json), "--prefix", str(out / stem),
         "--title", f"{sorter} on {set_name}"],
        check=True)
    record["metrics"] = json.loads(metrics_json.read_text())
    write_json(out / f"{stem}.json", record)
    m = record["metrics"]
    print(f"[{set_name}] {sorter}: well-detected {m['well_detected']}/{m['n_gt_units']}, "
          f"mean acc {m['mean_accuracy']:.2f}, wall {run.wall_s:.0f} s, "
          f"peak RSS {run.peak_rss_bytes / 1e9:.2f} GB", flush=True)
    return record


def main() -> None:
    """Parse arguments and benchmark each sorter in turn."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", required=True, help="GT-A, GT-B or a folder with a set's files")
    parser.add_argument("--sorters", default="spikearray",
                        help=f"comma-separated, from {', '.join(SORTERS)}")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results", help="results folder")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="where the public sets are generated if missing")
    parser.add_argument("--motion-correction", choices=("auto", "on", "off"), default="auto",
                        help="peers' motion correction switch (auto: on for the drifting public sets)")
    args = parser.parse_args()

    sorters = [s.strip() for s in args.sorters.split(",") if s.strip()]
    unknown = sorted(set(sorters) - set(SORTERS))
    if unknown:
        sys.exit(f"unknown sorter(s) {unknown}; known: {SORTERS}")
    set_name, set_dir = resolve_set(args.set, args.data_dir)
    motion = args.motion_correction == "on" or (args.motion_correction == "auto" and set_name in DRIFTING_SETS)
    out = args.out.resolve()
    failed = []
    for sorter in sorters:
        # One command per row, so docs can cite exactly how a row was made.
        command = shlex.join(["python", "benchmarks/ground_truth.py", "--set", args.set,
                              "--sorters", sorter, "--out", str(args.out)])
        if benchmark_one(set_name, set_dir, sorter, out, command, motion)["status"] != "ok":
            failed.append(sorter)
    print(f"table: {write_table(out)}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
