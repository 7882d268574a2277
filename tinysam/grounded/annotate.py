"""Text-prompted labelling of a folder: ``python evaluate.py task=grounded images=DIR text="..." detector=...``.

Per image: ``<stem>.json`` in SA-1B layout (COCO RLE masks, XYWH boxes, area, predicted IoU, plus
the phrase and detector score of each mask) with the image beside it, so the output folder is
training data as it is (``experiment=finetune_masks "data.train_dirs=[OUT]"``), and
``<stem>_overlay.png`` with each mask tinted and labelled with its phrase and score. For the
whole folder, ``instances.json``: COCO instances with one category per phrase. Files are written
atomically; an unreadable image is skipped and counted.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from segment_anything.modeling import Sam

from tinysam.data.transforms import list_images
from tinysam.eval.data import readable_images
from tinysam.everything.annotate import overlay
from tinysam.grounded.detector import DetectorError
from tinysam.grounded.segmenter import GroundedSegmenter, TextDetector
from tinysam.io import atomic_write_bytes

log = logging.getLogger(__name__)


def xywh(box: Sequence[float]) -> list[float]:
    x0, y0, x1, y1 = box
    return [x0, y0, x1 - x0, y1 - y0]


def labelled_overlay(rgb: np.ndarray, records: list[dict]) -> bytes:
    """PNG of the image with each mask tinted, its box drawn and its phrase and score written."""
    masks = [mask_utils.decode(r["segmentation"]).astype(bool) for r in records]
    picture = Image.fromarray(overlay(rgb, masks))
    draw = ImageDraw.Draw(picture)
    for r in records:
        x0, y0, x1, y1 = r["bbox_xyxy"]
        draw.rectangle((x0, y0, x1, y1), outline=(255, 255, 0), width=2)
        draw.text((x0 + 2, max(y0 - 11, 0)), f"{r['phrase']} {r['score']:.2f}", fill=(255, 255, 0))
    png = io.BytesIO()
    picture.save(png, format="PNG")
    return png.getvalue()


def sa1b_annotation(index: int, record: dict[str, Any]) -> dict[str, Any]:
    """One mask in SA-1B layout, with the grounding (phrase, detector score) kept beside it."""
    x0, y0, x1, y1 = record["bbox_xyxy"]
    return {
        "id": index,
        "segmentation": record["segmentation"],
        "bbox": xywh(record["bbox_xyxy"]),
        "area": record["area"],
        "predicted_iou": record["predicted_iou"],
        "point_coords": [[(x0 + x1) / 2, (y0 + y1) / 2]],
        "phrase": record["phrase"],
        "score": record["score"],
    }


def _place_image(source: Path, target: Path) -> None:
    """The image beside its JSON: a hard link where the file system allows it, else a copy."""
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


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
        info = {"image_id": image_id, "file_name": path.name, "height": rgb.shape[0], "width": rgb.shape[1]}
        record = {"image": info, "text": text, "annotations": [sa1b_annotation(i, r) for i, r in enumerate(records)]}
        atomic_write_bytes(out_dir / f"{path.stem}.json", json.dumps(record).encode())
        _place_image(path, out_dir / path.name)
        if overlays:
            atomic_write_bytes(out_dir / f"{path.stem}_overlay.png", labelled_overlay(rgb, records))
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
    atomic_write_bytes(out_dir / "instances.json", json.dumps(instances).encode())
    report = {
        "images": len(coco_images),
        "masks": len(coco_annotations),
        "categories": len(categories),
        "skipped": dict(skipped),
        "out": str(out_dir),
    }
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "metrics.json").write_text(json.dumps(report, indent=2))
    print(
        f"grounded: {report['masks']} masks of {report['categories']} phrases on {report['images']} images"
        + (f"; skipped {dict(skipped)}" if skipped else "")
    )
    print(f"wrote SA-1B JSONs, overlays and {out_dir / 'instances.json'}")
    return report
