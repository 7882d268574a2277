"""tinysam: distil, quantize and evaluate small Segment Anything models the TinySAM way."""

__version__ = "0.1.0"

from tinysam.everything import AdaptiveMaskGenerator, DenseMaskGenerator, HierarchicalMaskGenerator  # noqa: E402
from tinysam.grounded import GroundedSegmenter, GroundingDino  # noqa: E402
from tinysam.models.build import build_student, build_teacher  # noqa: E402
from tinysam.models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from tinysam.predictor import Predictor, PromptError  # noqa: E402

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
    "save_checkpoint",
    "__version__",
]
