"""An adaptive segment-everything sampler: coarse to fine over SAM's dense grid, greedy per batch."""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
import torch

from tinysam.everything.base import MaskGenerator, grid_points, pixel_of


def grid_levels(points_per_side: int, n_levels: int = 3) -> list[np.ndarray]:
    """Indices into SAM's ``points_per_side``² grid (row-major), split coarse to fine.

    Level ``k`` of ``n_levels`` holds the points on every ``2 ** (n_levels - 1 - k)``-th row and
    column (offset half a step, so each level is centred) that no coarser level holds; the last
    level takes what is left, so the levels partition the grid. With 32 a side and 3 levels: an
    8x8 grid, a 16x16 grid between its points, then the 704 points left of the 32x32 grid.
    """
    rows, cols = np.divmod(np.arange(points_per_side**2), points_per_side)
    taken = np.zeros(points_per_side**2, dtype=bool)
    levels = []
    for k in range(n_levels):
        step = 2 ** (n_levels - 1 - k)
        on = ((rows % step) == step // 2) & ((cols % step) == step // 2) & ~taken  # step 1: all that is left
        levels.append(np.flatnonzero(on))
        taken |= on
    return levels


class AdaptiveMaskGenerator(MaskGenerator):
    """Prompts only points of SAM's dense grid, coarse to fine, each batch where nothing is covered yet.

    The grid is split into ``n_levels`` nested levels (:func:`grid_levels`). Within a level,
    points are decoded ``points_per_batch`` at a time; before each batch, points on pixels that
    an earlier mask covers with a logit above ``high_score_thresh`` are dropped. Coverage thus
    grows batch by batch, so a fine level prompts only what the coarser ones left open, and a
    level ends early when coverage leaves it nothing. Every prompt is a dense-grid point, so
    each mask it finds is exactly the mask the dense generator finds for that point.
    ``prompts_per_level`` tells how many points each level decoded in the last ``generate``.
    """

    def __init__(self, *args, n_levels: int = 3, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if n_levels < 1 or 2 ** (n_levels - 1) > self.points_per_side:
            raise ValueError(f"n_levels={n_levels} needs points_per_side >= {2 ** (n_levels - 1)}")
        self.n_levels = n_levels
        self.prompts_per_level: list[int] = []

    @property
    def prompts_per_stage(self) -> list[int]:
        """Points decoded at each level of the last ``generate`` (its rounds are its batches)."""
        return self.prompts_per_level

    def _rounds(self, size: tuple[int, int]) -> Generator[np.ndarray, torch.Tensor, None]:
        points = grid_points(self.points_per_side, size)
        rows, cols = pixel_of(points, size)
        covered = np.zeros(size, dtype=bool)
        self.prompts_per_level = []
        for level in grid_levels(self.points_per_side, self.n_levels):
            decoded = 0
            remaining = level
            while len(remaining):
                remaining = remaining[~covered[rows[remaining], cols[remaining]]]
                batch, remaining = remaining[: self.points_per_batch], remaining[self.points_per_batch :]
                if not len(batch):
                    break
                decoded += len(batch)
                covered |= (yield points[batch]).cpu().numpy()
            self.prompts_per_level.append(decoded)
