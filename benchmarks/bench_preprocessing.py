"""Throughput of the full preprocessing chain (high-pass → median CAR → whitening), 384 channels, 60 s.

Measured in the same run on the same int16 SpikeGLX file:
* spikearray ``preprocess`` (whitening estimate included), computed with dask's threaded scheduler (2 threads,
  1 torch thread each) into a sink that keeps a checksum;
* SpikeInterface ``highpass_filter → common_reference → whiten`` (construction, i.e. its whitening estimate,
  included), every chunk's ``get_traces`` run by its ``TimeSeriesChunkExecutor`` with ``n_jobs=2`` (thread and
  process pools; the better is reported), 1 s chunks;
* the bandwidth floor: a plain memory copy of the same int16 samples (already in RAM), and reading the file.

Usage: ``nice -n 5 python benchmarks/bench_preprocessing.py [--duration 60] [--channels 384] [--repeats 2]``.
Prints a Markdown table (append it to ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import dask
import numpy as np


class Sink:
    """``da.store`` target that discards blocks but keeps a checksum (so nothing can be skipped)."""

    def __init__(self):
        self.total = 0.0

    def __setitem__(self, key, value):
        self.total += float(value[::997, ::7].sum())


def run_spikearray(path: Path, n_threads: int) -> tuple[float, float]:
    import dask.array as da

    import spikearray as sa

    t0 = time.perf_counter()
    rec = sa.open_recording(path)
    white, _ = sa.preprocess(rec, sa.Settings(device="cpu", torch_threads=1))
    t_est = time.perf_counter() - t0
    with dask.config.set(scheduler="threads", num_workers=n_threads):
        da.store(white.data, Sink(), lock=False)
    return time.perf_counter() - t0, t_est


def _si_init(rec):
    return {"rec": rec}


def _si_func(segment_index, start_frame, end_frame, worker_dict):
    tr = worker_dict["rec"].get_traces(segment_index=segment_index, start_frame=start_frame, end_frame=end_frame)
    return float(tr[::997, ::7].sum())


def run_spikeinterface(path: Path, n_channels: int, geometry: np.ndarray, gain: float, n_jobs: int,
                       engine: str) -> float:
    import spikeinterface.core as si
    import spikeinterface.preprocessing as spre
    from spikeinterface.core.job_tools import TimeSeriesChunkExecutor

    t0 = time.perf_counter()
    n_file = n_channels + 1  # + the SpikeGLX sync channel
    raw = si.read_binary(path, sampling_frequency=30000.0, dtype="int16", num_channels=n_file, gain_to_uV=gain,
                         offset_to_uV=0.0)
    raw = raw.select_channels(raw.channel_ids[:n_channels])
    raw.set_dummy_probe_from_locations(geometry)
    chain = spre.highpass_filter(raw, freq_min=300.0, dtype="float32")
    chain = spre.common_reference(chain, operator="median", reference="global")
    chain = spre.whiten(chain, dtype="float32", seed=0)
    ex = TimeSeriesChunkExecutor(chain, _si_func, _si_init, (chain,), n_jobs=n_jobs, chunk_duration="1s",
                                 handle_returns=True, pool_engine=engine, max_threads_per_worker=1,
                                 progress_bar=False)
    ex.run()
    return time.perf_counter() - t0


def run_copy(path: Path, n_channels: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    raw = np.fromfile(path, dtype=np.int16)
    t_read = time.perf_counter() - t0
    dst = np.empty_like(raw)
    t0 = time.perf_counter()
    np.copyto(dst, raw)
    return time.perf_counter() - t0, t_read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--channels", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from spikearray.synthetic import generate_recording, write_spikeglx

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t0 = time.perf_counter()
        rec, _ = generate_recording(duration=args.duration, n_channels=args.channels, n_units=40, seed=0)
        path = write_spikeglx(rec, Path(tmp) / "bench_g0_t0.imec0.ap.bin")
        print(f"# generated {args.duration:g} s x {args.channels} ch in {time.perf_counter() - t0:.1f} s")
        geometry = np.stack([rec["x"].values, rec["y"].values], axis=1)
        gain = float(rec.attrs["gain_to_uV"])
        n = rec.sizes["time"] * args.channels
        results: dict[str, list[float]] = {}
        for r in range(args.repeats):
            tc, tr = run_copy(path, args.channels)
            results.setdefault("memory copy (np.copyto, int16)", []).append(tc)
            results.setdefault("read file (np.fromfile, page cache)", []).append(tr)
            ts, te = run_spikearray(path, args.jobs)
            results.setdefault("spikearray preprocess", []).append(ts)
            results.setdefault("  of which: whitening/bad-channel estimate", []).append(te)
            for engine in ("thread", "process"):
                results.setdefault(f"SpikeInterface chain ({engine} pool)", []).append(
                    run_spikeinterface(path, args.channels, geometry, gain, args.jobs, engine))
            print(f"# repeat {r + 1}: " + ", ".join(f"{k.strip()}={v[-1]:.2f}s" for k, v in results.items()))

    best = {k: min(v) for k, v in results.items()}
    si_best = min(v for k, v in best.items() if k.startswith("SpikeInterface"))
    date = datetime.date.today().isoformat()
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    print(f"\n{date}, {cpu}, {len(os.sched_getaffinity(0))} cores, {args.duration:g} s x {args.channels} ch "
          f"int16 at 30 kHz, best of {args.repeats}\n")
    print("| what | time (s) | samples×channels / s | × real time | vs SpikeInterface |")
    print("|---|---:|---:|---:|---:|")
    for k, t in best.items():
        if k.strip().startswith("of which"):  # a part of the row above, not a throughput of its own
            print(f"| {k} | {t:.2f} | | | |")
            continue
        print(f"| {k} | {t:.2f} | {n / t / 1e6:.0f} M | {args.duration / t:.1f} | {si_best / t:.2f}× |")


if __name__ == "__main__":
    main()
