"""COCO instances in and out of an annotation folder, so that its labels open in other tools and theirs open here."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tinysam.annotate.store import AnnotationError, AnnotationStore, ConflictError
from tinysam.data.coco import load_coco_instances
from tinysam.data.masks import json_rle
from tinysam.data.sa1b import BadSample, read_annotations
from tinysam.io import atomic_write_text

UNNAMED = "object"  # the category of objects saved without a name


def export_coco(out: str | Path, coco_file: str | Path) -> dict[str, Any]:
    """Write the folder's objects as COCO instances (RLE masks, one category per name); returns counts.

    Each annotation keeps its ``source`` and ``predicted_iou``; unreadable JSONs are skipped and counted.
    """
    images, annotations, skipped = [], [], {}
    categories: dict[str, int] = {}
    for path in sorted(Path(out).glob("*.json")):
        try:
            record = read_annotations(path)
        except BadSample as err:
            skipped[path.name] = str(err)
            continue
        image_id = len(images) + 1
        info = record["image"]
        images.append(
            {"id": image_id, "file_name": info["file_name"], "height": info["height"], "width": info["width"]}
        )
        for ann in record["annotations"]:
            name = ann.get("category") or UNNAMED
            categories.setdefault(name, len(categories) + 1)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": categories[name],
                    "segmentation": ann["segmentation"],
                    "area": ann["area"],
                    "bbox": ann["bbox"],
                    "iscrowd": 0,
                    "source": ann.get("source", "imported"),
                    "predicted_iou": ann.get("predicted_iou"),
                }
            )
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name, "supercategory": "object"} for name, i in categories.items()],
    }
    atomic_write_text(coco_file, json.dumps(coco))
    return {"images": len(images), "annotations": len(annotations), "categories": len(categories), "skipped": skipped}


def import_coco(coco_file: str | Path, store: AnnotationStore) -> dict[str, Any]:
    """Open a COCO instances file's labels for editing: one JSON per listed image not yet annotated.

    Objects come in as ``source: imported`` with their category names; images already annotated in
    ``out`` are left as they are (and counted), as are images the file names but the folder lacks.
    """
    coco, dropped = load_coco_instances(coco_file)
    names = {cat["id"]: cat["name"] for cat in coco.dataset["categories"]}
    by_name = {entry.path.name: stem for stem, entry in store.entries.items()}
    counts: Counter = Counter()
    unusable: dict[str, str] = {}
    for image_id, image in coco.imgs.items():
        stem = by_name.get(Path(image["file_name"]).name)
        if stem is None:
            counts["not in the images folder"] += 1
            continue
        objects = [
            {
                "segmentation": json_rle(coco.annToRLE(ann)),
                "category": names[ann["category_id"]],
                "source": "imported",
                "point_coords": [],
            }
            for ann in coco.imgToAnns[image_id]
        ]
        try:
            store.save(stem, objects, version="")
            counts["imported"] += 1
            counts["objects"] += len(objects)
        except ConflictError:
            counts["already annotated"] += 1
        except AnnotationError as err:  # e.g. masks of another size than the image: that image is left out
            unusable[image["file_name"]] = str(err)
    return dict(counts) | {"unusable": unusable} | ({"dropped annotations": dict(dropped)} if dropped else {})
