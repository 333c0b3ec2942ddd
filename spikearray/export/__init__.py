"""Outputs: the sorting as a Zarr store and as a Phy folder (both ways), NWB, and a SpikeInterface analyzer.

``export_nwb`` needs ``spikearray[nwb]`` and ``to_sorting_analyzer`` needs ``spikearray[interop]``; both import
their optional dependencies only when called.
"""

from .analyzer import to_sorting_analyzer
from .curation import drop_noise, select_units
from .nwb import export_nwb
from .phy import export_phy
from .phy_read import read_phy
from .zarr_store import open_sorting, write_dataset_atomic, write_sorting

__all__ = ["open_sorting", "write_sorting", "write_dataset_atomic", "export_phy", "read_phy", "export_nwb",
           "to_sorting_analyzer", "select_units", "drop_noise"]
