"""A seeded synthetic world of images with exact instance masks, written in the SA-1B layout.

Each image has a textured background and 3-12 objects (ellipses, polygons,
rectangles, rings with holes, thin bars) painted back to front, so later objects
occlude earlier ones. With ``stuff_regions=K`` the background is instead split into
1..K differently textured regions with wavy borders, each annotated as a "stuff"
instance, as SA-1B annotates the background of a photo. Colours are painted from the
final label map, so every mask is exactly the set of pixels its object shows. A split folder holds
``sa_<id>.jpg`` + ``sa_<id>.json`` (the released SA-1B schema), a COCO
``instances.json`` and a ``detections.json`` of jittered ground-truth boxes with
misses and scored false positives.

Command line (OmegaConf ``key=value`` overrides)::

    python -m tinysam.data.toyworld out=/tmp/toy n_train=64 n_val=16 image_size=256 seed=0
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from tinysam.config import one_line_errors, parse_keys
from tinysam.data.masks import encode_rle

KINDS = ("ellipse", "polygon", "rectangle", "ring", "bar")
STUFF = "stuff"  # the kind (and COCO category) of an annotated background region
SPLITS = ("train", "val")
VAL_ID_OFFSET = 10_000_000  # image ids of the val split start here, so splits never collide
MANIFEST = "toyworld.json"
FORMAT_VERSION = 1


@dataclass
class ToyWorldConfig:
    """What to generate; the same config always gives byte-identical files."""

    out: str = "data/toyworld"
    n_train: int = 64
    n_val: int = 16
    image_size: int = 256
    seed: int = 0
    min_objects: int = 3
    max_objects: int = 12
    min_area_frac: float = 0.0005  # objects left smaller than this after occlusion are painted over
    jpeg_quality: int = 95
    det_miss_rate: float = 0.1
    det_jitter: float = 0.05  # std of box-edge jitter, as a fraction of the box side
    det_false_positives: float = 1.0  # mean scored false positives per image
    stuff_regions: int = 0  # > 0: split the background into 1..this many annotated regions


@dataclass
class ToyInstance:
    """One object of a generated image."""

    mask: np.ndarray  # HxW bool
    kind: str
    point: tuple[float, float]  # XY pixel centre inside the mask


@dataclass
class ToyImage:
    image: np.ndarray  # HxWx3 uint8
    instances: list[ToyInstance]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled random grid in [0, 1]: low-frequency texture."""
    grid = rng.random((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BILINEAR))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.integers(40, 216, size=3).astype(np.float32)
    texture = _smooth_noise(rng, size, int(rng.integers(3, 9))) - 0.5
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle, freq = rng.uniform(0, math.pi), rng.uniform(4, 24)
    stripes = np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)))
    tint = rng.uniform(-1, 1, size=3).astype(np.float32)
    img = base + 60 * texture[..., None] * tint + rng.uniform(5, 20) * stripes[..., None]
    return img + rng.normal(0, 4, size=(size, size, 3)).astype(np.float32)


def _stuff_labels(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    """Region index per pixel: Voronoi cells of ``n`` random seeds, borders made wavy by a smooth warp."""
    seeds = rng.uniform(0, size, size=(n, 2)).astype(np.float32)
    amplitude = size * rng.uniform(0.03, 0.1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    xx += amplitude * (2 * _smooth_noise(rng, size, 5) - 1)
    yy += amplitude * (2 * _smooth_noise(rng, size, 5) - 1)
    dist = (xx[None] - seeds[:, 0, None, None]) ** 2 + (yy[None] - seeds[:, 1, None, None]) ** 2
    return dist.argmin(0)


def _object_colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    for _ in range(20):
        colour = rng.integers(0, 256, size=3).astype(np.float32)
        if np.abs(colour - avoid).sum() > 90:
            break
    return colour


def _rotated_rect(cx: float, cy: float, w: float, h: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    corners = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners]


def _draw_shape(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """Binary mask of one shape at a random place and scale (before occlusion)."""
    canvas = Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    radius = size * math.exp(rng.uniform(math.log(0.03), math.log(0.3)))
    cx, cy = rng.uniform(-0.05, 1.05, size=2) * size
    angle = rng.uniform(0, math.pi)
    if kind == "ellipse":
        rx, ry = radius, radius * rng.uniform(0.4, 1.0)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    elif kind == "ring":
        rx, ry = radius, radius * rng.uniform(0.6, 1.0)
        width = max(2, int(radius * rng.uniform(0.2, 0.5)))
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], outline=1, width=width)
    elif kind == "polygon":
        n = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * math.pi, size=n))
        radii = radius * rng.uniform(0.5, 1.0, size=n)
        draw.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii)], fill=1)
    elif kind == "rectangle":
        draw.polygon(_rotated_rect(cx, cy, 2 * radius, 2 * radius * rng.uniform(0.3, 1.0), angle), fill=1)
    elif kind == "bar":
        thickness = max(2.0, size * rng.uniform(0.006, 0.02))
        draw.polygon(_rotated_rect(cx, cy, 3 * radius, thickness, angle), fill=1)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    return np.asarray(canvas, dtype=bool)


def _point_in(rng: np.random.Generator, mask: np.ndarray) -> tuple[float, float]:
    """XY centre of a random pixel of ``mask``."""
    ys, xs = np.nonzero(mask)
    pick = int(rng.integers(len(xs)))
    return float(xs[pick]) + 0.5, float(ys[pick]) + 0.5


def generate_image(rng: np.random.Generator, cfg: ToyWorldConfig) -> ToyImage:
    """One image and its instances; everything drawn comes from ``rng``."""
    size = cfg.image_size
    n_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    labels = np.zeros((size, size), dtype=np.int32)
    kinds = []
    for i in range(n_objects):
        kinds.append(KINDS[int(rng.integers(len(KINDS)))])
        labels[_draw_shape(rng, kinds[-1], size)] = i + 1  # painter's order: later objects occlude

    canvas = _background(rng, size)
    regions = None
    if cfg.stuff_regions > 0:
        regions = _stuff_labels(rng, size, int(rng.integers(1, cfg.stuff_regions + 1)))
        for r in range(1, int(regions.max()) + 1):
            canvas[regions == r] = _background(rng, size)[regions == r]
    bg_mean = canvas.reshape(-1, 3).mean(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    instances = []
    min_area = cfg.min_area_frac * size * size
    for i, kind in enumerate(kinds):
        mask = labels == i + 1
        colour = _object_colour(rng, bg_mean)
        shade = rng.uniform(-40, 40, size=2).astype(np.float32)
        if mask.sum() < min_area:
            continue  # too small after occlusion: whatever it showed stays background
        gradient = shade[0] * (xx - 0.5) + shade[1] * (yy - 0.5)
        canvas[mask] = colour + gradient[mask][:, None] + rng.normal(0, 3, size=(int(mask.sum()), 3))
        instances.append(ToyInstance(mask=mask, kind=kind, point=_point_in(rng, mask)))
    if regions is not None:
        covered = np.zeros((size, size), dtype=bool)
        for inst in instances:
            covered |= inst.mask
        for r in range(int(regions.max()) + 1):
            mask = (regions == r) & ~covered
            if mask.sum() >= min_area:
                instances.append(ToyInstance(mask=mask, kind=STUFF, point=_point_in(rng, mask)))
    return ToyImage(image=np.clip(np.round(canvas), 0, 255).astype(np.uint8), instances=instances)


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: independent of how many images the split has."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def image_id(split: str, index: int) -> int:
    return index + 1 + (VAL_ID_OFFSET if split == "val" else 0)


def _sa1b_record(image_id_: int, file_name: str, toy: ToyImage) -> dict:
    h, w = toy.image.shape[:2]
    annotations = []
    for k, inst in enumerate(toy.instances):
        rle = encode_rle(inst.mask)
        annotations.append(
            {
                "id": image_id_ * 1000 + k,
                "segmentation": rle,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "area": int(inst.mask.sum()),
                "predicted_iou": 1.0,  # toy masks are exact
                "stability_score": 1.0,
                "point_coords": [[inst.point[0], inst.point[1]]],
                "crop_box": [0.0, 0.0, float(w), float(h)],
            }
        )
    return {
        "image": {"image_id": image_id_, "file_name": file_name, "height": h, "width": w},
        "annotations": annotations,
    }


def _detections(rng: np.random.Generator, record: dict, kinds: list[str], cfg: ToyWorldConfig) -> list[dict]:
    """Jittered true boxes (some missed) plus scored false positives, in the COCO results format."""
    categories = category_names(cfg)
    h, w = record["image"]["height"], record["image"]["width"]
    dets = []
    for ann, kind in zip(record["annotations"], kinds):
        if rng.random() < cfg.det_miss_rate:
            continue
        x, y, bw, bh = ann["bbox"]
        x0, y0, x1, y1 = np.array([x, y, x + bw, y + bh]) + rng.normal(0, cfg.det_jitter, 4) * [bw, bh, bw, bh]
        dets.append((categories.index(kind) + 1, [x0, y0, x1, y1], rng.uniform(0.5, 1.0)))
    for _ in range(int(rng.poisson(cfg.det_false_positives))):
        bw, bh = rng.uniform(0.05, 0.4, 2) * [w, h]
        x0, y0 = rng.uniform(0, 1, 2) * [w - bw, h - bh]
        dets.append((int(rng.integers(len(KINDS))) + 1, [x0, y0, x0 + bw, y0 + bh], rng.uniform(0.05, 0.5)))
    results = []
    for category, (x0, y0, x1, y1), score in dets:
        x0, x1 = np.clip([x0, x1], 0, w)
        y0, y1 = np.clip([y0, y1], 0, h)
        if x1 - x0 < 1 or y1 - y0 < 1:
            continue
        box = [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)]
        results.append(
            {
                "image_id": record["image"]["image_id"],
                "category_id": category,
                "bbox": box,
                "score": round(float(score), 4),
            }
        )
    return results


def category_names(cfg: ToyWorldConfig) -> tuple[str, ...]:
    """COCO category names in id order: the shape kinds, then "stuff" when backgrounds are annotated."""
    return KINDS + ((STUFF,) if cfg.stuff_regions > 0 else ())


def _write_json(path: Path, payload) -> None:
    path.write_text(json.dumps(payload, sort_keys=True, separators=(",", ":")))


def write_split(folder: Path, split: str, count: int, cfg: ToyWorldConfig) -> None:
    """Write one split: SA-1B files, ``instances.json`` and ``detections.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    coco_images, coco_annotations, detections = [], [], []
    names = category_names(cfg)
    for index in range(count):
        rng = image_rng(cfg.seed, split, index)
        toy = generate_image(rng, cfg)
        iid = image_id(split, index)
        name = f"sa_{iid}"
        Image.fromarray(toy.image).save(folder / f"{name}.jpg", quality=cfg.jpeg_quality)
        record = _sa1b_record(iid, f"{name}.jpg", toy)
        _write_json(folder / f"{name}.json", record)
        coco_images.append(dict(record["image"], id=iid))
        kinds = [inst.kind for inst in toy.instances]
        for ann, kind in zip(record["annotations"], kinds):
            coco_annotations.append(
                {
                    "id": ann["id"],
                    "image_id": iid,
                    "category_id": names.index(kind) + 1,
                    "segmentation": ann["segmentation"],
                    "area": ann["area"],
                    "bbox": ann["bbox"],
                    "iscrowd": 0,
                }
            )
        detections.extend(_detections(rng, record, kinds, cfg))
    categories = [{"id": i + 1, "name": kind, "supercategory": "shape"} for i, kind in enumerate(names)]
    _write_json(
        folder / "instances.json", {"images": coco_images, "annotations": coco_annotations, "categories": categories}
    )
    _write_json(folder / "detections.json", detections)


def manifest(cfg: ToyWorldConfig) -> dict:
    """What a finished world records about itself; equal manifests mean equal worlds."""
    fields = asdict(cfg)
    fields.pop("out")
    return {"format": "tinysam-toyworld", "version": FORMAT_VERSION, "config": fields}


def generate(cfg: ToyWorldConfig) -> Path:
    """Write the world to ``cfg.out`` unless an identical one is already there; returns the folder.

    The world is built in a temporary sibling folder and renamed into place, so an
    interrupted run never leaves a half-written world behind.
    """
    out = Path(cfg.out)
    wanted = manifest(cfg)
    done = out / MANIFEST
    if done.is_file() and json.loads(done.read_text()) == wanted:
        return out
    if out.exists() and any(out.iterdir()):
        if not done.is_file():
            raise FileExistsError(f"toy world: {out} exists and is not a toy world; choose another out=")
        shutil.rmtree(out)  # a toy world of another config: regenerate it
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a data set is shared like any other folder
    try:
        write_split(tmp / "train", "train", cfg.n_train, cfg)
        write_split(tmp / "val", "val", cfg.n_val, cfg)
        _write_json(tmp / MANIFEST, wanted)
        if out.exists() and not any(out.iterdir()):
            out.rmdir()
        try:
            os.replace(tmp, out)
        except OSError:  # another process (a DDP rank) finished the same world first
            if not (done.is_file() and json.loads(done.read_text()) == wanted):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def parse_config(argv: list[str]) -> ToyWorldConfig:
    """``key=value`` overrides on :class:`ToyWorldConfig`; unknown keys fail with the valid ones listed."""
    base = OmegaConf.structured(ToyWorldConfig)
    args = parse_keys(argv, "toyworld", f"python -m tinysam.data.toyworld [{'=... '.join(base)}=...]", list(base))
    try:
        merged = OmegaConf.merge(base, args)
    except Exception as err:  # a value of the wrong type: omegaconf names the key in its message
        raise ValueError(f"toyworld: {str(err).splitlines()[0]}; valid keys: {', '.join(base)}") from None
    cfg = OmegaConf.to_object(merged)
    if (
        cfg.image_size < 32
        or min(cfg.n_train, cfg.n_val, cfg.stuff_regions) < 0
        or cfg.min_objects < 1
        or cfg.max_objects < cfg.min_objects
    ):
        raise ValueError(
            "toyworld: need image_size >= 32, n_train, n_val, stuff_regions >= 0 and 1 <= min_objects <= max_objects"
        )
    return cfg


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    out = generate(cfg)
    print(f"toy world: {cfg.n_train} train + {cfg.n_val} val images at {cfg.image_size} px in {out}")


if __name__ == "__main__":
    one_line_errors()(main)()
