"""Figures of recordings and sortings (matplotlib)."""

from .drift import plot_displacement, plot_drift_map
from .probe import plot_probe
from .raster import plot_raster, plot_sorting_drift
from .summary import plot_unit_histograms
from .traces import plot_traces
from .units import plot_acg, plot_unit_grid, plot_unit_waveform

__all__ = ["plot_traces", "plot_drift_map", "plot_displacement", "plot_probe", "plot_raster", "plot_sorting_drift",
           "plot_unit_histograms", "plot_unit_waveform", "plot_acg", "plot_unit_grid"]
