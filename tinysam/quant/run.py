"""The quantization stage (``python quantize.py``): calibrate, search scales, write the quantized model."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig
from segment_anything.modeling import Sam

from tinysam.data.toyworld import generate
from tinysam.data.transforms import ImageError, list_images, load_image
from tinysam.io import check_writable
from tinysam.quant.artifact import save_quantized
from tinysam.quant.calibrate import calibrate, collect
from tinysam.quant.fake_quant import wrap_model
from tinysam.quant.int8_onnx import export_onnx
from tinysam.quant.quantizers import check_bits
from tinysam.runtime import progress

log = logging.getLogger(__name__)


def calibration_images(folder: str | Path, count: int) -> tuple[list, list[str], Counter]:
    """The first ``count`` readable images of ``folder`` (an image folder or an SA-1B folder)."""
    if count < 1:
        raise ValueError(f"calibration.count={count}: calibrate on at least 1 image (the paper uses 8)")
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


GRANULARITY = {
    "conv": "per output channel",
    "conv_transpose": "per output channel",
    "linear": "per layer",
    "activations": "per layer",
    "requantized_conv_outputs": "per layer",
    "integer_gelu": "x * sigmoid(1.702 x), the sigmoid on k / 255; input and output per layer",
    "attention_matmuls": "per head; post-softmax operand with twin scales",
}


# TinyViT's defaults: the high-resolution conv stage (patch embedding, MBConv blocks, patch merging)
# runs int8 from end to end (convolutions requantized, its GELUs integer); the neck's
# compute-bound convolutions at 64x64 are requantized too.
REQUANTIZE = (
    "image_encoder.patch_embed.seq.[02].c",
    "image_encoder.layers.0.*.conv[123].c",
    "image_encoder.neck.*",
)
INTEGER_GELU = ("image_encoder.patch_embed.seq.1", "image_encoder.layers.0.*.act[123]")


def quantize_model(
    model: Sam,
    images: list[np.ndarray],
    out: str | Path,
    weight_bits: int = 8,
    act_bits: int = 8,
    method: str = "hessian",
    rounds: int = 3,
    candidates: int = 100,
    points_per_side: int = 4,
    requantize: Sequence[str] = REQUANTIZE,
    integer_gelu: Sequence[str] = INTEGER_GELU,
    recipe: dict[str, Any] | None = None,
    show_progress: bool = False,
) -> tuple[dict[str, Any], dict]:
    """Quantize ``model`` in place on calibration ``images`` and write the quantized directory ``out``.

    ``requantize``: name patterns of convolutions whose outputs are quantized too, so that the
    ONNX model runs them int8 to int8; ``integer_gelu``: GELUs run on int8
    (:class:`~tinysam.quant.fake_quant.QuantGELU`). Returns the recipe written (``recipe`` plus bits, method,
    granularity, search report and ONNX files) and the quantized modules by name.
    """
    track = progress if show_progress else (lambda items, _description: items)
    layers = wrap_model(model, weight_bits, act_bits, requantize, integer_gelu)
    samples = collect(model, layers, track(images, "calibrating"), points_per_side=points_per_side)
    search = calibrate(
        layers, samples, method, rounds, candidates, progress=lambda names: track(names, f"scale search ({method})")
    )
    recipe = dict(
        recipe or {},
        weight_bits=weight_bits,
        act_bits=act_bits,
        method=method,
        granularity=GRANULARITY,
        requantize=list(requantize),
        integer_gelu=list(integer_gelu),
        search={"rounds": rounds, "candidates": candidates, "layers": search},
    )
    recipe["onnx"] = export_onnx(model.cpu(), layers, out)
    save_quantized(model, layers, out, recipe)
    return recipe, layers


def run(cfg: DictConfig, model: Sam) -> dict:
    """Quantize ``model`` (``cfg.model`` loaded from ``cfg.checkpoint``) into ``cfg.out``; returns the recipe
    written."""
    weight_bits, act_bits = check_bits(cfg.weight_bits), check_bits(cfg.act_bits)
    check_writable(cfg.out)
    if cfg.calibration.toyworld is not None:
        generate(instantiate(cfg.calibration.toyworld))
    images, names, skipped = calibration_images(cfg.calibration.images, cfg.calibration.count)
    recipe, layers = quantize_model(
        model,
        images,
        cfg.out,
        weight_bits,
        act_bits,
        cfg.method,
        cfg.search.rounds,
        cfg.search.candidates,
        cfg.calibration.points_per_side,
        list(cfg.requantize),
        list(cfg.integer_gelu),
        show_progress=True,
        recipe={
            "source_checkpoint": str(cfg.checkpoint),
            "calibration": {
                "folder": str(cfg.calibration.images),
                "images": names,
                "skipped": dict(skipped),
                "points_per_side": cfg.calibration.points_per_side,
            },
        },
    )
    n = sum(layer.enabled for layer in layers.values())
    print(
        f"W{weight_bits}A{act_bits} ({cfg.method}): {n} of {len(layers)} layers quantized, calibrated on "
        f"{len(images)} images -> {cfg.out}"
    )
    search = recipe["search"]["layers"]
    if search:
        before = sum(r["minmax"] for r in search.values())
        after = sum(r["searched"] for r in search.values())
        print(f"Hessian-guided distance summed over layers: min-max {before:.3e} -> searched {after:.3e}")
    return recipe
