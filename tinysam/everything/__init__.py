"""Segment everything: the dense-grid baseline, TinySAM's hierarchical sampling and an adaptive sampler."""

from tinysam.everything.adaptive import AdaptiveMaskGenerator
from tinysam.everything.hierarchical import DenseMaskGenerator, HierarchicalMaskGenerator

__all__ = ["AdaptiveMaskGenerator", "DenseMaskGenerator", "HierarchicalMaskGenerator"]
