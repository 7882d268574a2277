"""An adaptive segment-everything sampler: coarse to fine over SAM's dense grid, greedy per batch."""

from __future__ import annotations

from collections.abc import Generator

import numpy as np

from tinysam.data.masks import grid_points
from tinysam.everything.base import MaskGenerator, RoundFeedback


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


def neighbour_counts(cells: np.ndarray) -> np.ndarray:
    """How many of each cell's 8 neighbours are set, for a 2-D boolean grid (cells off the grid count as unset)."""
    h, w = cells.shape
    padded = np.pad(cells, 1).astype(np.int64)
    return sum(padded[1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w] for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc)


class AdaptiveMaskGenerator(MaskGenerator):
    """Prompts only points of SAM's dense grid, coarse to fine, each batch where nothing is covered yet.

    The grid is split into ``n_levels`` nested levels (:func:`grid_levels`). Within a level,
    points are decoded ``points_per_batch`` at a time. Before each batch two kinds of point are
    dropped:

    - covered: on a pixel that an earlier prompt's kept mask covers with a logit above
      ``high_score_thresh``; in the finest level, only once ``fine_covers`` earlier prompts do, so
      what a single prompt explains gets a second look at full density (1 turns this off);
    - barren: at least ``barren_neighbours`` of its 8 grid neighbours were prompted and none of
      them came near a mask, that is, none had an output passing the predicted-IoU filter with a
      stability score of at least ``stability_score_thresh - near_miss_margin`` (0 disables this).

    Coverage and prompted neighbours grow batch by batch, so a fine level prompts only what the
    coarser ones left open, and a level ends early when nothing is left. Every prompt is a
    dense-grid point, so each mask it finds is exactly the mask the dense generator finds for
    that point. ``prompts_per_level`` tells how many points each level decoded in the last
    ``generate``.
    """

    def __init__(
        self,
        *args,
        n_levels: int = 3,
        fine_covers: int = 3,
        barren_neighbours: int = 2,
        near_miss_margin: float = 0.1,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if n_levels < 1 or 2 ** (n_levels - 1) > self.points_per_side:
            raise ValueError(f"n_levels={n_levels} needs points_per_side >= {2 ** (n_levels - 1)}")
        if fine_covers < 1:
            raise ValueError(f"fine_covers must be >= 1 prompt covering a point, got {fine_covers}")
        if not 0 <= barren_neighbours <= 8:
            raise ValueError(f"barren_neighbours must be 0 (off) to 8 grid neighbours, got {barren_neighbours}")
        self.n_levels = n_levels
        self.fine_covers = fine_covers
        self.barren_neighbours = barren_neighbours
        self.near_miss_margin = near_miss_margin
        self.prompts_per_level: list[int] = []

    @property
    def prompts_per_stage(self) -> list[int]:
        """Points decoded at each level of the last ``generate`` (its rounds are its batches)."""
        return self.prompts_per_level

    def _barren(self, prompted: np.ndarray, fertile: np.ndarray) -> np.ndarray:
        """Grid points (flat) with enough prompted neighbours, none of which came near a mask."""
        if not self.barren_neighbours:
            return np.zeros(prompted.size, dtype=bool)
        barren = (neighbour_counts(prompted) >= self.barren_neighbours) & (neighbour_counts(fertile) == 0)
        return barren.ravel()

    def _watched(self, size: tuple[int, int]) -> np.ndarray:
        """The whole dense grid: each round reports how many prompts cover each grid point."""
        return grid_points(self.points_per_side, size)

    def _rounds(self, size: tuple[int, int]) -> Generator[np.ndarray, RoundFeedback, None]:
        side = self.points_per_side
        points = grid_points(side, size)
        covers = np.zeros(side * side, dtype=np.int64)  # prompts whose kept masks confidently cover each point
        prompted, fertile = np.zeros((side, side), dtype=bool), np.zeros((side, side), dtype=bool)
        near_miss = self.stability_score_thresh - self.near_miss_margin
        self.prompts_per_level = []
        levels = grid_levels(side, self.n_levels)
        for k, level in enumerate(levels):
            enough = self.fine_covers if k == len(levels) - 1 else 1
            decoded = 0
            remaining = level
            while len(remaining):
                skip = covers[remaining] >= enough
                skip |= self._barren(prompted, fertile)[remaining]
                remaining = remaining[~skip]
                batch, remaining = remaining[: self.points_per_batch], remaining[self.points_per_batch :]
                if not len(batch):
                    break
                decoded += len(batch)
                feedback = yield points[batch]
                covers += feedback.covers
                prompted.flat[batch] = True
                fertile.flat[batch] = feedback.best_stability >= near_miss
            self.prompts_per_level.append(decoded)
