"""Reliability under faults (issue 15): wrong probes, full disks, two runs in one folder, damaged stores.

Each test plants one fault on tiny seeded data and checks what the user sees (a :class:`SpikearrayError` that
names the file and what was wrong) and what is left on disk. ``docs/reliability.md`` lists them all.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import spikearray as sa
from spikearray.cli import main as cli_main
from spikearray.errors import ProbeMismatchError, SpikearrayError

from _meta import np1_meta, write_pair

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ 2: probe vs file
def _pi_probe(path: Path, n_contacts: int, channels: list[int] | None = None) -> Path:
    """A probeinterface JSON of a 2-column probe whose contacts are wired to ``channels`` (default 0..n-1)."""
    from probeinterface import ProbeGroup, generate_multi_columns_probe, write_probeinterface

    pr = generate_multi_columns_probe(num_columns=2, num_contact_per_column=n_contacts // 2, xpitch=32, ypitch=20)
    pr.set_device_channel_indices(np.arange(n_contacts) if channels is None else np.asarray(channels))
    pg = ProbeGroup()
    pg.add_probe(pr)
    write_probeinterface(path, pg)
    return path


@pytest.fixture
def raw32(tmp_path):
    d = np.random.default_rng(4).integers(-300, 300, size=(3000, 32), dtype=np.int16)
    p = tmp_path / "rec32.dat"
    d.tofile(p)
    return p, d


RAW = dict(n_channels=32, sampling_rate=30000.0, gain_to_uV=0.195)


def test_probe_wiring_fewer_channels_than_the_file_is_an_error(raw32, tmp_path):
    p, d = raw32
    probe = _pi_probe(tmp_path / "probe28.json", 28)
    with pytest.raises(ProbeMismatchError) as e:
        sa.open_recording(p, probe=probe, **RAW)
    msg = str(e.value)
    assert "28 of the 32" in msg and "[28, 29, 30, 31]" in msg and "wired_only=True" in msg
    # a Kilosort JSON that lists only 28 rows is the same mistake
    ks = tmp_path / "ks28.json"
    ks.write_text(json.dumps({"chanMap": list(range(28)), "xc": [0.0] * 28, "yc": [20.0 * i for i in range(28)],
                              "kcoords": [0] * 28, "n_chan": 28}))
    with pytest.raises(ProbeMismatchError, match=r"\[28, 29, 30, 31\]"):
        sa.open_recording(p, probe=ks, **RAW)


def test_wired_only_sorts_just_the_wired_channels(raw32, tmp_path):
    p, d = raw32
    wired = [0, 1, 2, 3, 5, 6, 7, 8] + list(range(12, 32))  # 28 contacts; 4, 9, 10, 11 unwired
    rec = sa.open_recording(p, probe=_pi_probe(tmp_path / "probe28.json", 28, wired), wired_only=True, **RAW)
    assert rec.sizes["channel"] == 28
    assert rec["channel"].values.tolist() == wired
    assert rec.attrs["unwired_channels"] == [4, 9, 10, 11]
    np.testing.assert_array_equal(rec.values, d[:, wired])


def test_deliberately_disconnected_sites_are_not_unwired(raw32, tmp_path):
    import scipy.io

    p, d = raw32
    conn = np.ones(32)
    conn[7] = 0  # Kilosort's way of saying "do not sort this site" (e.g. NP1.0's reference channel 191)
    scipy.io.savemat(tmp_path / "map.mat", {"chanMap": (np.arange(32) + 1.0)[:, None], "connected": conn[:, None],
                                            "xcoords": np.zeros((32, 1)), "ycoords": 20.0 * np.arange(32)[:, None]})
    rec = sa.open_recording(p, probe=tmp_path / "map.mat", **RAW)
    assert rec.sizes["channel"] == 31 and 7 not in rec["channel"].values.tolist()
    assert "unwired_channels" not in rec.attrs


def test_spikeglx_probe_override_checks_neural_channels_not_sync(tmp_path):
    n = 600
    data = np.random.default_rng(2).integers(-200, 200, size=(n, 385), dtype=np.int16)
    path = write_pair(tmp_path, "run_g0_t0.imec0", np1_meta(n), data)
    full = _pi_probe(tmp_path / "p384.json", 384)  # every AP channel; the sync column 384 has no contact
    assert sa.open_recording(path, probe=full).sizes["channel"] == 384
    part = _pi_probe(tmp_path / "p380.json", 380)
    with pytest.raises(ProbeMismatchError, match=r"380 of the 384 .*\[380, 381, 382, 383\]"):
        sa.open_recording(path, probe=part)
    rec = sa.open_recording(path, probe=part, wired_only=True)
    assert rec.sizes["channel"] == 380 and rec.attrs["unwired_channels"] == [380, 381, 382, 383]
    assert rec.attrs["sync_columns"] == [384]
    np.testing.assert_array_equal(rec.values, data[:, :380])


def test_cli_refuses_a_partial_probe_and_offers_wired_only(tmp_path, capsys):
    p = tmp_path / "rec32.bin"
    np.random.default_rng(4).standard_normal((3000, 32)).astype(np.float32).tofile(p)  # µV: no gain flag needed
    probe = _pi_probe(tmp_path / "probe28.json", 28)
    args = ["info", str(p), "--n-channels", "32", "--sampling-rate", "30000", "--dtype", "float32",
            "--probe", str(probe)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "[28, 29, 30, 31]" in err and "--wired-only" in err and "Traceback" not in err
    assert cli_main(args + ["--wired-only"]) == 0
    assert "28" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ 4: the disk fills up
from _sorting import make_sorting  # noqa: E402
from spikearray.errors import DamagedCacheWarning, DamagedStoreError, DiskFullError, OutputLockedError  # noqa: E402
from spikearray.export import _atomic, zarr_store  # noqa: E402
from spikearray.export._atomic import partial_siblings  # noqa: E402


@pytest.fixture(scope="module")
def sorting(small_recording):
    rec, truth = small_recording
    return make_sorting(rec, truth, with_similarity=True)


def _enospc(path: str = "") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def _fail_after(n_ok: int, real):
    """Wrap a writer so that call ``n_ok + 1`` writes half its bytes, as a filling disk does, then raises ENOSPC."""
    calls = {"n": 0}

    def writer(*args, **kw):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise _enospc()
        return real(*args, **kw)

    writer.calls = calls
    return writer


def _same_sorting(a, b) -> None:
    for k in ("spike_time", "spike_unit", "template", "label"):
        np.testing.assert_array_equal(a[k].values, b[k].values)
    assert a.attrs == b.attrs


def test_zarr_store_disk_full_midway_keeps_the_earlier_store(tmp_path, sorting, monkeypatch):
    out = tmp_path / "out"
    sa.write_sorting(sorting, out)
    newer = sorting.assign_attrs(note="second run")
    if zarr_store.ZARR_FORMAT != 2:
        pytest.skip("the chunk writer patched here is zarr-python 2's DirectoryStore")
    from zarr.storage import DirectoryStore

    writer = _fail_after(12, DirectoryStore._tofile)  # a dozen files in: some arrays written, others not
    monkeypatch.setattr(DirectoryStore, "_tofile", staticmethod(writer))
    with pytest.raises(DiskFullError) as e:
        sa.write_sorting(newer, out, overwrite=True)
    monkeypatch.undo()
    assert writer.calls["n"] == 13
    msg = str(e.value)
    assert str(out / "sorting.zarr") in msg and "needs about" in msg and "free" in msg
    assert e.value.needed > 0 and e.value.path == str(out / "sorting.zarr")
    assert partial_siblings(out / "sorting.zarr") == []  # the partial store is gone
    _same_sorting(sa.open_sorting(out).load(), sorting)  # the earlier one is intact and readable


def test_phy_folder_disk_full_midway_keeps_the_earlier_folder(tmp_path, sorting, monkeypatch):
    folder = tmp_path / "phy"
    sa.export_phy(sorting, None, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real_save = np.save

    def half_then_full(file, arr, *a, **k):  # writes part of the file, then the disk is full
        calls["n"] += 1
        if calls["n"] == 5:
            Path(file).write_bytes(b"\x93NUMPY" + b"\0" * 100)
            raise _enospc(str(file))
        return real_save(file, arr, *a, **k)

    calls = {"n": 0}
    monkeypatch.setattr(np, "save", half_then_full)
    with pytest.raises(DiskFullError, match=r"Phy folder .*needs about .* free .*earlier Phy folder there is "
                                            r"untouched"):
        sa.export_phy(sorting.assign_attrs(note="again"), None, folder, overwrite=True)
    monkeypatch.undo()
    assert partial_siblings(folder) == []
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_phy_folder_too_big_for_the_disk_is_refused_before_writing(tmp_path, sorting, monkeypatch):
    monkeypatch.setattr(_atomic, "free_bytes", lambda path: 1000)
    monkeypatch.setattr(np, "save", lambda *a, **k: pytest.fail("np.save called although the disk is too small"))
    with pytest.raises(DiskFullError, match=r"needs about .* 1000 bytes was free .*Nothing was written"):
        sa.export_phy(sorting, None, tmp_path / "phy")
    assert not (tmp_path / "phy").exists() and partial_siblings(tmp_path / "phy") == []


def test_int16_copy_disk_full_deletes_the_partial_file(tmp_path, small_recording, monkeypatch):
    from spikearray import _cache

    rec = small_recording[0].astype(np.float32).chunk({"time": 30000})  # 4 chunks
    target = tmp_path / "pre.int16"
    monkeypatch.setattr(_cache, "_write_block", _fail_after(1, _cache._write_block))  # full on the 2nd chunk
    with pytest.raises(DiskFullError) as e:
        _cache.write_int16(rec, target)
    assert f"needs {_atomic.format_bytes(2 * rec.size)}" in str(e.value) and str(target) in str(e.value)
    assert e.value.needed == 2 * rec.shape[0] * rec.shape[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the copy nor its .partial
    monkeypatch.undo()

    def no_room(f, nbytes):
        raise _enospc(f.name)

    monkeypatch.setattr(_cache, "_reserve", no_room)  # the allocation itself fails
    with pytest.raises(DiskFullError, match="partial file was deleted"):
        _cache.write_int16(rec, target)
    assert list(tmp_path.iterdir()) == []


def test_sort_checks_space_for_the_int16_copy_before_preprocessing(tmp_path, small_recording, monkeypatch):
    import spikearray.preprocessing

    rec = small_recording[0]
    need = 2 * rec.shape[0] * rec.shape[1]
    monkeypatch.setattr(_atomic, "free_bytes", lambda path: need // 2)
    monkeypatch.setattr(spikearray.preprocessing, "preprocess",
                        lambda *a, **k: pytest.fail("preprocessing started although the copy cannot fit"))
    out = tmp_path / "out"
    with pytest.raises(DiskFullError) as e:
        sa.sort(rec, output=out, progress=False)
    msg = str(e.value)
    assert "preprocessed int16 copy" in msg and _atomic.format_bytes(need) in msg
    assert _atomic.format_bytes(need // 2) in msg and str(out / ".stages") in msg
    assert e.value.needed == need and e.value.free == need // 2
    assert not (out / ".spikearray.lock").exists()


@contextmanager
def _tmpfs(where: Path, size: str):
    """Mount a tmpfs of ``size`` at ``where`` (root only); skip the test where mounting is not allowed."""
    where.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


def test_real_full_tmpfs(tmp_path, sorting, small_recording):
    from spikearray import _cache

    with _tmpfs(tmp_path / "fs", "600k") as fs:
        sa.write_sorting(sorting, fs / "out")
        used = shutil.disk_usage(fs).used
        # random (incompressible) values: this store cannot fit in what is left
        noise = np.random.default_rng(0).standard_normal(600_000 // 4).astype(np.float32)
        bigger = sorting.assign(noise=("n_noise", noise))
        with pytest.raises(DiskFullError) as e:
            sa.write_sorting(bigger, fs / "out", overwrite=True)
        assert str(fs / "out" / "sorting.zarr") in str(e.value)
        assert partial_siblings(fs / "out" / "sorting.zarr") == []
        assert shutil.disk_usage(fs).used == used  # the partial store's space was given back
        _same_sorting(sa.open_sorting(fs / "out").load(), sorting)

        rec = small_recording[0].astype(np.float32)  # 4 s x 32 ch: 7.7 MB as int16, far more than free
        with pytest.raises(DiskFullError, match=r"preprocessed int16 copy .*needs .*Nothing was written"):
            _cache.write_int16(rec, fs / "pre.int16")
        assert not (fs / "pre.int16").exists() and not (fs / "pre.int16.partial").exists()
        # were the free space misreported (another writer, a quota), the allocation itself fails at once: an
        # ENOSPC, not a SIGBUS from a memory-mapped write into a sparse file
        with pytest.MonkeyPatch.context() as m:
            m.setattr(_atomic, "free_bytes", lambda path: 1 << 40)
            with pytest.raises(DiskFullError, match="partial file was deleted"):
                _cache.write_int16(rec, fs / "pre.int16")
        assert not (fs / "pre.int16.partial").exists() and shutil.disk_usage(fs).used == used


# ------------------------------------------------------------------------------------ 5: two runs, one folder
from spikearray._lock import LOCK_NAME, output_lock, read_lock  # noqa: E402

_HOLDER = """
import sys
from spikearray._lock import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def lock_holder(tmp_path):
    """Another process holding the lock of ``tmp_path / 'out'`` until the test ends."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc, out
    finally:
        proc.stdin.close()
        proc.wait(60)


def test_second_run_into_a_locked_folder_refuses_at_once(lock_holder, small_recording, tmp_path, capsys):
    proc, out = lock_holder
    t0 = time.perf_counter()
    with pytest.raises(OutputLockedError) as e:
        sa.sort(small_recording[0], output=out, progress=False)
    assert time.perf_counter() - t0 < 5.0
    msg = str(e.value)
    assert f"pid {proc.pid}" in msg and socket.gethostname() in msg and str(out) in msg
    assert not (out / ".stages").exists()  # nothing of the holder's folder was touched
    # the command line: one line, exit status 2
    (tmp_path / "rec").mkdir()
    path = sa.synthetic.write_spikeglx(small_recording[0], tmp_path / "rec" / "r.ap.bin")
    (out / ".stages").mkdir()  # the holder's caches: the refused run does not claim to resume them
    assert cli_main(["sort", str(path), "--out", str(out), "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert f"pid {proc.pid}" in err and "in use by another spikearray run" in err and "Traceback" not in err
    assert "resuming" not in captured.out
    assert read_lock(out / LOCK_NAME)["pid"] == proc.pid  # the holder's lock is still there
    proc.stdin.close()
    proc.wait(60)
    assert not (out / LOCK_NAME).exists()  # released when the holder exits


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": 0.0,
                                             "command": "spikearray sort (killed)", "token": "x"}))
    with output_lock(out) as lock:
        assert read_lock(lock)["pid"] == os.getpid()
    assert not lock.exists()
    # a lock from another machine cannot be checked from here: refused, not taken over
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "another-node", "started": 0.0,
                                             "command": "spikearray sort", "token": "y"}))
    with pytest.raises(OutputLockedError, match="another-node"):
        with output_lock(out):
            pass
    assert read_lock(out / LOCK_NAME)["token"] == "y"


def test_lock_is_reentrant_in_one_thread_but_not_across_threads(tmp_path):
    import threading

    out = tmp_path / "out"
    seen: list[BaseException] = []

    def other_thread():
        try:
            with output_lock(out):
                pass
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            seen.append(e)

    with output_lock(out) as lock:
        with output_lock(out):  # e.g. a recipe that locks its folder, then calls sort(output=out)
            assert lock.exists()
        assert read_lock(lock)["pid"] == os.getpid()  # the inner exit did not release it
        t = threading.Thread(target=other_thread)
        t.start()
        t.join(30)
        assert len(seen) == 1 and isinstance(seen[0], OutputLockedError)
        assert "another thread of this process" in str(seen[0])
    assert not lock.exists() and not out.exists()  # released; the empty folder it made is removed


def test_lock_released_when_sort_raises(tmp_path, small_recording):
    out = tmp_path / "out"
    with pytest.raises(SpikearrayError, match="tmin"):
        sa.sort(small_recording[0], sa.Settings(tmin=100.0), output=out, progress=False)
    assert not (out / LOCK_NAME).exists()
    with output_lock(out):  # free for the next run
        pass


# ------------------------------------------------------------------------------------ 6: damaged stores
def _v2_only():
    if zarr_store.ZARR_FORMAT != 2:
        pytest.skip("file names below are Zarr format 2's")


@pytest.mark.parametrize("meta", [".zgroup", ".zattrs", "spike_time/.zarray", "spike_time/.zattrs"])
@pytest.mark.parametrize("damage", ["missing", "cut short"])
def test_sorting_store_with_damaged_metadata_names_the_file(tmp_path, sorting, meta, damage):
    _v2_only()
    store = sa.write_sorting(sorting, tmp_path)
    f = store / meta
    if damage == "missing":
        f.unlink()
    else:
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(DamagedStoreError) as e:
        sa.open_sorting(tmp_path)
    assert repr(meta) in str(e.value) and str(store) in str(e.value)
    assert ("missing" if damage == "missing" else "not valid JSON") in str(e.value)


def test_sorting_store_without_consolidated_metadata_names_it(tmp_path, sorting):
    _v2_only()
    store = sa.write_sorting(sorting, tmp_path)
    (store / ".zmetadata").write_text('{"metadata": {".zgr')
    with pytest.raises(SpikearrayError, match=r"'\.zmetadata' is 19 bytes and unreadable"):
        sa.open_sorting(tmp_path)


def test_sorting_store_with_a_truncated_chunk_names_the_chunk(tmp_path, sorting):
    _v2_only()
    store = sa.write_sorting(sorting, tmp_path)
    chunk = store / "spike_time" / "0"
    chunk.write_bytes(chunk.read_bytes()[:40])
    ds = sa.open_sorting(tmp_path)  # metadata fine: opens lazily
    with pytest.raises(DamagedStoreError, match=r"chunk file 'spike_time/0' of variable 'spike_time' \(40 bytes\) "
                                                r"cannot be decoded"):
        ds["spike_time"].values
    # an eagerly read variable (the unit labels) fails at open, with its file named
    label = store / "label" / "0"
    label.write_bytes(label.read_bytes()[:10])
    with pytest.raises(DamagedStoreError, match=r"'label/0'"):
        sa.open_sorting(tmp_path)


def test_sorting_store_with_a_missing_chunk_is_not_read_as_zeros(tmp_path, sorting):
    _v2_only()
    store = sa.write_sorting(sorting, tmp_path)
    (store / "template" / "0.0.0").unlink()
    with pytest.raises(DamagedStoreError, match=r"chunk file 'template/0\.0\.0' of variable 'template' is missing"):
        sa.open_sorting(tmp_path)


def test_damaged_stage_cache_is_recomputed_with_a_warning(tmp_path, sorting):
    _v2_only()
    from spikearray.resume import StageStore

    store = StageStore(tmp_path)
    part = sorting[["spike_time", "spike_unit", "spike_amplitude"]]
    store.save("detect", "h", part)
    chunk = store.path("detect") / "spike_amplitude" / "0"
    chunk.write_bytes(chunk.read_bytes()[:25])
    with pytest.warns(DamagedCacheWarning, match=r"detect\.zarr.*spike_amplitude/0.*cannot be decoded"):
        assert store.load("detect", "h") is None  # recompute, no numpy/zarr traceback
    (store.path("detect") / ".zmetadata").unlink()
    with pytest.warns(DamagedCacheWarning, match=r"detect\.zarr.*\.zmetadata"):
        assert store.load("detect", "h") is None
    back = store.save("detect", "h", part)  # the recomputed result replaces it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(store.load("detect", "h")["spike_time"].values, back["spike_time"].values)


def test_cut_short_int16_copy_is_recomputed_with_a_warning(tmp_path):
    import xarray as xr

    from spikearray.resume import StageStore

    store = StageStore(tmp_path)
    store.root.mkdir()
    copy = store.root / "preprocessed.int16"
    copy.write_bytes(b"\0" * (2 * 100 * 4))
    store.save("preprocess", "h", xr.Dataset({"w": ("c", np.ones(4))}, attrs={"files": {copy.name: 800}}))
    assert store.load("preprocess", "h") is not None
    with open(copy, "r+b") as f:
        f.truncate(2 * 60 * 4)
    with pytest.warns(DamagedCacheWarning, match=r"preprocessed\.int16.*480 bytes instead of 800"):
        assert store.load("preprocess", "h") is None


def test_killed_sorts_scratch_folders_are_removed_by_the_next_sort(tmp_path, monkeypatch):
    """A sort without an output keeps its int16 copy in a temporary folder that names its owner; a folder whose
    process is gone (killed outright) is removed by the next sort. Folders of live processes and folders
    without the marker (the demo's output) are kept, and a sort with an output makes no temporary folder."""
    import tempfile

    from spikearray.pipeline import clean_stale_scratch
    from spikearray.synthetic import generate_recording

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    host = socket.gethostname()
    stale = tmp_path / "spikearray-stale"
    live = tmp_path / "spikearray-live"
    demo = tmp_path / "spikearray-demo-x"
    other = tmp_path / "spikearray-otherhost"
    for d in (stale, live, demo, other):
        d.mkdir()
    (stale / "owner.pid").write_text(f"{host} {int(dead.stdout)}\n")
    (stale / "preprocessed.int16").write_bytes(b"\0" * 64)
    (live / "owner.pid").write_text(f"{host} {os.getppid()}\n")
    (other / "owner.pid").write_text(f"not-{host} {int(dead.stdout)}\n")
    assert clean_stale_scratch() == [stale]
    assert not stale.exists() and live.exists() and demo.exists() and other.exists()

    made = []
    real = tempfile.TemporaryDirectory
    monkeypatch.setattr(tempfile, "TemporaryDirectory", lambda *a, **k: made.append(k.get("prefix")) or real(*a, **k))
    rec, _ = generate_recording(duration=4.0, n_channels=16, n_units=4, seed=2)
    (tmp_path / "spikearray-stale2").mkdir()
    (tmp_path / "spikearray-stale2" / "owner.pid").write_text(f"{host} {int(dead.stdout)}\n")
    sa.sort(rec, {"batch_size": 30000, "nblocks": 0}, output=tmp_path / "out", progress=False)
    kept = [demo.name, live.name, other.name]
    assert sorted(p.name for p in tmp_path.glob("spikearray-*")) == kept + ["spikearray-stale2"]
    assert "spikearray-" not in made  # with an output, nothing a SIGKILL could leave in the temporary directory
    sa.sort(rec, {"batch_size": 30000, "nblocks": 0}, progress=False)  # no output: a scratch folder, cleaned first
    assert made.count("spikearray-") == 1
    assert sorted(p.name for p in tmp_path.glob("spikearray-*")) == kept
