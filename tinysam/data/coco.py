"""COCO instances and detection-results readers for zero-shot instance segmentation.

Bad entries (boxes with NaN or non-positive size, ids of images that do not exist,
missing fields) are dropped and counted by reason, never silently: every reader
returns what it kept together with a :class:`~collections.Counter` of what it dropped.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

log = logging.getLogger(__name__)


class CocoFormatError(ValueError):
    """A COCO file that cannot be used at all; one line naming the file, the field and the fix."""


@dataclass
class ImageDetections:
    """The detections of one image: XYXY boxes in pixels, scores and category ids."""

    image_id: int
    boxes_xyxy: np.ndarray  # (N, 4) float64
    scores: np.ndarray  # (N,)
    category_ids: np.ndarray  # (N,) int64


@dataclass
class DetectionSet:
    by_image: dict[int, ImageDetections]
    dropped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return sum(len(d.scores) for d in self.by_image.values())


def _load_json(path: Path, what: str):
    path = Path(path)
    if not path.is_file():
        raise CocoFormatError(f"{what} file {path} does not exist; pass the right path")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CocoFormatError(f"{what} file {path} is not valid JSON ({err}); re-export it") from None


def box_problem(bbox) -> str | None:
    """Why an XYWH box is unusable (``None`` if it is fine)."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return "bbox is not [x, y, w, h]"
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return "bbox has non-numeric values"
    if not all(math.isfinite(v) for v in values):
        return "bbox has NaN or inf"
    if values[2] <= 0 or values[3] <= 0:
        return "bbox has zero or negative size"
    return None


def load_coco_instances(path: str | Path) -> tuple[COCO, Counter]:
    """A pycocotools ``COCO`` of the usable annotations of ``path`` and the counts of dropped ones."""
    data = _load_json(path, "COCO instances")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
            raise CocoFormatError(f"COCO instances file {path}: field '{key}' is missing or not a list")
    image_ids = {img.get("id") for img in data["images"]}
    category_ids = {c.get("id") for c in data["categories"]}
    dropped: Counter = Counter()
    kept = []
    for ann in data["annotations"]:
        problem = box_problem(ann.get("bbox"))
        if ann.get("image_id") not in image_ids:
            problem = "image id does not exist"
        elif ann.get("category_id") not in category_ids:
            problem = "category id does not exist"
        elif "segmentation" not in ann:
            problem = "no segmentation"
        if problem:
            dropped[problem] += 1
        else:
            kept.append(ann)
    if dropped:
        log.warning("%s: dropped %d annotations (%s)", path, sum(dropped.values()), dict(dropped))
    coco = COCO()
    coco.dataset = dict(data, annotations=kept)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco, dropped


def load_detections(path: str | Path, coco: COCO) -> DetectionSet:
    """Detections in the COCO results format (XYWH boxes), grouped by image, sorted by score.

    Detections of images not in ``coco``, with bad boxes, or without a score are dropped
    and counted; an empty file is valid and gives no detections.
    """
    data = _load_json(path, "detections")
    if not isinstance(data, list):
        raise CocoFormatError(f"detections file {path} must hold a JSON list of results (COCO results format)")
    dropped: Counter = Counter()
    grouped: dict[int, list] = defaultdict(list)
    for det in data:
        if not isinstance(det, dict):
            dropped["not a JSON object"] += 1
            continue
        problem = box_problem(det.get("bbox"))
        score = det.get("score")
        if det.get("image_id") not in coco.imgs:
            problem = "image id does not exist"
        elif not isinstance(score, (int, float)) or not math.isfinite(score):
            problem = "missing or non-finite score"
        if problem:
            dropped[problem] += 1
            continue
        x, y, w, h = (float(v) for v in det["bbox"])
        grouped[det["image_id"]].append((x, y, x + w, y + h, float(score), int(det.get("category_id", 1))))
    if dropped:
        log.warning("%s: dropped %d detections (%s)", path, sum(dropped.values()), dict(dropped))
    by_image = {}
    for image_id, rows in grouped.items():
        rows.sort(key=lambda r: -r[4])
        array = np.array(rows, dtype=np.float64)
        by_image[image_id] = ImageDetections(image_id, array[:, :4], array[:, 4], array[:, 5].astype(np.int64))
    return DetectionSet(by_image=by_image, dropped=dropped)


def image_path(coco: COCO, image_id: int, images_dir: str | Path) -> Path:
    """Where the file of ``image_id`` lies under ``images_dir``."""
    return Path(images_dir) / coco.imgs[image_id]["file_name"]
