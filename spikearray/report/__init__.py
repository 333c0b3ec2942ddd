"""The HTML report of a sorting: ``write_report(DIR)`` writes ``DIR/report/index.html`` with PNG figures."""

from .build import UNITS_PER_PAGE, write_report
from .waveforms import RecordingUnavailable, sample_spike_waveforms, window_reader

__all__ = ["write_report", "sample_spike_waveforms", "window_reader", "RecordingUnavailable", "UNITS_PER_PAGE"]
