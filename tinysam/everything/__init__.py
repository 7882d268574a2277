"""Segment everything: the dense-grid baseline, TinySAM's hierarchical sampling and an adaptive sampler."""

from tinysam.everything.adaptive import AdaptiveMaskGenerator
from tinysam.everything.dense import DenseMaskGenerator
from tinysam.everything.hierarchical import HierarchicalMaskGenerator

__all__ = ["AdaptiveMaskGenerator", "DenseMaskGenerator", "HierarchicalMaskGenerator"]
