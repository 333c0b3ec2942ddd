"""Quality metrics (Kilosort4's refractory contamination and labels) and the Sorting Dataset assembly."""

from .refractory import ccg_metrics, correlogram, is_cross_refractory, is_refractory
from .sorting import build_sorting

__all__ = ["correlogram", "ccg_metrics", "is_refractory", "is_cross_refractory", "build_sorting"]
