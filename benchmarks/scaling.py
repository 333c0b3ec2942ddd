"""Cost scaling: wall time and peak RSS of one sorter on 1×, 2×, 4× the duration, and 64 vs 384 channels.

Recordings come from ``make_gt.py`` with the GT-A generation arguments except
``--duration`` (and ``--num-channels``). The 384-channel recording keeps
GT-A's unit density (35 units per 64 channels → 210 units), so it measures
what more channels cost rather than what a sparser probe costs.

Each recording is sorted in a child process as in ``ground_truth.py``; no
scoring (the point is cost). Writes ``scaling_<sorter>.json`` and
``scaling_<sorter>.png`` into ``--out``. A sorter whose cost grows linearly in
time and whose memory does not grow with duration shows a straight wall-time
line through the origin and a flat RSS line.

Example::

    python benchmarks/scaling.py --sorter spikearray --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from _common import (BENCH_DIR, DEFAULT_DATA_DIR, REPO_ROOT, SORTERS, child_env, generate_set,
                     machine_info, now_iso, read_params, recording_seconds, run_measured,
                     sorter_python, write_json)

#: GT-A's arguments less --duration, --num-channels and --num-units, set per run.
BASE_ARGS = ["--seed", "42", "--layout", "np1", "--drift", "none", "--noise-level", "8"]
UNITS_PER_64_CHANNELS = 35


def make_recording(data_dir: Path, seconds: float, channels: int) -> Path:
    """Generate (once) the recording of ``seconds`` and ``channels`` for the scaling runs."""
    units = UNITS_PER_64_CHANNELS * channels // 64
    out = data_dir / f"scaling_{channels}ch_{seconds:g}s"
    return generate_set(out, [*BASE_ARGS, "--duration", f"{seconds:g}", "--num-channels", str(channels),
                              "--num-units", str(units)])


def measure(sorter: str, set_dir: Path) -> dict:
    """Sort ``set_dir`` in a child process; return wall time, peak RSS and what was found."""
    work = BENCH_DIR / "_work" / "scaling" / set_dir.name / sorter
    npz = work / "sorting.npz"
    params = read_params(set_dir)
    print(f"[scaling] {sorter} on {set_dir.name} ...", flush=True)
    run = run_measured(
        [sorter_python(sorter), str(BENCH_DIR / "_run_one.py"), "--sorter", sorter, "--set", str(set_dir),
         "--out", str(npz), "--work", str(work)],
        env=child_env(sorter), log_path=work / "sort.log")
    seconds = recording_seconds(params)
    result = {
        "recording": set_dir.name, "recording_seconds": seconds, "n_channels": params["n_channels"],
        "n_planted_units": params["num_units"], "returncode": run.returncode, "wall_s": run.wall_s,
        "x_real_time": run.wall_s / seconds, "peak_rss_bytes": run.peak_rss_bytes,
        "peak_rss_gb": run.peak_rss_bytes / 1e9, "loadavg_before": run.loadavg_before,
        "loadavg_after": run.loadavg_after, "log": str(work / "sort.log"),
    }
    if run.returncode == 0:
        found = np.load(npz)
        result["n_sorted_units"] = int(len(found["unit_ids"]))
        result["n_sorted_spikes"] = int(len(found["spike_samples"]))
    print(f"[scaling] {set_dir.name}: exit {run.returncode}, wall {run.wall_s:.0f} s, "
          f"peak RSS {run.peak_rss_bytes / 1e9:.2f} GB", flush=True)
    return result


def linear_fit(runs: list[dict]) -> dict | None:
    """Least-squares ``wall = fixed + slope × duration`` and the same for RSS, over runs of one channel count.

    The intercept separates start-up cost (imports, model set-up) from the cost
    that grows with the data, which a ratio of two wall times would mix up.

    Returns
    -------
    dict or None
        ``fixed_s``, ``s_per_recording_s``, ``rss_gb_fixed``, ``rss_gb_per_recording_s``;
        None with fewer than two durations.
    """
    t = np.array([r["recording_seconds"] for r in runs], dtype=float)
    if len(np.unique(t)) < 2:
        return None
    slope, fixed = np.polyfit(t, [r["wall_s"] for r in runs], 1)
    rss_slope, rss_fixed = np.polyfit(t, [r["peak_rss_gb"] for r in runs], 1)
    return {"fixed_s": float(fixed), "s_per_recording_s": float(slope),
            "rss_gb_fixed": float(rss_fixed), "rss_gb_per_recording_s": float(rss_slope)}


def plot(runs: list[dict], sorter: str, png: Path) -> None:
    """Two panels against duration: wall time (with the linear extrapolation of 1×) and peak RSS."""
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    ok = [r for r in runs if r["returncode"] == 0]
    by_ch = {ch: sorted((r for r in ok if r["n_channels"] == ch), key=lambda r: r["recording_seconds"])
             for ch in sorted({r["n_channels"] for r in ok})}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for ch, rs in by_ch.items():
        t = [r["recording_seconds"] for r in rs]
        style = dict(marker="o" if ch == 64 else "s", ls="-" if len(rs) > 1 else "none", label=f"{ch} channels")
        ax_t.plot(t, [r["wall_s"] for r in rs], **style)
        ax_m.plot(t, [r["peak_rss_gb"] for r in rs], **style)
        for r in rs:
            # The machine's 1-min load at the end of the run: above the core
            # count, the point measures contention as much as the sorter.
            ax_t.annotate(f"load {r['loadavg_after'][0]:.1f}", (r["recording_seconds"], r["wall_s"]),
                          textcoords="offset points", xytext=(4, -10), fontsize=7, color="gray")
        fit = linear_fit(rs)
        if fit:
            # The straight line the runs would sit on if cost = fixed + per-second × duration.
            ax_t.plot([0, max(t)], [fit["fixed_s"], fit["fixed_s"] + fit["s_per_recording_s"] * max(t)],
                      color="gray", ls=":", lw=1,
                      label=f"fit: {fit['fixed_s']:.0f} s + {fit['s_per_recording_s']:.2f} × duration")
    ax_t.set_xlabel("recording duration (s)")
    ax_t.set_ylabel("wall time (s)")
    ax_m.set_xlabel("recording duration (s)")
    ax_m.set_ylabel("peak RSS, process tree (GB)")
    # Headroom so markers at the top are not cut by the frame.
    ax_t.set_ylim(0, 1.15 * max(r["wall_s"] for r in ok))
    ax_m.set_ylim(0, 1.15 * max(r["peak_rss_gb"] for r in ok))
    ax_t.set_xlim(left=0)
    ax_m.set_xlim(left=0)
    for ax in (ax_t, ax_m):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{sorter}: cost against duration", fontsize=10)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main() -> None:
    """Parse arguments, generate the recordings, measure each, write JSON and PNG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sorter", default="spikearray", choices=SORTERS)
    parser.add_argument("--base-duration", type=float, default=60.0, help="seconds of the 1× recording")
    parser.add_argument("--factors", default="1,2,4", help="comma-separated multiples of the base duration")
    parser.add_argument("--wide-channels", type=int, default=384,
                        help="channel count of the extra run at the base duration (0: skip it)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the PNG from an existing scaling_<sorter>.json in --out")
    args = parser.parse_args()

    out = args.out.resolve()
    if args.replot:
        runs = json.loads((out / f"scaling_{args.sorter}.json").read_text())["runs"]
        plot(runs, args.sorter, out / f"scaling_{args.sorter}.png")
        return
    configs = [(args.base_duration * float(f), 64) for f in args.factors.split(",")]
    if args.wide_channels:
        configs.append((args.base_duration, args.wide_channels))
    # Generate everything first so a sorter never shares the CPU with the generator.
    sets = [make_recording(args.data_dir, seconds, ch) for seconds, ch in configs]
    runs = [measure(args.sorter, s) for s in sets]

    record = {"kind": "scaling", "sorter": args.sorter, "date": now_iso(), "machine": machine_info(),
              "command": f"python benchmarks/scaling.py --sorter {args.sorter} "
                         f"--base-duration {args.base_duration:g} --factors {args.factors} "
                         f"--wide-channels {args.wide_channels} --out {args.out}",
              "runs": runs,
              "fit_64_channels": linear_fit([r for r in runs if r["returncode"] == 0 and r["n_channels"] == 64])}
    write_json(out / f"scaling_{args.sorter}.json", record)
    plot(runs, args.sorter, out / f"scaling_{args.sorter}.png")
    print(f"wrote {out / f'scaling_{args.sorter}.json'} and .png")


if __name__ == "__main__":
    main()
