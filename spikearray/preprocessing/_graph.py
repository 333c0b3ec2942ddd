"""Preprocessing's graph helpers: DataArrays around new dask data, and the sampled windows of global estimates.

The chunked maps themselves (time chunks with a halo, blockwise maps that know where a block is, ``as_dask``)
are the chunk engine's, :mod:`spikearray._engine`, shared with every other stage; they are imported here so
the preprocessing modules have one place to take their graph pieces from.
"""

from __future__ import annotations

import xarray as xr
import dask.array as da

from .._engine import as_dask, map_time_blocks, map_time_overlap

__all__ = ["as_dask", "map_time_overlap", "map_time_blocks", "wrap_like", "sample_windows"]


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
