"""Same input and settings, same spikes, whatever the thread counts (issue 15, item 1).

Users compare spike times and units between machines and runs; thread counts are what differs most often
between them (cores, ``torch_threads``, ``dask.config.set(num_workers=...)``, a BLAS limit set by the caller).
Every reduction whose order a thread count could change was found and pinned (see ``spikearray._compute``):
MKL splits a lone FFT across threads, a multi-threaded GEMM splits the covariance's sum over samples (and
LAPACK's SVD of a large snippet matrix its reductions). Here the whole sort runs under different thread counts
and must give the same spikes exactly.
"""

from __future__ import annotations

import os

import dask
import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

import spikearray as sa
from spikearray._compute import default_torch_threads, irfft, rfft
from spikearray.synthetic import generate_recording

# float32 results (templates, amplitudes) may differ only by rounding: 1e-5 of the largest value, ~100 float32
# ulps. Today they are bit-for-bit identical; the tolerance is what the promise to users is.
_RTOL = 1e-5


@pytest.fixture(scope="module")
def recording():
    rec, _ = generate_recording(duration=6.0, n_channels=32, n_units=8, seed=11)
    return rec


def _cores() -> int:
    from dask.system import CPU_COUNT  # the cores spikearray divides between dask and torch threads

    return CPU_COUNT


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_fft_is_the_same_for_any_thread_count(rows):
    """The FFT helpers give the same bits at 1, 2 and 4 torch threads, even for fewer rows than threads (a lone
    transform of this length is split across threads by MKL, changing its last bits)."""
    x = torch.from_numpy(np.random.default_rng(rows).standard_normal((rows, 15360)).astype(np.float32))
    old = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            spec = rfft(x, n=15360)
            out.append((spec, irfft(spec, n=15360), rfft(x.T.contiguous(), n=15360, dim=0)))
            assert torch.get_num_threads() == n  # the cap is only for the call
    finally:
        torch.set_num_threads(old)
    for spec, back, spec0 in out[1:]:
        assert torch.equal(spec, out[0][0])
        assert torch.equal(back, out[0][1])
        assert torch.equal(spec0, out[0][2])


def _sort(rec, *, torch_threads: int | None, global_threads: int, dask_workers: int, blas: int, monkeypatch):
    """Sort under the given thread counts; returns the sorting and the torch thread counts the run asked for."""
    asked: list[int] = []
    real = torch.set_num_threads

    def record(n: int) -> None:
        asked.append(int(n))
        real(n)

    old = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", record)
    real(global_threads)
    try:
        with dask.config.set(num_workers=dask_workers, scheduler="threads"), \
                threadpool_limits(limits=blas, user_api="blas"):
            out = sa.sort(rec, sa.Settings(torch_threads=torch_threads, chunk_seconds=0.5), progress=False)
    finally:
        monkeypatch.setattr(torch, "set_num_threads", real)
        real(old)
    return out, set(asked)


def test_sort_gives_the_same_spikes_for_any_thread_count(recording, monkeypatch):
    """torch threads 1 and 2 (settings and torch.set_num_threads), dask threads 1 and 2, BLAS limits 1 and 2 set
    outside sort, and the defaults divided by the dask thread count: spike_time and spike_unit identical,
    templates and amplitudes within float32 rounding."""
    one, asked_one = _sort(recording, torch_threads=1, global_threads=1, dask_workers=1, blas=1,
                           monkeypatch=monkeypatch)
    two, asked_two = _sort(recording, torch_threads=2, global_threads=2, dask_workers=2, blas=2,
                           monkeypatch=monkeypatch)
    # default torch threads: cores // dask threads, i.e. every core for the single dask thread
    auto, asked_auto = _sort(recording, torch_threads=None, global_threads=1, dask_workers=1, blas=2,
                             monkeypatch=monkeypatch)
    # the runs asked for the thread counts they are meant to compare (the FFT cap asks for 1 for lone transforms)
    assert asked_one == {1} and asked_two == {1, 2}
    assert default_torch_threads(1) == _cores() and _cores() in asked_auto
    assert one.sizes["spike"] > 300 and one.sizes["unit"] >= 4
    for other in (two, auto):
        np.testing.assert_array_equal(other.spike_time.values, one.spike_time.values)
        np.testing.assert_array_equal(other.spike_unit.values, one.spike_unit.values)
        np.testing.assert_array_equal(other.label.values, one.label.values)
        scale = float(np.abs(one.template.values).max())
        np.testing.assert_allclose(other.template.values, one.template.values, rtol=0, atol=_RTOL * scale)
        amp = float(np.abs(one.spike_amplitude.values).max())
        np.testing.assert_allclose(other.spike_amplitude.values, one.spike_amplitude.values, rtol=0,
                                   atol=_RTOL * amp)


def _at_threads(n: int, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def test_whitening_covariance_is_the_same_for_any_thread_count():
    """The whitening covariance sums over 60000 samples per window, which a multi-threaded GEMM splits between
    threads. Compared bit for bit: same machine, same process, only the thread count differs, so any difference
    is a thread-order leak (and it reaches every spike through the whitening matrix)."""
    from spikearray.preprocessing._kernels import covariance_block

    x = np.random.default_rng(5).standard_normal((60000, 32)).astype(np.float32)
    cpu = torch.device("cpu")
    covs = [_at_threads(n, lambda: covariance_block(x, device=cpu, threads=n)) for n in (1, 2, 4)]
    for c in covs[1:]:
        np.testing.assert_array_equal(c, covs[0])


_CHILD = """
import sys
import numpy as np
import spikearray as sa
s = sa.sort(sa.open_recording(sys.argv[1]), sa.Settings(chunk_seconds=0.5), progress=False)
np.savez(sys.argv[2], t=s.spike_time.values, u=s.spike_unit.values, T=s.template.values, a=s.spike_amplitude.values)
"""


def test_sort_gives_the_same_spikes_with_other_cpu_kernels(recording, tmp_path):
    """Another machine, simulated: the same int16 file sorted in a process whose MKL (torch's GEMM and FFT) and
    OpenBLAS (numpy) are forced to their SSE4.2 kernels instead of this CPU's AVX2/AVX-512 ones. Summation
    orders inside those kernels differ, so floats differ in their last bits (measured: templates by ~1e-5 and
    amplitudes by ~3e-5 of their largest value, the whitening matrix by a few float32 ulps); the spikes and
    their units must not. Exact equality here holds for this recording, not for every one: a spike whose score
    sits within rounding of a threshold can flip between machines (the tolerance on floats is 1e-3)."""
    import subprocess
    import sys

    from spikearray.synthetic import write_spikeglx

    path = write_spikeglx(recording, tmp_path / "isa.ap.bin")
    here = sa.sort(sa.open_recording(path), sa.Settings(chunk_seconds=0.5), progress=False)
    env = {**os.environ, "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "OPENBLAS_CORETYPE": "Nehalem"}
    subprocess.run([sys.executable, "-c", _CHILD, str(path), str(tmp_path / "other.npz")], env=env, check=True,
                   timeout=600)
    other = np.load(tmp_path / "other.npz")
    T = here.template.values
    if np.array_equal(other["T"], T):  # nothing changed, so nothing would be compared
        pytest.skip("forcing SSE4.2 kernels changed no float here (this CPU's MKL/OpenBLAS may use them already)")
    np.testing.assert_array_equal(other["t"], here.spike_time.values)
    np.testing.assert_array_equal(other["u"], here.spike_unit.values)
    np.testing.assert_allclose(other["T"], T, rtol=0, atol=1e-3 * float(np.abs(T).max()))
    amp = float(np.abs(here.spike_amplitude.values).max())
    np.testing.assert_allclose(other["a"], here.spike_amplitude.values, rtol=0, atol=1e-3 * amp)
