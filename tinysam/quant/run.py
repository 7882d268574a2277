"""The quantization stage (``python quantize.py``): calibrate, search scales, write the quantized model."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from tinysam.data.toyworld import generate
from tinysam.data.transforms import ImageError, list_images, load_image, model_input
from tinysam.eval.data import progress, resolve_device
from tinysam.models.build import load_model
from tinysam.quant.artifact import save_quantized
from tinysam.quant.calibrate import calibrate, collect
from tinysam.quant.export import export_onnx
from tinysam.quant.fake_quant import wrap_model
from tinysam.quant.quantizers import check_bits

log = logging.getLogger(__name__)


def calibration_images(folder: str | Path, count: int) -> tuple[list, list[str], Counter]:
    """The first ``count`` readable images of ``folder`` (an image folder or an SA-1B folder)."""
    files = list_images(folder)
    if not files:
        raise FileNotFoundError(f"calibration folder {folder} holds no .jpg/.png images; pass calibration.images=DIR")
    images, names, skipped = [], [], Counter()
    for path in files:
        if len(images) == count:
            break
        try:
            images.append(load_image(path))
            names.append(path.name)
        except ImageError as err:
            log.warning("calibration: skipping %s", err)
            skipped["unreadable image"] += 1
    if not images:
        raise ImageError(f"calibration folder {folder}: none of its {len(files)} images is readable")
    return images, names, skipped


def run(cfg: DictConfig) -> dict:
    """Quantize ``cfg.model`` from ``cfg.checkpoint`` and write ``cfg.out``; returns the recipe written."""
    weight_bits, act_bits = check_bits(cfg.weight_bits), check_bits(cfg.act_bits)
    if cfg.calibration.toyworld is not None:
        generate(instantiate(cfg.calibration.toyworld))
    images, names, skipped = calibration_images(cfg.calibration.images, cfg.calibration.count)
    model = load_model(cfg.model, cfg.checkpoint, resolve_device(cfg.device))
    layers = wrap_model(model, weight_bits, act_bits)
    samples = collect(model, layers, progress(images, "calibrating"), points_per_side=cfg.calibration.points_per_side)
    search = calibrate(
        layers,
        samples,
        cfg.method,
        cfg.search.rounds,
        cfg.search.candidates,
        progress=lambda names_: progress(names_, f"scale search ({cfg.method})"),
    )
    recipe = {
        "weight_bits": weight_bits,
        "act_bits": act_bits,
        "method": cfg.method,
        "granularity": {
            "conv": "per output channel",
            "conv_transpose": "per output channel",
            "linear": "per layer",
            "activations": "per layer",
        },
        "source_checkpoint": str(cfg.checkpoint),
        "calibration": {
            "folder": str(cfg.calibration.images),
            "images": names,
            "skipped": dict(skipped),
            "points_per_side": cfg.calibration.points_per_side,
        },
        "search": {"rounds": cfg.search.rounds, "candidates": cfg.search.candidates, "layers": search},
    }
    recipe["onnx"] = export_onnx(model.cpu(), layers, cfg.out, [model_input(model, im) for im in images])
    out = save_quantized(model, layers, cfg.out, recipe)
    n = sum(layer.enabled for layer in layers.values())
    print(
        f"W{weight_bits}A{act_bits} ({cfg.method}): {n} of {len(layers)} layers quantized, calibrated on "
        f"{len(images)} images -> {out}"
    )
    if search:
        before = sum(r["minmax"] for r in search.values())
        after = sum(r["searched"] for r in search.values())
        print(f"Hessian-guided distance summed over layers: min-max {before:.3e} -> searched {after:.3e}")
    return recipe
