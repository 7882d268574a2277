"""What every segment-everything generator shares: prompting points in batches, filtering, NMS, records.

Follows SAM's automatic mask generator (``segment_anything.utils.amg`` helpers, its record
format and thresholds) for one crop covering the whole image; generators differ only in
which points they prompt (:meth:`MaskGenerator._rounds`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.amg import (
    MaskData,
    area_from_rle,
    batched_mask_to_box,
    box_xyxy_to_xywh,
    build_point_grid,
    calculate_stability_score,
    coco_encode_rle,
    mask_to_rle_pytorch,
    remove_small_regions,
    rle_to_mask,
)
from torchvision.ops.boxes import batched_nms

from tinysam.data.transforms import load_image, to_rgb_uint8
from tinysam.predictor import Predictor

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


def grid_points(points_per_side: int, size: tuple[int, int]) -> np.ndarray:
    """SAM's evenly spaced ``points_per_side``² grid in pixel XY for an image of ``size`` (H, W)."""
    h, w = size
    return build_point_grid(points_per_side) * np.array([[w, h]], dtype=np.float64)


def pixel_of(points: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of XY ``points``, clipped into an image of ``size`` (H, W)."""
    h, w = size
    rows = np.clip(np.floor(points[:, 1]).astype(np.int64), 0, h - 1)
    cols = np.clip(np.floor(points[:, 0]).astype(np.int64), 0, w - 1)
    return rows, cols


class MaskGenerator:
    """Base of the segment-everything generators; ``generate(image) -> list[dict]`` like SAM's.

    Args:
        model: a SAM-family model (student or teacher).
        points_per_side: side of the dense point grid.
        points_per_batch: points decoded per mask-decoder call.
        pred_iou_thresh: keep masks whose predicted IoU is at least this.
        high_score_thresh: logit above which a kept mask's pixels count as confidently covered
            (used by the hierarchical generator).
        stability_score_thresh, stability_score_offset: SAM's stability filter.
        box_nms_thresh: IoU of boxes above which the lower-scoring mask is suppressed.
        min_mask_region_area: remove holes and islands smaller than this (needs OpenCV, as in SAM).
        output_mode: ``binary_mask``, ``uncompressed_rle`` or ``coco_rle``.
    """

    def __init__(
        self,
        model: Sam,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        high_score_thresh: float = 8.5,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ) -> None:
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if points_per_side < 1 or points_per_batch < 1:
            raise ValueError("points_per_side and points_per_batch must be >= 1")
        if min_mask_region_area > 0:
            try:
                import cv2  # noqa: F401  (segment_anything's remove_small_regions uses it)
            except ImportError:
                raise ImportError("min_mask_region_area > 0 needs OpenCV: pip install opencv-python") from None
        self.predictor = Predictor(model)
        self.points_per_side = points_per_side
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.high_score_thresh = high_score_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.prompts_per_round: list[int] = []  # points decoded in each round of the last generate()

    def _rounds(self, size: tuple[int, int]) -> Iterator[np.ndarray]:
        """The points of each round (XY pixels); a generator may look at earlier rounds' results."""
        raise NotImplementedError

    def _logits(self, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits at image size (N, 3, H, W) and predicted IoUs (N, 3) for single-point prompts."""
        p = self.predictor
        coords = torch.as_tensor(p.transform.apply_coords(points, p.original_size), device=p.device)[:, None]
        labels = torch.ones(len(points), 1, dtype=torch.int, device=p.device)
        low_res, iou = p.decode(points=coords, labels=labels, multimask_output=True)
        return p.upscale(low_res), iou

    def _prompt(self, points: np.ndarray) -> tuple[MaskData, torch.Tensor]:
        """Decode ``points`` in batches; return the masks passing the filters and where they are confident."""
        size = self.predictor.original_size
        kept = MaskData()
        confident = torch.zeros(size, dtype=torch.bool, device=self.predictor.device)
        for start in range(0, len(points), self.points_per_batch):
            batch = points[start : start + self.points_per_batch]
            logits, iou = self._logits(batch)
            logits, iou = logits.flatten(0, 1), iou.flatten()
            stability = calculate_stability_score(
                logits, self.predictor.model.mask_threshold, self.stability_score_offset
            )
            keep = (iou >= self.pred_iou_thresh) & (stability >= self.stability_score_thresh)
            logits = logits[keep]
            if len(logits):
                confident |= (logits > self.high_score_thresh).any(0)
            masks = logits > self.predictor.model.mask_threshold
            non_empty = masks.flatten(1).any(1)
            masks = masks[non_empty]
            data = MaskData(
                rles=mask_to_rle_pytorch(masks),
                boxes=batched_mask_to_box(masks).float(),
                iou_preds=iou[keep][non_empty],
                points=torch.as_tensor(np.repeat(batch, 3, axis=0))[keep.cpu()][non_empty.cpu()],
                stability_score=stability[keep][non_empty],
            )
            kept.cat(data)
        return kept, confident

    def _suppress(self, data: MaskData) -> MaskData:
        if not len(data["iou_preds"]):
            return data
        keep = batched_nms(
            data["boxes"].float(), data["iou_preds"], torch.zeros_like(data["boxes"][:, 0]), self.box_nms_thresh
        )
        data.filter(keep)
        return data

    def _remove_small_regions(self, data: MaskData) -> MaskData:
        """SAM's hole and island removal, then NMS again (preferring masks that were not changed)."""
        masks, scores = [], []
        for rle in data["rles"]:
            mask, changed = remove_small_regions(rle_to_mask(rle), self.min_mask_region_area, "holes")
            mask, unchanged = remove_small_regions(mask, self.min_mask_region_area, "islands")
            masks.append(torch.as_tensor(mask))
            scores.append(float(not changed and unchanged))
        masks_ = torch.stack(masks)
        boxes = batched_mask_to_box(masks_)
        keep = batched_nms(boxes.float(), torch.as_tensor(scores), torch.zeros(len(boxes)), self.box_nms_thresh)
        data["rles"] = mask_to_rle_pytorch(masks_)
        data["boxes"] = boxes
        data.filter(keep)
        return data

    def _records(self, data: MaskData, size: tuple[int, int]) -> list[dict[str, Any]]:
        records = []
        for i, rle in enumerate(data["rles"]):
            if self.output_mode == "coco_rle":
                segmentation: Any = coco_encode_rle(rle)
            elif self.output_mode == "binary_mask":
                segmentation = rle_to_mask(rle)
            else:
                segmentation = rle
            records.append(
                {
                    "segmentation": segmentation,
                    "area": int(area_from_rle(rle)),
                    "bbox": box_xyxy_to_xywh(data["boxes"][i]).tolist(),
                    "predicted_iou": float(data["iou_preds"][i]),
                    "point_coords": [data["points"][i].tolist()],
                    "stability_score": float(data["stability_score"][i]),
                    "crop_box": [0, 0, size[1], size[0]],
                }
            )
        return records

    @torch.inference_mode()
    def generate(self, image: np.ndarray | str | Path) -> list[dict[str, Any]]:
        """Masks of everything in ``image`` (array or path), as SAM's automatic mask generator returns them.

        Each record has ``segmentation`` (per ``output_mode``), ``area``, ``bbox`` (XYWH),
        ``predicted_iou``, ``point_coords``, ``stability_score`` and ``crop_box``.
        """
        rgb = load_image(image) if isinstance(image, (str, Path)) else to_rgb_uint8(image)
        self.predictor.set_image(rgb)
        size = rgb.shape[:2]
        self.prompts_per_round = []
        data = MaskData()
        rounds = self._rounds(size)
        points = next(rounds)
        while True:
            self.prompts_per_round.append(len(points))
            round_data, confident = self._prompt(points)
            data.cat(round_data)
            try:
                points = rounds.send(confident)
            except StopIteration:
                break
        data = self._suppress(data)
        if self.min_mask_region_area > 0 and len(data["iou_preds"]):
            data = self._remove_small_regions(data)
        data.to_numpy()
        return self._records(data, size)
