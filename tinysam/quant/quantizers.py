"""Symmetric uniform quantizers: x_q = clip(round(x / s), -2^(b-1), 2^(b-1) - 1), at several granularities.

A scale tensor broadcasts against the tensor it quantizes: one element (per layer), one per
output channel, or one per attention head. :class:`TwinScale` gives post-softmax and
post-GELU activations two scales, one for the small-value bulk and one for the rest (PTQ4ViT's
twin uniform quantization).
"""

from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)


def check_bits(bits: int) -> int:
    """``bits`` if it is a supported width, else a ValueError naming the valid ones."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; choose one of {SUPPORTED_BITS}")
    return bits


def qmax(bits: int) -> int:
    """Largest integer level, 2^(b-1) - 1."""
    return 2 ** (bits - 1) - 1


def quantize(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Integer levels (as float) of ``x``: clip(round(x / scale), -2^(b-1), 2^(b-1) - 1)."""
    return torch.clamp(torch.round(x / scale), -(2 ** (bits - 1)), qmax(bits))


def fake_quant(x: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Quantize then dequantize: float values on the integer grid of ``scale``."""
    return quantize(x, scale, bits) * scale


def absmax_scale(x: Tensor, bits: int, dims: tuple[int, ...] = ()) -> Tensor:
    """Min-max scale max|x| / (2^(b-1) - 1), reduced over every dim except ``dims`` (kept, size 1 elsewhere)."""
    reduce = tuple(d for d in range(x.dim()) if d not in {d % x.dim() for d in dims})
    peak = x.abs().amax(dim=reduce, keepdim=True) if reduce else x.abs()
    return (peak / qmax(bits)).clamp_min(1e-8)


def scale_shape(x: Tensor, axis: int | None) -> list[int]:
    """The broadcastable shape of a scale for ``x`` with one value per index of ``axis``."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = x.shape[axis]
    return shape


class TwinScale:
    """Two scales for a heavy-tailed activation (post-softmax, post-GELU), b-1 bits of levels each.

    Values with |x| <= (2^(b-2) - 1) * ``small`` use ``small`` (fine steps for the dense bulk
    near 0), the rest ``large``; the remaining bit says which range a value is in.
    """

    def __init__(self, small: Tensor, large: Tensor, bits: int) -> None:
        self.small, self.large, self.bits = small, large, check_bits(bits)

    def __call__(self, x: Tensor) -> Tensor:
        b = self.bits - 1
        in_small = x.abs() <= qmax(b) * self.small
        return torch.where(in_small, fake_quant(x, self.small, b), fake_quant(x, self.large, b))
