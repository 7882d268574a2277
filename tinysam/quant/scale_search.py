"""Hessian-guided scale search (TinySAM section 3.2 after PTQ4ViT) and the min-max baseline.

For each quantized layer O = A * W, the weight scales and the activation scale are searched in
turn (``rounds`` times), each over ``candidates`` values linearly spaced in
[0.01, 1.2] x max|X| / 2^(b-1), keeping the one that minimises the Hessian-guided distance
E[(dL/dO * (O - O_q))^2]. Weight scales are searched per output channel where the layer has
one scale per channel (each channel's output depends on its own scale only). A requantized layer's
output scale is searched last, over the same kind of grid, on the quantized layer's output; an
integer GELU's input scale, then its output scale, the same way. A module whose input is another
module's quantized output keeps that grid as its input scale (``input_scale``), so that the
integer model passes uint8 from one to the other. dL/dO comes once from the float model on the
calibration set (:mod:`tinysam.quant.calibrate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tinysam.quant.attention import QuantMatMul
from tinysam.quant.fake_quant import QuantGELU, QuantLayer, weight_axis
from tinysam.quant.quantizers import absmax_scale, fake_quant, qmax, scale_shape


@dataclass
class LayerSamples:
    """What one layer saw on the calibration set: its inputs, float outputs and dL/dO at them.

    ``source``: the quantized module whose quantized output is this layer's input, if any.
    """

    inputs: Tensor
    outputs: Tensor
    grads: Tensor
    source: str | None = None


def candidate_scales(peak: Tensor, bits: int, n: int) -> Tensor:
    """(n, *peak.shape) scales linearly spaced in [0.01, 1.2] x peak / 2^(b-1)."""
    factors = torch.linspace(0.01, 1.2, n, dtype=peak.dtype, device=peak.device)
    return factors.view(-1, *[1] * peak.dim()) * peak / 2 ** (bits - 1)


def output_channel_axis(layer: QuantLayer, samples: LayerSamples) -> int:
    """Axis of the output that matches the weight's scale axis (channels of conv outputs)."""
    return 1 if weight_axis(layer.layer) is not None else samples.outputs.dim() - 1


def quantized_output(layer: QuantLayer, samples: LayerSamples, weight_scale: Tensor, act_scale: Tensor) -> Tensor:
    """The layer's output on the calibration inputs with quantized input and weight (output not requantized)."""
    return layer.compute(
        fake_quant(samples.inputs, act_scale, layer.act_bits),
        fake_quant(layer.layer.weight, weight_scale, layer.weight_bits),
    )


def hessian_distance(layer: QuantLayer, samples: LayerSamples, weight_scale: Tensor, act_scale: Tensor) -> Tensor:
    """E[(dL/dO * (O - O_q))^2] per weight-scale group (one value for a per-layer weight scale)."""
    quantized = quantized_output(layer, samples, weight_scale, act_scale)
    error = (samples.grads * (samples.outputs - quantized)).square()
    if weight_scale.numel() == 1:
        return error.mean().reshape(1)
    axis = output_channel_axis(layer, samples)
    return error.movedim(axis, 0).reshape(error.shape[axis], -1).mean(1)


@torch.no_grad()
def search_layer(
    layer: QuantLayer,
    samples: LayerSamples,
    rounds: int = 3,
    candidates: int = 100,
    input_scale: Tensor | None = None,
) -> dict[str, float]:
    """Set ``layer``'s scales by the alternating Hessian-guided grid search, starting from min-max.

    ``input_scale`` fixes the activation scale (the grid its input already is on).
    Returns the layer's distance with the min-max scales and with the searched ones.
    """
    minmax_layer(layer, samples, input_scale)
    requantized_start = None
    if layer.requantize:
        minmax_output = quantized_output(layer, samples, layer.weight_scale, layer.act_scale)
        requantized_start = output_distance(layer.act_bits, samples, minmax_output, layer.out_scale).item()
    weight = layer.layer.weight
    shape = scale_shape(weight, weight_axis(layer.layer))
    weight_scale, act_scale = layer.weight_scale.clone(), layer.act_scale.clone()
    w_grid = candidate_scales(weight_scale * qmax(layer.weight_bits), layer.weight_bits, candidates)
    a_grid = candidate_scales(act_scale * qmax(layer.act_bits), layer.act_bits, candidates)
    if input_scale is not None:
        a_grid = a_grid[:0]
    best = hessian_distance(layer, samples, weight_scale, act_scale)
    start = best.sum().item()
    for _ in range(rounds):
        for scale in w_grid:  # per group: each output channel keeps its own best
            d = hessian_distance(layer, samples, scale, act_scale)
            weight_scale = torch.where((d < best).reshape(shape), scale, weight_scale)
            best = torch.minimum(best, d)
        for scale in a_grid:
            d = hessian_distance(layer, samples, weight_scale, scale)
            if d.sum() < best.sum():
                best, act_scale = d, scale
    layer.weight_scale.copy_(weight_scale)
    layer.act_scale.copy_(act_scale)
    if layer.requantize:
        quantized = quantized_output(layer, samples, weight_scale, act_scale)
        return {"minmax": requantized_start, "searched": search_output_scale(layer, samples, quantized, candidates)}
    return {"minmax": start, "searched": best.sum().item()}


def weighted_error(samples: LayerSamples, approx: Tensor) -> Tensor:
    """E[(dL/dO * (O - approx))^2] over the calibration samples."""
    return (samples.grads * (samples.outputs - approx)).square().mean()


def output_distance(bits: int, samples: LayerSamples, quantized: Tensor, out_scale: Tensor) -> Tensor:
    """E[(dL/dO * (O - O_q))^2] when the layer's ``quantized`` output is requantized with ``out_scale``."""
    return weighted_error(samples, fake_quant(quantized, out_scale, bits))


@torch.no_grad()
def search_output_scale(
    module: QuantLayer | QuantGELU, samples: LayerSamples, quantized: Tensor, candidates: int = 100
) -> float:
    """Grid search of ``module.out_scale`` for its ``quantized`` output (input side already set); its distance."""
    bits = module.act_bits
    best = output_distance(bits, samples, quantized, module.out_scale)
    out_scale = module.out_scale.clone()
    for scale in candidate_scales(out_scale * qmax(bits), bits, candidates):
        d = output_distance(bits, samples, quantized, scale)
        if d < best:
            best, out_scale = d, scale
    module.out_scale.copy_(out_scale)
    return best.item()


@torch.no_grad()
def minmax_layer(layer: QuantLayer, samples: LayerSamples, input_scale: Tensor | None = None) -> None:
    """The baseline: scales from the largest absolute weight (per group) and input seen in calibration."""
    layer.weight_scale.copy_(layer.minmax_weight_scale())
    act_scale = absmax_scale(samples.inputs, layer.act_bits) if input_scale is None else input_scale
    layer.act_scale.copy_(act_scale.reshape(()))
    if layer.requantize:
        layer.out_scale.copy_(absmax_scale(samples.outputs, layer.act_bits).reshape(()))


@torch.no_grad()
def minmax_gelu(gelu: QuantGELU, samples: LayerSamples, input_scale: Tensor | None = None) -> None:
    """Input and output scales of an integer GELU from the largest values seen (or the given input grid)."""
    in_scale = absmax_scale(samples.inputs, gelu.act_bits) if input_scale is None else input_scale
    gelu.in_scale.copy_(in_scale.reshape(()))
    gelu.out_scale.copy_(absmax_scale(samples.outputs, gelu.act_bits).reshape(()))


def gelu_output(gelu: QuantGELU, samples: LayerSamples, in_scale: Tensor) -> Tensor:
    """The integer GELU's output on the calibration inputs quantized with ``in_scale`` (output not requantized)."""
    return gelu.compute(fake_quant(samples.inputs, in_scale, gelu.act_bits))


@torch.no_grad()
def search_gelu(
    gelu: QuantGELU, samples: LayerSamples, candidates: int = 100, input_scale: Tensor | None = None
) -> dict[str, float]:
    """Hessian-guided grid search of an integer GELU's input scale (unless given), then of its output scale."""
    minmax_gelu(gelu, samples, input_scale)
    quantized = gelu_output(gelu, samples, gelu.in_scale)
    start = output_distance(gelu.act_bits, samples, quantized, gelu.out_scale).item()
    if input_scale is None:
        best = weighted_error(samples, quantized)
        for scale in candidate_scales(gelu.in_scale * qmax(gelu.act_bits), gelu.act_bits, candidates):
            output = gelu_output(gelu, samples, scale)
            if (d := weighted_error(samples, output)) < best:
                best, quantized = d, output
                gelu.in_scale.copy_(scale)
    return {"minmax": start, "searched": search_output_scale(gelu, samples, quantized, candidates)}


@dataclass
class MatMulSamples:
    """What one attention matmul saw: both operands, the float product and dL/dO at it."""

    a: Tensor
    b: Tensor
    outputs: Tensor
    grads: Tensor


def matmul_distance(mm: QuantMatMul, samples: MatMulSamples, a_scale: Tensor, b_scale: Tensor) -> Tensor:
    """E[(dL/dO * (O - O_q))^2] per head; ``a_scale`` is the small twin scale for a post-softmax operand."""
    error = (samples.grads * (samples.outputs - mm.compute(samples.a, samples.b, a_scale, b_scale))).square()
    return error.transpose(0, 1).reshape(error.shape[1], -1).mean(1)


@torch.no_grad()
def minmax_matmul(mm: QuantMatMul, samples: MatMulSamples) -> None:
    """Per-head scales from the largest values; a post-softmax operand keeps one range ([0, 1], b-1 bits)."""
    mm.b_scale.copy_(absmax_scale(samples.b, mm.bits, (1,)))
    if mm.softmax_input:
        mm.a_small.copy_(mm.a_scale)
    else:
        mm.a_scale.copy_(absmax_scale(samples.a, mm.bits, (1,)))


@torch.no_grad()
def search_matmul(mm: QuantMatMul, samples: MatMulSamples, rounds: int = 3, candidates: int = 100) -> dict[str, float]:
    """Per-head alternating Hessian-guided search of both operands' scales, starting from min-max.

    For a post-softmax operand the small twin scale is searched in [0.01, 1] x the fixed large one.
    """
    minmax_matmul(mm, samples)
    a_scale = (mm.a_small if mm.softmax_input else mm.a_scale).clone()
    b_scale = mm.b_scale.clone()
    if mm.softmax_input:
        a_grid = torch.linspace(0.01, 1.0, candidates).view(-1, 1, 1, 1, 1) * mm.a_scale
    else:
        a_grid = candidate_scales(a_scale * qmax(mm.bits), mm.bits, candidates)
    b_grid = candidate_scales(b_scale * qmax(mm.bits), mm.bits, candidates)
    best = matmul_distance(mm, samples, a_scale, b_scale)
    start = best.sum().item()
    heads = (1, -1, 1, 1)
    for _ in range(rounds):
        for scale in b_grid:
            d = matmul_distance(mm, samples, a_scale, scale)
            b_scale = torch.where((d < best).view(heads), scale, b_scale)
            best = torch.minimum(best, d)
        for scale in a_grid:
            d = matmul_distance(mm, samples, scale, b_scale)
            a_scale = torch.where((d < best).view(heads), scale, a_scale)
            best = torch.minimum(best, d)
    (mm.a_small if mm.softmax_input else mm.a_scale).copy_(a_scale)
    mm.b_scale.copy_(b_scale)
    return {"minmax": start, "searched": best.sum().item()}
