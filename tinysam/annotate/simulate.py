"""A simulated annotator, as SAM's paper simulates one: it clicks the most interior pixel of the largest error.

Per ground-truth object, clicks go on (positive where the object is missed, negative where the mask
spills over) until the mask reaches ``target`` IoU or ``max_clicks`` is spent, when the annotator undoes
back to the best mask it saw; each click is decoded with all the object's clicks so far, keeping the
output of highest predicted IoU, as the page does.
With proposals, the annotator first keeps each proposal that matches an object at ``target`` as it is,
starts from a proposal's prompt and mask when it covers an object at IoU >= ``start_iou``, and
deletes the proposals that match no object.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinysam.data.masks import decode_rle, encode_rle
from tinysam.eval.prompt_miou import interior_point, next_click
from tinysam.predictor import Predictor


@dataclass
class AnnotatedObject:
    """One ground-truth object as the annotator left it."""

    clicks: int
    iou: float
    source: str  # auto (a proposal kept as it is), edited (a proposal corrected) or manual
    mask: np.ndarray
    point_coords: list[list[float]]
    point_labels: list[int]
    predicted_iou: float | None

    def saved(self) -> dict[str, Any]:
        """The object as the page saves it (for :meth:`~tinysam.annotate.store.AnnotationStore.save`)."""
        return {
            "segmentation": encode_rle(self.mask),
            "point_coords": self.point_coords,
            "point_labels": self.point_labels,
            "predicted_iou": self.predicted_iou,
            "source": self.source,
        }


@dataclass
class AnnotatedImage:
    """The objects of one image, the proposals deleted and the seconds the model took."""

    objects: list[AnnotatedObject]
    deleted: int = 0
    model_seconds: float = 0.0
    proposals: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


class SimulatedAnnotator:
    """Annotates images to ``target`` IoU with ``predictor``'s model, counting clicks and model time."""

    def __init__(self, predictor: Predictor, target: float = 0.9, max_clicks: int = 20, start_iou: float = 0.5) -> None:
        self.predictor, self.target, self.max_clicks, self.start_iou = predictor, target, max_clicks, start_iou
        self.seconds = 0.0

    def _decode(self, points: list[list[float]], labels: list[int]) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        masks, scores, _ = self.predictor.predict(
            point_coords=np.array(points, dtype=np.float64), point_labels=np.array(labels), multimask_output=True
        )
        self.seconds += time.perf_counter() - start
        best = int(np.argmax(scores))
        return masks[best], float(scores[best])

    def refine(self, gt: np.ndarray, start: AnnotatedObject | None = None) -> AnnotatedObject:
        """Click until ``gt`` is reached, from nothing or from a proposal's prompt and mask."""
        if start is None:
            obj = AnnotatedObject(0, 0.0, "manual", np.zeros_like(gt), [], [], None)
        else:
            obj = start
            obj.iou = mask_iou(obj.mask, gt)
        best = (obj.iou, obj.mask, len(obj.point_coords), obj.predicted_iou, obj.source)
        while obj.iou < self.target and obj.clicks < self.max_clicks:
            if obj.point_coords:
                x, y, label = next_click(obj.mask, gt)
            else:
                (x, y), label = interior_point(gt), 1
            obj.point_coords.append([x + 0.5, y + 0.5])  # the pixel's centre, where a click on it lands
            obj.point_labels.append(label)
            obj.clicks += 1
            obj.mask, obj.predicted_iou = self._decode(obj.point_coords, obj.point_labels)
            obj.iou = mask_iou(obj.mask, gt)
            if start is not None:
                obj.source = "edited"
            if obj.iou > best[0]:
                best = (obj.iou, obj.mask, len(obj.point_coords), obj.predicted_iou, obj.source)
        if obj.iou < best[0]:  # out of clicks: the annotator undoes back to the best mask it saw
            obj.iou, obj.mask, kept, obj.predicted_iou, obj.source = best
            del obj.point_coords[kept:], obj.point_labels[kept:]
        return obj

    def annotate(
        self, rgb: np.ndarray, gts: list[np.ndarray], proposals: list[dict[str, Any]] | None = None
    ) -> AnnotatedImage:
        """Every object of ``gts`` in ``rgb``; ``proposals`` (objects of :class:`~tinysam.annotate.Proposer`) first."""
        self.seconds = 0.0
        start = time.perf_counter()
        self.predictor.set_image(rgb)
        self.seconds += time.perf_counter() - start
        starts: dict[int, AnnotatedObject] = {}
        deleted = 0
        if proposals:
            masks = [decode_rle(p["segmentation"]) for p in proposals]
            pairs = sorted(
                ((mask_iou(m, g), i, j) for i, m in enumerate(masks) for j, g in enumerate(gts)), reverse=True
            )
            used: set[int] = set()
            for overlap, i, j in pairs:  # each proposal serves at most one object, best matches first
                if overlap < self.start_iou or i in used or j in starts:
                    continue
                used.add(i)
                p = proposals[i]
                starts[j] = AnnotatedObject(
                    0,
                    overlap,
                    "auto",
                    masks[i],
                    [list(map(float, xy)) for xy in p["point_coords"]],
                    list(p["point_labels"]),
                    p["predicted_iou"],
                )
            deleted = len(proposals) - len(used)
        objects = [self.refine(gt, starts.get(j)) for j, gt in enumerate(gts)]
        return AnnotatedImage(objects, deleted, self.seconds, len(proposals or []))
