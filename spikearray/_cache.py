"""A disk copy of the preprocessed recording, so later passes read it instead of recomputing the filters.

Kilosort4 re-reads and re-filters the raw file in each of its three passes. We compute the whitened traces
once, store them as int16 in whitened units × ``scale`` (Kilosort4's ``temp_wh.dat`` convention, ×200:
0.005 SD resolution, ±163 SD range) in a memory-mapped file, and hand the later stages a lazy DataArray over
it. Memory stays bounded by the chunk size; the file costs ``2 · n_samples · n_channels`` bytes of disk.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .io.recording import BinaryReader, _lazy

__all__ = ["materialize", "write_int16", "open_int16"]


def _write_block(block: np.ndarray, scale: float, path: str, shape: tuple, block_info=None) -> np.ndarray:
    # each task opens the file itself, so the graph carries a path, never a memory map (works on
    # dask-distributed workers that share the filesystem)
    (s0, s1), _ = block_info[0]["array-location"]
    mm = np.memmap(path, dtype=np.int16, mode="r+", shape=shape)
    mm[s0:s1] = np.clip(np.rint(block * scale), -32767, 32767).astype(np.int16)
    mm.flush()
    del mm
    return np.zeros((1, 1), np.int8)


def _scale_block(block: np.ndarray, inv: float) -> np.ndarray:
    return block.astype(np.float32) * np.float32(inv)


def materialize(white: xr.DataArray, path: str | os.PathLike, *, scale: float = 200.0, client: Any = None,
                progress: bool = False) -> xr.DataArray:
    """Compute ``white`` once into an int16 file and return a lazy float32 DataArray reading it back.

    Parameters
    ----------
    white : xarray.DataArray (time, channel)
        Lazy float traces (whitened units).
    path : path
        File to write (written as ``path + '.partial'``, renamed when complete).
    scale : float
        int16 = round(value × scale).
    client : dask.distributed.Client, optional
        Compute the chunks on this cluster (workers must share the filesystem).
    progress : bool

    Returns
    -------
    xarray.DataArray
        Same coords, attrs and chunks as ``white``; values within ``0.5 / scale`` of the originals (or clipped
        at ±32767 / scale).
    """
    write_int16(white, path, scale=scale, client=client, progress=progress)
    return open_int16(path, white, scale=scale)


def write_int16(white: xr.DataArray, path: str | os.PathLike, *, scale: float = 200.0, client: Any = None,
                progress: bool = False) -> Path:
    """Write ``round(white × scale)`` as int16 to ``path`` (via ``path.partial``, renamed when complete)."""
    from ._blocks import compute_tasks

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, c = white.shape
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.truncate(n * c * 2)
    data = white.data
    tokens = data.map_blocks(_write_block, float(scale), str(tmp), (n, c), dtype=np.int8,
                             chunks=((1,) * len(data.chunks[0]), (1,)), name="store-" + tmp.name)
    compute_tasks(list(tokens.to_delayed().ravel()), progress=progress, desc="preprocess", client=client,
                  prefix="store")
    tmp.replace(path)
    return path


def open_int16(path: str | os.PathLike, like: xr.DataArray, *, scale: float = 200.0,
               attrs: dict | None = None) -> xr.DataArray:
    """Lazy float32 view (``value / scale``) of an int16 file written by :func:`write_int16`.

    ``like`` gives dims, coords, name and time chunking (the file holds ``like.shape``); ``attrs`` replaces
    its attrs when given. The graph holds a picklable reader (path and shape), never a memory map.
    """
    path = Path(path)
    n, c = like.shape
    reader = BinaryReader(path, np.int16, c, n, np.arange(c))
    lazy = _lazy(reader, like.chunks[0][0] if like.chunks else n).map_blocks(_scale_block, 1.0 / float(scale),
                                                                              dtype=np.float32)
    out = like.copy(data=lazy)
    out.attrs = dict(like.attrs if attrs is None else attrs, cache=str(path), cache_scale=float(scale))
    return out
