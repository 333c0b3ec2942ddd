"""Preprocessing stages (Kilosort4 §2.2–2.3) as lazy, chunk-invariant DataArray → DataArray functions.

``highpass`` (zero-phase Butterworth, halo'd map_overlap), ``common_reference`` (median across channels),
``whitening_matrix``/``whiten`` (local ZCA from a deterministic sample), ``detect_bad_channels`` and
``preprocess`` (the fused chain returning ``(whitened traces, whitening matrix)``).
"""

from .bad_channels import BadChannelWarning, detect_bad_channels
from .chain import preprocess
from .filters import highpass
from .reference import common_reference
from .whitening import whiten, whitening_matrix

__all__ = ["highpass", "common_reference", "whitening_matrix", "whiten", "preprocess", "detect_bad_channels",
           "BadChannelWarning"]
