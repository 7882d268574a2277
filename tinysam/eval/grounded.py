"""``evaluate.py task=grounded``: text-prompted labelling of a folder: ``python evaluate.py task=grounded images=DIR text="..." detector=...``.

Per image: ``<stem>.json`` in SA-1B layout (COCO RLE masks, XYWH boxes, area, predicted IoU, plus
the phrase and detector score of each mask) with the image beside it, so the output folder is
training data as it is (``experiment=finetune_masks "data.train_dirs=[OUT]"``), and
``<stem>_overlay.png`` with each mask tinted and labelled with its phrase and score. For the
whole folder, ``instances.json``: COCO instances with one category per phrase. Files are written
atomically; an unreadable image is skipped and counted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from segment_anything.modeling import Sam

from tinysam.data.layouts import readable_images
from tinysam.data.masks import decode_rle, overlay, png_bytes
from tinysam.data.sa1b import sa1b_record, write_sa1b
from tinysam.data.transforms import list_images
from tinysam.grounded.detector import DetectorError
from tinysam.grounded.segmenter import GroundedSegmenter, TextDetector
from tinysam.io import atomic_write_text

log = logging.getLogger(__name__)


def xywh(box: Sequence[float]) -> list[float]:
    x0, y0, x1, y1 = box
    return [x0, y0, x1 - x0, y1 - y0]


def labelled_overlay(rgb: np.ndarray, records: list[dict]) -> bytes:
    """PNG of the image with each mask tinted, its box drawn and its phrase and score written."""
    picture = Image.fromarray(overlay(rgb, [decode_rle(r["segmentation"]) for r in records]))
    draw = ImageDraw.Draw(picture)
    for r in records:
        x0, y0, x1, y1 = r["bbox_xyxy"]
        draw.rectangle((x0, y0, x1, y1), outline=(255, 255, 0), width=2)
        draw.text((x0 + 2, max(y0 - 11, 0)), f"{r['phrase']} {r['score']:.2f}", fill=(255, 255, 0))
    return png_bytes(picture)


def sa1b_annotation(record: dict[str, Any]) -> dict[str, Any]:
    """One mask in SA-1B layout, with the grounding (phrase, detector score) kept beside it."""
    x0, y0, x1, y1 = record["bbox_xyxy"]
    return {
        "segmentation": record["segmentation"],
        "bbox": xywh(record["bbox_xyxy"]),
        "area": record["area"],
        "predicted_iou": record["predicted_iou"],
        "point_coords": [[(x0 + x1) / 2, (y0 + y1) / 2]],
        "phrase": record["phrase"],
        "score": record["score"],
    }


def annotate(
    model: Sam,
    output_dir: str | Path,
    images: str,
    text: str | Sequence[str],
    detector: TextDetector | None,
    out: str,
    nms_threshold: float = 0.5,
    multimask: bool = True,
    backend: str = "eager",
    overlays: bool = True,
) -> dict[str, Any]:
    """Masks of what ``text`` names in every image of ``images``, written to ``out``; returns a report."""
    if detector is None:
        raise DetectorError(
            "task=grounded needs a detector: add detector=grounding_dino detector.folder=<saved Grounding DINO>"
        )
    files = list_images(images)
    segmenter = GroundedSegmenter(
        detector, model, backend=backend, nms_threshold=nms_threshold, multimask=multimask, output_mode="coco_rle"
    )
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    categories: dict[str, int] = {}
    coco_images, coco_annotations = [], []
    skipped: Counter = Counter()
    for index, path, rgb in readable_images(files, "text-prompted segmentation", skipped):
        image_id = index + 1
        records = segmenter.segment(rgb, text)
        record = sa1b_record(path.name, image_id, rgb.shape[:2], [sa1b_annotation(r) for r in records], text=text)
        write_sa1b(out_dir, record, image_file=path, overlay_png=labelled_overlay(rgb, records) if overlays else None)
        coco_images.append({"id": image_id, "file_name": path.name, "height": rgb.shape[0], "width": rgb.shape[1]})
        for r in records:
            coco_annotations.append(
                {
                    "id": len(coco_annotations) + 1,
                    "image_id": image_id,
                    "category_id": categories.setdefault(r["phrase"], len(categories) + 1),
                    "segmentation": r["segmentation"],
                    "area": r["area"],
                    "bbox": xywh(r["bbox_xyxy"]),
                    "iscrowd": 0,
                    "score": r["score"],
                }
            )
    instances = {
        "images": coco_images,
        "annotations": coco_annotations,
        "categories": [{"id": i, "name": name} for name, i in categories.items()],
    }
    atomic_write_text(out_dir / "instances.json", json.dumps(instances))
    report = {
        "images": len(coco_images),
        "masks": len(coco_annotations),
        "categories": len(categories),
        "skipped": dict(skipped),
        "out": str(out_dir),
    }
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(output_dir) / "metrics.json", json.dumps(report, indent=2))
    print(
        f"grounded: {report['masks']} masks of {report['categories']} phrases on {report['images']} images"
        + (f"; skipped {dict(skipped)}" if skipped else "")
    )
    print(f"wrote SA-1B JSONs, overlays and {out_dir / 'instances.json'}")
    return report
