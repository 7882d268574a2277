"""Fake-quantized attention matmuls: Q K^T and attn V with per-head scales, twin scales after softmax.

:func:`quantize_attention` turns TinyViT's window attention and SAM's decoder attention into
versions that compute attention explicitly through two :class:`QuantMatMul` modules (``qk`` and
``av``); disabled, they compute exactly what the original modules compute.
"""

from __future__ import annotations

import math

import torch
from segment_anything.modeling.transformer import Attention
from torch import Tensor, nn

from tinysam.models.tiny_vit import WindowAttention
from tinysam.quant.quantizers import TwinScale, check_bits, fake_quant, qmax


class QuantMatMul(nn.Module):
    """``a @ b`` for (B, heads, N, K) x (B, heads, K, M) with both operands fake-quantized per head.

    With ``softmax_input`` the left operand holds probabilities in [0, 1] and gets twin scales:
    ``a_small`` for the dense bulk near 0 and a fixed ``a_scale`` covering [0, 1].
    """

    def __init__(self, heads: int, bits: int = 8, softmax_input: bool = False) -> None:
        super().__init__()
        self.bits, self.softmax_input = check_bits(bits), softmax_input
        self.register_buffer("a_scale", torch.ones(1, heads, 1, 1))
        self.register_buffer("b_scale", torch.ones(1, heads, 1, 1))
        if softmax_input:
            self.a_scale.fill_(1.0 / qmax(bits - 1))
            self.register_buffer("a_small", self.a_scale / 16)
        self.enabled = False

    def quantize_a(self, a: Tensor, scale: Tensor | None = None) -> Tensor:
        """The left operand fake-quantized (``scale``: its per-head scale, or the small twin scale)."""
        if self.softmax_input:
            return TwinScale(self.a_small if scale is None else scale, self.a_scale, self.bits)(a)
        return fake_quant(a, self.a_scale if scale is None else scale, self.bits)

    def compute(self, a: Tensor, b: Tensor, a_scale: Tensor | None = None, b_scale: Tensor | None = None) -> Tensor:
        """The quantized product, optionally with candidate scales (scale search)."""
        return self.quantize_a(a, a_scale) @ fake_quant(b, self.b_scale if b_scale is None else b_scale, self.bits)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.compute(a, b) if self.enabled else a @ b


class QuantWindowAttention(WindowAttention):
    """TinyViT window attention computed explicitly through ``qk`` and ``av``."""

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        attn = self.qk(q * self.head_dim**-0.5, k.transpose(-2, -1)) + bias
        out = self.av(attn.softmax(dim=-1), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class QuantDecoderAttention(Attention):
    """SAM's decoder attention with its two matmuls through ``qk`` and ``av``."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        attn = self.qk(q, k.permute(0, 1, 3, 2)) / math.sqrt(q.shape[-1])
        out = self.av(torch.softmax(attn, dim=-1), v)
        return self.out_proj(self._recombine_heads(out))


def quantize_attention(model: nn.Module, bits: int = 8) -> dict[str, QuantMatMul]:
    """Give every attention module of ``model`` quantized matmuls, in place; returns them by name."""
    matmuls = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, WindowAttention) and not isinstance(module, QuantWindowAttention):
            module.__class__ = QuantWindowAttention
        elif isinstance(module, Attention) and not isinstance(module, QuantDecoderAttention):
            module.__class__ = QuantDecoderAttention
        else:
            continue
        device = next(module.parameters()).device
        module.qk = QuantMatMul(module.num_heads, bits).to(device)
        module.av = QuantMatMul(module.num_heads, bits, softmax_input=True).to(device)
        matmuls[f"{name}.qk"], matmuls[f"{name}.av"] = module.qk, module.av
    return matmuls
