"""Zero-shot instance segmentation from detector boxes: the protocol of the SAM and TinySAM papers.

Every detection's box prompts the model; its mask inherits the detection's score and
category. With ``multimask=True`` the multimask output of highest predicted IoU is kept
(TinySAM), otherwise the single-mask output (SAM's other protocol). All boxes of an image
are decoded in batches. Scores come from pycocotools (COCO) or the ``lvis`` package (LVIS).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from segment_anything.modeling import Sam

from tinysam.data.coco import CocoFormatError, DetectionSet, image_path, load_coco_instances, load_detections
from tinysam.data.layouts import CocoLayout
from tinysam.data.masks import encode_rle
from tinysam.data.transforms import ImageError, load_image
from tinysam.io import atomic_write_text
from tinysam.predictor import Predictor, clip_boxes
from tinysam.runtime import markdown_table, progress

log = logging.getLogger(__name__)

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_METRICS = (*METRICS, "APr", "APc", "APf")
WARN_DROPPED_SHARE = 0.05  # more detections than this share not scored: warn before the table


def select_best(low_res: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, per prompt, the output of highest predicted IoU: (N, C, h, w), (N, C) -> (N, 1, h, w), (N,)."""
    best = iou.argmax(dim=1)
    rows = torch.arange(len(best), device=best.device)
    return low_res[rows, best].unsqueeze(1), iou[rows, best]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class BoxSegmenter:
    """Binary masks for XYXY box prompts of the current image, ``batch_size`` boxes per decoder call.

    ``decode_seconds`` and ``upscale_seconds`` accumulate the time of the two phases.
    """

    predictor: Predictor
    multimask: bool = True
    batch_size: int = 64
    decode_seconds: float = 0.0
    upscale_seconds: float = 0.0

    def set_image(self, rgb: np.ndarray) -> None:
        self.predictor.set_image(rgb)

    @torch.inference_mode()
    def __call__(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """(N, 4) boxes inside the image -> (N, H, W) boolean masks."""
        p = self.predictor
        h, w = p.original_size
        out = np.zeros((len(boxes_xyxy), h, w), dtype=bool)
        for start in range(0, len(boxes_xyxy), self.batch_size):
            chunk = p.transform.apply_boxes(boxes_xyxy[start : start + self.batch_size], p.original_size)
            t0 = time.perf_counter()
            low_res, iou = p.decode(boxes=torch.as_tensor(chunk, device=p.device), multimask_output=self.multimask)
            if self.multimask:
                low_res, _ = select_best(low_res, iou)
            _sync(p.device)
            t1 = time.perf_counter()
            masks = p.upscale(low_res)[:, 0] > p.model.mask_threshold
            out[start : start + len(chunk)] = masks.cpu().numpy()
            _sync(p.device)
            self.decode_seconds += t1 - t0
            self.upscale_seconds += time.perf_counter() - t1
        return out


@dataclass
class SegmentationResults:
    """COCO results (RLE masks) and, by reason, the detections that could not be segmented."""

    results: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


def segment_detections(coco: COCO, detections: DetectionSet, images_dir: str | Path, segmenter) -> SegmentationResults:
    """One mask per detection from its box; ``segmenter`` has ``set_image(rgb)`` and ``(boxes) -> masks``.

    Missing or unreadable images and boxes entirely outside their image are skipped and
    counted; nothing is dropped silently.
    """
    out = SegmentationResults()
    for image_id in progress(sorted(detections.by_image), "segmenting detections"):
        dets = detections.by_image[image_id]
        path = image_path(coco, image_id, images_dir)
        try:
            rgb = load_image(path)
        except FileNotFoundError:
            out.skipped["image file missing"] += len(dets.scores)
            continue
        except ImageError as err:
            log.warning("%s", err)
            out.skipped["image unreadable"] += len(dets.scores)
            continue
        info = coco.imgs[image_id]
        if rgb.shape[:2] != (info.get("height", rgb.shape[0]), info.get("width", rgb.shape[1])):
            log.warning(
                "%s is %dx%d but the annotations say %sx%s", path, *rgb.shape[1::-1], info["width"], info["height"]
            )
            out.skipped["image size differs from the annotations"] += len(dets.scores)
            continue
        boxes, inside = clip_boxes(dets.boxes_xyxy, rgb.shape[:2])
        out.skipped["box outside its image"] += int((~inside).sum())
        if not inside.any():
            continue
        segmenter.set_image(rgb)
        masks = segmenter(boxes[inside])
        for mask, score, category in zip(masks, dets.scores[inside], dets.category_ids[inside]):
            out.results.append(
                {
                    "image_id": image_id,
                    "category_id": int(category),
                    "segmentation": encode_rle(mask),
                    "score": float(score),
                }
            )
    out.skipped = +out.skipped  # drop zero counts
    return out


def is_lvis(annotations: str | Path) -> bool:
    """Whether an instances file is LVIS (its categories carry a ``frequency``)."""
    with open(annotations) as f:
        data = json.load(f)
    return bool(data.get("categories")) and "frequency" in data["categories"][0]


def score_coco(coco: COCO, results: list[dict], iou_type: str = "segm") -> dict[str, float | None]:
    """Mask (or, with ``iou_type="bbox"``, box) AP in percent from pycocotools; ``None`` where no ground truth
    of that size exists."""
    if not results:
        return {name: 0.0 for name in METRICS}
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes([dict(r) for r in results]), iou_type)  # loadRes edits its input
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (None if v < 0 else round(100 * float(v), 2)) for name, v in zip(METRICS, evaluator.stats[:6])}


def score_lvis(annotations: str | Path, results: list[dict]) -> dict[str, float | None]:
    """Mask AP in percent from the ``lvis`` package (needed for LVIS's federated protocol)."""
    try:
        from lvis import LVIS, LVISEval, LVISResults
    except ImportError:
        raise CocoFormatError(
            f"{annotations} is an LVIS file; scoring it needs the lvis package: pip install lvis"
        ) from None
    if not results:
        return {name: 0.0 for name in LVIS_METRICS}
    gt = LVIS(str(annotations))
    evaluator = LVISEval(gt, LVISResults(gt, [dict(r) for r in results]), "segm")
    evaluator.run()
    stats = evaluator.get_results()
    return {name: (None if stats[name] < 0 else round(100 * float(stats[name]), 2)) for name in LVIS_METRICS}


def metrics_table(metrics: dict[str, float | None]) -> str:
    """One-row markdown table of AP or AR metrics (percent, one decimal)."""
    return markdown_table(list(metrics), [list(metrics.values())])


def evaluate(
    model: Sam,
    output_dir: str | Path,
    dataset: CocoLayout,
    multimask: bool = True,
    batch_size: int = 64,
    detector=None,
) -> dict:
    """Run the protocol on ``dataset``; write ``segm_results.json`` and ``metrics.json`` to ``output_dir``.

    The boxes come from ``dataset.detections``, or, with an open-set ``detector``
    (:class:`~tinysam.grounded.detector.GroundingDino`), from prompting it with the set's category
    names (SegInW's protocol); then the detector's own box AP is reported too.
    """
    if dataset.detections is None and detector is None:
        raise CocoFormatError(
            "coco_instances needs boxes: pass dataset.detections=<detector results JSON>, or detector=grounding_dino "
            "to prompt an open-set detector with the category names"
        )
    dataset.prepare()
    coco, dropped_annotations = load_coco_instances(dataset.annotations)
    if detector is None:
        detections = load_detections(dataset.detections, coco)
    else:
        from tinysam.eval.text_detections import text_detections

        detections = text_detections(coco, dataset.images_dir, detector)
    segmenter = BoxSegmenter(Predictor(model), multimask=multimask, batch_size=batch_size)
    seg = SegmentationResults()
    if len(detections):
        seg = segment_detections(coco, detections, dataset.images_dir, segmenter)
    lost = detections.dropped + seg.skipped
    read = len(detections) + sum(detections.dropped.values())
    if read and not seg.results:
        raise CocoFormatError(
            f"every one of the {read} detections in {dataset.detections} was dropped ({_reasons(lost)}); check that "
            f"their image_id values are those of {dataset.annotations}, their bbox XYWH pixels inside the image, "
            f"and that dataset.images={dataset.images_dir} holds the images"
        )
    lvis = is_lvis(dataset.annotations)
    metrics = score_lvis(dataset.annotations, seg.results) if lvis else score_coco(coco, seg.results)
    report = {
        "segm": metrics,
        "protocol": {
            "multimask": multimask,
            "score": "detection score",
            "lvis": lvis,
            "boxes": "category names prompt the detector" if detector is not None else str(dataset.detections),
        },
        "counts": {
            "detections_read": len(detections) + sum(detections.dropped.values()),
            "segmented": len(seg.results),
            "dropped_detections": dict(detections.dropped),
            "skipped_detections": dict(seg.skipped),
            "dropped_annotations": dict(dropped_annotations),
        },
    }
    if detector is not None:  # what the detector alone scores, beside what the segmenter adds
        report["bbox"] = score_coco(coco, box_results(detections), iou_type="bbox")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "segm_results.json", json.dumps(seg.results))
    atomic_write_text(out / "metrics.json", json.dumps(report, indent=2))
    skipped = sum(lost.values())
    if skipped > WARN_DROPPED_SHARE * read:
        print(f"warning: {skipped} of {read} detections were not scored ({_reasons(lost)}); see counts in metrics.json")
    elif not read:
        print(f"warning: {dataset.detections} holds no detections: every AP is 0")
    print(f"mask AP (%) on {dataset.annotations}, {len(seg.results)} masks, {skipped} detections skipped")
    print(metrics_table(metrics))
    if "bbox" in report:
        print(f"box AP (%) of the detector alone\n{metrics_table(report['bbox'])}")
    print(f"wrote {out / 'segm_results.json'} and {out / 'metrics.json'}")
    return report


def box_results(detections: DetectionSet) -> list[dict]:
    """The detections as COCO box results (XYWH)."""
    return [
        {"image_id": d.image_id, "category_id": int(c), "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(s)}
        for d in detections.by_image.values()
        for (x0, y0, x1, y1), s, c in zip(d.boxes_xyxy.tolist(), d.scores, d.category_ids)
    ]


def _reasons(counts: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common()) or "no reason recorded"


def score_proposals(
    coco: COCO, results: list[dict], image_ids: list[int], max_dets=(10, 100, 1000)
) -> dict[str, float]:
    """Class-agnostic mask average recall in percent (AR@k for each k of ``max_dets``) on ``image_ids``.

    How segment-everything masks are scored as object proposals against instance annotations
    (SAM section 7.3); each result's ``score`` ranks it.
    """
    if not results or not image_ids:
        return {f"AR@{k}": 0.0 for k in max_dets}
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "segm")
        evaluator.params.useCats = 0
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.params.maxDets = list(max_dets)
        evaluator.evaluate()
        evaluator.accumulate()
    recall = evaluator.eval["recall"]  # (IoU thresholds, categories, areas, max dets); -1 where undefined
    out = {}
    for m, k in enumerate(max_dets):
        values = recall[:, :, 0, m]
        out[f"AR@{k}"] = round(100 * float(values[values > -1].mean()), 2) if (values > -1).any() else 0.0
    return out
