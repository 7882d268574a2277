"""Prompt mIoU: masks from a box, one click and k refinement clicks, against ground truth and a teacher.

Clicks are deterministic: the first is the object's most interior pixel, each next one the
most interior pixel of the error region of the previous mask (positive where the object
was missed, negative where the mask spilled over), as interactive-segmentation benchmarks
do. Every prompt of an image is decoded in one batch per round.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from tinysam.data.layouts import CocoLayout, Sa1bLayout
from tinysam.io import atomic_write_text
from tinysam.loader import load_model
from tinysam.predictor import Predictor
from tinysam.runtime import markdown_table, progress

SIZE_BUCKETS = {"small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, math.inf)}  # COCO's areas


def interior_point(region: np.ndarray, max_side: int = 128) -> tuple[int, int]:
    """(x, y) of a pixel of ``region`` far from its boundary: the middle pixel of its last erosion.

    Erosion runs on the region's bounding box subsampled to at most ``max_side`` pixels a
    side, so it costs the same for any image size; the result always lies in ``region``.
    """
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        raise ValueError("interior_point: empty region")
    y0, x0 = ys.min(), xs.min()
    crop = region[y0 : ys.max() + 1, x0 : xs.max() + 1]
    step = max(1, math.ceil(max(crop.shape) / max_side))
    if not crop[::step, ::step].any():  # subsampling missed a thin region: erode at full resolution
        step = 1
    core = F.pad(torch.from_numpy(crop[::step, ::step]).float()[None, None], (1, 1, 1, 1))
    while True:
        eroded = -F.max_pool2d(-core, 3, stride=1, padding=1)
        if not eroded.any():
            break
        core = eroded
    deepest = torch.nonzero(core[0, 0]).float() - 1
    cy, cx = deepest[(deepest - deepest.mean(0)).square().sum(1).argmin()].tolist()  # the middle one
    ty, tx = y0 + cy * step, x0 + cx * step
    nearest = np.argmin((ys - ty) ** 2 + (xs - tx) ** 2)  # after subsampling, snap back onto the region
    return int(xs[nearest]), int(ys[nearest])


def next_click(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int]:
    """(x, y, label) of the next corrective click; label -1 (no click) when the mask is already exact."""
    error = pred ^ gt
    if not error.any():
        return 0, 0, -1
    x, y = interior_point(error)
    return x, y, int(gt[y, x])


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight XYXY boxes (N, 4) of boolean masks (N, H, W), covering whole pixels."""
    boxes = np.zeros((len(masks), 4))
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        boxes[i] = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return boxes


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boolean masks (N, H, W) pairwise along N; two empty masks agree (IoU 1)."""
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _predict(predictor: Predictor, multimask: bool, **prompts) -> np.ndarray:
    masks, scores, _ = predictor.predict(multimask_output=multimask, **prompts)
    return masks[np.arange(len(masks)), scores.argmax(1)]


def image_ious(
    predictor: Predictor, gt: np.ndarray, clicks: int, multimask: bool, teacher: Predictor | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """Per prompt kind (``box``, ``1_click`` ... ``k_clicks``), IoUs vs ``gt`` (and vs the teacher)."""
    out: dict[str, dict[str, np.ndarray]] = {}

    def score(kind: str, pred: np.ndarray, **prompts) -> None:
        out[kind] = {"gt": iou(pred, gt)}
        if teacher is not None:
            out[kind]["teacher"] = iou(pred, _predict(teacher, multimask, **prompts))

    boxes = mask_boxes(gt)
    score("box", _predict(predictor, multimask, boxes=boxes), boxes=boxes)
    points = np.array([interior_point(m) for m in gt], dtype=np.float64)[:, None]
    labels = np.ones((len(gt), 1), dtype=np.int64)
    pred = _predict(predictor, multimask, point_coords=points, point_labels=labels)
    score("1_click", pred, point_coords=points, point_labels=labels)
    for k in range(2, clicks + 1):
        new = np.array([next_click(p, g) for p, g in zip(pred, gt)])
        points = np.concatenate([points, new[:, None, :2].astype(np.float64)], axis=1)
        labels = np.concatenate([labels, new[:, None, 2]], axis=1)
        pred = _predict(predictor, multimask, point_coords=points, point_labels=labels)
        score(f"{k}_clicks", pred, point_coords=points, point_labels=labels)
    return out


def summarize(ious: dict[str, dict[str, list[float]]], areas: list[float]) -> dict[str, dict[str, dict[str, float]]]:
    """mIoU per prompt kind, reference (gt/teacher) and size bucket ("all", "small", ...); empty buckets left out."""
    areas_ = np.asarray(areas)
    summary: dict = {}
    for kind, refs in ious.items():
        for ref, values in refs.items():
            values_ = np.asarray(values)
            buckets = {"all": np.ones(len(values_), dtype=bool)}
            buckets.update({name: (areas_ >= lo) & (areas_ < hi) for name, (lo, hi) in SIZE_BUCKETS.items()})
            summary.setdefault(kind, {})[ref] = {
                name: round(float(values_[m].mean()), 4) for name, m in buckets.items() if m.any()
            }
    return summary


def table(summary: dict, counts: dict[str, int]) -> str:
    """Markdown table: one row per prompt kind and reference, one column per size bucket."""
    buckets = ["all", *SIZE_BUCKETS]
    head = ["prompt", "vs"] + [f"{b} ({counts.get(b, 0)})" for b in buckets]
    rows = [
        [kind, ref, *(values.get(b) for b in buckets)] for kind, refs in summary.items() for ref, values in refs.items()
    ]
    return markdown_table(head, rows, digits=3)


def evaluate(
    model: Sam,
    output_dir: str | Path,
    dataset: CocoLayout | Sa1bLayout,
    clicks: int = 3,
    multimask: bool = True,
    teacher_model: str | None = None,
    teacher_checkpoint: str | None = None,
) -> dict:
    """mIoU of box, 1-click and up to ``clicks``-click prompts on ``dataset``; writes ``metrics.json``."""
    if clicks < 1:
        raise ValueError(f"prompt_miou: clicks must be >= 1, got {clicks}")
    dataset.prepare()
    predictor = Predictor(model)
    teacher = None
    if teacher_model is not None:
        teacher = Predictor(load_model(teacher_model, teacher_checkpoint, model.device))
    ious: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    areas: list[float] = []
    skipped: Counter = Counter()
    for _, rgb, gt in progress(dataset.instances(skipped), "prompting objects"):
        gt = gt[gt.reshape(len(gt), -1).any(1)]
        if not len(gt):
            continue
        predictor.set_image(rgb)
        if teacher is not None:
            teacher.set_image(rgb)
        for kind, refs in image_ious(predictor, gt, clicks, multimask, teacher).items():
            for ref, values in refs.items():
                ious[kind][ref].extend(values.tolist())
        areas.extend(gt.reshape(len(gt), -1).sum(1).tolist())
    counts = {"all": len(areas)}
    counts.update({b: int(sum(lo <= a < hi for a in areas)) for b, (lo, hi) in SIZE_BUCKETS.items()})
    summary = summarize(ious, areas)
    report = {"miou": summary, "objects": counts, "skipped": dict(+skipped), "multimask": multimask}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(report, indent=2))
    print(f"prompt mIoU on {counts['all']} objects" + (f", skipped: {dict(+skipped)}" if +skipped else ""))
    print(table(summary, counts))
    print(f"wrote {out / 'metrics.json'}")
    return report
