"""The quantized model directory: integer weights + scales as safetensors, the recipe as JSON.

    <dir>/model.safetensors    int8 weights (``<layer>.weight_q``) with their scales, float rest
    <dir>/quantization.json    architecture, bits, method, calibration, per-layer search report

Loading needs no pickle: the architecture is rebuilt from the registry, wrapped with the same
quantized layers, and the weights are dequantized onto the scales' grids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from segment_anything.modeling import Sam

from tinysam.io import atomic_write, atomic_write_text
from tinysam.models.checkpoint import CheckpointError
from tinysam.models.registry import architecture_builders
from tinysam.quant.fake_quant import QuantLayer, wrap_model
from tinysam.quant.quantizers import quantize

WEIGHTS, RECIPE = "model.safetensors", "quantization.json"


def save_quantized(model: Sam, layers: dict[str, QuantLayer], out: str | Path, recipe: dict[str, Any]) -> Path:
    """Write the enabled layers' weights as integers (int8 storage for any bit width <= 8) plus the rest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    quantized = sorted(name for name, layer in layers.items() if layer.enabled)
    for name in quantized:
        layer = layers[name]
        if not isinstance(layer, QuantLayer):
            continue  # attention matmuls: their scales are buffers in the state dict
        state.pop(f"{name}.layer.weight")
        state[f"{name}.weight_q"] = quantize(layer.layer.weight, layer.weight_scale, layer.weight_bits).to(torch.int8)
    info = dict(recipe, format="tinysam-quantized", arch=model.arch, quantized_layers=quantized)
    atomic_write(out / WEIGHTS, lambda tmp: save_file(state, tmp))
    atomic_write_text(out / RECIPE, json.dumps(info, indent=2))
    return out


def is_quantized_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / RECIPE).is_file()


def load_quantized(path: str | Path) -> tuple[Sam, dict[str, Any]]:
    """The fake-quantized model of a directory written by :func:`save_quantized`, and its recipe."""
    path = Path(path)
    if not is_quantized_dir(path):
        raise CheckpointError(f"{path} is not a quantized model directory (no {RECIPE}); run python quantize.py")
    try:
        info = json.loads((path / RECIPE).read_text())
        builder = architecture_builders()[info["arch"]]
        bits_w, bits_a = info["weight_bits"], info["act_bits"]
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(
            f"{path / RECIPE}: unreadable or missing field ({err}); re-run python quantize.py"
        ) from None
    model = builder()
    layers = wrap_model(model, bits_w, bits_a, info.get("requantize", ()), info.get("integer_gelu", ()))
    if not (path / WEIGHTS).is_file():
        raise CheckpointError(f"quantized model folder {path} lacks {WEIGHTS}; re-run python quantize.py into it")
    try:
        state = load_file(path / WEIGHTS)
    except Exception as err:  # any failure of the reader: a truncated or foreign file
        raise CheckpointError(
            f"{path / WEIGHTS} is truncated or not safetensors ({err}); re-run python quantize.py"
        ) from None
    for name in info["quantized_layers"]:
        if f"{name}.weight_q" in state:
            levels = state.pop(f"{name}.weight_q")
            state[f"{name}.layer.weight"] = levels.float() * state[f"{name}.weight_scale"]
        layers[name].enabled = True
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False), info
