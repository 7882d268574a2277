"""Folders in the SA-1B layout (``sa_<id>.jpg`` + ``sa_<id>.json``): a training dataset over them, and
the one writer of such folders (:func:`write_sa1b`).

Each sample is the SAM-preprocessed image (longest side resized, normalised,
zero-padded), up to ``max_masks`` of its masks (in the padded input frame, at
``mask_size``), their XYXY boxes and one point each, in input-frame pixels. A bad
sample (unreadable image, malformed JSON, RLE of the wrong size, no usable mask)
comes back as a :class:`SkippedSample`, is logged once by file name, and is
dropped and counted by :func:`collate_samples`; :class:`SkipReport` summarises a pass.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from segment_anything.utils.transforms import ResizeLongestSide
from torch.utils.data import Dataset

from tinysam.data.transforms import ImageError, list_images, load_image, prepare_image
from tinysam.io import atomic_write_bytes, atomic_write_text
from tinysam.models.registry import PIXEL_MEAN, PIXEL_STD

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkippedSample:
    """A sample that could not be used, and why."""

    path: str
    reason: str


class BadSample(ValueError):
    """Raised inside the reader for one unusable sample; turned into a :class:`SkippedSample`."""


class SkipReport:
    """Counts skipped samples over a pass; at its end logs what was skipped (and a clean pass once)."""

    def __init__(self, name: str = "dataset") -> None:
        self.name = name
        self.reasons: Counter[str] = Counter()
        self.seen = 0
        self.logged_clean_pass = False  # "none skipped" is said once a run, not every epoch

    def add(self, used: int, skipped: Sequence[SkippedSample]) -> None:
        self.seen += used + len(skipped)
        self.reasons.update(s.reason.split(":")[0] for s in skipped)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        if not self.reasons:
            return f"{self.name}: {self.seen} samples, none skipped"
        detail = ", ".join(f"{n} {reason}" for reason, n in self.reasons.most_common())
        return f"{self.name}: skipped {self.skipped} of {self.seen} samples ({detail})"

    def end_pass(self) -> str:
        """Return the summary and start counting the next pass; log it when samples were skipped, or once."""
        text = self.summary()
        if self.reasons:
            log.warning(text)
        elif not self.logged_clean_pass:
            log.info(text)
            self.logged_clean_pass = True
        self.reasons.clear()
        self.seen = 0
        return text


def find_pairs(roots: str | Path | Sequence[str | Path]) -> tuple[list[tuple[Path, Path]], list[SkippedSample]]:
    """Image/JSON pairs under each root (sorted by name) and the images that have no JSON."""
    roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
    pairs, orphans = [], []
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(
                f"SA-1B folder {root} does not exist; pass data folders that hold sa_*.jpg + sa_*.json"
            )
        found = len(pairs)
        for image in list_images(root):
            annotation = image.with_suffix(".json")
            if annotation.is_file():
                pairs.append((image, annotation))
            else:
                orphans.append(SkippedSample(str(image), f"no annotation: {annotation.name} is missing"))
        if len(pairs) == found:
            jsons = len(list(root.glob("*.json")))
            raise FileNotFoundError(
                f"SA-1B folder {root} holds no image with its JSON ({jsons} .json files, "
                f"{len(list_images(root))} images); put each sa_*.jpg beside its sa_*.json"
            )
    return pairs, orphans


def read_annotations(path: Path) -> dict:
    """The JSON record of one SA-1B image; a malformed file raises :class:`BadSample`."""
    try:
        record = json.loads(path.read_text())
        record["image"]["height"], record["image"]["width"]  # noqa: B018 - presence check
        if not isinstance(record["annotations"], list):
            raise TypeError("annotations is not a list")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise BadSample(f"malformed JSON: {path.name}: {type(err).__name__} {err}") from None
    return record


def sa1b_record(
    file_name: str, image_id: int, size: tuple[int, int], annotations: Sequence[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    """The SA-1B JSON of one image: ``image`` {image_id, file_name, height, width}, ``annotations`` numbered from
    0 (each a dict with at least ``segmentation`` as COCO RLE), and any ``extra`` top-level fields."""
    return {
        "image": {"image_id": image_id, "file_name": file_name, "height": size[0], "width": size[1]},
        **extra,
        "annotations": [dict(a, id=i) for i, a in enumerate(annotations)],
    }


def write_sa1b(
    out_dir: str | Path,
    record: dict[str, Any],
    image_file: Path | None = None,
    overlay_png: bytes | None = None,
) -> Path:
    """Write ``<stem>.json`` (and ``<stem>_overlay.png``) into ``out_dir`` atomically; returns the JSON's path.

    ``image_file``: the image is placed beside its JSON (a hard link where the file system allows
    it, else a copy), so that the folder is training data as it is; an image already there is kept.
    """
    out_dir = Path(out_dir)
    stem = Path(record["image"]["file_name"]).stem
    target = atomic_write_text(out_dir / f"{stem}.json", json.dumps(record))
    if image_file is not None and not (out_dir / image_file.name).exists():
        try:
            os.link(image_file, out_dir / image_file.name)
        except OSError:
            shutil.copy2(image_file, out_dir / image_file.name)
    if overlay_png is not None:
        atomic_write_bytes(out_dir / f"{stem}_overlay.png", overlay_png)
    return target


class SA1BDataset(Dataset):
    """SA-1B-layout folders as training samples for promptable segmentation.

    Args:
        roots: one folder or a list of folders of ``sa_<id>.jpg`` + ``sa_<id>.json``.
        image_size: the model input side (longest side resized to it, then padded).
        max_masks: at most this many masks per image, drawn at random (seeded per epoch); drawn
            masks that vanish when down-sampled to ``mask_size`` are then dropped.
        min_mask_area: masks smaller than this (original pixels) are not used.
        mask_size: side of the returned masks in the padded input frame (default ``image_size // 4``,
            the resolution of SAM's low-res mask logits).
        seed: seed of the mask selection and of fallback points.
    """

    def __init__(
        self,
        roots: str | Path | Sequence[str | Path],
        image_size: int = 1024,
        max_masks: int = 64,
        min_mask_area: float = 0.0,
        mask_size: int | None = None,
        seed: int = 0,
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
    ) -> None:
        self.pairs, self.orphans = find_pairs(roots)
        for orphan in self.orphans:
            log.warning("skipping %s (%s)", orphan.path, orphan.reason)
        self.image_size = image_size
        self.max_masks = max_masks
        self.min_mask_area = min_mask_area
        self.mask_size = mask_size or image_size // 4
        self.seed = seed
        self.epoch = 0
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        self.transform = ResizeLongestSide(image_size)
        self._logged: set[str] = set()

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Choose another random subset of masks per image (seeded by ``seed`` and ``epoch``)."""
        self.epoch = epoch

    def names(self) -> list[str]:
        """The sample names (file stems, e.g. ``sa_1``) in index order."""
        return [image.stem for image, _ in self.pairs]

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        return self.load(index, self.epoch)

    def load(self, index: int, epoch: int) -> dict[str, Any] | SkippedSample:
        """Sample ``index`` with the masks chosen for ``epoch`` (a bad sample comes back skipped)."""
        image_path, json_path = self.pairs[index]
        try:
            return self._load(index, epoch, image_path, json_path)
        except (BadSample, ImageError, FileNotFoundError) as err:
            skipped = SkippedSample(str(image_path), str(err))
            if skipped.path not in self._logged:
                self._logged.add(skipped.path)
                log.warning("skipping %s (%s)", skipped.path, skipped.reason)
            return skipped

    def _load(self, index: int, epoch: int, image_path: Path, json_path: Path) -> dict[str, Any]:
        record = read_annotations(json_path)
        try:
            rgb = load_image(image_path)
        except ImageError as err:
            raise BadSample(f"unreadable image: {err}") from None
        h, w = rgb.shape[:2]
        if (record["image"]["height"], record["image"]["width"]) != (h, w):
            raise BadSample(
                f"size mismatch: JSON says {record['image']['height']}x{record['image']['width']}, image is {h}x{w}"
            )
        rng = np.random.default_rng([self.seed, epoch, index])
        annotations = self._select(record["annotations"], (h, w), json_path, rng)
        image, input_size = prepare_image(rgb, self.image_size, self.pixel_mean, self.pixel_std)
        rles = [a["segmentation"] for a in annotations]
        masks = mask_utils.decode(
            [dict(r, counts=r["counts"].encode()) if isinstance(r["counts"], str) else r for r in rles]
        )
        small = self._masks_in_input_frame(masks, input_size)
        visible = small.flatten(1).any(1).numpy()  # masks thinner than a cell vanish at mask_size
        if not visible.any():
            raise BadSample(f"no usable mask: all {len(annotations)} masks vanish at {self.mask_size}x{self.mask_size}")
        annotations = [a for a, keep in zip(annotations, visible) if keep]
        masks = masks[..., visible]
        boxes = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # SA-1B boxes are XYWH; SAM wants XYXY
        points = np.array([self._point(a, masks[..., i], rng) for i, a in enumerate(annotations)], dtype=np.float64)
        return {
            "image": image,
            "masks": small[torch.from_numpy(visible)],
            "boxes": torch.from_numpy(self.transform.apply_boxes(boxes, (h, w))).float(),
            "points": torch.from_numpy(self.transform.apply_coords(points, (h, w))).float(),
            "image_id": int(record["image"].get("image_id", -1)),
            "name": image_path.stem,
            "original_size": (h, w),
            "input_size": input_size,
        }

    def _select(self, annotations: list, size: tuple[int, int], json_path: Path, rng: np.random.Generator) -> list:
        usable = []
        for i, ann in enumerate(annotations):
            try:
                rle_size = tuple(ann["segmentation"]["size"])
                area, (_, _, bw, bh) = float(ann["area"]), ann["bbox"]
            except (KeyError, TypeError, ValueError) as err:
                raise BadSample(
                    f"malformed JSON: {json_path.name} annotation {i}: {type(err).__name__} {err}"
                ) from None
            if rle_size != size:
                raise BadSample(f"RLE size mismatch: annotation {i} has size {list(rle_size)}, image is {list(size)}")
            if area >= self.min_mask_area and bw > 0 and bh > 0:
                usable.append(ann)
        if not usable:
            raise BadSample(f"no usable mask: none of {len(annotations)} masks has area >= {self.min_mask_area}")
        if len(usable) > self.max_masks:
            keep = np.sort(rng.choice(len(usable), self.max_masks, replace=False))
            usable = [usable[i] for i in keep]
        return usable

    @staticmethod
    def _point(annotation: dict, mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
        coords = annotation.get("point_coords") or []
        labels = annotation.get("point_labels") or [1] * len(coords)
        positive = [xy for xy, label in zip(coords, labels) if label == 1]  # the first click on the object
        if positive:
            return float(positive[0][0]), float(positive[0][1])
        ys, xs = np.nonzero(mask)
        if not len(xs):
            raise BadSample(f"no usable mask: annotation {annotation.get('id')} is empty")
        pick = int(rng.integers(len(xs)))
        return float(xs[pick]) + 0.5, float(ys[pick]) + 0.5

    def _masks_in_input_frame(self, masks: np.ndarray, input_size: tuple[int, int]) -> torch.Tensor:
        """(H, W, K) original-size masks to (K, m, m) bool in the padded input frame at ``mask_size``."""
        scale = self.mask_size / self.image_size
        h, w = max(1, round(input_size[0] * scale)), max(1, round(input_size[1] * scale))
        x = torch.from_numpy(masks).permute(2, 0, 1)[:, None].float()
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[:, 0] >= 0.5
        return F.pad(x, (0, self.mask_size - w, 0, self.mask_size - h))


def split_skipped(batch: list[dict[str, Any] | SkippedSample]) -> tuple[list[dict[str, Any]], list[SkippedSample]]:
    """The usable samples of a batch and the skipped ones."""
    skipped = [s for s in batch if isinstance(s, SkippedSample)]
    return [s for s in batch if not isinstance(s, SkippedSample)], skipped


def collate_samples(batch: list[dict[str, Any] | SkippedSample]) -> dict[str, Any]:
    """Stack samples, padding the per-image masks / boxes / points to the batch's most.

    ``valid`` (B, K) marks real entries; ``skipped`` lists the samples dropped from this batch.
    """
    samples, skipped = split_skipped(batch)
    out: dict[str, Any] = {"skipped": skipped}
    if not samples:
        return out
    k = max(len(s["boxes"]) for s in samples)
    valid = torch.zeros(len(samples), k, dtype=torch.bool)
    for i, s in enumerate(samples):
        valid[i, : len(s["boxes"])] = True

    def pad(key: str) -> torch.Tensor:
        return torch.stack([F.pad(s[key], (0, 0) * (s[key].dim() - 1) + (0, k - len(s[key]))) for s in samples])

    out.update(
        image=torch.stack([s["image"] for s in samples]),
        masks=pad("masks"),
        boxes=pad("boxes"),
        points=pad("points"),
        valid=valid,
        image_id=torch.tensor([s["image_id"] for s in samples]),
        name=[s["name"] for s in samples],
        original_size=[s["original_size"] for s in samples],
        input_size=[s["input_size"] for s in samples],
    )
    return out


class SA1BImages(Dataset):
    """The images alone of SA-1B-layout folders, SAM-preprocessed, e.g. for the teacher embedding pass.

    Samples named in ``skip_names`` (already done) are left out; unreadable images come
    back as :class:`SkippedSample`.
    """

    def __init__(
        self,
        roots: str | Path | Sequence[str | Path],
        image_size: int,
        skip_names: Sequence[str] = (),
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
    ) -> None:
        pairs, self.orphans = find_pairs(roots)
        skip = set(skip_names)
        self.images = [image for image, _ in pairs if image.stem not in skip]
        self.image_size = image_size
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        path = self.images[index]
        try:
            rgb = load_image(path)
        except (ImageError, FileNotFoundError) as err:
            log.warning("skipping %s (%s)", path, err)
            return SkippedSample(str(path), f"unreadable image: {err}")
        image, input_size = prepare_image(rgb, self.image_size, self.pixel_mean, self.pixel_std)
        return {"image": image, "name": path.stem, "input_size": input_size}


def collate_images(batch: list[dict[str, Any] | SkippedSample]) -> dict[str, Any]:
    """Stack :class:`SA1BImages` samples; ``skipped`` lists those dropped from the batch."""
    samples, skipped = split_skipped(batch)
    out: dict[str, Any] = {"skipped": skipped, "name": []}
    if samples:
        out.update(image=torch.stack([s["image"] for s in samples]), name=[s["name"] for s in samples])
    return out
