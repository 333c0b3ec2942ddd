"""Clustering of detected spikes into units, template similarity and merges."""

from .cluster import cluster_spikes
from .similarity import template_similarity
from .splitmerge import split_merge
from .templates import full_templates, mean_waveforms

__all__ = ["cluster_spikes", "template_similarity", "split_merge", "full_templates", "mean_waveforms"]
