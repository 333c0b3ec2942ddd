"""Running a per-chunk kernel that yields a table (spikes) rather than an array.

Detection and template matching read a chunk of the (lazy) preprocessed recording plus a halo on each side
and return variable-length results. :func:`map_chunks` builds one dask task per chunk on top of
``dask.array.overlap`` (each chunk is computed once and its edges are shared with its neighbours), and
:func:`compute_tasks` runs them with a progress bar on the threaded scheduler or a distributed client.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import dask
import dask.array as da
import numpy as np
from dask.callbacks import Callback
from tqdm.auto import tqdm

from ._compute import release_memory

__all__ = ["map_chunks", "compute_tasks", "ChunkInfo"]


class ChunkInfo(tuple):
    """``(start, stop, left)``: the chunk's core sample range and how many halo samples precede it."""

    __slots__ = ()

    def __new__(cls, start: int, stop: int, left: int):
        return super().__new__(cls, (int(start), int(stop), int(left)))

    def __getnewargs__(self) -> tuple:  # pickling (dask-distributed) calls __new__ with these
        return tuple(self)

    @property
    def start(self) -> int:
        return self[0]

    @property
    def stop(self) -> int:
        return self[1]

    @property
    def left(self) -> int:
        return self[2]


def _merge_small_tail(arr: da.Array, halo: int) -> da.Array:
    chunks = list(arr.chunks[0])
    if len(chunks) > 1 and min(chunks) <= halo:
        merged: list[int] = []
        for c in chunks:
            if merged and (c <= halo or merged[-1] <= halo):
                merged[-1] += c
            else:
                merged.append(c)
        arr = arr.rechunk({0: tuple(merged)})
    return arr


def map_chunks(arr: da.Array, fn: Callable[..., Any], *, halo: int, args: Sequence[Any] = (),
               name: str = "chunk") -> list:
    """One delayed ``fn(block, info, *args)`` per time chunk of ``arr`` (time, channel).

    Parameters
    ----------
    arr : dask.array.Array, shape (n_samples, n_channels)
        Chunked along time only.
    fn : callable
        ``fn(block: ndarray (n_left + core + n_right, C), info: ChunkInfo, *args)``. It must keep only results
        whose time falls in the core ``[info.start, info.stop)`` so that results do not depend on chunking
        beyond the halo.
    halo : int
        Samples of context on each side (fewer at the recording's two ends).
    args : sequence
        Extra arguments (small arrays, settings) passed to every call.

    Returns
    -------
    list of dask.delayed.Delayed
    """
    arr = _merge_small_tail(arr, halo)
    if halo > 0 and len(arr.chunks[0]) > 1:
        ov = da.overlap.overlap(arr, depth={0: halo, 1: 0}, boundary="none")
    else:
        ov = arr
    blocks = ov.to_delayed().ravel()
    starts = np.cumsum((0,) + arr.chunks[0])
    multi = len(arr.chunks[0]) > 1
    tasks = []
    for i, blk in enumerate(blocks):
        left = halo if (multi and i > 0) else 0
        info = ChunkInfo(starts[i], starts[i + 1], left)
        tasks.append(dask.delayed(fn, pure=True, name=f"{name}-{dask.base.tokenize(blk.key, info, fn)}")(blk, info, *args))
    return tasks


class _TqdmCallback(Callback):
    def __init__(self, bar: tqdm, prefix: str) -> None:
        super().__init__()
        self.bar = bar
        self.prefix = prefix

    def _posttask(self, key, result, dsk, state, id):  # noqa: A002 - dask's signature
        name = key[0] if isinstance(key, tuple) else key
        if isinstance(name, str) and name.startswith(self.prefix):
            self.bar.update(1)


def compute_tasks(tasks: list, *, progress: bool = False, desc: str = "", client: Any = None,
                  prefix: str = "chunk", window: int | None = None) -> list:
    """Compute delayed tasks (threaded scheduler or ``client``), with a tqdm bar over the chunk tasks.

    On the threaded scheduler the tasks run in consecutive windows of ``window`` (default: 2 × the cores):
    handed all at once, dask starts reading every input chunk before the first kernel finishes, so peak
    memory would grow with the recording's length. Windows keep it bounded by a few chunks, at the price of
    reading the one chunk shared by two windows' halos twice.
    """
    if not tasks:
        return []
    if client is not None:
        futures = client.compute(tasks)
        if progress:
            from distributed import as_completed

            with tqdm(total=len(futures), desc=desc, unit="chunk") as bar:
                for _ in as_completed(futures):
                    bar.update(1)
        return client.gather(futures)
    window = window or 2 * (os.cpu_count() or 1)
    out: list = []
    with tqdm(total=len(tasks), desc=desc, unit="chunk", disable=not progress) as bar:
        with _TqdmCallback(bar, prefix):
            for i in range(0, len(tasks), window):
                out.extend(dask.compute(*tasks[i:i + window], scheduler="threads"))
                release_memory()
    return out
