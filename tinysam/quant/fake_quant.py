"""Fake-quantized layers: float kernels on quantized values, to measure a quantized model's accuracy.

:func:`wrap_model` replaces every ``Linear``, ``Conv2d`` and ``ConvTranspose2d`` of a SAM-family
model (image encoder, prompt encoder, mask decoder), after folding BatchNorms into their
convolutions, by a :class:`QuantLayer`: weights per output
channel for convolutions and transposed convolutions, per layer for linear layers; the input
activation per layer; every attention gets per-head quantized matmuls (:mod:`tinysam.quant.attention`).
Convolutions named by ``requantize`` also quantize their output (per layer), as the integer ONNX
model runs them: int8 in, int8 out (``QLinearConv``). GELUs named by ``integer_gelu`` become
:class:`QuantGELU`, a GELU on int8 values that the integer model runs without leaving uint8.
A disabled module computes in float (calibration passes).
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinysam.quant.attention import QuantMatMul, quantize_attention
from tinysam.quant.quantizers import absmax_scale, check_bits, fake_quant

QUANTIZABLE = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
SIGMOID_ALPHA = 1.702  # GELU(x) ~ x * sigmoid(1.702 x) (Hendrycks & Gimpel 2016)
SIGMOID_LEVELS = 255  # the sigmoid's uint8 grid: k / 255, k = 0..255


def weight_axis(layer: nn.Module) -> int | None:
    """The output-channel axis of a layer's weight that gets its own scale (``None``: one scale)."""
    if isinstance(layer, nn.ConvTranspose2d):
        return 1
    if isinstance(layer, nn.Conv2d):
        return 0
    return None


class QuantLayer(nn.Module):
    """A Linear / Conv2d / ConvTranspose2d with fake-quantized weight and input (and output, if ``requantize``)."""

    def __init__(self, layer: nn.Module, weight_bits: int = 8, act_bits: int = 8, requantize: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.weight_bits, self.act_bits = check_bits(weight_bits), check_bits(act_bits)
        self.register_buffer("weight_scale", self.minmax_weight_scale())
        self.register_buffer("act_scale", torch.ones(()))
        self.requantize = requantize
        if requantize:
            self.register_buffer("out_scale", torch.ones(()))
        self.enabled = False

    def compute(self, x: Tensor, weight: Tensor) -> Tensor:
        """The wrapped layer's operation with the given input and weight."""
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, layer.bias)
        if isinstance(layer, nn.ConvTranspose2d):
            return F.conv_transpose2d(
                x, weight, layer.bias, layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation
            )
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    def minmax_weight_scale(self) -> Tensor:
        """max|W| / (2^(b-1) - 1) per output channel (convolutions) or for the whole weight (linear)."""
        axis = weight_axis(self.layer)
        return absmax_scale(self.layer.weight.detach(), self.weight_bits, () if axis is None else (axis,))

    def quantized_weight(self) -> Tensor:
        return fake_quant(self.layer.weight, self.weight_scale, self.weight_bits)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self.layer(x)
        out = self.compute(fake_quant(x, self.act_scale, self.act_bits), self.quantized_weight())
        return fake_quant(out, self.out_scale, self.act_bits) if self.requantize else out


class QuantGELU(nn.Module):
    """A GELU on int8 values: q_out(x * q(sigmoid(1.702 x))) for x = q_in(input), the sigmoid on k / 255.

    Input and output are on per-layer grids (``in_scale``, ``out_scale``). On int8 input the
    sigmoid is a 256-entry lookup table, so the integer model runs this GELU as onnxruntime's
    ``QLinearSigmoid`` + ``QLinearMul`` without leaving uint8; between requantized convolutions
    on the same grids, a whole MBConv block runs in uint8. Disabled, it is the exact GELU.
    """

    def __init__(self, act_bits: int = 8) -> None:
        super().__init__()
        self.act_bits = check_bits(act_bits)
        self.register_buffer("in_scale", torch.ones(()))
        self.register_buffer("out_scale", torch.ones(()))
        self.enabled = False

    @staticmethod
    def compute(x: Tensor) -> Tensor:
        """x * sigmoid(1.702 x) with the sigmoid rounded to k / 255 (x already quantized)."""
        return x * torch.round(torch.sigmoid(SIGMOID_ALPHA * x) * SIGMOID_LEVELS) / SIGMOID_LEVELS

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return F.gelu(x)
        return fake_quant(self.compute(fake_quant(x, self.in_scale, self.act_bits)), self.out_scale, self.act_bits)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d into the Conv2d before it (TinyViT's ``c`` + ``bn`` pairs), in place.

    Quantization applies to the folded weights, as deployment (and ONNX export) runs them.
    Returns the number of folded pairs.
    """
    folded = 0
    for module in model.modules():
        conv, bn = getattr(module, "c", None), getattr(module, "bn", None)
        if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
            continue
        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            bias=True,
        ).to(conv.weight)
        fused.weight.copy_(conv.weight * factor.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * factor + bn.bias)
        module.c, module.bn = fused, nn.Identity()
        folded += 1
    return folded


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def wrap_model(
    model: nn.Module,
    weight_bits: int = 8,
    act_bits: int = 8,
    requantize: Sequence[str] = (),
    integer_gelu: Sequence[str] = (),
) -> dict[str, QuantLayer | QuantMatMul | QuantGELU]:
    """Fold BatchNorms, replace every quantizable layer and give every attention quantized matmuls, in place.

    ``requantize``: name patterns (fnmatch) of convolutions whose output is quantized too;
    ``integer_gelu``: name patterns of GELU modules to replace by :class:`QuantGELU`.
    Returns the quantized modules (layers, attention matmuls, integer GELUs) by qualified name.
    """
    fold_batchnorm(model)
    wrapped: dict[str, QuantLayer | QuantMatMul | QuantGELU] = dict(quantize_attention(model, act_bits))
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, QUANTIZABLE):
                requant = _matches(full, requantize)
                if requant and type(child) is not nn.Conv2d:
                    raise ValueError(
                        f"requantize: {full} is a {type(child).__name__}; only Conv2d outputs are requantized"
                    )
                wrapped[full] = QuantLayer(child, weight_bits, act_bits, requant)
            elif _matches(full, integer_gelu):
                if type(child) is not nn.GELU or child.approximate != "none":
                    raise ValueError(f"integer_gelu: {full} is {child!r}, not an exact nn.GELU")
                wrapped[full] = QuantGELU(act_bits)
            else:
                continue
            setattr(module, child_name, wrapped[full])
    for key, patterns, kind, what, example in (
        ("requantize", requantize, QuantLayer, "quantizable layer", "image_encoder.neck.0"),
        ("integer_gelu", integer_gelu, QuantGELU, "GELU", "image_encoder.layers.0.blocks.0.act1"),
    ):
        names = [n for n, m in wrapped.items() if isinstance(m, kind)]
        unmatched = [p for p in patterns if not any(fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise ValueError(
                f"{key}: no {what} matches {unmatched}; patterns match names like {example} "
                f"(set {key}=[...] for this architecture)"
            )
    return wrapped


def float_copy(model: nn.Module) -> nn.Module:
    """A copy of a wrapped model with every :class:`QuantLayer` replaced by the float layer it wraps and every
    :class:`QuantGELU` by ``nn.GELU``: the float model whose graphs an integer rewrite starts from (attention
    matmuls stay as they are; switch them off first)."""
    copy = deepcopy(model)
    for module in list(copy.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, QuantLayer):
                setattr(module, child_name, child.layer)
            elif isinstance(child, QuantGELU):
                setattr(module, child_name, nn.GELU())
    return copy


def set_enabled(layers: dict[str, QuantLayer | QuantMatMul | QuantGELU], enabled: bool) -> None:
    """Switch fake quantization on (quantized model) or off (float model) for every layer."""
    for layer in layers.values():
        layer.enabled = enabled
