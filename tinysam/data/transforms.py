"""Image reading and conversion to the 8-bit RGB arrays SAM models take."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from segment_anything.utils.transforms import ResizeLongestSide

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """An image that cannot be used; the message is one line naming the file and the fix."""


def to_rgb_uint8(image: np.ndarray, source: str = "image") -> np.ndarray:
    """Convert an HxW, HxWx1, HxWx3 or HxWx4 array to contiguous HxWx3 ``uint8``.

    ``uint8`` is kept, ``uint16`` is scaled by 255/65535, floats must lie in [0, 1],
    an alpha channel is dropped and grey is replicated to three channels.
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ImageError(f"{source}: expected an HxW, HxWx3 or HxWx4 array, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{source}: image has zero size {array.shape[:2]}")
    array = array[..., :3]
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = np.round(array.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError(f"{source}: float image contains NaN or inf")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageError(
                f"{source}: float image values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]; divide by 255 "
                "(8-bit) or 65535 (16-bit) first"
            )
        array = np.round(array * 255.0).astype(np.uint8)
    else:
        raise ImageError(f"{source}: unsupported dtype {array.dtype}; pass uint8, uint16 or float in [0, 1]")
    return np.ascontiguousarray(array)


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as HxWx3 ``uint8`` RGB, applying its EXIF orientation.

    Handles grey, palette, CMYK, alpha and 16-bit files; a missing, truncated or
    non-image file raises :class:`ImageError` (``FileNotFoundError`` for a missing one).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            if im.mode in SIXTEEN_BIT_MODES:
                array = np.asarray(im).astype(np.int64)
                if array.min() < 0 or array.max() > 65535:
                    raise ImageError(f"image {path}: {im.mode} values outside the 16-bit range")
                return to_rgb_uint8(array.astype(np.uint16), str(path))
            if im.mode == "F":
                return to_rgb_uint8(np.asarray(im), str(path))
            if im.mode not in ("RGB", "L"):
                im = im.convert("RGB")
            return to_rgb_uint8(np.asarray(im), str(path))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageError(f"image {path} is truncated or not a readable image ({err}); re-export or remove it") from None


def prepare_image(
    rgb: np.ndarray, image_size: int, pixel_mean: Sequence[float], pixel_std: Sequence[float]
) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM's input: longest side resized to ``image_size``, normalised, zero-padded bottom-right.

    Returns the ``(3, image_size, image_size)`` float tensor and the resized (unpadded) size.
    """
    resized = ResizeLongestSide(image_size).apply_image(rgb)
    x = torch.from_numpy(resized).permute(2, 0, 1).float()
    mean = torch.as_tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=torch.float32).view(3, 1, 1)
    h, w = x.shape[-2:]
    x = F.pad((x - mean) / std, (0, image_size - w, 0, image_size - h))
    return x, (h, w)


def list_images(folder: str | Path) -> list[Path]:
    """Image files (:data:`IMAGE_SUFFIXES`) directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder {folder} does not exist; pass a folder of .jpg/.png images")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def model_input(model: torch.nn.Module, rgb: np.ndarray) -> torch.Tensor:
    """``rgb`` as the (3, S, S) input of a SAM-family ``model``: its resize, normalisation and padding."""
    mean, std = model.pixel_mean.flatten().cpu(), model.pixel_std.flatten().cpu()
    return prepare_image(rgb, model.image_encoder.img_size, mean, std)[0]
