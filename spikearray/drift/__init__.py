"""Drift estimation and correction (Kilosort4's ``datashift`` stage, re-designed for speed).

``estimate(white, settings)`` finds spikes per chunk and registers per-batch depth × amplitude fingerprints into
a displacement per batch and depth block; ``correct(white, drift)`` moves every channel lazily, chunk by chunk,
by kriging interpolation; ``rms_error`` scores an estimate against a known displacement.
"""

from .estimation import estimate
from .evaluate import displacement_at, rms_error
from .correction import correct
from .peaks import detect_peaks

__all__ = ["estimate", "correct", "detect_peaks", "rms_error", "displacement_at"]
