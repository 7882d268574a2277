"""Text-prompted zero-shot instance segmentation (the SegInW protocol): a COCO set's category names are the prompt.

The detector is prompted with every category name of the set (chunked to its token limit), each
box's phrase is mapped back to a category, and the boxes go through the usual box-prompt
evaluation (:func:`tinysam.eval.coco_instances.evaluate`). Box AP of the detector alone is
reported beside mask AP, so that what the segmenter adds is visible.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from tinysam.data.coco import DetectionSet, ImageDetections, image_path
from tinysam.data.transforms import ImageError, load_image
from tinysam.grounded.detector import class_names
from tinysam.grounded.segmenter import TextDetector, class_wise_nms
from tinysam.runtime import progress


def phrase_category(phrase: str, ids_by_name: dict[str, int]) -> int | None:
    """The category a detected phrase names: the same name, else the longest name it contains as whole words."""
    if phrase in ids_by_name:
        return ids_by_name[phrase]
    inside = [n for n in ids_by_name if re.search(rf"(^| ){re.escape(n)}( |$)", phrase)]
    return ids_by_name[max(inside, key=len)] if inside else None


def text_detections(
    coco: COCO, images_dir: str | Path, detector: TextDetector, nms_threshold: float = 0.5
) -> DetectionSet:
    """Boxes for every image of ``coco`` from prompting ``detector`` with the set's category names.

    Boxes whose phrase names no category, and images that cannot be read, are counted in ``dropped``.
    """
    categories = sorted(coco.cats.values(), key=lambda c: c["id"])
    names = class_names([c["name"] for c in categories])
    ids_by_name = {name: c["id"] for name, c in zip(names, categories)}
    by_image: dict[int, ImageDetections] = {}
    dropped: Counter = Counter()
    for image_id in progress(sorted(coco.imgs), "detecting from category names"):
        try:
            rgb = load_image(image_path(coco, image_id, images_dir))
        except (FileNotFoundError, ImageError):
            dropped["image missing or unreadable"] += 1
            continue
        found = class_wise_nms(detector.detect(rgb, names), nms_threshold)
        rows: dict[str, list] = defaultdict(list)
        for box, score, phrase in zip(found.boxes, found.scores, found.phrases):
            category = phrase_category(phrase, ids_by_name)
            if category is None:
                dropped["phrase names no category"] += 1
                continue
            rows["boxes"].append(box)
            rows["scores"].append(score)
            rows["categories"].append(category)
        if rows:
            order = np.argsort(-np.asarray(rows["scores"]))
            by_image[image_id] = ImageDetections(
                image_id,
                np.asarray(rows["boxes"], np.float64)[order],
                np.asarray(rows["scores"], np.float64)[order],
                np.asarray(rows["categories"], np.int64)[order],
            )
    return DetectionSet(by_image=by_image, dropped=dropped)
