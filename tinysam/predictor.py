"""Batched prompting of a SAM-family model on one image embedding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from tinysam.backends import make_backend
from tinysam.data.transforms import load_image, model_input, to_rgb_uint8

POSTPROCESS_CHUNK = 16  # prompts upscaled to full resolution at a time, bounding peak memory


class PromptError(ValueError):
    """An invalid prompt; the message is one line naming the argument and the fix."""


def _as_float_array(value, name: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if not np.isfinite(array).all():
        raise PromptError(f"{name} contains NaN or inf")
    return array


def _batched(array: np.ndarray, name: str, item_shape: str) -> tuple[np.ndarray, bool]:
    """Add a leading batch axis to one unbatched prompt; return the array and whether it was batched."""
    item_ndim = item_shape.count(",") + 1
    if array.ndim == item_ndim:
        return array[None], False
    if array.ndim == item_ndim + 1:
        return array, True
    raise PromptError(f"{name} must have shape ({item_shape}) or (N, {item_shape}), got {array.shape}")


def clip_boxes(boxes: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """XYXY ``boxes`` (N, 4) clipped to an image of ``size`` (H, W), and which keep a positive area (N,)."""
    h, w = size
    clipped = np.array(boxes, dtype=np.float64, copy=True)
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, w)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, h)
    return clipped, (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])


class Predictor:
    """Encode an image once, then decode any number of point / box / mask prompts in one batch.

    Coordinates are in original-image pixels (points XY, boxes XYXY). Like
    ``segment_anything.SamPredictor`` but every call is batched over N prompts.
    """

    def __init__(self, model: Sam, backend: str = "eager", onnx_dir: str | Path | None = None) -> None:
        """``backend``: ``eager``, ``factored`` (eager, the decoder's image-side work shared by all
        prompts: several times faster for many prompts), ``compile`` (torch.compile), ``onnx``
        (onnxruntime on the models in ``onnx_dir``, exported on the spot when not given) or ``auto``
        (:func:`~tinysam.backends.auto_backend`: factored on the CPU); outputs agree to float tolerance,
        and ``eager`` is bit-identical to ``segment_anything``."""
        self.model = model.eval()
        self.backend = make_backend(backend, self.model, onnx_dir)
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forget the current image and its embedding."""
        self.features: torch.Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    @torch.inference_mode()
    def set_image(self, image: np.ndarray | str | Path) -> None:
        """Compute the image embedding of an HxW / HxWx3 / HxWx4 array or an image path.

        Arrays may be ``uint8``, ``uint16`` or float in [0, 1]; files get their EXIF
        orientation applied.
        """
        rgb = load_image(image) if isinstance(image, (str, Path)) else to_rgb_uint8(image)
        x = model_input(self.model, rgb)
        self.set_embedding(self.backend.encode(x[None].to(self.device)), rgb.shape[:2])

    def set_embedding(self, features: torch.Tensor, original_size: tuple[int, int]) -> None:
        """Use a precomputed ``(1, C, h, w)`` image embedding of an image of ``original_size`` (H, W)."""
        self.features = features.to(self.device)
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = ResizeLongestSide.get_preprocess_shape(*self.original_size, self.transform.target_length)

    def _require_image(self) -> None:
        if self.features is None:
            raise RuntimeError("Predictor: call set_image(...) before predict(...)")

    def _prepare_boxes(self, boxes) -> tuple[np.ndarray, bool]:
        array, batched = _batched(_as_float_array(boxes, "boxes"), "boxes", "4")
        if array.shape[-1] != 4:
            raise PromptError(f"boxes must be XYXY with 4 values per box, got shape {array.shape}")
        bad = np.flatnonzero((array[:, 2] <= array[:, 0]) | (array[:, 3] <= array[:, 1]))
        if bad.size:
            raise PromptError(f"box {bad[0]} = {array[bad[0]].tolist()} is not XYXY with x1 > x0 and y1 > y0")
        clipped, inside = clip_boxes(array, self.original_size)
        outside = np.flatnonzero(~inside)
        if outside.size:
            raise PromptError(
                f"box {outside[0]} = {array[outside[0]].tolist()} lies outside the {self.original_size[1]}x{self.original_size[0]} image"
            )
        return clipped, batched

    def _prepare_points(self, coords, labels) -> tuple[np.ndarray, np.ndarray, bool]:
        if (coords is None) != (labels is None):
            raise PromptError("point_coords and point_labels must be given together")
        points, batched = _batched(_as_float_array(coords, "point_coords"), "point_coords", "K, 2")
        if points.shape[-1] != 2:
            raise PromptError(f"point_coords must be XY pairs, got shape {points.shape}")
        label_array = np.asarray(labels)
        expected = points.shape[:-1] if batched else points.shape[1:-1]
        if label_array.shape != expected:
            raise PromptError(f"point_labels must have shape {expected} to match point_coords, got {label_array.shape}")
        label_array = label_array.reshape(points.shape[:-1])
        if not np.isin(label_array, (-1, 0, 1)).all():
            raise PromptError("point_labels must be 1 (foreground), 0 (background) or -1 (padding)")
        return points, label_array.astype(np.int64), batched

    def _prepare_masks(self, mask_input) -> tuple[np.ndarray, bool]:
        side = 4 * self.model.prompt_encoder.image_embedding_size[0]
        masks, batched = _batched(_as_float_array(mask_input, "mask_input"), "mask_input", f"1, {side}, {side}")
        if masks.shape[1:] != (1, side, side):
            raise PromptError(f"mask_input must be low-res logits of shape (1, {side}, {side}), got {masks.shape}")
        return masks, batched

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decode prompts for the current image in one batched decoder call.

        Args:
            point_coords: (K, 2) points for one prompt or (N, K, 2) for N prompts, XY pixels.
            point_labels: (K,) or (N, K); 1 foreground, 0 background, -1 padding.
            boxes: (4,) or (N, 4) XYXY pixels; parts outside the image are clipped.
            mask_input: (1, 256, 256) or (N, 1, 256, 256) low-res logits of an earlier call.
            multimask_output: three masks per prompt if true, else the single-mask output.
            return_logits: return mask logits instead of booleans.

        Prompts with a leading N broadcast against those given once. Returns masks
        (N, C, H, W) at the original size, IoU predictions (N, C) and low-res logits
        (N, C, 256, 256); without N when every prompt was given unbatched.
        """
        self._require_image()
        parts: dict[str, np.ndarray] = {}
        batched_flags = []
        if point_coords is not None or point_labels is not None:
            coords, labels, batched = self._prepare_points(point_coords, point_labels)
            parts["coords"] = self.transform.apply_coords(coords, self.original_size)
            parts["labels"] = labels
            batched_flags.append(batched)
        if boxes is not None:
            box_array, batched = self._prepare_boxes(boxes)
            parts["boxes"] = self.transform.apply_boxes(box_array, self.original_size)
            batched_flags.append(batched)
        if mask_input is not None:
            parts["masks"], batched = self._prepare_masks(mask_input)
            batched_flags.append(batched)
        if not parts:
            raise PromptError("predict needs at least one of point_coords, boxes or mask_input")

        sizes = {len(v) for v in parts.values()} - {1}
        if len(sizes) > 1:
            raise PromptError(f"prompt batch sizes disagree: {sorted(sizes)}; give N of each or 1 to broadcast")
        n = sizes.pop() if sizes else 1
        tensors = {
            k: torch.as_tensor(np.broadcast_to(v, (n, *v.shape[1:])).copy(), device=self.device)
            for k, v in parts.items()
        }
        with torch.inference_mode():
            low_res, iou = self.decode(
                points=tensors.get("coords"),
                labels=tensors.get("labels"),
                boxes=tensors.get("boxes"),
                mask_input=tensors.get("masks"),
                multimask_output=multimask_output,
            )
            masks = self.upscale(low_res)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        out = (masks.cpu().numpy(), iou.float().cpu().numpy(), low_res.float().cpu().numpy())
        if not any(batched_flags):
            out = tuple(a[0] for a in out)
        return out

    def decode(
        self,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask-decoder call on prompts already in the model's input frame.

        ``points`` (N, K, 2) with ``labels`` (N, K), ``boxes`` (N, 4) and ``mask_input``
        (N, 1, 256, 256) are optional; returns low-res logits (N, C, 256, 256) and IoU (N, C).
        """
        self._require_image()
        return self.backend.decode(self.features, points, labels, boxes, mask_input, multimask_output)

    def upscale(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res logits (N, C, h, w) to logits at the original image size (N, C, H, W)."""
        self._require_image()
        chunks = [
            self.model.postprocess_masks(low_res[i : i + POSTPROCESS_CHUNK], self.input_size, self.original_size)
            for i in range(0, len(low_res), POSTPROCESS_CHUNK)
        ]
        return torch.cat(chunks) if chunks else low_res.new_zeros((0, low_res.shape[1], *self.original_size))
