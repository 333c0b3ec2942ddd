"""Scale-out, memory and resume: 1 vs N dask-distributed workers, peak RSS vs duration, resume vs fresh.

    nice python benchmarks/scaling_workers.py [--duration 60] [--channels 64] [--workers 1 2] [--json out.json]

1. **Workers**: the same synthetic recording (written as SpikeGLX, so workers read the file) is sorted on a
   ``LocalCluster(n_workers=N, threads_per_worker=1, processes=True)`` for each N; the figure is detection +
   matching time from ``sorting.attrs["timings"]`` (best of ``--repeat`` runs after one warm-up sort that loads
   torch/numba on the workers). Results are checked identical across N.
2. **Memory**: peak RSS (process tree, psutil polling every 50 ms) of ``spikearray sort`` child processes on a
   recording of ``--mem-duration`` s and one 4× longer (threaded scheduler), plus the RSS of a process that only
   imports spikearray and torch (the floor).
3. **Resume**: a ``spikearray sort`` killed (SIGKILL) once detection has started, then rerun, against a fresh
   uninterrupted run: wall time of the rerun vs the fresh run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's spikearray, here and in the child processes
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _write(tmp: Path, duration: float, channels: int, seed: int = 0) -> Path:
    from spikearray.synthetic import generate_recording, write_spikeglx

    rec, _ = generate_recording(duration=duration, n_channels=channels, n_units=max(4, channels // 4), seed=seed)
    return write_spikeglx(rec, tmp / f"rec_{duration:g}s_{channels}ch.ap.bin")


def bench_workers(path: Path, workers: list[int], repeat: int) -> dict:
    import numpy as np
    from distributed import Client, LocalCluster

    import spikearray as sa

    rec = sa.open_recording(path)
    warm = rec.isel(time=slice(0, int(4 * rec.attrs["sampling_rate"])))
    out, ref = {}, None
    for n in workers:
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
                Client(cl) as client:
            sa.sort(warm, progress=False, client=client)  # imports and JIT on every worker
            runs = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                so = sa.sort(rec, progress=False, client=client)
                wall = time.perf_counter() - t0
                t = json.loads(so.attrs["timings"])
                runs.append({"detect": t["detect"], "match": t["match"], "detect+match": t["detect"] + t["match"],
                             "total": wall})
            if ref is None:
                ref = so
            else:
                assert np.array_equal(ref.spike_time.values, so.spike_time.values)
                assert np.array_equal(ref.spike_unit.values, so.spike_unit.values)
        best = min(runs, key=lambda r: r["detect+match"])
        out[n] = {"best": best, "runs": runs}
        print(f"workers={n}: detect+match {best['detect+match']:.2f} s (detect {best['detect']:.2f}, match "
              f"{best['match']:.2f}), whole sort {best['total']:.1f} s", flush=True)
    base = out[workers[0]]["best"]["detect+match"]
    for n in workers[1:]:
        out[n]["speedup_detect_match"] = base / out[n]["best"]["detect+match"]
        print(f"speed-up {workers[0]} -> {n} workers (detect+match): {out[n]['speedup_detect_match']:.2f}x")
    return out


def _peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS of the process tree in MiB, wall seconds) of a command."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
        except psutil.Error:
            rss = 0
        peak = max(peak, rss)
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} exited with {proc.returncode}")
    return peak / 2**20, time.perf_counter() - t0


def bench_memory(tmp: Path, duration: float, channels: int) -> dict:
    floor, _ = _peak_rss([sys.executable, "-c", "import spikearray, torch, spikearray.pipeline, time; time.sleep(1)"])
    out = {"import_floor_MiB": floor}
    print(f"import floor: {floor:.0f} MiB", flush=True)
    for mult in (1, 4):
        path = _write(tmp, duration * mult, channels, seed=1)
        peak, wall = _peak_rss([sys.executable, "-m", "spikearray", "sort", str(path), "--out",
                                str(tmp / f"mem{mult}"), "--no-progress"])
        out[f"{mult}x"] = {"duration_s": duration * mult, "peak_rss_MiB": peak, "wall_s": wall,
                           "file_MiB": path.stat().st_size / 2**20}
        print(f"{duration * mult:g} s x {channels} ch ({path.stat().st_size / 2**20:.0f} MiB file): peak RSS "
              f"{peak:.0f} MiB, {wall:.1f} s", flush=True)
        path.unlink()
    out["ratio_4x_over_1x"] = out["4x"]["peak_rss_MiB"] / out["1x"]["peak_rss_MiB"]
    out["ratio_above_floor"] = ((out["4x"]["peak_rss_MiB"] - floor) / max(1.0, out["1x"]["peak_rss_MiB"] - floor))
    print(f"peak RSS 4x / 1x: {out['ratio_4x_over_1x']:.2f} (above the import floor: {out['ratio_above_floor']:.2f})")
    return out


def bench_resume(path: Path, tmp: Path) -> dict:
    base = [sys.executable, "-m", "spikearray", "sort", str(path)]
    t0 = time.perf_counter()
    subprocess.run(base + ["--out", str(tmp / "fresh"), "--no-progress"], env=ENV, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fresh = time.perf_counter() - t0
    proc = subprocess.Popen(base + ["--out", str(tmp / "killed")], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "detect …" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t0 = time.perf_counter()
    r = subprocess.run(base + ["--out", str(tmp / "killed"), "--no-progress"], env=ENV, check=True,
                       capture_output=True, text=True)
    resumed = time.perf_counter() - t0
    reused = [ln for ln in r.stdout.splitlines() if ln.startswith("time")]
    print(f"fresh run {fresh:.1f} s; rerun after SIGKILL in detection {resumed:.1f} s ({reused[0] if reused else ''})")
    return {"fresh_s": fresh, "resumed_s": resumed, "summary": reused[0] if reused else ""}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds, worker and resume benchmarks")
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--mem-duration", type=float, default=30.0, help="seconds of the 1x memory run (4x: 4 times)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["workers", "memory", "resume"])
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args(argv)
    res: dict = {"cores": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="spikearray-bench-") as tmp_:
        tmp = Path(tmp_)
        if "workers" not in a.skip or "resume" not in a.skip:
            path = _write(tmp, a.duration, a.channels)
        if "workers" not in a.skip:
            res["workers"] = bench_workers(path, a.workers, a.repeat)
        if "resume" not in a.skip:
            res["resume"] = bench_resume(path, tmp)
        if "memory" not in a.skip:
            res["memory"] = bench_memory(tmp, a.mem_duration, a.channels)
    res["load_after"] = os.getloadavg()
    if a.json:
        a.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
