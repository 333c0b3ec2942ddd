"""Spike detection: waveform bases learned from the data, then a space-time matched filter per chunk."""

from .bases import learn_bases
from .detect import detect

__all__ = ["learn_bases", "detect"]
