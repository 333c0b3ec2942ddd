"""The same sorting on dask's threaded scheduler and on a dask-distributed cluster of worker processes."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

import spikearray as sa
from spikearray.synthetic import generate_recording, write_spikeglx

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def recording_file(tmp_path_factory):
    rec, _ = generate_recording(duration=8.0, n_channels=32, n_units=6, seed=21)
    return write_spikeglx(rec, tmp_path_factory.mktemp("dist") / "dist.ap.bin")


def test_graph_pieces_pickle_without_data(recording_file):
    """Workers get file paths and offsets: the drift-corrected graph pickles small, with no memory maps."""
    import cloudpickle

    from spikearray._engine import ChunkInfo
    from spikearray.drift import correct, estimate
    from spikearray.preprocessing import preprocess

    info = ChunkInfo(10, 20, 3)
    assert pickle.loads(pickle.dumps(info)) == info and pickle.loads(pickle.dumps(info)).left == 3
    rec = sa.open_recording(recording_file)
    s = sa.Settings(batch_size=60000)
    white, _ = preprocess(rec, s)
    corrected = correct(white, estimate(white, s))
    blob = cloudpickle.dumps(dict(corrected.data.__dask_graph__()))
    assert len(blob) < rec.nbytes / 20  # the samples themselves are not in the graph


def test_threads_and_local_cluster_give_identical_sortings(recording_file):
    from distributed import Client, LocalCluster

    from spikearray._engine import current_client

    rec = sa.open_recording(recording_file)
    s = sa.Settings(nblocks=1)
    threaded = sa.sort(rec, s, progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        assert current_client() is client  # sort() picks up the current client by itself
        from spikearray._compute import dask_thread_count, default_torch_threads

        # chunk tasks resolve default_torch_threads() where they run: a task sees its worker's one thread, and
        # the nanny's OMP_NUM_THREADS=1 keeps the two workers' torch threads to the two cores
        asked = [client.submit(f, pure=False, workers=[w]) for w in client.nthreads()
                 for f in (dask_thread_count, default_torch_threads)]
        assert client.gather(asked) == [1, 1, 1, 1]
        on_cluster = sa.sort(rec, s, progress=False)
    assert threaded.sizes["spike"] > 100
    np.testing.assert_array_equal(on_cluster.spike_time.values, threaded.spike_time.values)
    np.testing.assert_array_equal(on_cluster.spike_unit.values, threaded.spike_unit.values)
    np.testing.assert_array_equal(on_cluster.template.values, threaded.template.values)
    assert set(json.loads(on_cluster.attrs["timings"])) >= {"detect", "match"}


def test_default_torch_threads_divides_the_cores_by_the_dask_threads():
    """Torch threads per dask thread = cores // dask threads; by default the dask threads are the threaded
    scheduler's pool (``num_workers``, else the cores), so one dask thread gets every core."""
    import dask
    from dask.system import CPU_COUNT  # affinity and cgroup quota aware, as dask's threaded pool

    from spikearray._compute import dask_thread_count, default_torch_threads

    cores = CPU_COUNT
    assert default_torch_threads(1) == cores
    assert default_torch_threads(2 * cores) == 1
    with dask.config.set(num_workers=1):
        assert dask_thread_count() == 1 and default_torch_threads() == cores
    with dask.config.set(num_workers=2 * cores):
        assert dask_thread_count() == 2 * cores and default_torch_threads() == 1
