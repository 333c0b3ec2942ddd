"""Figures of recordings and sortings (matplotlib)."""

from .drift import plot_displacement, plot_drift_map
from .traces import plot_traces

__all__ = ["plot_traces", "plot_drift_map", "plot_displacement"]
