"""TinySAM's hierarchical segment-everything (section 3.3)."""

from __future__ import annotations

from collections.abc import Generator

import numpy as np

from tinysam.data.masks import grid_points
from tinysam.everything.base import MaskGenerator, RoundFeedback

# Round 2's offsets around a round-1 point, in strides, in the official code's order: the 3x3
# block without its centre (x outer, y inner), then x + 2, then y + 2, then the corner (+2, +2).
LATTICE_OFFSETS = np.array(
    [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)]
    + [(2, dy) for dy in (-1, 0, 1)]
    + [(dx, 2) for dx in (-1, 0, 1)]
    + [(2, 2)],
    dtype=np.float64,
)


def lattice_points(sparse: np.ndarray, points_per_side: int, size: tuple[int, int]) -> np.ndarray:
    """Round 2's candidates: the 15 :data:`LATTICE_OFFSETS` neighbours of each ``sparse`` XY point.

    The stride is the official code's integer one, ``(W // points_per_side, H // points_per_side)``
    pixels, so the lattice sits half a dense cell off SAM's grid. Neighbours outside the image
    (H, W) are dropped, never wrapped to the far border as negative indices would be.
    """
    h, w = size
    stride = np.array([max(1, w // points_per_side), max(1, h // points_per_side)], dtype=np.float64)
    points = (sparse[:, None, :] + LATTICE_OFFSETS[None] * stride).reshape(-1, 2)
    inside = (points[:, 0] >= 0) & (points[:, 0] < w) & (points[:, 1] >= 0) & (points[:, 1] < h)
    return points[inside]


class HierarchicalMaskGenerator(MaskGenerator):
    """TinySAM's two rounds, as the official implementation samples them.

    Round 1 prompts a sparse grid (``points_per_side // 4`` a side). Round 2 prompts the
    :func:`lattice_points` around each round-1 point, leaving out those on a pixel that a
    round-1 mask covers with a logit above ``high_score_thresh``; no round 2 when all are.
    """

    def _sparse(self, size: tuple[int, int]) -> np.ndarray:
        return grid_points(max(1, self.points_per_side // 4), size)

    def _watched(self, size: tuple[int, int]) -> np.ndarray:
        """Round 2's candidates, whose pixels round 1 reports on."""
        return lattice_points(self._sparse(size), self.points_per_side, size)

    def _rounds(self, size: tuple[int, int]) -> Generator[np.ndarray, RoundFeedback, None]:
        feedback = yield self._sparse(size)
        outside = feedback.covers == 0
        if outside.any():
            yield self._watched(size)[outside]
