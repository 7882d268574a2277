"""Synthetic images at SA-1B's real size, in SA-1B layout: for throughput and dtype checks of the real recipe
where no SA-1B folder is at hand (the toy world is square and small)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tinysam.data.masks import encode_rle
from tinysam.data.sa1b import sa1b_record, write_sa1b


def write_sa1b_like(
    folder: str | Path, count: int, size: tuple[int, int] = (1500, 2250), masks: int = 100, seed: int = 0
) -> Path:
    """Write ``count`` images of ``size`` (H, W; SA-1B's photos are about 1500 x 2250) with ``masks``
    annotated ellipses each, as ``sa_<n>.jpg`` + ``sa_<n>.json``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    for index in range(count):
        image = Image.fromarray(rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8))
        image = image.resize((w, h))
        draw = ImageDraw.Draw(image)
        annotations = []
        for _ in range(masks):
            x0, y0 = rng.uniform(0, w * 0.9), rng.uniform(0, h * 0.9)
            x1, y1 = x0 + rng.uniform(w / 40 + 2, w / 4), y0 + rng.uniform(h / 40 + 2, h / 4)
            layer = Image.new("1", (w, h))
            ImageDraw.Draw(layer).ellipse((x0, y0, x1, y1), fill=1)
            mask = np.array(layer)
            draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
            ys, xs = np.nonzero(mask)
            annotations.append(
                {
                    "segmentation": encode_rle(mask),
                    "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
                    "area": int(mask.sum()),
                    "predicted_iou": 1.0,
                    "stability_score": 1.0,
                    "point_coords": [[float(xs.mean()), float(ys.mean())]],
                    "crop_box": [0, 0, w, h],
                }
            )
        name = f"sa_{index + 1}.jpg"
        image.save(folder / name, quality=90)
        write_sa1b(folder, sa1b_record(name, index + 1, size, annotations))
    return folder
