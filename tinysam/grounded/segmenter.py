"""Grounded-SAM with any tinysam model: text -> boxes (an open-set detector) -> masks (one batched decoder call)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from segment_anything.modeling import Sam
from torchvision.ops import batched_nms

from tinysam.data.masks import check_output_mode, encode_rles, to_output_mode
from tinysam.data.transforms import load_image, to_rgb_uint8
from tinysam.grounded.detector import TextDetections, check_threshold
from tinysam.predictor import Predictor, clip_boxes


class TextDetector(Protocol):
    """What :class:`GroundedSegmenter` needs of a detector (``GroundingDino`` is one)."""

    def detect(self, rgb: np.ndarray, text: str | Sequence[str]) -> TextDetections: ...


def class_wise_nms(detections: TextDetections, iou_threshold: float) -> TextDetections:
    """Non-maximum suppression among the boxes of each phrase, highest score first; ``1.0`` keeps all."""
    if len(detections) == 0 or iou_threshold >= 1.0:
        return detections
    groups = {phrase: i for i, phrase in enumerate(dict.fromkeys(detections.phrases))}
    keep = batched_nms(
        torch.as_tensor(detections.boxes, dtype=torch.float32),
        torch.as_tensor(detections.scores, dtype=torch.float32),
        torch.as_tensor([groups[p] for p in detections.phrases]),
        iou_threshold,
    )
    return detections.select(keep.numpy())


class GroundedSegmenter:
    """Masks for the objects a text prompt names, the way Grounded-SAM makes them, with any tinysam model.

    Args:
        detector: an open-set detector (:class:`~tinysam.grounded.detector.GroundingDino`).
        model: any model :func:`~tinysam.models.build.load_model` returns (teacher, student,
            fake-quant directory).
        backend: the :class:`~tinysam.predictor.Predictor` backend (``eager``, ``factored``, ``compile``, ``onnx``);
            ``onnx_dir`` runs a written ONNX pair (the INT8 one of ``quantize.py``).
        nms_threshold: class-wise box NMS IoU (``1.0`` turns it off).
        multimask: keep the multimask output of highest predicted IoU (else the single-mask output).
        output_mode: ``binary_mask`` (boolean arrays), ``uncompressed_rle`` or ``coco_rle``.
    """

    def __init__(
        self,
        detector: TextDetector,
        model: Sam,
        backend: str = "eager",
        onnx_dir: str | Path | None = None,
        nms_threshold: float = 0.5,
        multimask: bool = True,
        output_mode: str = "binary_mask",
    ) -> None:
        check_output_mode(output_mode)
        self.detector = detector
        self.predictor = Predictor(model, backend=backend, onnx_dir=onnx_dir)
        self.nms_threshold = check_threshold("nms_threshold", nms_threshold)
        self.multimask, self.output_mode = multimask, output_mode

    def boxes(self, rgb: np.ndarray, text: str | Sequence[str]) -> TextDetections:
        """The detector's boxes after class-wise NMS, clipped to the image; empty or outside boxes dropped."""
        detections = class_wise_nms(self.detector.detect(rgb, text), self.nms_threshold)
        boxes, inside = clip_boxes(detections.boxes, rgb.shape[:2])
        usable = inside & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        kept = detections.select(usable)
        kept.boxes = boxes[usable].astype(np.float32)
        return kept

    def segment(self, image: np.ndarray | str | Path, text: str | Sequence[str]) -> list[dict[str, Any]]:
        """One record per detected object: ``bbox_xyxy``, ``phrase``, ``score``, ``segmentation``,
        ``predicted_iou`` and ``area``.

        ``text`` is a caption ("dog. frisbee.") or a list of class names. Every box of the image goes
        through the decoder in one call; a prompt that detects nothing gives an empty list.
        """
        rgb = load_image(image) if isinstance(image, (str, Path)) else to_rgb_uint8(image)
        detections = self.boxes(rgb, text)
        if len(detections) == 0:
            return []
        self.predictor.set_image(rgb)
        masks, iou, _ = self.predictor.predict(boxes=detections.boxes, multimask_output=self.multimask)
        best = iou.argmax(axis=1)
        rows = np.arange(len(best))
        chosen = masks[rows, best]
        segmentations = (
            list(chosen) if self.output_mode == "binary_mask" else to_output_mode(encode_rles(chosen), self.output_mode)
        )
        records = []
        for box, phrase, score, mask, segmentation, quality in zip(
            detections.boxes, detections.phrases, detections.scores, chosen, segmentations, iou[rows, best]
        ):
            records.append(
                {
                    "bbox_xyxy": [float(v) for v in box],
                    "phrase": phrase,
                    "score": float(score),
                    "segmentation": segmentation,
                    "predicted_iou": float(quality),
                    "area": int(mask.sum()),
                }
            )
        return records
