"""Mask helpers shared by every layer above: COCO RLE encoding and decoding, areas, output formats,
SAM's point grid, and coloured overlays.

One encoder serves all: :func:`encode_rles` turns a stack of boolean masks into pycocotools RLEs
in one C call (their ``counts`` are bytes); :func:`json_rle` makes one JSON-serialisable (``counts``
as text, the form SA-1B and COCO result files store).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything.utils.amg import build_point_grid, mask_to_rle_pytorch

# How a generator or segmenter returns masks: boolean arrays, SAM's uncompressed RLE, or COCO RLE (text counts).
OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


def check_output_mode(mode: str) -> str:
    """``mode`` when it is one of :data:`OUTPUT_MODES`; a one-line ``ValueError`` otherwise."""
    if mode not in OUTPUT_MODES:
        raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {mode!r}")
    return mode


def encode_rles(masks: torch.Tensor | np.ndarray) -> list[dict[str, Any]]:
    """COCO RLEs (compressed, ``counts`` as bytes) of boolean masks (N, H, W), in one pycocotools call."""
    masks = torch.as_tensor(masks, dtype=torch.bool)
    fortran = masks.transpose(1, 2).contiguous().cpu().numpy().view(np.uint8).transpose(2, 1, 0)  # (H, W, N)
    return mask_utils.encode(fortran)


def json_rle(rle: dict[str, Any]) -> dict[str, Any]:
    """A pycocotools RLE with ``size`` as ints and ``counts`` as text, ready for JSON."""
    counts = rle["counts"]
    return {
        "size": [int(v) for v in rle["size"]],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE of one boolean mask (H, W) with ``counts`` as text (JSON-serialisable)."""
    return json_rle(encode_rles(np.asarray(mask, dtype=bool)[None])[0])


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """The boolean mask (H, W) of a COCO RLE (``counts`` as bytes or text)."""
    return mask_utils.decode(rle).astype(bool)


def rle_areas(rles: list[dict[str, Any]]) -> list[int]:
    """Pixel counts of COCO RLEs; pycocotools' ``area`` takes at most 255 at a time (a uint8 count)."""
    return [int(a) for start in range(0, len(rles), 255) for a in mask_utils.area(rles[start : start + 255])]


def to_output_mode(rles: list[dict[str, Any]], mode: str) -> list[Any]:
    """The segmentations of ``rles`` as ``mode`` asks: boolean arrays, uncompressed RLE or COCO RLE."""
    if check_output_mode(mode) == "coco_rle":
        return [json_rle(r) for r in rles]
    masks = [decode_rle(rle) for rle in rles]
    if mode == "binary_mask":
        return masks
    return mask_to_rle_pytorch(torch.as_tensor(np.stack(masks))) if masks else []


def grid_points(points_per_side: int, size: tuple[int, int]) -> np.ndarray:
    """SAM's evenly spaced ``points_per_side``² grid in pixel XY for an image of ``size`` (H, W)."""
    h, w = size
    return build_point_grid(points_per_side) * np.array([[w, h]], dtype=np.float64)


def pixel_of(points: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of XY ``points``, clipped into an image of ``size`` (H, W)."""
    h, w = size
    rows = np.clip(np.floor(points[:, 1]).astype(np.int64), 0, h - 1)
    cols = np.clip(np.floor(points[:, 0]).astype(np.int64), 0, w - 1)
    return rows, cols


def overlay(rgb: np.ndarray, masks: list[np.ndarray], seed: int = 0) -> np.ndarray:
    """The image with each mask tinted in its own colour (largest first, so small ones stay visible)."""
    out = rgb.astype(np.float32)
    colours = np.random.default_rng(seed).uniform(0, 255, size=(len(masks), 3))
    for i in np.argsort([-m.sum() for m in masks]):
        out[masks[i]] = 0.45 * out[masks[i]] + 0.55 * colours[i]
    return out.astype(np.uint8)


def png_bytes(picture: np.ndarray | Image.Image) -> bytes:
    """A PNG file's bytes of an RGB array or a PIL image."""
    image = picture if isinstance(picture, Image.Image) else Image.fromarray(picture)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
