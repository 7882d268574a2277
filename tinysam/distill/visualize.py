"""Image grids of student vs teacher masks with their prompts, for TensorBoard."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

from tinysam.distill.decoding import Prompts

MAX_SHOWN = 8


def _panel(image: Tensor, masks: Tensor, prompts: Prompts) -> Tensor:
    side = image.shape[-1]
    up = F.interpolate(masks[:, None].float(), size=(side, side), mode="nearest")[:, 0].bool()
    panel = draw_segmentation_masks(image, up.cpu(), alpha=0.5)
    if prompts.boxes is not None:
        panel = draw_bounding_boxes(panel, prompts.boxes[:MAX_SHOWN].cpu(), colors="yellow")
    if prompts.points is not None:
        keypoints = prompts.points[:MAX_SHOWN].cpu()
        labels = prompts.labels[:MAX_SHOWN].cpu()
        panel = draw_keypoints(panel, keypoints[labels == 1][:, None], colors="lime", radius=3)
        panel = draw_keypoints(panel, keypoints[labels == 0][:, None], colors="red", radius=3)
    return panel


def prompt_grid(
    image: Tensor, pixel_mean: Tensor, pixel_std: Tensor, prompts: Prompts, student: Tensor, teacher: Tensor | None
) -> Tensor:
    """``uint8`` (3, S, 2S or S): the image with student masks (left) and teacher masks (right).

    ``image`` is the normalised model input; masks are (N, h, w) booleans, at most 8 shown.
    """
    rgb = (image.detach().float() * pixel_std.view(3, 1, 1) + pixel_mean.view(3, 1, 1)).clamp(0, 255).byte().cpu()
    n = min(MAX_SHOWN, len(student))
    panels = [_panel(rgb, student[:n], prompts)]
    if teacher is not None:
        panels.append(_panel(rgb, teacher[:n], prompts))
    return torch.cat(panels, dim=-1)
