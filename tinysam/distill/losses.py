"""Full-stage distillation losses (TinySAM section 3.1) and the ground-truth mask losses.

All terms work on :class:`~tinysam.distill.decoding.DecoderOutputs` of student and teacher
for the same prompts. A term whose weight is 0 is neither computed nor logged.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinysam.distill.decoding import DecoderOutputs

DISTANCES: dict[str, Callable[..., Tensor]] = {"l1": F.l1_loss, "mse": F.mse_loss, "smooth_l1": F.smooth_l1_loss}


def mask_iou(logits: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of ``logits > 0`` (N, M, h, w) with boolean masks (N, h, w) or (N, M, h, w); returns (N, M)."""
    pred = logits > 0
    target = target.unsqueeze(1) if target.dim() == 3 else target
    inter = (pred & target).flatten(2).sum(-1).float()
    union = (pred | target).flatten(2).sum(-1).float()
    return inter / (union + eps)


def hard_mask_weights(teacher_logits: Tensor, student_logits: Tensor, gt: Tensor, eps: float = 1e-6) -> Tensor:
    """TinySAM's hard mask weight per mask: sigmoid(IoU(teacher, GT) / (IoU(student, GT) + eps) - 1), (N, M).

    Masks the teacher gets right and the student does not weigh more; no gradient flows through it.
    """
    with torch.no_grad():
        return torch.sigmoid(mask_iou(teacher_logits, gt) / (mask_iou(student_logits, gt) + eps) - 1)


def sigmoid_focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss per mask, averaged over pixels: logits (N, M, h, w), target (N, h, w) bool -> (N, M)."""
    target = target.unsqueeze(1).expand_as(logits).float()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(2).mean(-1)


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft dice loss per mask: logits (N, M, h, w), target (N, h, w) bool -> (N, M)."""
    p = torch.sigmoid(logits).flatten(2)
    t = target.unsqueeze(1).expand_as(logits).float().flatten(2)
    return 1 - (2 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)


class DistillLoss(nn.Module):
    """L = a * L_emb + b * L_tok + c * sum_i H_i L_out^i + d * L_gt, each weight 0 disables its term.

    Args:
        embedding_weight: image-embedding distance, student vs cached teacher embedding.
        token_weight: decoder distance: the two-way transformer's IoU and mask output tokens
            and the upscaled image features, student vs teacher on the same prompts.
        output_weight: mask-logit distance per mask (times its hard weight) plus IoU-prediction distance.
        gt_weight: SAM's supervised loss against ground truth: focal x ``focal_weight`` + dice +
            MSE of the predicted vs achieved IoU, the minimum over the multimask outputs.
        hard_mask_weighting: multiply each mask's output loss by :func:`hard_mask_weights`.
        distance: ``l1`` (the paper's choice), ``mse`` or ``smooth_l1``.
    """

    def __init__(
        self,
        embedding_weight: float = 1.0,
        token_weight: float = 1.0,
        output_weight: float = 1.0,
        gt_weight: float = 1.0,
        hard_mask_weighting: bool = True,
        distance: str = "l1",
        focal_weight: float = 20.0,
    ) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distill.distance={distance!r} is not one of {sorted(DISTANCES)}")
        self.weights = {"embedding": embedding_weight, "tokens": token_weight, "output": output_weight, "gt": gt_weight}
        self.hard_mask_weighting = hard_mask_weighting
        self.distance = DISTANCES[distance]
        self.focal_weight = focal_weight

    @property
    def needs_teacher(self) -> bool:
        return any(self.weights[k] > 0 for k in ("embedding", "tokens", "output"))

    def gt_loss(self, out: DecoderOutputs, gt: Tensor) -> Tensor:
        """Focal x20 + dice + IoU MSE per multimask output, minimum over outputs, mean over prompts."""
        achieved = mask_iou(out.low_res.detach(), gt)
        per_output = (
            self.focal_weight * sigmoid_focal_loss(out.low_res, gt)
            + dice_loss(out.low_res, gt)
            + (out.iou - achieved) ** 2
        )
        return per_output.min(dim=1).values.mean()

    def output_loss(self, student: DecoderOutputs, teacher: DecoderOutputs, gt: Tensor) -> Tensor:
        per_mask = self.distance(student.low_res, teacher.low_res, reduction="none").flatten(2).mean(-1)
        if self.hard_mask_weighting:
            per_mask = per_mask * hard_mask_weights(teacher.low_res, student.low_res, gt)
        return per_mask.mean() + self.distance(student.iou, teacher.iou)

    def forward(
        self,
        student_embedding: Tensor | None,
        teacher_embedding: Tensor | None,
        student: DecoderOutputs,
        teacher: DecoderOutputs | None,
        gt: Tensor,
    ) -> dict[str, Tensor]:
        """Every enabled term (unweighted) and ``total`` (weighted sum)."""
        terms: dict[str, Tensor] = {}
        if self.weights["embedding"] > 0:
            terms["embedding"] = self.distance(student_embedding, teacher_embedding)
        if self.weights["tokens"] > 0:
            terms["tokens"] = self.distance(student.tokens, teacher.tokens) + self.distance(
                student.upscaled, teacher.upscaled
            )
        if self.weights["output"] > 0:
            terms["output"] = self.output_loss(student, teacher, gt)
        if self.weights["gt"] > 0:
            terms["gt"] = self.gt_loss(student, gt)
        if not terms:
            raise ValueError("every distill weight is 0: enable at least one loss term")
        terms["total"] = sum(self.weights[k] * v for k, v in terms.items())
        return terms
