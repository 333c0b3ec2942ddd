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
from spikearray.errors import DamagedCacheWarning
from spikearray.pipeline import STAGES, stage_hashes
from spikearray.resume import StageStore
from spikearray.synthetic import generate_recording, write_spikeglx

ROOT = Path(__file__).resolve().parents[1]
CACHED = [st.name for st in STAGES if st.cached]


def _changed(settings, ident=None):
    """The cached stages whose hash differs from the default settings' on the same recording."""
    base = stage_hashes(sa.Settings(), {"data": "x"})
    h = stage_hashes(settings, ident or {"data": "x"})
    return [st for st in CACHED if h[st] != base[st]]


def test_hash_changes_for_the_stages_a_setting_reaches():
    assert CACHED == ["preprocess", "drift", "bases", "detect", "cluster", "match"]
    # a matching threshold only touches matching
    assert _changed(sa.Settings(Th_learned=7.0)) == ["match"]
    # a clustering seed: cluster and match
    assert _changed(sa.Settings(cluster_init_seed=1)) == ["cluster", "match"]
    # a detection threshold: detection and what uses its spikes, not the bases (which do not read it)
    assert _changed(sa.Settings(Th_universal=7.0)) == ["detect", "cluster", "match"]
    # a drift setting: everything from drift on, not preprocessing
    assert _changed(sa.Settings(drift_threshold=6.0)) == ["drift", "bases", "detect", "cluster", "match"]
    # a preprocessing setting or another recording: everything
    assert _changed(sa.Settings(highpass_cutoff=250.0)) == CACHED
    assert _changed(sa.Settings(), {"data": "y"}) == CACHED
    # where the work runs does not change what it computes
    assert _changed(sa.Settings(device="cpu", torch_threads=2)) == []


def test_unfinished_stale_or_cut_short_stage_is_not_complete(tmp_path):
    import xarray as xr

    store = StageStore(tmp_path)
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
    with pytest.warns(DamagedCacheWarning):
        assert store.load("detect", "h1") is None
    assert store.run("drift", "h1", lambda: 1 / 0).identical(ds)  # read back, not computed
    assert store.skipped == ["drift"]
    # a stage's own files count only while they have the size its store recorded
    (tmp_path / ".stages" / "copy.bin").write_bytes(b"\0" * 80)
    store.save("preprocess", "h", xr.Dataset(attrs={"files": {"copy.bin": 80}}))
    assert store.complete("preprocess", "h") and not store.complete("preprocess", "h2")
    (tmp_path / ".stages" / "copy.bin").write_bytes(b"\0" * 40)  # cut short
    with pytest.warns(DamagedCacheWarning, match="40 bytes instead of 80"):
        assert not store.complete("preprocess", "h")
    # a stage is recomputed into a clean place: its old store goes first, then the new one is saved
    seen = []
    again = store.run("preprocess", "h3", lambda: seen.append(store.path("preprocess").exists()) or xr.Dataset())
    assert seen == [False] and again.sizes == {} and store.complete("preprocess", "h3")
    # a DataArray result comes back as the DataArray
    arr = xr.DataArray(np.ones((2, 3), np.float32), dims=("unit", "channel"), name="templates", attrs={"units": "w"})
    xr.testing.assert_identical(store.run("cluster", "c", lambda: arr), arr)
    xr.testing.assert_identical(store.run("cluster", "c", lambda: 1 / 0), arr)


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
        "preprocess.zarr", "preprocessed.int16", "drift.zarr", "bases.zarr",
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
