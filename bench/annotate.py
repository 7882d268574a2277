"""What the data engine saves an annotator: clicks per object to reach mask IoU >= 0.9, three ways.

    python bench/annotate.py [--images 16] [--steps 300] [--target 0.9] [--max-clicks 20]

A simulated annotator (``tinysam.annotate.simulate``: each click on the most interior pixel of the
largest error, as SAM's paper simulates) annotates every ground-truth object of ``--images`` toy-world
validation images with the shipped distilled toy student:

1. **clicks only**: every object from its first click;
2. **proposals + clicks**: the adaptive generator's proposals first (``tinysam.annotate.Proposer``, at
   ``--pred-iou-thresh`` / ``--stability-score-thresh``); a proposal matching an object at the target is
   kept as it is, one covering it at IoU >= 0.5 is corrected with clicks from its own prompt, the rest are deleted;
3. **after one round of fine-tuning**: the same annotator first annotates ``--images`` toy-world *training*
   images the second way, saving the objects that reached the target through the annotation store (the
   folder the page writes; an image whose objects all fall short is saved empty and skipped by training), then
   ``python train.py experiment=finetune_masks`` fine-tunes the student on that folder for ``--steps`` steps;
   the held-out validation images are annotated the second way with the fine-tuned student.

Per way: clicks per object (mean; an object not reached costs ``--max-clicks``), objects reaching the
target, the mean IoU of the masks left (an annotator out of clicks undoes back to its best mask), objects
taken from a proposal at the target with no click, proposals deleted per image, and the model's seconds per
image on this CPU (encoder,
proposals, every click's decoder).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tinysam import Predictor
from tinysam.annotate import AnnotationStore, Proposer
from tinysam.annotate.simulate import AnnotatedImage, SimulatedAnnotator
from tinysam.assets import asset_path
from tinysam.data.toyworld import ToyWorldConfig, generate_image, image_rng
from tinysam.loader import load_model
from tinysam.runtime import cpu_features, markdown_table

REPO = Path(__file__).resolve().parents[1]
STUDENT = asset_path("toy_student.safetensors")


def toy_images(split: str, n: int, seed: int) -> list:
    return [generate_image(image_rng(seed, split, i), ToyWorldConfig(out="unused", seed=seed)) for i in range(n)]


def annotate(model, toys: list, proposer: Proposer | None, args) -> list[AnnotatedImage]:
    annotator = SimulatedAnnotator(Predictor(model), args.target, args.max_clicks)
    results = []
    for toy in toys:
        start = time.perf_counter()
        proposals = proposer.propose(toy.image) if proposer else None
        seconds = time.perf_counter() - start
        result = annotator.annotate(toy.image, [t.mask for t in toy.instances], proposals)
        result.model_seconds += seconds
        results.append(result)
    return results


def summary(way: str, results: list[AnnotatedImage], target: float) -> list:
    objects = [o for r in results for o in r.objects]
    return [
        way,
        float(np.mean([o.clicks for o in objects])),
        f"{100 * np.mean([o.iou >= target for o in objects]):.1f}",
        float(np.mean([o.iou for o in objects])),
        f"{sum(o.source == 'auto' and o.clicks == 0 for o in objects)} of {len(objects)}",
        float(np.mean([r.deleted for r in results])),
        float(np.mean([r.model_seconds for r in results])),
    ]


def fine_tune(folder: Path, work: Path, args) -> Path:
    """``train.py experiment=finetune_masks`` on the annotated folder; returns the new student."""
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "experiment=finetune_masks",
        "student=tinyvit_toy",
        f"student.checkpoint={STUDENT}",
        f"data.train_dirs=[{folder}]",
        "data.image_size=256",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.min_mask_area=0",
        f"trainer.max_steps={args.steps}",
        "module.warmup_steps=10",
        f"module.lr={args.lr}",
        "module.image_log_every=0",
        "logger=csv",
        "~callbacks.progress_bar",
        f"paths.root_dir={work}",
        "run_name=annotated",
        f"seed={args.seed}",
    ]
    proc = subprocess.run(command, cwd=work, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"fine-tuning failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    [student] = list(work.rglob("checkpoints/student.safetensors"))
    metrics = json.loads(next(work.rglob("results.json")).read_text())
    print(
        f"fine-tuned {metrics['global_step']} steps on {metrics['train_masks_read']} masks read "
        f"({metrics['seconds_per_batch']:.2f} s a batch of 4)"
    )
    return student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="images per round (annotated, then held out)")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps (batches of 4)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--max-clicks", type=int, default=20)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.7)
    parser.add_argument("--stability-score-thresh", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    features = sorted(cpu_features() & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})
    print(f"CPU: {', '.join(features) or 'no AVX2'}; {torch.get_num_threads()} threads")
    thresholds = {"pred_iou_thresh": args.pred_iou_thresh, "stability_score_thresh": args.stability_score_thresh}
    held_out = toy_images("val", args.images, args.seed)
    model = load_model("tinyvit_toy", STUDENT)
    proposer = Proposer(model, thresholds)
    rows = [
        summary("clicks only", annotate(model, held_out, None, args), args.target),
        summary("proposals + clicks", annotate(model, held_out, proposer, args), args.target),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images, out = work / "images", work / "annotated"
        images.mkdir()
        first_round = toy_images("train", args.images, args.seed)
        for i, toy in enumerate(first_round):  # the annotated images are files, as the page reads them
            Image.fromarray(toy.image).save(images / f"train_{i}.png")
        store = AnnotationStore(images, out)
        results = annotate(model, first_round, proposer, args)
        saved = 0
        for i, result in enumerate(results):  # an object left below the target is not saved as a label
            objects = [o.saved() for o in result.objects if o.iou >= args.target]
            store.save(f"train_{i}", objects, version="", state="done")
            saved += len(objects)
        print(
            f"round 1: {saved} of {sum(len(r.objects) for r in results)} objects reached IoU >= {args.target} "
            f"on {len(results)} images and were saved to the folder"
        )
        tuned = load_model("tinyvit_toy", fine_tune(out, work, args))
        rows.append(
            summary(
                "proposals + clicks, fine-tuned once",
                annotate(tuned, held_out, Proposer(tuned, thresholds), args),
                args.target,
            )
        )
    header = [
        "way",
        "clicks per object",
        f"objects at IoU >= {args.target} (%)",
        "mean IoU",
        "objects from a proposal, no click",
        "proposals deleted per image",
        "model s / image",
    ]
    print(
        f"\n{len(held_out)} held-out toy images, {sum(len(t.instances) for t in held_out)} objects, "
        f"at most {args.max_clicks} clicks an object; proposals at predicted IoU >= {args.pred_iou_thresh}, "
        f"stability >= {args.stability_score_thresh}"
    )
    print(markdown_table(header, rows, digits=2))


if __name__ == "__main__":
    main()
