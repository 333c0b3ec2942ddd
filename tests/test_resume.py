"""Resumable sorting: stage caches with input hashes, a SIGKILLed ``spikearray sort`` resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import spikearray as sa
from spikearray.resume import STAGES, StageStore, stage_hash
from spikearray.synthetic import generate_recording, write_spikeglx

ROOT = Path(__file__).resolve().parents[1]


def _hashes(settings, ident=None):
    store = StageStore(None, settings=settings, identity=ident or {"data": "x"})
    return {st: store.hash(st) for st in STAGES}


def test_hash_changes_from_the_changed_stage_on():
    base = _hashes(sa.Settings())
    # a matching threshold only touches matching
    h = _hashes(sa.Settings(Th_learned=7.0))
    assert [st for st in STAGES if h[st] != base[st]] == ["match"]
    # a clustering seed: cluster and match
    h = _hashes(sa.Settings(cluster_init_seed=1))
    assert [st for st in STAGES if h[st] != base[st]] == ["cluster", "match"]
    # a preprocessing setting or another recording: everything
    assert all(_hashes(sa.Settings(highpass_cutoff=250.0))[st] != base[st] for st in STAGES)
    assert all(_hashes(sa.Settings(), {"data": "y"})[st] != base[st] for st in STAGES)
    # where the work runs does not change what it computes
    assert _hashes(sa.Settings(device="cpu", torch_threads=2)) == base
    assert stage_hash("drift", sa.Settings(), "p") != stage_hash("drift", sa.Settings(), "q")


def test_unfinished_or_stale_stage_is_not_complete(tmp_path):
    import xarray as xr

    store = StageStore(tmp_path, settings=sa.Settings())
    ds = xr.Dataset({"v": ("n", np.arange(5))}, attrs={"note": "x"})
    back = store.save("drift", "h1", ds)
    xr.testing.assert_identical(back, ds)
    assert store.load("drift", "h2") is None  # another hash: recompute
    # a half-written store (as a killed writer leaves it) is never read as finished
    (tmp_path / ".stages" / "bases.zarr.partial-1-abc").mkdir()
    assert store.load("bases", "h1") is None
    store.clean_partials()
    assert not (tmp_path / ".stages" / "bases.zarr.partial-1-abc").exists()
    # a store folder without its consolidated metadata is not complete either
    (tmp_path / ".stages" / "detect.zarr").mkdir()
    assert store.load("detect", "h1") is None
    xr.testing.assert_identical(store.load("drift", "h1"), ds)
    assert store.skipped == ["drift"]
    # the int16 copy counts only with its marker, for the same hash and shape
    store.preprocessed_path.write_bytes(b"\0" * 2 * 10 * 4)
    assert not store.preprocessed_ready("h", (10, 4))
    store.mark_preprocessed("h", (10, 4), 200.0)
    assert store.preprocessed_ready("h", (10, 4)) and not store.preprocessed_ready("h2", (10, 4))
    assert not store.preprocessed_ready("h", (11, 4))


@pytest.fixture(scope="module")
def rec8():
    rec, _ = generate_recording(duration=8.0, n_channels=32, n_units=6, seed=11)
    return rec


def test_crash_then_rerun_with_changed_setting_recomputes_downstream(rec8, tmp_path, monkeypatch):
    import spikearray.matching

    s = sa.Settings(nblocks=1)

    def crash(*a, **k):
        raise RuntimeError("simulated crash in matching")

    with monkeypatch.context() as m:
        m.setattr(spikearray.matching, "match", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            sa.sort(rec8, s, output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "sorting.zarr").exists()
    assert {p.name for p in (tmp_path / "out" / ".stages").iterdir()} >= {
        "preprocess.zarr", "preprocessed.int16", "preprocessed.int16.json", "drift.zarr", "bases.zarr",
        "detect.zarr", "cluster.zarr"}

    s2 = s.replace(Th_learned=7.5)  # a matching setting: everything before matching is reused
    resumed = sa.sort(rec8, s2, output=tmp_path / "out", progress=False)
    assert json.loads(resumed.attrs["stages_skipped"]) == ["preprocess", "drift", "bases", "detect", "cluster"]
    assert not (tmp_path / "out" / ".stages").exists()  # spent once the output is complete
    fresh = sa.sort(rec8, s2, progress=False)
    assert json.loads(fresh.attrs["stages_skipped"]) == []
    for k in ("spike_time", "spike_unit", "template", "spike_amplitude"):
        np.testing.assert_array_equal(resumed[k].values, fresh[k].values)


@pytest.fixture(scope="module")
def spikeglx_file(tmp_path_factory):
    rec, _ = generate_recording(duration=12.0, n_channels=32, n_units=8, seed=5)
    return write_spikeglx(rec, tmp_path_factory.mktemp("rec") / "kill.ap.bin")


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return [sys.executable, "-m", "spikearray", "sort", *map(str, args)], env


def test_sigkill_mid_detection_then_rerun_equals_uninterrupted(spikeglx_file, tmp_path):
    out = tmp_path / "killed"
    cmd, env = _cli(spikeglx_file, "--out", out)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            seen.append(line)
            if "detect …" in line:  # detection has started: kill it mid-stage
                break
            assert time.monotonic() < deadline, "".join(seen)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    stages = out / ".stages"
    finished = [st for st in ("preprocess", "drift", "bases", "detect") if (stages / f"{st}.zarr").is_dir()]
    assert finished[:3] == ["preprocess", "drift", "bases"] and not (stages / "match.zarr").exists()
    assert not (out / "sorting.zarr").exists()

    rerun = subprocess.run(cmd + ["--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout and f"reused: {', '.join(finished)}" in rerun.stdout

    resumed = sa.open_sorting(out)
    assert json.loads(resumed.attrs["stages_skipped"]) == finished
    whole = sa.sort(sa.open_recording(spikeglx_file), output=tmp_path / "whole", progress=False)
    assert json.loads(whole.attrs["stages_skipped"]) == []
    assert whole.sizes["unit"] > 0
    for k in ("spike_time", "spike_unit", "template"):
        np.testing.assert_array_equal(resumed[k].values, whole[k].values)

    # a complete output is refused without --overwrite (one line, exit status 2)
    again = subprocess.run(cmd + ["--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
