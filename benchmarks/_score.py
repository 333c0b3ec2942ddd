"""Score a sorter's spikes against a set's ground truth (child process, peers venv).

Uses SpikeInterface's ``compare_sorter_to_ground_truth`` with ``exhaustive_gt=True``
and its defaults (match score 0.5, delta 0.4 ms), as ``shared/gt/README.md``
does for the published peer numbers, so rows are comparable. Writes

- ``--metrics``: JSON with the summary metrics;
- ``<prefix>_units.csv``: per ground-truth unit: peak-to-peak amplitude (µV),
  accuracy, precision, recall;
- ``<prefix>_units.png``: accuracy against amplitude.

Usage::

    python benchmarks/_score.py --set gt_data/GT-A --sorting X.npz --metrics m.json --prefix results/GT-A_x --title "..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from _common import read_params, write_json

WELL_DETECTED = 0.8


def load_gt(set_dir: Path, fs: float):
    """Ground truth of a set as a SpikeInterface sorting, plus each unit's ptp in µV."""
    from spikeinterface.core import NumpySorting

    gt = np.load(set_dir / "ground_truth.npz")
    unit_ids = gt["unit_ids"].astype(str)
    sorting = NumpySorting.from_samples_and_labels(
        [gt["spike_samples"]], [unit_ids[gt["spike_labels"]]], fs, unit_ids=unit_ids)
    return sorting, dict(zip(unit_ids, gt["template_ptp_uV_maxchan"].astype(float)))


def load_tested(npz_path: Path, fs: float):
    """A sorter's spikes (as written by ``_run_one.py``) as a SpikeInterface sorting."""
    from spikeinterface.core import NumpySorting

    data = np.load(npz_path)
    unit_ids = data["unit_ids"].astype(str)
    return NumpySorting.from_samples_and_labels(
        [data["spike_samples"]], [unit_ids[data["spike_labels"]]], fs, unit_ids=unit_ids)


def score(set_dir: Path, npz_path: Path) -> tuple[dict, "object"]:
    """Compare a sorting to the ground truth.

    Parameters
    ----------
    set_dir : pathlib.Path
        Ground-truth set folder.
    npz_path : pathlib.Path
        Spikes written by ``_run_one.py``.

    Returns
    -------
    metrics : dict
        Summary counts and means (means over all ground-truth units, a missed
        unit counting 0).
    per_unit : pandas.DataFrame
        One row per ground-truth unit: ``ptp_uV``, ``accuracy``, ``precision``,
        ``recall``, ``matched_unit``.
    """
    from spikeinterface.comparison import compare_sorter_to_ground_truth

    fs = float(read_params(set_dir)["sampling_rate"])
    gt, ptp = load_gt(set_dir, fs)
    tested = load_tested(npz_path, fs)
    cmp = compare_sorter_to_ground_truth(gt, tested, exhaustive_gt=True)
    perf = cmp.get_performance(method="by_unit")
    per_unit = perf[["accuracy", "precision", "recall"]].astype(float).fillna(0.0)
    per_unit.insert(0, "ptp_uV", [ptp[str(u)] for u in per_unit.index])
    matched = cmp.hungarian_match_12
    per_unit["matched_unit"] = [str(matched.get(u, -1)) for u in per_unit.index]
    per_unit.index.name = "unit"

    acc = per_unit["accuracy"].to_numpy()
    missed = per_unit[per_unit["accuracy"] < WELL_DETECTED]
    metrics = {
        "n_gt_units": int(len(per_unit)),
        "n_sorted_units": int(len(tested.unit_ids)),
        "n_sorted_spikes": int(tested.to_spike_vector().size),
        "well_detected": int(cmp.count_well_detected_units(WELL_DETECTED)),
        "accuracy_ge_0.5": int(np.sum(acc >= 0.5)),
        "false_positive": int(cmp.count_false_positive_units()),
        "redundant": int(cmp.count_redundant_units()),
        "overmerged": int(cmp.count_overmerged_units()),
        "not_well_detected_ptp_uV": sorted(round(float(v), 1) for v in missed["ptp_uV"]),
    }
    for col in ("accuracy", "precision", "recall"):
        metrics[f"mean_{col}"] = float(per_unit[col].mean())
        metrics[f"median_{col}"] = float(per_unit[col].median())
    return metrics, per_unit


def plot_units(per_unit, title: str, png: Path) -> None:
    """Scatter accuracy against the planted unit's ptp (log x: amplitudes span 12–430 µV)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ax.scatter(per_unit["ptp_uV"], per_unit["accuracy"], s=18, color="tab:blue")
    ax.axhline(WELL_DETECTED, color="gray", lw=0.8, ls="--", label=f"well detected ({WELL_DETECTED})")
    ax.set_xscale("log")
    # Plain µV ticks: the default log labels of minor ticks overlap on this range.
    ax.set_xticks([10, 20, 50, 100, 200, 500], labels=["10", "20", "50", "100", "200", "500"])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("ground-truth unit peak-to-peak on max channel (µV)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    """Parse arguments, score, write metrics JSON, per-unit CSV and PNG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", required=True, type=Path)
    parser.add_argument("--sorting", required=True, type=Path, help="npz from _run_one.py")
    parser.add_argument("--metrics", required=True, type=Path, help="JSON to write")
    parser.add_argument("--prefix", required=True, type=Path, help="path prefix of the CSV and PNG")
    parser.add_argument("--title", default="")
    args = parser.parse_args()

    metrics, per_unit = score(args.set, args.sorting)
    args.prefix.parent.mkdir(parents=True, exist_ok=True)
    per_unit.to_csv(f"{args.prefix}_units.csv", float_format="%.4f")
    plot_units(per_unit, args.title, Path(f"{args.prefix}_units.png"))
    write_json(args.metrics, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "not_well_detected_ptp_uV"}))


if __name__ == "__main__":
    main()
