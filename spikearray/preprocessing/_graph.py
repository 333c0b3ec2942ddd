"""Dask plumbing shared by the stages: time chunks, halo'd maps and blockwise maps that know where a block is."""

from __future__ import annotations

from typing import Callable

import dask.array as da
import numpy as np
import xarray as xr

__all__ = ["time_chunks", "as_dask", "map_time_overlap", "map_time_blocks", "wrap_like"]


def as_dask(rec: xr.DataArray) -> da.Array:
    """The recording's samples as a dask array with all channels in one chunk (numpy data get 2 s chunks)."""
    data = rec.data
    if not isinstance(data, da.Array):
        rows = max(1, int(round(2.0 * float(rec.attrs["sampling_rate"]))))
        data = da.from_array(np.asarray(data), chunks=(rows, -1))
    if len(data.chunks[1]) > 1:
        data = data.rechunk({1: -1})
    return data


def time_chunks(chunks: tuple[int, ...], minimum: int) -> tuple[int, ...]:
    """Merge chunks shorter than ``minimum`` into their left neighbour (map_overlap needs halo ≤ every chunk)."""
    out: list[int] = []
    for c in chunks:
        if out and (c < minimum or out[-1] < minimum):
            out[-1] += c
        else:
            out.append(c)
    return tuple(out)


def map_time_overlap(fn: Callable[..., np.ndarray], data: da.Array, halo: int) -> da.Array:
    """``fn(block, start, pad_left, pad_right, at_start, at_end)`` on halo'd time blocks; float32 result.

    ``start`` is the absolute sample of ``block[0]``; ``pad_left``/``pad_right`` how many halo samples the block
    carries on each side (0 at the recording's ends, where ``at_start``/``at_end`` are true). ``fn`` returns the
    whole block (halo included) and dask trims it, so the output has exactly the input's chunks.
    """
    chunks = time_chunks(data.chunks[0], halo + 1)
    if chunks != data.chunks[0]:
        data = data.rechunk({0: chunks})
    starts = np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(int)
    n_chunks = len(chunks)

    def block(x: np.ndarray, block_info=None) -> np.ndarray:
        i = block_info[0]["chunk-location"][0]
        pad_left = halo if (i > 0 and n_chunks > 1) else 0
        pad_right = halo if (i < n_chunks - 1) else 0
        return fn(x, int(starts[i]) - pad_left, pad_left, pad_right, i == 0, i == n_chunks - 1)

    if n_chunks == 1 or halo == 0:
        return data.map_blocks(lambda x, block_info=None: fn(
            x, int(starts[block_info[0]["chunk-location"][0]]), 0, 0,
            block_info[0]["chunk-location"][0] == 0, block_info[0]["chunk-location"][0] == n_chunks - 1),
            dtype=np.float32, meta=np.empty((0, 0), np.float32))
    return da.map_overlap(block, data, depth={0: halo, 1: 0}, boundary="none", trim=True, dtype=np.float32,
                          meta=np.empty((0, 0), np.float32))


def map_time_blocks(fn: Callable[[np.ndarray, int], np.ndarray], data: da.Array) -> da.Array:
    """``fn(block, start)`` on every time block (no halo); float32 result with the input's chunks."""
    starts = np.concatenate([[0], np.cumsum(data.chunks[0])[:-1]]).astype(int)

    def block(x: np.ndarray, block_info=None) -> np.ndarray:
        return fn(x, int(starts[block_info[0]["chunk-location"][0]]))

    return data.map_blocks(block, dtype=np.float32, meta=np.empty((0, 0), np.float32))


def wrap_like(rec: xr.DataArray, data: da.Array, attrs: dict) -> xr.DataArray:
    """A DataArray with ``rec``'s dims, coords (lazy time index kept) and name, new ``data`` and ``attrs``."""
    out = rec.copy(deep=False, data=data)
    out.attrs = attrs
    return out


def sample_windows(n_samples: int, *, batch_size: int, nskip: int, seed: int = 0,
                   min_batches: int = 4) -> list[tuple[int, int]]:
    """Deterministic sample of ``batch_size`` windows for global estimates (whitening, bad channels).

    Kilosort4 uses batches ``0, nskip, 2·nskip, ...``; on a short recording that can be a single batch, so the
    stride is shrunk until at least ``min_batches`` batches (or all of them) are used. ``seed`` shifts the first
    batch by ``seed % stride``. Windows are defined in samples, not dask chunks, so the estimate does not
    depend on the chunking. The last window may be shorter.
    """
    n_batches = max(1, -(-int(n_samples) // int(batch_size)))
    stride = max(1, min(int(nskip), n_batches // max(1, min_batches)))
    first = int(seed) % stride
    return [(b * batch_size, min(n_samples, (b + 1) * batch_size)) for b in range(first, n_batches, stride)]
