"""Segment everything: the dense 32x32 grid vs TinySAM's hierarchical sampling, side by side in one run.

On the same toy-world images with the same model: time per image, prompts decoded per round,
masks kept, and agreement (share of dense masks that hierarchical recovers at mask IoU >= 0.9,
and the reverse).

    python bench/everything.py [--model vit_toy] [--images 8] [--stuff-regions 0] [--pred-iou-thresh 0.88] ...
    (default model: the shipped toy teacher; --checkpoint for another one)

``--stuff-regions K`` benches on a toy world whose backgrounds are split into annotated regions
(every pixel in some mask, as in SA-1B), for a model trained on such worlds
(``python train.py experiment=toy_teacher_stuff``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from tinysam import DenseMaskGenerator, HierarchicalMaskGenerator
from tinysam.assets import asset_path
from tinysam.data.toyworld import ToyWorldConfig, generate
from tinysam.data.transforms import load_image
from tinysam.models.build import load_model


def recovered(reference: list[dict], candidates: list[dict], thresh: float = 0.9) -> tuple[int, int]:
    """How many ``reference`` masks have a ``candidates`` mask at IoU >= ``thresh`` (of how many)."""
    if not reference:
        return 0, 0
    if not candidates:
        return 0, len(reference)
    ious = mask_utils.iou(
        [m["segmentation"] for m in reference], [m["segmentation"] for m in candidates], [0] * len(candidates)
    )
    return int((np.asarray(ious).max(axis=1) >= thresh).sum()), len(reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_toy")
    parser.add_argument("--checkpoint", default=None, help="default: the shipped toy teacher for vit_toy")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--stuff-regions", type=int, default=0, help="annotated background regions per image")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88)
    parser.add_argument("--stability-score-thresh", type=float, default=0.95)
    parser.add_argument("--high-score-thresh", type=float, default=8.5)
    args = parser.parse_args()
    checkpoint = args.checkpoint or (asset_path("toy_teacher.safetensors") if args.model == "vit_toy" else None)
    torch.manual_seed(0)
    model = load_model(args.model, checkpoint)
    kwargs = dict(
        points_per_side=args.points_per_side,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        high_score_thresh=args.high_score_thresh,
        output_mode="coco_rle",
    )
    generators = {
        "dense": DenseMaskGenerator(model, **kwargs),
        "hierarchical": HierarchicalMaskGenerator(model, **kwargs),
    }
    seconds = {name: 0.0 for name in generators}
    prompts = {name: np.zeros(2) for name in generators}
    masks = {name: 0 for name in generators}
    found = {"dense in hierarchical": [0, 0], "hierarchical in dense": [0, 0]}
    with tempfile.TemporaryDirectory() as tmp:
        world = ToyWorldConfig(
            out=str(Path(tmp) / "toy"), n_train=1, n_val=args.images, seed=0, stuff_regions=args.stuff_regions
        )
        val = generate(world) / "val"
        for path in sorted(val.glob("*.jpg")):
            rgb = load_image(path)
            out = {}
            for name, gen in generators.items():
                start = time.perf_counter()
                out[name] = gen.generate(rgb)
                seconds[name] += time.perf_counter() - start
                prompts[name][: len(gen.prompts_per_round)] += gen.prompts_per_round
                masks[name] += len(out[name])
            for key, (a, b) in {
                "dense in hierarchical": ("dense", "hierarchical"),
                "hierarchical in dense": ("hierarchical", "dense"),
            }.items():
                hit, total = recovered(out[a], out[b])
                found[key][0] += hit
                found[key][1] += total
    n = args.images
    print(
        f"model {args.model} ({checkpoint or 'random weights'}), {n} toy images 256 px "
        f"(stuff_regions={args.stuff_regions}), "
        f"{torch.get_num_threads()} threads; {kwargs}"
    )
    print("| mode | s / image | prompts round 1 / image | prompts round 2 / image | masks / image |")
    print("|---|---|---|---|---|")
    for name in generators:
        r1, r2 = prompts[name] / n
        print(f"| {name} | {seconds[name] / n:.3f} | {r1:.0f} | {r2:.0f} | {masks[name] / n:.1f} |")
    share = {k: (h / t if t else float("nan")) for k, (h, t) in found.items()}
    print(f"speed-up hierarchical vs dense: {seconds['dense'] / seconds['hierarchical']:.2f}x (target >= 1.8x)")
    print(
        f"dense masks recovered by hierarchical (IoU >= 0.9): {share['dense in hierarchical']:.1%} "
        f"({found['dense in hierarchical'][0]}/{found['dense in hierarchical'][1]}, target >= 95%); "
        f"hierarchical masks found by dense: {share['hierarchical in dense']:.1%}"
    )


if __name__ == "__main__":
    main()
