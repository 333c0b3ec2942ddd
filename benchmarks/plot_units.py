"""Accuracy against amplitude, one line per sorter, for one ground-truth set (from the harness's per-unit CSVs).

Reads ``<results>/<set>_<sorter>_units.csv`` (written by ``ground_truth.py``) for every sorter present and
draws the fraction of well-detected units (accuracy ≥ 0.8) in amplitude bins, plus each unit's accuracy as a
dot, into ``<results>/<set>_units_by_sorter.png``. Needs matplotlib and pandas (the peers venv has both)::

    python benchmarks/plot_units.py --set P128-static --out benchmarks/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--set", required=True)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args()
    files = sorted(a.out.glob(f"{a.set}_*_units.csv"))
    files = [f for f in files if not f.name.startswith(f"{a.set}_units")]
    if not files:
        raise SystemExit(f"no {a.set}_<sorter>_units.csv in {a.out}: run benchmarks/ground_truth.py first")
    edges = np.array([0, 10, 20, 30, 40, 60, 80, 120, 1000.0])
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for f in files:
        sorter = f.name[len(a.set) + 1:-len("_units.csv")]
        d = pd.read_csv(f)
        ptp, acc = d["ptp_uV"].to_numpy(), d["accuracy"].to_numpy()
        b = np.digitize(ptp, edges) - 1
        frac = [np.mean(acc[b == i] >= 0.8) if np.any(b == i) else np.nan for i in range(len(edges) - 1)]
        centres = np.sqrt(np.maximum(edges[:-1], 5) * np.minimum(edges[1:], 300))
        line, = ax0.plot(centres, frac, "o-", label=f"{sorter} ({int(np.sum(acc >= 0.8))})")
        ax1.scatter(ptp, acc, s=8, alpha=0.6, color=line.get_color(), label=sorter)
    for ax in (ax0, ax1):
        ax.set_xscale("log")
        ax.set_xlabel("ground-truth unit peak-to-peak (µV)")
    ax0.set_ylabel("fraction well detected (accuracy ≥ 0.8)")
    ax1.set_ylabel("accuracy")
    ax0.legend(title="sorter (well detected)", fontsize=8)
    ax0.set_title(f"{a.set}: well detected by amplitude")
    ax1.set_title(f"{a.set}: every unit")
    png = a.out / f"{a.set}_units_by_sorter.png"
    fig.savefig(png, dpi=110)
    print(png)


if __name__ == "__main__":
    main()
