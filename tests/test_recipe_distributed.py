"""recipes/distributed.py runs end to end: a CPU LocalCluster here, a LocalCUDACluster where there are GPUs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import spikearray as sa

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "distributed.py"


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(RECIPE), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT / "recipes"))  # from its own folder: no shadowing


def test_recipe_cpu_local_cluster(tmp_path):
    pytest.importorskip("distributed")
    r = _run("--out", tmp_path / "out", "--duration", "6", "--workers", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cluster: 2 workers (CPU)" in r.stdout
    so = sa.open_sorting(tmp_path / "out")
    assert so.sizes["spike"] > 0 and (tmp_path / "out" / "phy" / "params.py").is_file()


@pytest.mark.gpu
def test_recipe_gpu_local_cuda_cluster(tmp_path):
    pytest.importorskip("dask_cuda")
    r = _run("--out", tmp_path / "out", "--duration", "6", "--gpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(GPU)" in r.stdout and sa.open_sorting(tmp_path / "out").sizes["spike"] > 0


@pytest.mark.gpu
def test_cuda_sorting_matches_cpu():
    """Same pipeline on the GPU: the spikes agree with the CPU run (float order differs, so not bit for bit)."""
    from spikearray.synthetic import generate_recording

    rec, _ = generate_recording(duration=10.0, n_channels=32, n_units=6, seed=4)
    cpu = sa.sort(rec, sa.Settings(device="cpu"), progress=False)
    gpu = sa.sort(rec, sa.Settings(device="cuda"), progress=False)
    assert abs(gpu.sizes["unit"] - cpu.sizes["unit"]) <= 1
    t_cpu, t_gpu = cpu.spike_time.values, gpu.spike_time.values
    near = np.abs(t_gpu[:, None] - t_cpu[None, :]).min(1) <= 2 if len(t_gpu) and len(t_cpu) else np.zeros(0, bool)
    assert near.mean() > 0.95
