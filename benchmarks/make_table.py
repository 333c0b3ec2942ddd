"""Collect the run JSONs of a results folder into one Markdown table (``table.md``).

Columns follow the peers' table in ``shared/gt/README.md``, plus median
accuracy, mean precision/recall and the number of units the sorter reported.

Usage::

    python benchmarks/make_table.py benchmarks/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import SORTERS

#: Display names, in the order rows are listed within a set.
SORTER_NAMES = {
    "spikearray": "spikearray",
    "kilosort4": "Kilosort4",
    "spykingcircus2": "SpykingCircus2",
    "tridesclous2": "Tridesclous2",
    "mountainsort5": "MountainSort5",
}

HEADER = ("| set | sorter | well-detected (≥ 0.8) | ≥ 0.5 | mean acc | median acc | mean precision "
          "| mean recall | false positive | redundant | over-merged | units found | wall | × real time "
          "| peak RSS (process tree) | load before → after | date |")


def load_runs(results: Path) -> list[dict]:
    """Read every run JSON (those with a ``sorter`` and ``status``) in ``results``."""
    runs = []
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and "sorter" in record and "status" in record:
            runs.append(record)
    return runs


def _sorter_label(run: dict) -> str:
    """Display name with the version that produced the row, where it matters."""
    name = SORTER_NAMES.get(run["sorter"], run["sorter"])
    versions = run.get("versions", {})
    key = {"kilosort4": "kilosort", "spikearray": "spikearray"}.get(run["sorter"], "spikeinterface")
    return f"{name} {versions[key]}" if key in versions else name


def row(run: dict) -> str:
    """One Markdown table row for a run (failed runs say so instead of metrics)."""
    date = run["date"][:10]
    # 1-minute load averages: above the core count means the run shared the CPU.
    load = f"{run['loadavg_before'][0]:.1f} → {run['loadavg_after'][0]:.1f}"
    if run["status"] != "ok":
        return (f"| {run['set']} | {_sorter_label(run)} | failed (exit {run.get('returncode')}) |"
                + " |" * 12 + f" {load} | {date} |")
    m = run["metrics"]
    cells = [
        run["set"], _sorter_label(run),
        f"{m['well_detected']} / {m['n_gt_units']}", str(m["accuracy_ge_0.5"]),
        f"{m['mean_accuracy']:.2f}", f"{m['median_accuracy']:.2f}",
        f"{m['mean_precision']:.2f}", f"{m['mean_recall']:.2f}",
        str(m["false_positive"]), str(m["redundant"]), str(m["overmerged"]), str(m["n_sorted_units"]),
        f"{run['wall_s']:.0f} s", f"{run['x_real_time']:.2f}", f"{run['peak_rss_gb']:.1f} GB", load, date,
    ]
    return "| " + " | ".join(cells) + " |"


def make_table(runs: list[dict]) -> str:
    """Markdown table of ``runs``, sorted by set, then sorter in :data:`SORTERS` order."""
    order = {s: i for i, s in enumerate(SORTERS)}
    runs = sorted(runs, key=lambda r: (r["set"], order.get(r["sorter"], len(order)), r["sorter"]))
    sep = "|" + " --- |" * HEADER.count(" | ") + " --- |"
    return "\n".join([HEADER, sep, *(row(r) for r in runs)]) + "\n"


def write_table(results: Path) -> Path:
    """Write ``results/table.md`` from the run JSONs in ``results``; return its path."""
    path = results / "table.md"
    path.write_text(make_table(load_runs(results)))
    return path


def main() -> None:
    """Parse arguments, write and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, nargs="?", default=Path(__file__).parent / "results")
    args = parser.parse_args()
    print(write_table(args.results).read_text(), end="")


if __name__ == "__main__":
    main()
