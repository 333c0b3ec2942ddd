#!/usr/bin/env python3
"""Sort on a dask-distributed cluster: CPU worker processes, or one worker per GPU.

    python recipes/distributed.py [RECORDING.ap.bin] --out OUT [--workers 2] [--duration 30]
    python recipes/distributed.py [RECORDING.ap.bin] --out OUT --gpu        # dask-cuda: one worker per GPU

Without a recording the built-in synthetic one (``--duration`` seconds, 32 channels) is written to a temporary
SpikeGLX file first, so the workers read a file as they would on real data: the task graph carries the file
path and offsets, never the samples, and each worker reads its own chunks.

- CPU: ``distributed.LocalCluster(n_workers=N, threads_per_worker=1)``; ``Settings(device="cpu")``.
- GPU (``--gpu``): ``dask_cuda.LocalCUDACluster()`` starts one worker per visible GPU, each pinned to its device
  (``CUDA_VISIBLE_DEVICES``), and ``Settings(device="cuda")`` makes every chunk's torch kernels run on the worker's
  GPU. Needs ``pip install 'spikearray[gpu]'`` and a CUDA build of torch.
- Any cluster: ``spikearray.sort(..., client=client)``, or inside ``with Client(...)`` the current client is used
  by itself. ``spikearray sort REC --out OUT --cluster tcp://scheduler:8786`` does the same from the shell.

The result is the same Sorting Dataset whatever the scheduler and the number of workers; the recipe prints the
units and the per-stage timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Sequence

# this file is called distributed.py: keep its folder off the import path so ``import distributed`` finds dask's
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def _cluster(gpu: bool, workers: int):
    if gpu:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise SystemExit("--gpu needs dask-cuda (pip install 'spikearray[gpu]') and a CUDA GPU.") from None
        return LocalCUDACluster(dashboard_address=None)  # one worker per GPU
    from distributed import LocalCluster

    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)


def main(argv: Sequence[str] | None = None) -> int:
    import spikearray as sa

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recording", nargs="?", help="SpikeGLX .ap.bin (default: a synthetic recording)")
    p.add_argument("--out", required=True, help="output folder (sorting.zarr, phy/)")
    p.add_argument("--workers", type=int, default=2, help="CPU worker processes (default 2)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of synthetic data (default 30)")
    p.add_argument("--gpu", action="store_true", help="dask-cuda LocalCUDACluster, Settings(device='cuda')")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    from distributed import Client

    with tempfile.TemporaryDirectory(prefix="spikearray-recipe-") as tmp:
        path = args.recording
        if path is None:
            from spikearray.synthetic import generate_recording, write_spikeglx

            rec, truth = generate_recording(duration=args.duration, n_channels=32, n_units=8, seed=0)
            path = write_spikeglx(rec, Path(tmp) / "synthetic.ap.bin")
            print(f"synthetic recording: {args.duration:g} s, 32 channels, {truth.sizes['unit']} planted units")
        recording = sa.open_recording(path)
        settings = sa.Settings(device="cuda" if args.gpu else "cpu")
        with _cluster(args.gpu, args.workers) as cluster, Client(cluster) as client:
            print(f"cluster: {len(client.scheduler_info()['workers'])} workers ({'GPU' if args.gpu else 'CPU'})")
            sorting = sa.sort(recording, settings, output=args.out, client=client, progress=False,
                              overwrite=args.overwrite)
    good = int((sorting["label"].values.astype(str) == "good").sum())
    print(f"units: {sorting.sizes['unit']} ({good} good), spikes: {sorting.sizes['spike']}")
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in json.loads(sorting.attrs["timings"]).items()))
    print(f"sorting: {Path(args.out) / 'sorting.zarr'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
