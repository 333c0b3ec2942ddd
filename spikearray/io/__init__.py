"""Reading recordings and probes."""

from .probes import ProbeLayout, read_probe
from .recording import BinaryReader, make_recording, open_recording
from .spikeglx import read_meta, spikeglx_info
from .summary import format_summary, summary

__all__ = ["ProbeLayout", "read_probe", "open_recording", "make_recording", "BinaryReader", "read_meta",
           "spikeglx_info", "summary", "format_summary"]
