"""What every segment-everything generator shares: prompting points in batches, filtering, NMS, records.

Follows SAM's automatic mask generator (``segment_anything.utils.amg`` helpers, its record
format and thresholds) for one crop covering the whole image; generators differ only in
which points they prompt (:meth:`MaskGenerator._rounds`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.amg import (
    MaskData,
    batched_mask_to_box,
    box_xyxy_to_xywh,
    calculate_stability_score,
    remove_small_regions,
)
from torchvision.ops.boxes import batched_nms

from tinysam.data.masks import check_output_mode, decode_rle, encode_rles, pixel_of, rle_areas, to_output_mode
from tinysam.data.transforms import load_image, to_rgb_uint8
from tinysam.predictor import Predictor


@dataclass
class RoundFeedback:
    """What one round tells the sampler before its next round.

    ``covers``: for each of the generator's watched points (:meth:`MaskGenerator._watched`), how
    many of the round's prompts have a kept mask whose logit is above ``high_score_thresh`` at its
    pixel (a prompt counts once, however many of its masks do); ``covers > 0``: confidently covered.
    ``best_stability``: per prompted point, the highest stability score among its outputs that
    passed the predicted-IoU filter (0 when none did), so a sampler can tell near misses from
    points that came back with nothing.
    """

    covers: np.ndarray
    best_stability: np.ndarray


class MaskGenerator:
    """Base of the segment-everything generators; ``generate(image) -> list[dict]`` like SAM's.

    Args:
        model: a SAM-family model (student or teacher).
        points_per_side: side of the dense point grid.
        points_per_batch: points decoded per mask-decoder call.
        pred_iou_thresh: keep masks whose predicted IoU is at least this.
        high_score_thresh: logit above which a kept mask's pixels count as confidently covered
            (used by the hierarchical generator).
        stability_score_thresh: SAM's stability filter: keep masks at least this stable.
        stability_score_offset: the logit offset of SAM's stability score.
        box_nms_thresh: IoU of boxes above which the lower-scoring mask is suppressed.
        min_mask_region_area: remove holes and islands smaller than this (needs OpenCV, as in SAM).
        output_mode: ``binary_mask``, ``uncompressed_rle`` or ``coco_rle``.
        upscale_chunk: masks upscaled to full resolution at a time (bounds peak memory).
        backend: the :class:`~tinysam.predictor.Predictor` backend: ``auto`` (the default: ``factored`` on
            the CPU, ``eager`` elsewhere), ``eager`` (bit-identical to SAM's generator), ``factored``,
            ``compile`` or ``onnx``.
        onnx_dir: for ``onnx``, a folder of exported or quantized (INT8) models.
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
        upscale_chunk: int = 16,
        backend: str = "auto",
        onnx_dir: str | Path | None = None,
    ) -> None:
        check_output_mode(output_mode)
        if min(points_per_side, points_per_batch, upscale_chunk) < 1:
            raise ValueError("points_per_side, points_per_batch and upscale_chunk must be >= 1")
        if min_mask_region_area > 0:
            try:
                import cv2  # noqa: F401  (segment_anything's remove_small_regions uses it)
            except ImportError:
                raise ImportError("min_mask_region_area > 0 needs OpenCV: pip install opencv-python") from None
        self.predictor = Predictor(model, backend, onnx_dir)
        self.points_per_side = points_per_side
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.high_score_thresh = high_score_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.upscale_chunk = upscale_chunk
        self.prompts_per_round: list[int] = []  # points decoded in each round of the last generate()

    @property
    def prompts_per_stage(self) -> list[int]:
        """Points decoded in each stage of the last ``generate`` (its rounds, unless a generator groups them)."""
        return self.prompts_per_round

    def _rounds(self, size: tuple[int, int]) -> Iterator[np.ndarray]:
        """The points of each round (XY pixels); each round's :class:`RoundFeedback` is sent back in."""
        raise NotImplementedError

    def _watched(self, size: tuple[int, int]) -> np.ndarray:
        """XY points whose coverage each round reports in :attr:`RoundFeedback.covers` (none here)."""
        return np.zeros((0, 2))

    def _decode(self, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (N, 3, h, w) and predicted IoUs (N, 3) for single-point prompts (XY pixels)."""
        p = self.predictor
        coords = torch.as_tensor(p.transform.apply_coords(points, p.original_size), device=p.device)[:, None]
        labels = torch.ones(len(points), 1, dtype=torch.int, device=p.device)
        return p.decode(points=coords, labels=labels, multimask_output=True)

    def _prompt(self, points: np.ndarray, watched: torch.Tensor) -> tuple[MaskData, RoundFeedback]:
        """Decode ``points`` in batches; return the masks passing the filters and the round's feedback.

        ``watched``: flat pixel indices at which the feedback counts the covering prompts.

        The same masks as SAM's generator, for less work: the predicted-IoU filter runs on the
        low-res logits, so only its survivors are upscaled to full resolution, ``upscale_chunk``
        at a time (peak memory does not grow with the number of points), and only masks that
        also pass the stability filter are thresholded and RLE-encoded, a chunk per C call.
        """
        threshold = self.predictor.model.mask_threshold
        kept = MaskData()
        hits = torch.zeros(len(points), len(watched), dtype=torch.int32, device=self.predictor.device)
        best_stability = torch.zeros(len(points), device=self.predictor.device)
        for start in range(0, len(points), self.points_per_batch):
            batch = points[start : start + self.points_per_batch]
            low_res, iou = self._decode(batch)
            iou = iou.flatten()
            survivors = torch.nonzero(iou > self.pred_iou_thresh)[:, 0]  # SAM's strict ">"
            low_res = low_res.flatten(0, 1)[survivors]
            for first in range(0, len(survivors), self.upscale_chunk):
                chunk = survivors[first : first + self.upscale_chunk]
                logits = self.predictor.upscale(low_res[first : first + self.upscale_chunk, None])[:, 0]
                stability = calculate_stability_score(logits, threshold, self.stability_score_offset)
                best_stability.scatter_reduce_(0, start + chunk // 3, stability.nan_to_num(0.0), "amax")
                stable = stability >= self.stability_score_thresh  # NaN (an empty mask) is never stable
                if not stable.any():
                    continue
                logits, chunk, stability = logits[stable], chunk[stable], stability[stable]
                over = logits.flatten(1)[:, watched] > self.high_score_thresh
                hits.index_add_(0, start + chunk // 3, over.to(torch.int32))  # a prompt's masks add up
                masks = logits > threshold
                non_empty = masks.flatten(1).any(1)  # only when stability_score_thresh <= 0 can one be empty
                masks, chunk, stability = masks[non_empty], chunk[non_empty], stability[non_empty]
                chunk_cpu = chunk.cpu().numpy()
                kept.cat(
                    MaskData(
                        rles=encode_rles(masks),
                        boxes=batched_mask_to_box(masks).float(),
                        iou_preds=iou[chunk],
                        points=torch.as_tensor(batch[chunk_cpu // 3]),
                        stability_score=stability,
                    )
                )
        covers = (hits > 0).sum(0)
        return kept, RoundFeedback(covers.cpu().numpy(), best_stability.cpu().numpy())

    def _suppress(self, data: MaskData) -> MaskData:
        keep = batched_nms(
            data["boxes"].float(), data["iou_preds"], torch.zeros_like(data["boxes"][:, 0]), self.box_nms_thresh
        )
        data.filter(keep)
        return data

    def _remove_small_regions(self, data: MaskData) -> MaskData:
        """SAM's hole and island removal, then NMS again (preferring masks that were not changed)."""
        masks, scores = [], []
        for rle in data["rles"]:
            mask, changed = remove_small_regions(decode_rle(rle), self.min_mask_region_area, "holes")
            mask, unchanged = remove_small_regions(mask, self.min_mask_region_area, "islands")
            masks.append(torch.as_tensor(mask))
            scores.append(float(not changed and unchanged))
        masks_ = torch.stack(masks)
        boxes = batched_mask_to_box(masks_)
        keep = batched_nms(boxes.float(), torch.as_tensor(scores), torch.zeros(len(boxes)), self.box_nms_thresh)
        data["rles"] = encode_rles(masks_)
        data["boxes"] = boxes
        data.filter(keep)
        return data

    def _records(self, data: MaskData, size: tuple[int, int]) -> list[dict[str, Any]]:
        segmentations = to_output_mode(data["rles"], self.output_mode)
        areas = rle_areas(data["rles"])
        return [
            {
                "segmentation": segmentation,
                "area": areas[i],
                "bbox": box_xyxy_to_xywh(data["boxes"][i]).tolist(),
                "predicted_iou": float(data["iou_preds"][i]),
                "point_coords": [data["points"][i].tolist()],
                "stability_score": float(data["stability_score"][i]),
                "crop_box": [0, 0, size[1], size[0]],
            }
            for i, segmentation in enumerate(segmentations)
        ]

    @torch.inference_mode()
    def generate(self, image: np.ndarray | str | Path) -> list[dict[str, Any]]:
        """Masks of everything in ``image`` (array or path), as SAM's automatic mask generator returns them.

        Each record has ``segmentation`` (per ``output_mode``), ``area``, ``bbox`` (XYWH),
        ``predicted_iou``, ``point_coords``, ``stability_score`` and ``crop_box``.
        """
        rgb = load_image(image) if isinstance(image, (str, Path)) else to_rgb_uint8(image)
        self.predictor.set_image(rgb)
        size = rgb.shape[:2]
        rows, cols = pixel_of(self._watched(size), size)
        watched = torch.as_tensor(rows * size[1] + cols, device=self.predictor.device)
        self.prompts_per_round = []
        per_round = []
        rounds = self._rounds(size)
        points = next(rounds)
        while True:
            self.prompts_per_round.append(len(points))
            round_data, feedback = self._prompt(points, watched)
            per_round.append(round_data)
            try:
                points = rounds.send(feedback)
            except StopIteration:
                break
        data = MaskData()
        for round_data in reversed(per_round):  # later rounds first, as the official TinySAM code merges them
            data.cat(round_data)
        if not len(data.items()):  # no round kept a mask
            return []
        data = self._suppress(data)
        if self.min_mask_region_area > 0:
            data = self._remove_small_regions(data)
        data.to_numpy()
        return self._records(data, size)
