"""Clustering of detected spikes into units, template similarity and merges."""

from .cluster import cluster_spikes
from .similarity import template_similarity
from .splitmerge import split_merge

__all__ = ["cluster_spikes", "template_similarity", "split_merge"]
