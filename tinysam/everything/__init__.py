"""Segment everything: TinySAM's hierarchical point sampling and the dense-grid baseline."""

from tinysam.everything.hierarchical import DenseMaskGenerator, HierarchicalMaskGenerator

__all__ = ["DenseMaskGenerator", "HierarchicalMaskGenerator"]
