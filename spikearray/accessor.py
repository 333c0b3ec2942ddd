"""The ``.sa`` accessor on recordings, so a notebook reads ``rec.sa.summary()``.

Stage methods (``rec.sa.highpass()``, ``rec.sa.preprocess(settings)``, plots) are added by the modules that
own those stages; this module holds the accessor class and the methods that belong to the recording itself.
"""

from __future__ import annotations

import xarray as xr

from .io.summary import format_summary, summary

__all__ = ["RecordingAccessor"]


@xr.register_dataarray_accessor("sa")
class RecordingAccessor:
    """spikearray methods on a ``(time, channel)`` recording DataArray."""

    def __init__(self, obj: xr.DataArray) -> None:
        self._obj = obj

    def summary(self) -> dict:
        """Key facts as a dict (see :func:`spikearray.summary`)."""
        return summary(self._obj)

    def __repr__(self) -> str:
        return format_summary(self._obj)

    def seconds(self, start: float, stop: float) -> xr.DataArray:
        """The samples between ``start`` and ``stop`` seconds (half-open), lazily.

        ``RangeIndex`` coordinates only support ``sel(..., method="nearest")``; this computes the sample
        positions and uses ``isel``, which keeps the lazy index.
        """
        fs = float(self._obj.attrs["sampling_rate"])
        t0 = float(self._obj.attrs.get("time_start", 0.0))
        i0 = max(0, int(round((start - t0) * fs)))
        i1 = min(self._obj.sizes["time"], int(round((stop - t0) * fs)))
        return self._obj.isel(time=slice(i0, i1))

    def to_uV(self) -> xr.DataArray:
        """The recording as float32 µV (lazy): counts × ``gain_to_uV`` per channel."""
        from .geometry import uV_gains

        obj = self._obj
        if obj.attrs.get("units") == "uV":
            return obj.astype("float32")
        gain = xr.DataArray(uV_gains(obj), dims="channel")
        out = (obj.astype("float32") * gain).astype("float32")
        out.attrs = {k: v for k, v in obj.attrs.items() if k != "gain_to_uV"}
        out.attrs["units"] = "uV"
        out.name = obj.name
        return out

    # preprocessing stages (spikearray.preprocessing)

    def highpass(self, cutoff: float = 300.0, **kwargs) -> xr.DataArray:
        """Zero-phase Butterworth high-pass (see :func:`spikearray.preprocessing.highpass`)."""
        from .preprocessing import highpass

        return highpass(self._obj, cutoff, **kwargs)

    def common_reference(self, **kwargs) -> xr.DataArray:
        """Subtract the median across channels (see :func:`spikearray.preprocessing.common_reference`)."""
        from .preprocessing import common_reference

        return common_reference(self._obj, **kwargs)

    def whiten(self, **kwargs) -> xr.DataArray:
        """Local ZCA whitening (see :func:`spikearray.preprocessing.whiten`)."""
        from .preprocessing import whiten

        return whiten(self._obj, **kwargs)

    def preprocess(self, settings=None, **kwargs) -> tuple[xr.DataArray, xr.DataArray]:
        """High-pass, reference and whiten: ``(traces, whitening_matrix)`` (see
        :func:`spikearray.preprocessing.preprocess`)."""
        from .preprocessing import preprocess

        return preprocess(self._obj, settings, **kwargs)

    # drift (spikearray.drift)

    def estimate_drift(self, settings=None) -> xr.Dataset:
        """Displacement per batch and depth block of this preprocessed recording (see
        :func:`spikearray.drift.estimate`)."""
        from .drift import estimate

        return estimate(self._obj, settings)

    def correct_drift(self, drift: xr.Dataset, **kwargs) -> xr.DataArray:
        """This preprocessed recording moved back by ``drift``, lazily (see :func:`spikearray.drift.correct`)."""
        from .drift import correct

        return correct(self._obj, drift, **kwargs)

    def plot_traces(self, start: float, stop: float, channels=None, ax=None, **kwargs):
        """Traces between ``start`` and ``stop`` s offset by depth, with a µV scale bar; returns the Figure."""
        from .plotting.traces import plot_traces

        return plot_traces(self._obj, start, stop, channels=channels, ax=ax, **kwargs)
