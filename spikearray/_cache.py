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

from .export._atomic import _FULL
from .io.recording import BinaryReader, _lazy

__all__ = ["materialize", "write_int16", "open_int16", "int16_bytes", "require_space_for_int16"]


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


def materialize(white: xr.DataArray, path: str | os.PathLike, *, scale: float = 200.0) -> xr.DataArray:
    """Compute ``white`` once into an int16 file and return a lazy float32 DataArray reading it back.

    Parameters
    ----------
    white : xarray.DataArray (time, channel)
        Lazy float traces (whitened units).
    path : path
        File to write (written as ``path + '.partial'``, renamed when complete).
    scale : float
        int16 = round(value × scale).

    Returns
    -------
    xarray.DataArray
        Same coords, attrs and chunks as ``white``; values within ``0.5 / scale`` of the originals (or clipped
        at ±32767 / scale).
    """
    write_int16(white, path, scale=scale)
    return open_int16(path, white, scale=scale)


def int16_bytes(shape: tuple[int, int]) -> int:
    """Disk bytes of the int16 copy of a ``(n_samples, n_channels)`` recording: ``2 · n_samples · n_channels``."""
    n, c = (int(v) for v in shape)
    return 2 * n * c


def require_space_for_int16(path: str | os.PathLike, shape: tuple[int, int]) -> None:
    """Raise :class:`~spikearray.errors.DiskFullError` now if the int16 copy of ``shape`` cannot fit at ``path``.

    Parameters
    ----------
    path : path
        Where the copy will be written (need not exist yet).
    shape : (n_samples, n_channels)

    Examples
    --------
    >>> require_space_for_int16("out/.stages/preprocessed.int16", (108_000_000, 384))  # doctest: +SKIP
    """
    from .export._atomic import require_free_space

    require_free_space(path, int16_bytes(shape), "the preprocessed int16 copy", exact=True)


def _reserve(f: Any, nbytes: int) -> None:
    """Give the open file ``f`` its full size, allocating the blocks where the filesystem can.

    An allocated file cannot run out of space half-way (a memory-mapped write into a sparse file on a full disk
    kills the process with SIGBUS instead of raising). Where the filesystem cannot allocate, the file is left
    sparse, as before.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
        fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    except (OSError, AttributeError):  # not Linux/glibc: no allocation without writing
        fallocate = None
    if fallocate is not None and nbytes > 0:
        if fallocate(f.fileno(), 0, 0, nbytes) != 0:
            err = ctypes.get_errno()
            if err in _FULL:
                raise OSError(err, os.strerror(err), str(f.name))
    f.truncate(nbytes)


def write_int16(white: xr.DataArray, path: str | os.PathLike, *, scale: float = 200.0) -> Path:
    """Write ``round(white × scale)`` as int16 to ``path`` (via ``path.partial``, renamed when complete).

    The free space is checked and the file's blocks are allocated before any chunk is computed; if the disk
    fills up anyway the partial file is deleted and :class:`~spikearray.errors.DiskFullError` names the path,
    the size needed (``2 · n_samples · n_channels`` bytes) and the free space. The chunks run on the current
    dask client (its workers must share the filesystem) or the threaded scheduler (:mod:`spikearray._engine`).
    """
    from ._engine import compute_tasks
    from .export._atomic import atomic_file, free_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, c = white.shape
    tmp = path.with_name(path.name + ".partial")
    tmp.unlink(missing_ok=True)
    require_space_for_int16(tmp, (n, c))
    with atomic_file(path, tmp, what="the preprocessed int16 copy", needed=int16_bytes((n, c)),
                     free=free_bytes(tmp), exact=True):
        with open(tmp, "wb") as f:
            _reserve(f, int16_bytes((n, c)))
        data = white.data
        tokens = data.map_blocks(_write_block, float(scale), str(tmp), (n, c), dtype=np.int8,
                                 chunks=((1,) * len(data.chunks[0]), (1,)), name="store-" + tmp.name)
        compute_tasks(list(tokens.to_delayed().ravel()), desc="preprocess")
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
