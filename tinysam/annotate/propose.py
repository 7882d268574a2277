"""The semi-automatic stage: objects proposed by a segment-everything generator, for the annotator to review."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from segment_anything.modeling import Sam

from tinysam.everything import AdaptiveMaskGenerator

DEFAULT_THRESHOLDS = {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}  # SAM's, unless the model names its own


class Proposer:
    """Proposals of one model: the adaptive generator (coarse-to-fine prompts, factored backend on CPU).

    Args:
        model: the model the page runs (its PyTorch form; ``onnx_dir`` runs an exported or INT8 folder instead).
        thresholds: ``pred_iou_thresh`` and ``stability_score_thresh`` used when a request names none.
        points_per_side: the finest grid of the generator.
    """

    def __init__(
        self,
        model: Sam,
        thresholds: dict[str, float] | None = None,
        points_per_side: int = 32,
        onnx_dir: str | Path | None = None,
    ) -> None:
        self.model, self.onnx_dir = model, onnx_dir
        self.thresholds = dict(DEFAULT_THRESHOLDS, **(thresholds or {}))
        self.points_per_side = points_per_side
        self.lock = threading.Lock()  # one image at a time: the model is not shared between threads

    def propose(self, rgb: np.ndarray, **thresholds: float) -> list[dict[str, Any]]:
        """Objects (``source: auto``) for ``rgb``, each with its RLE, box, area, point and predicted IoU."""
        unknown = set(thresholds) - set(DEFAULT_THRESHOLDS)
        if unknown:
            raise ValueError(f"propose: unknown thresholds {sorted(unknown)}; use {', '.join(DEFAULT_THRESHOLDS)}")
        settings = dict(self.thresholds, **{k: float(v) for k, v in thresholds.items()})
        with self.lock:
            generator = AdaptiveMaskGenerator(
                self.model,
                points_per_side=self.points_per_side,
                output_mode="coco_rle",
                backend="onnx" if self.onnx_dir else "auto",
                onnx_dir=self.onnx_dir,
                **settings,
            )
            masks = generator.generate(rgb)
        return [
            {
                "segmentation": m["segmentation"],
                "bbox": m["bbox"],
                "area": m["area"],
                "predicted_iou": float(m["predicted_iou"]),
                "stability_score": float(m["stability_score"]),
                "point_coords": [[float(x), float(y)] for x, y in m["point_coords"]],
                "point_labels": [1] * len(m["point_coords"]),
                "box": None,
                "category": None,
                "source": "auto",
            }
            for m in masks
        ]
