"""Outputs: the sorting as a Zarr store and as a Phy folder (both ways)."""

from .phy import export_phy
from .phy_read import read_phy
from .zarr_store import open_sorting, write_dataset_atomic, write_sorting

__all__ = ["open_sorting", "write_sorting", "write_dataset_atomic", "export_phy", "read_phy"]
