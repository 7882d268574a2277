"""COCO-protocol decoding: all boxes of an image per decoder call vs one box per call, side by side.

Same model, same images, same detections (the toy world's, generated if missing). Times the
decoder phase (prompt encoder + mask decoder + best-output selection) and the upscaling to
image size separately, and checks that both ways give the same masks (up to float rounding at the threshold).

    python bench/evaluate.py [model] [n_images]     # model: tinyvit_5m (default, SAM's real decoder) or any arch
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from tinysam import Predictor
from tinysam.data.coco import image_path, load_coco_instances, load_detections
from tinysam.data.toyworld import ToyWorldConfig, generate
from tinysam.data.transforms import load_image
from tinysam.eval.coco_instances import BoxSegmenter
from tinysam.loader import load_model


def total(segmenter: BoxSegmenter) -> float:
    return segmenter.decode_seconds + segmenter.upscale_seconds


def main() -> None:
    arch = sys.argv[1] if len(sys.argv) > 1 else "tinyvit_5m"
    n_images = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())
    model = load_model(arch)  # seeded random weights: timing and agreement do not depend on them
    with tempfile.TemporaryDirectory() as tmp:
        val = generate(ToyWorldConfig(out=str(Path(tmp) / "toy"), n_train=1, n_val=n_images, seed=0)) / "val"
        coco, _ = load_coco_instances(val / "instances.json")
        dets = load_detections(val / "detections.json", coco)
        batched = BoxSegmenter(Predictor(model), batch_size=64)
        single = BoxSegmenter(Predictor(model), batch_size=1)
        differing, boxes, pixels, worst = 0, 0, 0, 1.0
        for image_id, d in dets.by_image.items():
            rgb = load_image(image_path(coco, image_id, val))
            batched.set_image(rgb)  # one embedding, shared by both ways
            single.predictor.set_embedding(batched.predictor.features, rgb.shape[:2])
            a, b = batched(d.boxes_xyxy), single(d.boxes_xyxy)
            diff = (a != b).sum(axis=(1, 2))
            differing, pixels, boxes = differing + int((diff > 0).sum()), pixels + int(diff.sum()), boxes + len(a)
            union = (a | b).sum(axis=(1, 2))
            worst = min(worst, float(((a & b).sum(axis=(1, 2)) / np.maximum(union, 1)).min()))
    print(f"model {arch}, {len(dets.by_image)} toy images, {boxes} boxes, {torch.get_num_threads()} threads")
    print("| decoding | decoder phase (s) | upscaling (s) | total (s) |")
    print("|---|---|---|---|")
    for name, s in (("one box per call", single), ("all boxes of an image per call", batched)):
        print(f"| {name} | {s.decode_seconds:.3f} | {s.upscale_seconds:.3f} | {total(s):.3f} |")
    print(
        f"decoder-phase speed-up: {single.decode_seconds / batched.decode_seconds:.1f}x (target >= 3x); "
        f"end-to-end: {total(single) / total(batched):.1f}x"
    )
    print(
        f"masks identical: {boxes - differing} of {boxes}; the others differ in {pixels} pixels in all "
        f"(logits within float rounding of the threshold), lowest IoU between the two {worst:.4f}"
    )
    if worst < 0.99:
        raise SystemExit("batched and one-box-per-call masks disagree beyond float rounding")


if __name__ == "__main__":
    main()
