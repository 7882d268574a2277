"""Grounded-SAM time per image, detector and segmenter apart: a TinySAM student against SAM ViT-H.

    python bench/grounded.py [--images 2] [--detector DIR] [--students tinyvit_5m vit_h] [--text "dog. cat."]

The detector is Grounding DINO at the grounding-dino-tiny architecture (Swin-T + BERT-base), randomly
initialised unless ``--detector`` names a saved one; the segmenters are seeded random weights at
1024 px (timing does not depend on the weights, but the number of boxes does: each image gets the
same ``--boxes`` boxes from the detector's top scores). Prints, per segmenter, seconds per image for
the detector and the segmenter (image encoder + one batched decoder call), and the segmenter's
share of the pipeline time: what a small student saves inside Grounded-SAM.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tinysam.data.toyworld import ToyWorldConfig, generate
from tinysam.data.transforms import list_images, load_image
from tinysam.grounded import GroundedSegmenter, GroundingDino
from tinysam.grounded.detector import TextDetections
from tinysam.loader import load_model

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "dog", "cat", "person", "car"]


def random_grounding_dino(folder: Path) -> Path:
    """grounding-dino-tiny's architecture with random weights and a small vocabulary, saved as users save one."""
    import transformers

    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    torch.manual_seed(0)
    transformers.GroundingDinoForObjectDetection(transformers.GroundingDinoConfig()).save_pretrained(folder)
    tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"))
    transformers.GroundingDinoProcessor(transformers.GroundingDinoImageProcessor(), tokenizer).save_pretrained(folder)
    return folder


class FixedCount:
    """The detector's ``n`` best boxes whatever their score, so that every segmenter decodes the same work."""

    def __init__(self, detector: GroundingDino, n: int) -> None:
        self.detector, self.n, self.seconds = detector, n, []

    def detect(self, rgb: np.ndarray, text) -> TextDetections:
        start = time.perf_counter()
        found = self.detector.detect(rgb, text)
        self.seconds.append(time.perf_counter() - start)
        top = np.argsort(-found.scores)[: self.n]
        return found.select(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--detector", type=Path, default=None, help="a saved Grounding DINO folder")
    parser.add_argument("--students", nargs="+", default=["tinyvit_5m", "vit_h"])
    parser.add_argument("--text", default="dog. cat.")
    parser.add_argument("--boxes", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = args.detector or random_grounding_dino(tmp)
        detector = FixedCount(GroundingDino(folder, box_threshold=0.0, text_threshold=0.0), args.boxes)
        world = generate(ToyWorldConfig(out=str(tmp / "w"), n_train=0, n_val=args.images, image_size=1024))
        images = [load_image(p) for p in list_images(world / "val")][: args.images]
        rows = []
        for name in args.students:
            torch.manual_seed(0)
            segmenter = GroundedSegmenter(detector, load_model(name), nms_threshold=1.0)
            detector.seconds.clear()
            segmenter.segment(images[0], args.text)  # warm-up
            detector.seconds.clear()
            totals, masks = [], 0
            for rgb in images:
                start = time.perf_counter()
                masks += len(segmenter.segment(rgb, args.text))
                totals.append(time.perf_counter() - start)
            det = statistics.fmean(detector.seconds)
            seg = statistics.fmean(totals) - det
            rows.append((name, det, seg, masks / len(images)))
    print(
        f"Grounded-SAM per image ({len(images)} images at 1024 px, {args.boxes} boxes each, "
        f"{torch.get_num_threads()} threads; detector {'from ' + str(args.detector) if args.detector else 'random'})"
    )
    print("| segmenter | detector s | segmenter s | pipeline s | segmenter share | masks / image |")
    print("|---|---|---|---|---|---|")
    for name, det, seg, masks in rows:
        print(f"| {name} | {det:.2f} | {seg:.2f} | {det + seg:.2f} | {100 * seg / (det + seg):.0f}% | {masks:.1f} |")


if __name__ == "__main__":
    main()
