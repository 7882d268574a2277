"""Dataset layouts the evaluation tasks read: a COCO-layout folder (images, instances, detections), an SA-1B
folder, and the readable images of a file list."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinysam.data.coco import image_path, load_coco_instances
from tinysam.data.masks import decode_rle
from tinysam.data.sa1b import BadSample, find_pairs, read_annotations
from tinysam.data.toyworld import ToyWorldConfig, generate
from tinysam.data.transforms import ImageError, load_image
from tinysam.runtime import progress

log = logging.getLogger(__name__)


@dataclass
class CocoLayout:
    """A folder of images with a COCO/LVIS instances file and, optionally, a detector's results file.

    ``toyworld`` is given for the embedded default: the toy world is generated (or reused) first.
    """

    images: str
    annotations: str
    detections: str | None = None
    toyworld: ToyWorldConfig | None = None

    def prepare(self) -> CocoLayout:
        """Generate the toy world when this dataset is the toy world; return self."""
        if self.toyworld is not None:
            generate(self.toyworld)
        return self

    @property
    def images_dir(self) -> Path:
        return Path(self.images)

    def instances(self, skipped: Counter) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(file name, RGB image, (N, H, W) boolean masks) per image (crowds left out); bad ones counted."""
        coco, dropped = load_coco_instances(self.annotations)
        skipped.update(dropped)
        for image_id in sorted(coco.imgs):
            anns = [a for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
            if not anns:
                continue
            path = image_path(coco, image_id, self.images)
            try:
                rgb = load_image(path)
            except (FileNotFoundError, ImageError) as err:
                log.warning("skipping %s", err)
                skipped["missing or unreadable image"] += 1
                continue
            masks = np.stack([coco.annToMask(a).astype(bool) for a in anns])
            if masks.shape[1:] != rgb.shape[:2]:
                skipped["image size differs from the annotations"] += 1
                continue
            yield path.name, rgb, masks


def readable_images(files: list[Path], description: str, skipped: Counter) -> Iterator[tuple[int, Path, np.ndarray]]:
    """``(index, path, rgb)`` of each file that loads, under a progress bar; an unreadable file is logged and
    counted in ``skipped["unreadable image"]``, never fatal."""
    for index, path in enumerate(progress(files, description)):
        try:
            rgb = load_image(path)
        except ImageError as err:
            log.warning("skipping: %s", err)
            skipped["unreadable image"] += 1
            continue
        yield index, path, rgb


@dataclass
class Sa1bLayout:
    """A folder of SA-1B-layout pairs (``<id>.jpg`` + ``<id>.json`` with RLE masks)."""

    images: str

    def prepare(self) -> Sa1bLayout:
        return self

    def instances(self, skipped: Counter) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """(name, RGB image, (N, H, W) boolean masks) per image; bad pairs are counted in ``skipped``."""
        pairs, orphans = find_pairs(self.images)
        skipped["image without annotation JSON"] += len(orphans)
        for image_file, json_file in pairs:
            try:
                record = read_annotations(json_file)
                rgb = load_image(image_file)
                masks = np.stack([decode_rle(a["segmentation"]) for a in record["annotations"]])
            except (BadSample, ImageError, KeyError, TypeError, ValueError) as err:
                log.warning("skipping %s: %s", image_file, err)
                skipped["unreadable image or annotations"] += 1
                continue
            if masks.shape[1:] != rgb.shape[:2]:
                skipped["mask size differs from its image"] += 1
                continue
            yield image_file.name, rgb, masks
