"""TinySAM's hierarchical segment-everything (section 3.3) and the one-round dense-grid baseline."""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
import torch

from tinysam.everything.base import MaskGenerator, grid_points, pixel_of


class DenseMaskGenerator(MaskGenerator):
    """SAM's baseline: every point of the ``points_per_side``² grid in one round."""

    def _rounds(self, size: tuple[int, int]) -> Generator[np.ndarray, torch.Tensor, None]:
        yield grid_points(self.points_per_side, size)


class HierarchicalMaskGenerator(MaskGenerator):
    """TinySAM's two rounds: a sparse grid (``points_per_side / 4`` a side), then only the dense-grid
    points outside the pixels that round 1's kept masks cover with a logit above ``high_score_thresh``."""

    def _rounds(self, size: tuple[int, int]) -> Generator[np.ndarray, torch.Tensor, None]:
        confident = yield grid_points(max(1, self.points_per_side // 4), size)
        dense = grid_points(self.points_per_side, size)
        rows, cols = pixel_of(dense, size)
        outside = ~confident.cpu().numpy()[rows, cols]
        if outside.any():
            yield dense[outside]
