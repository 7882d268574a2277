"""Text-prompted segmentation (Grounded-SAM): an open-set detector's boxes, segmented by any tinysam model."""

from tinysam.grounded.detector import DetectorError, GroundingDino, TextDetections
from tinysam.grounded.segmenter import GroundedSegmenter

__all__ = ["DetectorError", "GroundedSegmenter", "GroundingDino", "TextDetections"]
