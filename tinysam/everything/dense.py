"""SAM's one-round dense-grid baseline."""

from __future__ import annotations

from collections.abc import Generator

import numpy as np

from tinysam.data.masks import grid_points
from tinysam.everything.base import MaskGenerator, RoundFeedback


class DenseMaskGenerator(MaskGenerator):
    """SAM's baseline: every point of the ``points_per_side``² grid in one round."""

    def _rounds(self, size: tuple[int, int]) -> Generator[np.ndarray, RoundFeedback, None]:
        yield grid_points(self.points_per_side, size)
