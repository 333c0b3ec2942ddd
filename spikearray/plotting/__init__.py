"""Figures of recordings and sortings (matplotlib)."""

from .traces import plot_traces

__all__ = ["plot_traces"]
