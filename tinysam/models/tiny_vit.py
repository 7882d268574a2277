"""SAM-adapted TinyViT image encoder (the TinySAM / MobileSAM student backbone).

The module tree mirrors the official ``vit_t`` checkpoints key for key
(``patch_embed.seq.*``, ``layers.N.blocks.M.*``, ``neck.*``, the unused
classification ``norm_head`` / ``head``), so those checkpoints load with
``strict=True``. Architecture facts follow TinyViT (Wu et al., ECCV 2022) with
the SAM adaptation of MobileSAM: the last down-sampling keeps the stride at 1 so
a 1024 px input yields a 64x64 embedding, and a conv/LayerNorm2d neck maps it to
the prompt dimension.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import window_partition, window_unpartition
from timm.layers import DropPath
from torch import nn


def conv_bn(
    in_chans: int, out_chans: int, kernel: int = 1, stride: int = 1, groups: int = 1, bn_weight_init: float = 1.0
) -> nn.Sequential:
    """Bias-free convolution followed by BatchNorm (keys ``c`` and ``bn``)."""
    bn = nn.BatchNorm2d(out_chans)
    nn.init.constant_(bn.weight, bn_weight_init)
    nn.init.zeros_(bn.bias)
    conv = nn.Conv2d(in_chans, out_chans, kernel, stride, kernel // 2, groups=groups, bias=False)
    return nn.Sequential(OrderedDict(c=conv, bn=bn))


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 convolutions: image to a 1/4-resolution feature map."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            conv_bn(in_chans, embed_dim // 2, 3, 2), nn.GELU(), conv_bn(embed_dim // 2, embed_dim, 3, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, 3x3 depthwise, 1x1 project, residual."""

    def __init__(self, dim: int, expand_ratio: float, drop_path: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = conv_bn(dim, hidden)
        self.conv2 = conv_bn(hidden, hidden, 3, groups=hidden)
        self.conv3 = conv_bn(hidden, dim, bn_weight_init=0.0)
        self.act1, self.act2, self.act3 = nn.GELU(), nn.GELU(), nn.GELU()  # one each: quantization may swap one
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        return self.act3(x + self.drop_path(self.conv3(y)))


class PatchMerging(nn.Module):
    """1x1 conv, depthwise 3x3 conv (stride 1 or 2), 1x1 conv; takes and returns NCHW."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(dim, out_dim)
        self.conv2 = conv_bn(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = conv_bn(out_dim, out_dim)
        self.act1, self.act2 = nn.GELU(), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        return self.conv3(x)


def relative_offset_index(window_size: int) -> tuple[torch.Tensor, int]:
    """Index of each (query, key) pair's |dy|, |dx| offset class inside a window.

    Offsets are numbered in order of first appearance when scanning query and key
    positions row-major, which is the order the official attention biases use.
    """
    points = list(itertools.product(range(window_size), range(window_size)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in points:
        for p2 in points:
            offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            idxs.append(offsets.setdefault(offset, len(offsets)))
    n = len(points)
    return torch.tensor(idxs, dtype=torch.long).view(n, n), len(offsets)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window with learned relative-offset biases.

    The fused ``qkv`` projection is laid out per head as ``[q | k | v]``, as in the
    official weights.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * self.head_dim * num_heads)
        self.proj = nn.Linear(self.head_dim * num_heads, dim)
        bias_idxs, num_offsets = relative_offset_index(window_size)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, num_offsets))
        self.register_buffer("attention_bias_idxs", bias_idxs, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class TinyViTBlock(nn.Module):
    """Window attention, depthwise local convolution, then an MLP; tokens are NHWC."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, local_conv_size: int, drop_path: float
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, window_size)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict(norm=nn.LayerNorm(dim), fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim))
        )
        self.local_conv = conv_bn(dim, dim, local_conv_size, groups=dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        windows, padded_hw = window_partition(x, ws)
        attended = self.attn(windows.view(-1, ws * ws, c)).view(-1, ws, ws, c)
        x = x + self.drop_path(window_unpartition(attended, ws, padded_hw, (h, w)))
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path(self.mlp(x))


class ConvStage(nn.Module):
    """Stage of MBConv blocks followed by a patch merging (NCHW in, NCHW out)."""

    def __init__(self, dim: int, out_dim: int, depth: int, expand_ratio: float, drop_paths: Sequence[float]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio, dp) for dp in drop_paths[:depth])
        self.downsample = PatchMerging(dim, out_dim, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class AttentionStage(nn.Module):
    """Stage of TinyViT blocks, optionally followed by a patch merging (NCHW in, NCHW out)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        drop_paths: Sequence[float],
        out_dim: int | None,
        downsample_stride: int,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, local_conv_size, dp) for dp in drop_paths[:depth]
        )
        self.downsample = PatchMerging(dim, out_dim, downsample_stride) if out_dim is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """TinyViT backbone with a SAM neck: ``(B, 3, S, S)`` to ``(B, out_chans, S/16, S/16)``.

    Args:
        img_size: square input side the model is built for (``Sam.preprocess`` pads to it).
        embed_dims, depths, num_heads, window_sizes: per-stage widths, block counts,
            attention heads (stages 1-3) and attention windows (stages 1-3).
        mlp_ratio, mbconv_expand_ratio, local_conv_size: block hyper-parameters.
        out_chans: channels of the output embedding (the SAM prompt dimension).
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        num_classes: width of the unused classification head kept for checkpoint parity.
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
        drop_path_rate: float = 0.0,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        if len(embed_dims) != 4 or len(depths) != 4 or len(num_heads) != 4 or len(window_sizes) != 4:
            raise ValueError("TinyViT: embed_dims, depths, num_heads and window_sizes need 4 stages each")
        if img_size % 16:
            raise ValueError(f"TinyViT: img_size={img_size} must be a multiple of 16")
        self.img_size = img_size
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(depths[:i]) for i in range(4)]

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        # Strides after the 1/4 patch embedding: 2, 2, 1 (the SAM adaptation), giving 1/16 overall.
        self.layers = nn.ModuleList(
            [ConvStage(embed_dims[0], embed_dims[1], depths[0], mbconv_expand_ratio, dpr[starts[0] :])]
        )
        for i in range(1, 4):
            last = i == 3
            self.layers.append(
                AttentionStage(
                    embed_dims[i],
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    local_conv_size,
                    dpr[starts[i] :],
                    out_dim=None if last else embed_dims[i + 1],
                    downsample_stride=2 if i == 1 else 1,
                )
            )
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
