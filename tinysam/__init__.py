"""tinysam: distil, quantize and evaluate small Segment Anything models the TinySAM way."""

from tinysam.everything import AdaptiveMaskGenerator, DenseMaskGenerator, HierarchicalMaskGenerator
from tinysam.grounded import GroundedSegmenter, GroundingDino
from tinysam.loader import load_model
from tinysam.models.build import build_student, build_teacher
from tinysam.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tinysam.predictor import Predictor, PromptError
from tinysam.version import __version__

__all__ = [
    "AdaptiveMaskGenerator",
    "CheckpointError",
    "DenseMaskGenerator",
    "GroundedSegmenter",
    "GroundingDino",
    "HierarchicalMaskGenerator",
    "Predictor",
    "PromptError",
    "build_student",
    "build_teacher",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "__version__",
]
