"""Calibration: run the float model on a few images, record each layer's inputs, outputs and dL/dO,
then set every layer's scales (Hessian-guided search or min-max).

The loss whose gradient weighs the output errors is the binary cross-entropy of the mask logits
against the float model's own masks, for a grid of single-point prompts per image. (The KL of
the float and quantized outputs has a zero gradient at the float model; its hard-label form,
as PTQ4ViT computes it, is this one.)
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor, nn

from tinysam.data.masks import grid_points
from tinysam.data.transforms import model_input
from tinysam.quant.attention import QuantMatMul
from tinysam.quant.fake_quant import QuantGELU, QuantLayer, set_enabled, weight_axis
from tinysam.quant.scale_search import (
    LayerSamples,
    MatMulSamples,
    minmax_gelu,
    minmax_layer,
    minmax_matmul,
    search_gelu,
    search_layer,
    search_matmul,
)


def decode_points(model: Sam, embedding: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    """Low-res logits and IoUs of every output (single-mask and multimask) for single positive points."""
    labels = torch.ones(len(points), 1, dtype=torch.int, device=points.device)
    sparse, dense = model.prompt_encoder(points=(points[:, None], labels), boxes=None, masks=None)
    return model.mask_decoder.predict_masks(
        image_embeddings=embedding,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
    )


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _sampler(module: nn.Module, output: Tensor, limits: dict[str, int], generator: torch.Generator) -> Callable:
    """What a module keeps of a call's tensors (shaped like ``output``): at most ``limits`` random
    values (integer GELU), rows (linear layer), batch entries (attention matmul) or whole maps of
    a batch (convolution: one per prompt in the decoder)."""
    if isinstance(module, QuantGELU):
        size, count, view = output.numel(), limits["values"], torch.flatten
    elif isinstance(module, QuantMatMul):
        size, count, view = len(output), limits["matrices"], nn.Identity()
    elif weight_axis(module.layer) is None:
        size, count, view = output[..., 0].numel(), limits["rows"], _rows
    else:
        size, count, view = len(output), limits["maps"], nn.Identity()
    if size <= count:
        return view
    index = torch.randint(size, (count,), generator=generator).to(output.device)
    return lambda t: view(t)[index]


def _subsample(tensors: list[Tensor], count: int, generator: torch.Generator) -> list[Tensor]:
    """The same ``count`` random entries of the first axis of each tensor (all of them if fewer)."""
    if len(tensors[0]) <= count:
        return tensors
    keep = torch.randperm(len(tensors[0]), generator=generator)[:count]
    return [t[keep] for t in tensors]


def collect(
    model: Sam,
    layers: dict[str, QuantLayer | QuantMatMul | QuantGELU],
    images: Iterable[np.ndarray],
    points_per_side: int = 4,
    max_rows: int = 4096,
    max_matrices: int = 64,
    max_values: int = 2**20,
    max_maps: int = 4,
    seed: int = 0,
) -> dict[str, LayerSamples | MatMulSamples]:
    """Inputs, float outputs and dL/dO of every quantized module over ``images``, in the order they run.

    Linear layers keep ``max_rows`` sampled rows, attention matmuls ``max_matrices`` sampled
    (window or prompt) entries of their batch axis, integer GELUs ``max_values`` sampled values,
    convolutions ``max_maps`` maps per call (the encoder's one; 4 of the decoder's per-prompt
    maps), sampled as they are recorded so that memory stays bounded. The encoder's
    convolutions keep every map whole: at 1024 px (``tinyvit_5m``) about 2.4 GB of samples per image.
    A module whose input is the output of a module that quantizes its output (a requantized
    convolution, an integer GELU) records that module as its ``source``.
    """
    set_enabled(layers, False)
    records: dict[str, dict[str, list[Tensor]]] = defaultdict(lambda: defaultdict(list))
    grads: dict[str, list[tuple[int, Tensor]]] = defaultdict(list)
    emitted: dict[str, weakref.ref] = {}  # the last output of each module that quantizes its output
    sources: dict[str, str] = {}
    generator = torch.Generator().manual_seed(seed)
    limits = {"values": max_values, "rows": max_rows, "matrices": max_matrices, "maps": max_maps}
    handles = []

    def hook(name: str) -> Callable:
        def record(module, inputs, output):
            call = len(records[name]["inputs"])
            sources.update((name, source) for source, t in emitted.items() if t() is inputs[0])
            if isinstance(module, QuantGELU) or getattr(module, "requantize", False):
                emitted[name] = weakref.ref(output)
            pick = _sampler(module, output, limits, generator)
            records[name]["inputs"].append(pick(inputs[0].detach()))
            if len(inputs) > 1:  # an attention matmul's right operand
                records[name]["second"].append(pick(inputs[1].detach()))
            records[name]["outputs"].append(pick(output.detach()))
            if output.requires_grad:
                output.register_hook(lambda grad: grads[name].append((call, pick(grad.detach()))))

        return record

    for name, layer in layers.items():
        handles.append(layer.register_forward_hook(hook(name)))
    size = model.image_encoder.img_size
    try:
        for rgb in images:
            x = model_input(model, rgb)[None].to(model.device)
            x.requires_grad_(True)  # so that every activation carries a gradient
            embedding = model.image_encoder(x)
            points = ResizeLongestSide(size).apply_coords(grid_points(points_per_side, rgb.shape[:2]), rgb.shape[:2])
            logits, _ = decode_points(model, embedding, torch.as_tensor(points, dtype=torch.float, device=x.device))
            F.binary_cross_entropy_with_logits(logits, (logits.detach() > 0).float()).backward()
    finally:
        for h in handles:
            h.remove()
    samples = {}
    for name, rec in records.items():  # layers these prompts never reach (the mask-prompt convolutions) stay float
        layer = layers[name]
        by_call = dict(grads[name])  # outputs the loss does not depend on (the IoU head) weigh errors evenly
        rec["grads"] = [by_call.get(i, torch.ones_like(out)) for i, out in enumerate(rec["outputs"])]
        if isinstance(layer, QuantMatMul):
            a, b, outputs, grads_ = _subsample(
                [torch.cat(rec[k]) for k in ("inputs", "second", "outputs", "grads")], max_matrices, generator
            )
            samples[name] = MatMulSamples(a, b, outputs, grads_)
            continue
        tensors = [torch.cat(rec[k]) for k in ("inputs", "outputs", "grads")]
        if isinstance(layer, QuantGELU):
            tensors = _subsample(tensors, max_values, generator)
        elif weight_axis(layer.layer) is None:
            tensors = _subsample(tensors, max_rows, generator)
        inputs, outputs, grads_ = tensors
        samples[name] = LayerSamples(inputs, outputs, grads_, sources.get(name))
    return samples


def calibrate(
    layers: dict[str, QuantLayer | QuantMatMul | QuantGELU],
    samples: dict[str, LayerSamples | MatMulSamples],
    method: str = "hessian",
    rounds: int = 3,
    candidates: int = 100,
    progress: Callable[[Iterable], Iterable] = iter,
) -> dict[str, dict[str, float]]:
    """Set the scales of every module seen in calibration, in the order they run, and switch them on.

    A module with a ``source`` keeps its source's output scale as its input scale. Returns
    per-module distances (``hessian``).
    """
    if method not in ("hessian", "minmax"):
        raise ValueError(f"unknown calibration method {method!r}; choose hessian or minmax")
    report = {}
    for name in progress(list(samples)):
        module, sample = layers[name], samples[name]
        if isinstance(module, QuantMatMul):
            if method == "hessian":
                report[name] = search_matmul(module, sample, rounds, candidates)
            else:
                minmax_matmul(module, sample)
            continue
        grid = layers[sample.source].out_scale.clone() if sample.source else None
        if isinstance(module, QuantGELU) and method == "hessian":
            report[name] = search_gelu(module, sample, candidates, grid)
        elif isinstance(module, QuantGELU):
            minmax_gelu(module, sample, grid)
        elif method == "hessian":
            report[name] = search_layer(module, sample, rounds, candidates, grid)
        else:
            minmax_layer(module, sample, grid)
    set_enabled({n: layers[n] for n in samples}, True)
    return report
