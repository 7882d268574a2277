"""Segment everything, side by side in one process: SAM's own generator, our dense, hierarchical and adaptive.

    python bench/everything.py [--images 16] [--checkpoint PATH] [--speed-images 1] [--speed-side 1024] ...

Part 1, toy world (256 px, ``--images`` validation images, ``--stuff-regions`` annotated background
regions, default 4): every generator on every image, interleaved, on the same model (default: the
shipped toy teacher trained to segment backgrounds too, ``toy_teacher_stuff``; the objects-only toy
teacher is ``--checkpoint tinysam/assets/toy_teacher.safetensors --stuff-regions 0``), at toy
thresholds (``--pred-iou-thresh 0.7 --stability-score-thresh 0.85``); dense runs on SAM's decoder
and on the factored one (``backend="factored"``). Per row: seconds per image,
prompts per round, masks, recall of the dense masks (a dense mask counts when the row has one at
mask IoU >= 0.9), class-agnostic mask AR@100 against the toy ground truth, and peak memory
(resident-set growth during ``generate``). Hierarchical and adaptive run at each
``--high-score-thresh``: the paper's Table 5 sweep 7 / 8.5 / 10, and below it 2 to 6, where the
toy models' logits are confident. Two rows run adaptive at 7 without one of its rules, to show what
each does: without the barren-neighbour rule (``barren_neighbours=0``), and with a finest level that
skips what one prompt covers (``fine_covers=1``). A last row prompts every point of the
hierarchical lattice (a threshold no logit passes): the share of dense masks the paper's point set
finds at best. ``--seed 1`` and ``--seed 2`` draw other toy images, held-out checks of defaults
chosen on seed 0 (``fine_covers`` was chosen on seeds 0 and 1).

Part 2, speed (``--speed-images`` photos at ``--speed-side`` px, ``tinyvit_5m``): SAM's
``SamAutomaticMaskGenerator(crop_n_layers=0)`` against our dense generator on the same model and
thresholds (SAM's 0.88 / 0.95; our eager path, the factored decoder, onnxruntime, and onnxruntime on the W8A8 model that
``quantize_model`` writes, calibrated min-max on the last shipped photo), then the hierarchical and adaptive
samplers (default backend) at ``--speed-high-score-thresh``, with the share of masks matched at IoU >= 0.95
both ways. The student's weights are the seeded reference state dict of ``tests/reference``: their logits stay
within about ±0.5 at 1024 px, so no mask is stable and none passes SAM's 0.88 / 0.95, and every mask
spans most of the image, so that box NMS keeps one; with ``--speed-pred-iou-thresh 0.19
--speed-stability-score-thresh 0 --speed-box-nms-thresh 1 --speed-high-score-thresh 0.35`` about 100
masks an image pass and are compared.
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.transforms import ResizeLongestSide

from tinysam import AdaptiveMaskGenerator, DenseMaskGenerator, HierarchicalMaskGenerator
from tinysam.assets import asset_path
from tinysam.assets import photos as shipped_photos
from tinysam.data.coco import load_coco_instances
from tinysam.data.masks import grid_points
from tinysam.data.toyworld import ToyWorldConfig, generate
from tinysam.data.transforms import list_images, load_image
from tinysam.eval.coco_instances import score_proposals
from tinysam.eval.prompt_miou import iou as mask_ious
from tinysam.loader import load_model
from tinysam.predictor import Predictor
from tinysam.quant.run import quantize_model

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "reference"


def recovered(reference: list[dict], candidates: list[dict], thresh: float) -> tuple[int, int]:
    """How many ``reference`` masks have a ``candidates`` mask at IoU >= ``thresh`` (of how many)."""
    if not reference or not candidates:
        return 0, len(reference)
    ious = mask_utils.iou(
        [m["segmentation"] for m in reference], [m["segmentation"] for m in candidates], [0] * len(candidates)
    )
    return int((np.asarray(ious).max(axis=1) >= thresh).sum()), len(reference)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def measured(fn: Callable[[], list[dict]]) -> tuple[list[dict], float, int]:
    """``fn()``, its seconds and its peak resident-set growth in bytes (sampled every millisecond).

    Freed heap memory is handed back to the system first (glibc ``malloc_trim``), so that a row
    does not look small only because it reuses what an earlier row freed.
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes() - base)
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    start = time.perf_counter()
    try:
        out = fn()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        thread.join()
    return out, seconds, peak[0]


class Row:
    """One generator's totals over the images of a part."""

    def __init__(self, name: str, gen) -> None:
        self.name, self.gen = name, gen
        self.seconds, self.peak, self.masks, self.images = 0.0, 0, 0, 0
        self.prompts: list[int] = []
        self.found = [0, 0]
        self.results: list[dict] = []

    def run(self, rgb: np.ndarray, image_id: int) -> list[dict]:
        records, seconds, peak = measured(lambda: self.gen.generate(rgb))
        self.seconds, self.peak, self.images = self.seconds + seconds, max(self.peak, peak), self.images + 1
        self.masks += len(records)
        rounds = getattr(self.gen, "prompts_per_stage", None) or [len(self.gen.point_grids[0])]  # SAM's: one grid
        self.prompts += [0] * (len(rounds) - len(self.prompts))
        for i, n in enumerate(rounds):
            self.prompts[i] += n
        self.results += [
            {"image_id": image_id, "category_id": 1, "segmentation": m["segmentation"], "score": m["predicted_iou"]}
            for m in records
        ]
        return records

    def prompts_text(self) -> str:
        return " + ".join(f"{p / self.images:.0f}" for p in self.prompts)


def toy_part(args: argparse.Namespace, kwargs: dict) -> None:
    checkpoint = args.checkpoint or asset_path("toy_teacher_stuff.safetensors")
    model = load_model("vit_toy", checkpoint)
    sam_kwargs, kwargs = kwargs, {**kwargs, "backend": "eager"}  # ours on SAM's decoder unless a row says otherwise
    rows = [
        Row("SamAutomaticMaskGenerator", SamAutomaticMaskGenerator(model, crop_n_layers=0, **sam_kwargs)),
        Row("dense", DenseMaskGenerator(model, **kwargs)),
        Row("dense, backend=factored", DenseMaskGenerator(model, **{**kwargs, "backend": "factored"})),
    ]
    for high in args.high_score_thresh:
        for name, cls in (("hierarchical", HierarchicalMaskGenerator), ("adaptive", AdaptiveMaskGenerator)):
            rows.append(Row(f"{name} (high {high:g})", cls(model, high_score_thresh=high, **kwargs)))
    # The adaptive sampler without one of its rules, at the paper's lowest threshold: what each rule does.
    for change in ({"barren_neighbours": 0}, {"fine_covers": 1}):
        name = ", ".join(f"{key}={value}" for key, value in change.items())
        rows.append(
            Row(f"adaptive, {name} (high 7)", AdaptiveMaskGenerator(model, high_score_thresh=7.0, **change, **kwargs))
        )
    # Nothing marked, every lattice point prompted: the most of dense's masks the paper's point set can find.
    ceiling = HierarchicalMaskGenerator(model, high_score_thresh=float("inf"), **kwargs)
    rows.append(Row("hierarchical, no point skipped (high inf)", ceiling))
    with tempfile.TemporaryDirectory() as tmp:
        world = ToyWorldConfig(
            out=str(Path(tmp) / "toy"), n_train=1, n_val=args.images, seed=args.seed, stuff_regions=args.stuff_regions
        )
        val = generate(world) / "val"
        coco = load_coco_instances(str(val / "instances.json"))[0]
        ids = {img["file_name"]: i for i, img in coco.imgs.items()}
        for path in list_images(val):
            rgb = load_image(path)
            out = {row.name: row.run(rgb, ids[path.name]) for row in rows}
            for row in rows:
                hit, total = recovered(out["dense"], out[row.name], 0.9)
                row.found = [row.found[0] + hit, row.found[1] + total]
        ar = {row.name: score_proposals(coco, row.results, list(ids.values()))["AR@100"] for row in rows}
    n, dense = args.images, rows[1]
    print(
        f"\nToy world, {n} images 256 px (seed {args.seed}, stuff_regions={args.stuff_regions}), vit_toy {checkpoint}, "
        f"{torch.get_num_threads()} threads; {kwargs}"
    )
    print(
        "| generator | s / image | speed-up vs dense | prompts / image (per round) | masks / image "
        "| dense masks recovered (IoU >= 0.9) | mask AR@100 vs GT | peak memory MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        hit, total = row.found
        print(
            f"| {row.name} | {row.seconds / n:.3f} | {dense.seconds / row.seconds:.2f}x | {row.prompts_text()} "
            f"| {row.masks / n:.1f} | {hit / max(total, 1):.1%} ({hit}/{total}) | {ar[row.name]:.1f} "
            f"| {row.peak / 2**20:.0f} |"
        )


def quantized_onnx(photo: np.ndarray, weights: Path | None, out: Path) -> Path:
    """``tinyvit_5m`` quantized W8A8 by ``quantize_model`` (min-max, one calibration photo); ONNX pair in ``out``."""
    with torch.inference_mode(False), torch.enable_grad():  # calibration needs gradients
        quantize_model(load_model("tinyvit_5m", weights), [photo], out, method="minmax", points_per_side=2)
    return out


def decoder_agreement(model, rgb: np.ndarray, points_per_side: int, prompts: int = 64) -> tuple[float, int, int, float]:
    """SAM's decoder against the factored one on the first ``prompts`` grid points of ``rgb``, all three masks each.

    Returns the max abs difference of the low-res logits, how many of the masks (logit > 0) agree
    at IoU >= 0.95, of how many, and the lowest IoU.
    """
    eager, factored = Predictor(model), Predictor(model, backend="factored")
    eager.set_image(rgb)
    factored.set_embedding(eager.features, eager.original_size)
    points = grid_points(points_per_side, rgb.shape[:2])[:prompts]
    coords = torch.as_tensor(eager.transform.apply_coords(points, eager.original_size), dtype=torch.float32)[:, None]
    labels = torch.ones(len(points), 1, dtype=torch.int)
    ours, sams = factored.decode(coords, labels)[0], eager.decode(coords, labels)[0]
    ious = mask_ious(*((logits > model.mask_threshold).flatten(0, 1).numpy() for logits in (ours, sams)))
    return float((ours - sams).abs().max()), int((ious >= 0.95).sum()), ious.size, float(ious.min())


def speed_part(args: argparse.Namespace, kwargs: dict) -> None:
    weights = REFERENCE / "tinysam_vit_t_seed0.safetensors"
    model = load_model("tinyvit_5m", weights)
    photos = shipped_photos()
    rng = np.random.default_rng(0)
    images = [load_image(p) for p in photos] or [
        rng.integers(0, 255, (args.speed_side, args.speed_side, 3), dtype=np.uint8)
        for _ in range(args.speed_images + 1)
    ]
    resize = ResizeLongestSide(args.speed_side).apply_image  # SAM's own resize, longest side to speed_side
    calibration, images = resize(images[-1]), [resize(rgb) for rgb in images[: args.speed_images]]
    speed_kwargs = {
        **kwargs,
        "points_per_side": args.speed_points,
        "pred_iou_thresh": args.speed_pred_iou_thresh,
        "stability_score_thresh": args.speed_stability_score_thresh,
        "box_nms_thresh": args.speed_box_nms_thresh,
    }
    with tempfile.TemporaryDirectory() as tmp:
        int8 = quantized_onnx(calibration, weights, Path(tmp))
        rows = [
            Row("SamAutomaticMaskGenerator", SamAutomaticMaskGenerator(model, crop_n_layers=0, **speed_kwargs)),
            Row("dense", DenseMaskGenerator(model, **{**speed_kwargs, "backend": "eager"})),
            Row("dense, backend=factored", DenseMaskGenerator(model, **{**speed_kwargs, "backend": "factored"})),
            Row("dense, backend=onnx", DenseMaskGenerator(model, **{**speed_kwargs, "backend": "onnx"})),
            Row(
                "dense, backend=onnx, W8A8",
                DenseMaskGenerator(model, **{**speed_kwargs, "backend": "onnx", "onnx_dir": int8}),
            ),
        ]
        sampled = {**speed_kwargs, "high_score_thresh": args.speed_high_score_thresh}  # backend auto: factored on CPU
        rows += [
            Row(f"hierarchical (high {args.speed_high_score_thresh:g})", HierarchicalMaskGenerator(model, **sampled)),
            Row(f"adaptive (high {args.speed_high_score_thresh:g})", AdaptiveMaskGenerator(model, **sampled)),
        ]
        matched = {row.name: [0, 0, 0, 0] for row in rows}  # SAM's found by the row, of; the row's found by SAM's, of
        for index, rgb in enumerate(images):
            sam, *ours = (row.run(rgb, index) for row in rows)
            for row, masks in zip(rows, [sam, *ours]):
                acc = matched[row.name]
                acc[:] = [a + b for a, b in zip(acc, recovered(sam, masks, 0.95) + recovered(masks, sam, 0.95))]
        agreement = decoder_agreement(model, images[0], args.speed_points)
    n = len(images)
    print(
        f"\nSpeed: {n} image(s), longest side {args.speed_side} px, tinyvit_5m "
        f"(reference weights), {torch.get_num_threads()} threads; "
        f"{speed_kwargs}; W8A8: quantize_model, min-max on the last reference photo"
    )
    print(
        "| generator | s / image | speed-up | prompts / image | masks / image | SAM's masks it has (IoU >= 0.95) "
        "| its masks SAM has | peak memory MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        a, b, c, d = matched[row.name]
        print(
            f"| {row.name} | {row.seconds / n:.2f} | {rows[0].seconds / row.seconds:.2f}x | {row.prompts_text()} "
            f"| {row.masks / n:.1f} | {a}/{b} | {c}/{d} | {row.peak / 2**20:.0f} |"
        )
    diff, same, total, lowest = agreement
    print(
        f"Factored vs SAM's decoder, first image, first {total // 3} grid prompts x 3 masks (before any filter): "
        f"max abs logit difference {diff:.1e}, {same}/{total} masks at IoU >= 0.95, lowest IoU {lowest:.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a vit_toy model; default: the shipped toy_teacher_stuff")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="toy world seed; 1 and 2 are held-out sets (the defaults were chosen on 0, fine_covers on 0 and 1)",
    )
    parser.add_argument("--stuff-regions", type=int, default=4, help="annotated background regions per image")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--points-per-batch", type=int, default=64)
    # The toy models' predicted IoUs run lower than SAM's: at SAM's 0.88 / 0.95 they keep few masks.
    parser.add_argument("--pred-iou-thresh", type=float, default=0.7)
    parser.add_argument("--stability-score-thresh", type=float, default=0.85)
    parser.add_argument("--high-score-thresh", type=float, nargs="+", default=[2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.5, 10.0])
    parser.add_argument("--speed-images", type=int, default=1, help="0 skips the speed part")
    parser.add_argument("--speed-side", type=int, default=1024)
    parser.add_argument("--speed-points", type=int, default=32)
    parser.add_argument("--speed-pred-iou-thresh", type=float, default=0.88, help="SAM's")
    parser.add_argument("--speed-stability-score-thresh", type=float, default=0.95, help="SAM's")
    parser.add_argument(
        "--speed-high-score-thresh", type=float, default=8.5, help="the samplers' coverage logit at 1024 px (paper's)"
    )
    parser.add_argument("--speed-box-nms-thresh", type=float, default=0.7, help="SAM's; 1 turns NMS off")
    args = parser.parse_args()
    torch.manual_seed(0)
    kwargs = {
        "points_per_side": args.points_per_side,
        "points_per_batch": args.points_per_batch,
        "pred_iou_thresh": args.pred_iou_thresh,
        "stability_score_thresh": args.stability_score_thresh,
        "output_mode": "coco_rle",
    }
    with torch.inference_mode():
        if args.images:
            toy_part(args, kwargs)
        if args.speed_images:
            speed_part(args, kwargs)


if __name__ == "__main__":
    main()
