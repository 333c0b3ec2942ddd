"""Where block compute runs: torch device choice and thread budgets shared by every stage."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import dask
import numpy as np
import torch
import torch.nn.functional as F
from dask.system import CPU_COUNT

from .errors import SettingsError, SpikearrayError

__all__ = ["resolve_device", "torch_threads", "default_torch_threads", "dask_thread_count", "rfft", "irfft",
           "release_memory", "band_blocks", "band_matmul", "wide_matmul", "gather_windows", "channels_first",
           "ols_blocks", "ols_outputs"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn a settings ``device`` string into a torch device.

    ``"auto"`` picks ``cuda`` when torch sees a GPU, else ``cpu``; ``"cuda"`` without a GPU raises a clear error
    instead of torch's.
    """
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(
            f"device={device!r} but torch sees no CUDA GPU (torch {torch.__version__}); install a CUDA build of "
            "torch or use device='cpu'."
        )
    return torch.device(device)


def _cores() -> int:
    # dask's count (affinity and cgroup quota aware): the same one its threaded pool is sized by, so that
    # cores // dask threads is 1 by default, also in a container whose CPU quota is below the host's cores
    return max(1, int(CPU_COUNT))


def _current_worker() -> Any:
    """The ``dask.distributed`` worker running the calling task, else None (not imported: not a worker)."""
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def dask_thread_count() -> int:
    """How many dask threads run tasks next to the calling code, in this process.

    Inside a task on a ``dask.distributed`` worker: that worker's thread count. Elsewhere (dask's threaded
    scheduler, or code that builds a graph): the threaded scheduler's pool, ``dask.config`` ``num_workers``
    when set (``dask.config.set(num_workers=...)``), else dask's CPU count.
    """
    worker = _current_worker()
    if worker is not None:
        return max(1, int(worker.state.nthreads))
    n = dask.config.get("num_workers", None)
    return max(1, int(n)) if n else max(1, int(CPU_COUNT))


def default_torch_threads(dask_threads: int | None = None) -> int:
    """Torch intra-op threads per dask worker thread so that the two together do not oversubscribe the cores.

    Parameters
    ----------
    dask_threads : int, optional
        Dask threads sharing this process's cores. Default: :func:`dask_thread_count` where the call runs — the
        threaded scheduler's pool, or the worker's threads inside a ``dask.distributed`` task.

    Returns
    -------
    int
        ``max(1, cores // dask_threads)``. Inside a distributed task, workers of one host cannot see each
        other's threads, so the per-thread budget the nanny puts in ``OMP_NUM_THREADS`` (dask's default 1,
        ``distributed.nanny.pre-spawn-environ``) wins when it is set.

    Examples
    --------
    >>> default_torch_threads(1) == _cores()  # one dask thread: every core
    True
    >>> default_torch_threads(10_000)
    1
    """
    if dask_threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        if _current_worker() is not None and env.isdigit() and int(env) > 0:
            return int(env)
        dask_threads = dask_thread_count()
    return max(1, _cores() // max(1, int(dask_threads)))


def _fft_threads(x: torch.Tensor, dim: int) -> int | None:
    """Torch threads for an FFT of ``x`` along ``dim``: at most one per transform in the batch (None: leave)."""
    if x.device.type != "cpu":
        return None
    batch = x.numel() // max(1, x.shape[dim])
    return max(1, batch) if batch < torch.get_num_threads() else None


def rfft(x: torch.Tensor, n: int, dim: int = -1) -> torch.Tensor:
    """``torch.fft.rfft(x, n=n, dim=dim)`` whose result does not depend on the torch thread count.

    On CPU, torch's FFT (MKL) splits a *single* transform across threads when it has more threads than
    transforms, and the split changes its rounding (measured: a 1-row transform of length 15360 differs in the
    last bits between 1 and 2 threads; 32 rows at 2 threads do not). So the thread count is capped at the
    number of transforms, which keeps every transform on one thread and the result bit-for-bit the same for any
    ``torch_threads`` or dask thread count. The batch (what costs) stays parallel.
    """
    return _call_fft(torch.fft.rfft, x, n, dim)


def irfft(x: torch.Tensor, n: int, dim: int = -1) -> torch.Tensor:
    """``torch.fft.irfft(x, n=n, dim=dim)``, independent of the thread count as :func:`rfft`."""
    return _call_fft(torch.fft.irfft, x, n, dim)


def _call_fft(fn: Any, x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    cap = _fft_threads(x, dim)
    if cap is None:
        return fn(x, n=n, dim=dim)
    with torch_threads(cap):
        return fn(x, n=n, dim=dim)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (no-op for ``None``)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def release_memory() -> None:
    """Give freed heap back to the operating system (glibc only; elsewhere nothing to do).

    Chunk kernels allocate and free tens of MB per task from several threads; glibc keeps the freed memory in
    its per-thread arenas, so without this the process's resident memory creeps up with every chunk and grows
    with the recording's length instead of staying at a few chunks' worth.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        pass


def band_blocks(w: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Split ``out = x @ w.T`` into output-channel blocks that only read the columns where ``w`` is non-zero.

    Local whitening matrices are banded when channels are ordered by depth; a block of ``B`` output channels then
    needs ``B + bandwidth`` inputs instead of all of them. Returns ``(o0, o1, i0, i1)`` tuples; the block size is
    the one with the fewest multiply-adds (plus a per-call overhead), dense when nothing is gained.
    """
    c = w.shape[0]
    nz = w != 0
    best, best_cost = [(0, c, 0, c)], float(c * c)
    for size in (16, 24, 32, 48, 64, 96, 128):
        if size >= c:
            break
        blocks, cost = [], 0.0
        for o0 in range(0, c, size):
            o1 = min(c, o0 + size)
            cols = np.flatnonzero(nz[o0:o1].any(axis=0))
            i0, i1 = (int(cols[0]), int(cols[-1]) + 1) if cols.size else (0, 1)
            blocks.append((o0, o1, i0, i1))
            cost += (o1 - o0) * (i1 - i0) + 512  # ~ the matmul call overhead in multiply-adds per row
        if cost < best_cost:
            best, best_cost = blocks, cost
    return best


#: Columns per product in :func:`wide_matmul` on the CPU. A (48 × 45) @ (45 × 121,500) product (one of matching's
#: row groups at 128 channels) took 18-23 ms into a preallocated output and 28-37 ms into a new one; in blocks of
#: 8,192 columns 17-19 ms (one thread, 2-core EPYC, three interleaved repeats): the blocks of the wide operand
#: and of the output stay in cache while the small matrix is applied to them.
WIDE_COLUMNS = 8192


def ols_blocks(x: torch.Tensor, n: int, nt: int, nt0: int) -> torch.Tensor:
    """Overlapping blocks of ``x`` (..., L) for an overlap-save correlation with a length-``nt`` filter.

    Block ``i`` (a view, ``(..., nb, n)``) reads ``x[i·step - nt0 : i·step - nt0 + n]``, ``step = n - nt + 1``,
    zero outside ``x``. The circular convolution of a block with the reversed filter (length ``n``) is exact
    from index ``nt - 1`` on, where it equals ``sum_tau w[tau] · x[t - nt0 + tau]`` for the block's ``step``
    output samples ``t``; :func:`ols_outputs` puts those together. Short transforms stay in cache (the
    measured block lengths: ``detection.detect.OLS_BLOCK``, ``matching.peel.OLS_BLOCK``).

    Examples
    --------
    >>> x = torch.arange(10.0)[None]
    >>> ols_blocks(x, 8, 3, 1).shape
    torch.Size([1, 2, 8])
    """
    L = x.shape[-1]
    step = n - nt + 1
    nb = max(1, -(-L // step))
    return F.pad(x, (nt0, nb * step + nt - 1 - nt0 - L)).unfold(-1, n, step)


def ols_outputs(y: torch.Tensor, nt: int, L: int) -> torch.Tensor:
    """The ``L`` output samples (..., L) from the blocks' circular convolutions ``y`` (..., nb, n) of
    :func:`ols_blocks`: each block's exact part, from index ``nt - 1`` on, end to end."""
    nb, n = y.shape[-2:]
    return y[..., nt - 1:].reshape(*y.shape[:-2], nb * (n - nt + 1))[..., :L]


def wide_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` for a small ``(m, k)`` matrix and a wide ``(k, n)`` one, written into ``out`` ``(m, n)``.

    On the CPU the product runs in blocks of :data:`WIDE_COLUMNS` columns; elsewhere it is one product. Each
    output entry is the same length-``k`` dot product either way.

    Examples
    --------
    >>> a, b = torch.ones(2, 3), torch.arange(3 * 20000, dtype=torch.float32).reshape(3, 20000)
    >>> bool(torch.equal(wide_matmul(a, b, torch.empty(2, 20000)), a @ b))
    True
    """
    n = b.shape[1]
    if b.device.type != "cpu" or n <= WIDE_COLUMNS:
        return torch.matmul(a, b, out=out)
    for i in range(0, n, WIDE_COLUMNS):
        torch.matmul(a, b[:, i:i + WIDE_COLUMNS], out=out[:, i:i + WIDE_COLUMNS])
    return out


def band_matmul(w: torch.Tensor, x: torch.Tensor, blocks: list[tuple[int, int, int, int]], *,
                channels_first: bool) -> torch.Tensor:
    """``w @ x`` (``channels_first``, x ``(C_in, L)``) or ``x @ w.T`` (x ``(L, C_in)``) for a ``(C_out, C_in)``
    matrix ``w`` with the band structure ``blocks`` of :func:`band_blocks`: each block of output channels
    reads only its input range (the other entries of ``w`` must be zero). float32 tensors, same device.

    Examples
    --------
    >>> w = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    >>> x = torch.arange(6.0).reshape(3, 2)
    >>> bool((band_matmul(w, x, [(0, 2, 0, 2), (2, 3, 1, 3)], channels_first=True) == w @ x).all())
    True
    """
    if channels_first:
        out = x.new_empty((w.shape[0], x.shape[1]))
        if len(blocks) == 1:
            return wide_matmul(w, x, out)
        for o0, o1, i0, i1 in blocks:
            wide_matmul(w[o0:o1, i0:i1], x[i0:i1], out[o0:o1])
        return out
    wt = w.T
    if len(blocks) == 1:
        return x @ wt
    out = x.new_empty((x.shape[0], w.shape[0]))
    for o0, o1, i0, i1 in blocks:
        torch.matmul(x[:, i0:i1], wt[i0:i1, o0:o1], out=out[:, o0:o1])
    return out


def gather_windows(x: torch.Tensor, chans: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """``out[i, m] = x[chans[i, m], starts[i]:starts[i] + width]`` for a contiguous ``(C, L)`` tensor ``x``.

    Every window of ``width`` samples is a row of one strided view of ``x``, so the gather copies whole
    windows (``index_select`` of rows) instead of indexing sample by sample: 1.6 ms against 14 ms for 512 spikes
    × 80 channels × 61 samples of a (128, 60,300) chunk (one thread). Windows must lie inside their row
    (``0 <= starts``, ``starts + width <= L``); this is checked.

    Parameters
    ----------
    x : tensor (C, L), contiguous
    chans : tensor (n, M) int64
    starts : tensor (n,) int64
    width : int

    Returns
    -------
    tensor (n, M, width), a copy.

    Examples
    --------
    >>> x = torch.arange(20.0).reshape(2, 10)
    >>> gather_windows(x, torch.tensor([[1, 0]]), torch.tensor([3]), 2).tolist()
    [[[13.0, 14.0], [3.0, 4.0]]]
    """
    C, L = x.shape
    n, M = chans.shape
    if n == 0:
        return x.new_zeros((0, M, width))
    if int(starts.min()) < 0 or int(starts.max()) + width > L:
        raise SpikearrayError(f"gather_windows: windows of {width} samples at {int(starts.min())}..{int(starts.max())} "
                         f"reach outside rows of {L} samples")
    rows = torch.as_strided(x, (C * L - width + 1, width), (1, 1))
    return rows.index_select(0, (chans * L + starts[:, None]).reshape(-1)).view(n, M, width)


def channels_first(block: np.ndarray, device: torch.device) -> torch.Tensor:
    """A ``(time, channel)`` chunk as a contiguous float32 ``(channel, time)`` tensor on ``device``.

    torch's transposing copy is blocked for the cache; numpy's ``ascontiguousarray(block.T)`` took 0.21 s
    instead of 0.06 s for a 2 s, 384-channel chunk (one thread).
    """
    x = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
    return x.to(device).T.contiguous()
