"""spikearray: spike sorting for dense extracellular probes as lazy, labelled xarray/Dask stages.

Open a recording with :func:`open_recording` (SpikeGLX, raw binary, SpikeInterface), look at it, and sort it
with :func:`sort`. Every stage is also a public function on ``DataArray``/``Dataset``.
"""

import os as _os

# Before torch makes its first tensor: torch's CPU allocator takes every large tensor from a fresh mmap, which
# the kernel then faults in 4 KB at a time; a sort at 384 channels makes ~100 MB temporaries per chunk and
# spent 18 % of its CPU time in the kernel doing that (12 s of the P384 set: 5.5 M page faults, 32 s system
# time of 172 s CPU). With this torch aligns such tensors to 2 MB and asks for transparent huge pages: 0.54 M
# faults, 13 s system time of 141 s. Set THP_MEM_ALLOC_ENABLE=0 before importing spikearray to opt out.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from . import accessor as _accessor  # noqa: F401  (registers rec.sa)
from . import drift, plotting
from ._version import __version__
from .errors import SpikearrayError
from .export import (drop_noise, export_nwb, export_phy, open_sorting, read_phy, select_units, to_sorting_analyzer,
                     write_sorting)
from .io import ProbeLayout, format_summary, open_recording, read_probe, summary
from .io.spikeinterface import from_spikeinterface, to_spikeinterface
from .pipeline import sort
from .preprocessing import common_reference, detect_bad_channels, highpass, preprocess, whiten, whitening_matrix
from .settings import Settings

__all__ = ["__version__", "SpikearrayError", "Settings", "open_recording", "read_probe", "ProbeLayout",
           "summary", "format_summary", "highpass", "common_reference", "whitening_matrix", "whiten", "preprocess",
           "detect_bad_channels", "sort", "open_sorting", "write_sorting", "export_phy", "read_phy",
           "from_spikeinterface", "to_spikeinterface", "drift", "plotting", "export_nwb", "to_sorting_analyzer",
           "select_units", "drop_noise"]
