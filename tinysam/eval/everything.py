"""``evaluate.py task=everything``: automatic annotation of a folder (SAM's "fully automatic" data-engine stage): masks of everything.

Per image, ``<stem>.json`` in SA-1B layout (COCO RLE masks) and optionally ``<stem>_overlay.png``;
written atomically, so an interrupted run leaves only whole files. Unreadable images are skipped
and reported. With ``annotations`` (COCO instances of the same files) the masks are scored as
class-agnostic proposals (mask AR) with pycocotools.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from segment_anything.modeling import Sam

from tinysam.data.coco import CocoFormatError, load_coco_instances
from tinysam.data.layouts import readable_images
from tinysam.data.masks import decode_rle, overlay, png_bytes
from tinysam.data.sa1b import sa1b_record, write_sa1b
from tinysam.data.toyworld import ToyWorldConfig, generate
from tinysam.data.transforms import list_images
from tinysam.eval.coco_instances import metrics_table, score_proposals
from tinysam.everything import AdaptiveMaskGenerator, DenseMaskGenerator, HierarchicalMaskGenerator
from tinysam.io import atomic_write_text
from tinysam.models.checkpoint import read_metadata

log = logging.getLogger(__name__)

GENERATORS = {
    "hierarchical": HierarchicalMaskGenerator,
    "dense": DenseMaskGenerator,
    "adaptive": AdaptiveMaskGenerator,
}
SAM_THRESHOLDS = {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}  # SAM's automatic mask generator's


def generator_settings(generator: dict[str, Any], checkpoint: str | Path | None) -> dict[str, Any]:
    """The generator's arguments with each ``None`` filled in: the checkpoint's own value (the ``everything``
    entry of its JSON sidecar: a model whose predicted IoUs run lower than SAM's names its thresholds there),
    else SAM's default."""
    own = read_metadata(checkpoint).get("everything", {}) if checkpoint and Path(checkpoint).is_file() else {}
    return {key: own.get(key, SAM_THRESHOLDS.get(key)) if value is None else value for key, value in generator.items()}


def annotate(
    model: Sam,
    output_dir: str | Path,
    images: str,
    out: str,
    mode: str = "hierarchical",
    overlays: bool = False,
    annotations: str | None = None,
    toyworld: ToyWorldConfig | None = None,
    generator: dict[str, Any] | None = None,
    checkpoint: str | Path | None = None,
) -> dict:
    """Masks of everything in every image of ``images``, written to ``out``; returns a report.

    ``mode`` is ``hierarchical`` (TinySAM), ``dense`` (SAM's grid) or ``adaptive``; ``generator`` holds the
    generator's keyword arguments (a ``None`` threshold: see :func:`generator_settings`, with ``checkpoint``
    the model's weights); ``toyworld`` generates the toy world first (the default data).
    """
    if mode not in GENERATORS:
        raise ValueError(f"everything: mode must be one of {sorted(GENERATORS)}, got {mode!r}")
    if toyworld is not None:
        generate(toyworld)
    files = list_images(images)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = generator_settings(dict(generator or {}), checkpoint)
    gen = GENERATORS[mode](model, **dict(settings, output_mode="coco_rle"))
    thresholds = {key: settings.get(key, value) for key, value in SAM_THRESHOLDS.items()}
    log.info("%s: %s", mode, ", ".join(f"{key} {value}" for key, value in thresholds.items()))
    coco = load_coco_instances(annotations)[0] if annotations else None
    ids_by_name = {img["file_name"]: img_id for img_id, img in coco.imgs.items()} if coco else {}
    if coco is not None:
        covered = sum(path.name in ids_by_name for path in files)
        if files and not covered:
            raise CocoFormatError(
                f"annotations={annotations} names none of the {len(files)} images in {images}; pass "
                "annotations=null to annotate without scoring, or the instances file of these images"
            )
        if covered < len(files):
            log.warning("annotations=%s cover %d of %d images: only those are scored", annotations, covered, len(files))
    skipped: Counter = Counter()
    prompts: Counter = Counter()
    results, scored_ids, n_masks = [], [], 0
    for index, path, rgb in readable_images(files, f"segmenting everything ({mode})", skipped):
        masks = gen.generate(rgb)
        prompts.update({f"round_{i + 1}": n for i, n in enumerate(gen.prompts_per_stage)})
        n_masks += len(masks)
        image_id = ids_by_name.get(path.name, index)
        picture = png_bytes(overlay(rgb, [decode_rle(m["segmentation"]) for m in masks])) if overlays else None
        auto = [dict(m, source="auto") for m in masks]  # the annotator's folder format: made by a generator
        write_sa1b(out_dir, sa1b_record(path.name, image_id, rgb.shape[:2], auto), overlay_png=picture)
        if path.name in ids_by_name:
            scored_ids.append(image_id)
            results += [
                {"image_id": image_id, "category_id": 1, "segmentation": m["segmentation"], "score": m["predicted_iou"]}
                for m in masks
            ]
    report: dict[str, Any] = {
        "mode": mode,
        "thresholds": thresholds,
        "images": len(files) - sum(skipped.values()),
        "masks": n_masks,
        "prompts": dict(prompts),
        "skipped": dict(skipped),
        "out": str(out_dir),
    }
    print(
        f"{mode}: {report['masks']} masks on {report['images']} images -> {out_dir}"
        + (f"; skipped {dict(skipped)}" if skipped else "")
    )
    if coco is not None:
        if not scored_ids:
            log.warning("none of the images is listed in %s: nothing to score", annotations)
        report["proposals"] = score_proposals(coco, results, scored_ids)
        report["scored_images"] = len(scored_ids)
        print(f"class-agnostic mask AR (%) on {len(scored_ids)} annotated images")
        print(metrics_table(report["proposals"]))
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(output_dir) / "metrics.json", json.dumps(report, indent=2))
    print(f"wrote {report['images']} SA-1B JSONs to {out_dir} and the report to {Path(output_dir) / 'metrics.json'}")
    return report
