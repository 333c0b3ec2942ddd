"""Shared plumbing of the preprocessing stages: µV scaling, attrs/stages bookkeeping, block positions, NaN checks.

Nothing here computes on the data at graph-build time; the helpers either read metadata or run inside blocks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from ..errors import DataError, RecordingError
from ..geometry import uV_gains  # noqa: F401  (re-exported: the stages import it from here)

__all__ = ["uV_gains", "derive_attrs", "check_recording", "check_finite", "block_start", "json_friendly"]


def check_recording(rec: Any, stage: str) -> xr.DataArray:
    """Raise a clear error unless ``rec`` is a ``(time, channel)`` DataArray with a sampling rate."""
    if not isinstance(rec, xr.DataArray):
        raise RecordingError(f"{stage}: expected an xarray.DataArray recording, got {type(rec).__name__}; "
                             "open one with spikearray.open_recording(...).")
    if rec.dims != ("time", "channel"):
        raise RecordingError(f"{stage}: the recording has dims {rec.dims}; expected ('time', 'channel'). "
                             "Use rec.transpose('time', 'channel').")
    if "sampling_rate" not in rec.attrs:
        raise RecordingError(f"{stage}: the recording has no 'sampling_rate' attr; open it with open_recording or "
                             "make_recording.")
    return rec


def json_friendly(value: Any) -> Any:
    """Numbers, strings, lists and dicts only (numpy scalars/arrays converted), so attrs survive Zarr/JSON."""
    if isinstance(value, dict):
        return {str(k): json_friendly(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_friendly(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_friendly(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def derive_attrs(rec: xr.DataArray, *, units: str, stages: list[dict], extra: dict | None = None) -> dict:
    """The attrs of a stage's output: the input's attrs, new ``units``, and ``stages`` with ``stages`` appended.

    ``gain_to_uV`` is dropped once the data are no longer counts (the coordinate stays for reference).
    """
    attrs = dict(rec.attrs)
    if units != "counts":
        attrs.pop("gain_to_uV", None)
    attrs["units"] = units
    attrs["stages"] = [dict(s) for s in rec.attrs.get("stages", [])] + [json_friendly(s) for s in stages]
    if extra:
        attrs.update(json_friendly(extra))
    return attrs


def block_start(chunks: tuple[int, ...], index: int) -> int:
    """Sample index (in the un-overlapped array) where chunk ``index`` starts."""
    return int(sum(chunks[:index]))


def check_finite(block: np.ndarray, *, start: int, sampling_rate: float, channel_ids: np.ndarray,
                 time_start: float = 0.0, stage: str = "preprocessing") -> None:
    """Raise :class:`DataError` naming channels and time if a float block holds NaN or inf.

    ``start`` is the absolute sample index of ``block[0]``. Integer blocks cannot hold NaN and return at once.
    """
    if block.dtype.kind not in "fc":
        return
    finite = np.isfinite(block)
    if finite.all():
        return
    bad = ~finite
    bad_ch = np.flatnonzero(bad.any(axis=0))
    first = int(np.flatnonzero(bad.any(axis=1))[0])
    t = time_start + (start + first) / sampling_rate
    ids = [json_friendly(channel_ids[c]) for c in bad_ch]
    shown = ids if len(ids) <= 20 else ids[:20] + [f"... ({len(ids)} channels)"]
    raise DataError(f"{stage}: the recording holds NaN or inf on channel(s) {shown}; the first bad sample is at "
                    f"t = {t:.6f} s (sample {start + first}). Replace or drop those samples/channels before "
                    "preprocessing (e.g. rec.where(np.isfinite(rec), 0) or rec.isel(channel=...)).")
