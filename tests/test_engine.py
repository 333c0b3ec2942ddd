"""The chunk engine: one task per chunk with cheap keys, the context tokenized once, progress bars that advance."""

from __future__ import annotations

import re

import cloudpickle
import dask.array as da
import numpy as np
import pytest
import xarray as xr

import spikearray as sa
from spikearray._engine import ChunkInfo, chunk_kernel, compute_tasks, map_chunks, memo, show_progress
from spikearray.matching import peel

BAR = re.compile(r"(\w+): +\d+%\|[^|\r\n]*\| *(\d+)/(\d+)")


def _last_bars(stderr: str) -> dict[str, tuple[int, int]]:
    """``desc -> (n, total)`` of each tqdm bar's last update in ``stderr``."""
    return {m.group(1): (int(m.group(2)), int(m.group(3))) for m in BAR.finditer(stderr)}


def _assert_bars_complete(stderr: str) -> None:
    bars = _last_bars(stderr)
    for desc in ("preprocess", "detect", "match"):
        assert desc in bars, f"no {desc} bar in: {stderr[-2000:]!r}"
        n, total = bars[desc]
        assert total >= 3 and n == total, (desc, n, total)


@chunk_kernel(halo=lambda ctx: ctx["halo"])
def _rows(block, info, ctx):
    return len(block), tuple(info), int(block[info.left, 0])


def test_one_task_per_chunk_with_its_halo_and_unique_keys():
    data = da.arange(100, chunks=30).astype(np.float32)[:, None] * np.ones((1, 2), np.float32)
    tasks = map_chunks(_rows, data, {"halo": 4}, name="rows")
    assert len({t.key for t in tasks}) == 4 and all(t.key[0].startswith("rows-") for t in tasks)
    # chunks (30, 30, 30, 10): each block carries 4 samples either side but at the ends; block[left] = start
    assert compute_tasks(tasks) == [(34, (0, 30, 0), 0), (38, (30, 60, 4), 30), (38, (60, 90, 4), 60),
                                    (14, (90, 100, 4), 90)]
    # a chunk shorter than the halo is merged into its neighbour; select picks chunks by index
    short = map_chunks(_rows, data, {"halo": 12}, name="rows", select=[2])
    assert compute_tasks(short) == [(52, (60, 100, 12), 60)]
    assert ChunkInfo(1, 2, 3).left == 3


def test_memo_makes_a_value_once_per_context_and_key():
    class Ctx:
        pass

    calls = []
    a, b = Ctx(), Ctx()
    assert memo(a, "k", lambda: calls.append(1) or "x") == "x"
    assert memo(a, "k", lambda: calls.append(1) or "y") == "x"
    assert memo(b, "k", lambda: calls.append(1) or "z") == "z"
    assert len(calls) == 2


def test_memo_makes_a_value_once_when_threads_ask_for_it_together():
    """Two chunk tasks that need the same value at the same time: the second waits for the first's instead of
    making it again (matching's filter spectrum was made by both threads of the first chunks)."""
    import threading
    import time

    class Ctx:
        pass

    ctx, calls, got = Ctx(), [], []

    def slow():
        calls.append(1)
        time.sleep(0.2)
        return object()

    threads = [threading.Thread(target=lambda: got.append(memo(ctx, "v", slow))) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(calls) == 1
    assert len(got) == 4 and all(v is got[0] for v in got)


def _white(n_chunks: int, chunk: int = 600, C: int = 8) -> xr.DataArray:
    data = da.random.RandomState(0).standard_normal((n_chunks * chunk, C), chunks=(chunk, C)).astype(np.float32)
    return xr.DataArray(data, dims=("time", "channel"),
                        coords={"channel": np.arange(C), "x": ("channel", np.zeros(C)),
                                "y": ("channel", 20.0 * np.arange(C))},
                        attrs={"sampling_rate": 30000.0})


def _templates(K: int, C: int = 8, nt: int = 61) -> xr.DataArray:
    rng = np.random.default_rng(1)
    return xr.DataArray((rng.standard_normal((K, C, nt)) * 3).astype(np.float32), dims=("unit", "channel", "sample"))


def _bases(nt: int = 61) -> xr.Dataset:
    pcs = np.linalg.qr(np.random.default_rng(2).standard_normal((nt, 6)))[0].T.astype(np.float32)
    return xr.Dataset({"pc": (("pc", "sample"), pcs)})


def test_matching_tokenizes_its_templates_once_for_100_chunks(monkeypatch):
    """The template context is one graph key: tokenized once, not once per chunk."""
    calls = []
    real = peel._context

    def counted_context(*a, **k):
        ctx = real(*a, **k)
        ctx_type = type(ctx)
        if not hasattr(ctx_type, "__dask_tokenize__"):
            monkeypatch.setattr(ctx_type, "__dask_tokenize__", lambda self: calls.append(1) or "ctx-token",
                                raising=False)
        return ctx

    monkeypatch.setattr(peel, "_context", counted_context)
    out = peel.match(_white(100), _templates(20), _bases(), sa.Settings(Th_learned=20.0))
    assert calls == [1]
    assert out.sizes["template"] == 20


def test_matching_graph_does_not_grow_with_templates_times_chunks():
    s = sa.Settings()
    white = _white(100)
    ctx = peel._context(_templates(40).values, _bases()["pc"].values, np.zeros((40, 4), np.int64),
                        np.c_[np.zeros(8), 20.0 * np.arange(8)], th=6.0, max_peels=10, nt0=s.nt0min_,
                        device="cpu", threads=1, rank=6, drop_tol=3.0)
    ctx_bytes = len(cloudpickle.dumps(ctx))

    def graph_bytes(n: int) -> int:
        tasks = map_chunks(peel._match_block, white.data[: n * 600], ctx, name="match")
        layer = tasks[0].dask.layers[tasks[0].key[0]]
        return len(cloudpickle.dumps(dict(layer)))

    # the chunk tasks add a few hundred bytes each; the context is in the graph once
    assert graph_bytes(100) - graph_bytes(50) < 0.1 * ctx_bytes
    assert graph_bytes(100) < 2 * ctx_bytes


def test_progress_bars_reach_their_totals_on_threads(sorted_session, capfd):
    rec = sorted_session["recording"]
    so = sa.sort(rec, sa.Settings(nblocks=0, batch_size=30000), progress=True)
    _assert_bars_complete(capfd.readouterr().err)
    np.testing.assert_array_equal(so.spike_time.values, sorted_session["sorting"].spike_time.values)


def test_progress_bars_reach_their_totals_on_a_local_cluster(sorted_session, capfd):
    distributed = pytest.importorskip("distributed")
    rec = sorted_session["recording"]
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster):
        so = sa.sort(rec, sa.Settings(nblocks=0, batch_size=30000), progress=True)
    _assert_bars_complete(capfd.readouterr().err)
    np.testing.assert_array_equal(so.spike_time.values, sorted_session["sorting"].spike_time.values)
    np.testing.assert_array_equal(so.spike_unit.values, sorted_session["sorting"].spike_unit.values)


def test_no_bar_without_progress(capfd):
    tasks = map_chunks(_rows, da.zeros((90, 2), chunks=(30, 2)), {"halo": 0}, name="quiet")
    with show_progress(False):
        compute_tasks(tasks, desc="quiet")
    assert "quiet" not in capfd.readouterr().err
    with show_progress(True):
        compute_tasks(tasks, desc="loud")
    assert _last_bars(capfd.readouterr().err)["loud"] == (3, 3)


def test_device_auto_is_resolved_inside_the_tasks(monkeypatch):
    """The context carries the settings' string; each task resolves it where it runs (a GPU worker uses its
    GPU even when the driver has none), not the driver at graph-build time."""
    import sys
    import threading

    det = sys.modules["spikearray.detection.detect"]  # the module (the package exports the function detect)

    seen = []
    real = det.resolve_device

    def spy(device):
        seen.append((device, threading.current_thread() is threading.main_thread()))
        return real(device)

    monkeypatch.setattr(det, "resolve_device", spy)
    det.detect(_white(4), _bases(), sa.Settings())
    assert len(seen) == 4 and all(device == "auto" and not in_main for device, in_main in seen)


def test_compute_tasks_folds_each_result_in_task_order_and_keeps_what_the_fold_returns():
    import dask

    from spikearray._engine import compute_tasks

    seen = []

    def fold(r):
        seen.append(r["i"])
        return r["i"] * 10  # the large part dropped, a small part kept

    tasks = [dask.delayed(lambda i: {"i": i, "big": np.zeros(1000)})(i) for i in range(7)]
    assert compute_tasks(tasks, window=3, fold=fold) == [0, 10, 20, 30, 40, 50, 60]
    assert seen == list(range(7))  # in the order of the tasks, whatever order they finished in
    assert compute_tasks(tasks, window=3)[2]["i"] == 2  # no fold: the results themselves


def test_matching_folds_the_per_chunk_waveform_sums_into_one_running_total(monkeypatch):
    """The (template, channel, sample) sums of each chunk are added as chunks finish, never all kept: the fold
    the matcher hands to run_chunks strips them from every chunk's result."""
    from spikearray.matching import peel

    kept = []
    real = peel.run_chunks

    def spy(*a, fold=None, **k):
        out = real(*a, fold=fold, **k)
        kept.extend(out)
        return out

    monkeypatch.setattr(peel, "run_chunks", spy)
    out = peel.match(_white(6), _templates(3), _bases(), sa.Settings(Th_learned=3.0))
    assert len(kept) == 6 and all("sums" not in p and "counts" not in p for p in kept)
    assert out["template_count"].values.sum() == out.sizes["spike"]


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "absent"
    return text.split("[")[1].split("]")[0]


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="the kernel gives no transparent huge pages")
@pytest.mark.parametrize("setting, huge", [(None, True), ("0", False)])
def test_importing_spikearray_asks_torch_for_huge_pages(setting, huge):
    """Filling a 96 MB CPU tensor made after ``import spikearray`` faults in huge pages (a few hundred faults,
    not one per 4 KB page: 23,438), unless the user set THP_MEM_ALLOC_ENABLE=0 first."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    code = ("import resource, spikearray, torch\n"
            "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "x = torch.empty(24_000_000).fill_(1.0)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    faults = int(out.stdout.strip())
    assert (faults < 5_000) if huge else (faults > 20_000), faults


class _CountingShift:
    """A sample-wise transform (adds the absolute sample index) that counts the samples it transforms."""

    def __init__(self) -> None:
        self.samples = 0

    def __call__(self, block: np.ndarray, start: int) -> np.ndarray:
        self.samples += len(block)
        return block + np.arange(start, start + len(block), dtype=np.float32)[:, None]


@chunk_kernel(halo=lambda ctx: ctx)
def _copy(block, info, ctx):
    return np.array(block)


def test_samplewise_arrays_transform_each_halod_block_in_its_task_with_the_same_result():
    """A registered sample-wise array (the drift correction) gives every kernel the same halo'd blocks as the
    plain transformed array, but transforms only the chunks' own samples and halos: for 3 of 10 chunks of 30 with
    a halo of 4, 34 + 38 + 34 samples, not 7 whole chunks."""
    from spikearray._engine import register_samplewise

    src = da.from_array(np.random.default_rng(0).standard_normal((300, 3)).astype(np.float32), chunks=(30, 3))
    shift = _CountingShift()
    plain = src.map_blocks(lambda b, block_info=None: shift(b, block_info[0]["array-location"][0][0]),
                           dtype=np.float32)
    want = compute_tasks(map_chunks(_copy, plain, 4, name="plain", select=[0, 4, 9]))
    assert shift.samples == 7 * 30  # the three chunks and their neighbours 1, 3, 5 and 8, whole
    registered = src.map_blocks(lambda b, block_info=None: shift(b, block_info[0]["array-location"][0][0]),
                                dtype=np.float32)
    register_samplewise(registered, src, shift)
    shift.samples = 0
    got = compute_tasks(map_chunks(_copy, registered, 4, name="samplewise", select=[0, 4, 9]))
    assert shift.samples == (30 + 4) + (30 + 8) + (30 + 4)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(sa.SpikearrayError, match="chunks"):
        register_samplewise(registered.rechunk((60, 3)), src, shift)
