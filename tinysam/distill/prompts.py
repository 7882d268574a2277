"""Online hard prompt sampling (TinySAM section 3.1), with the EdgeSAM variant as an option.

Per image, prompts target some of its ground-truth masks: a (noisy) box or a point
inside the mask. Hard sampling then adds clicks over a random number of rounds
(uniform in 0..``max_rounds``): ``gt_miss`` (TinySAM) draws the next positive click
inside M_gt - M_i, the part of the ground truth the current prediction misses;
``disagreement`` (EdgeSAM) draws it where student and teacher masks disagree,
positive where the teacher says foreground, negative where it says background.
All randomness comes from one seeded generator whose state is checkpointed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tinysam.distill.decoding import Prompts

MODES = ("none", "gt_miss", "disagreement")


class HardPromptSampler:
    """Seeded prompt sampler.

    Args:
        prompts_per_image: prompts drawn per image (its masks, without replacement when it has enough).
        box_fraction: chance that an image's prompts are boxes rather than points.
        mode: ``none`` (no extra rounds), ``gt_miss`` (TinySAM) or ``disagreement`` (EdgeSAM).
        max_rounds: the number of added clicks is drawn uniformly from 0..max_rounds per step.
        box_noise: std of box-corner noise as a fraction of the box side (at most ``max_box_noise`` px).
        seed: seed of the generator.
    """

    def __init__(
        self,
        prompts_per_image: int = 16,
        box_fraction: float = 0.5,
        mode: str = "gt_miss",
        max_rounds: int = 9,
        box_noise: float = 0.1,
        max_box_noise: float = 20.0,
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"prompts.mode={mode!r} is not one of {MODES}")
        self.prompts_per_image = prompts_per_image
        self.box_fraction = box_fraction
        self.mode = mode
        self.max_rounds = max_rounds if mode != "none" else 0
        self.box_noise = box_noise
        self.max_box_noise = max_box_noise
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def _uniform(self, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=self.generator)

    def rounds(self) -> int:
        """How many clicks to add this step."""
        return int(torch.randint(0, self.max_rounds + 1, (1,), generator=self.generator))

    def sample_points(self, regions: Tensor, image_size: int) -> Tensor:
        """One uniformly random point (input pixels) inside each (N, h, w) region; empty regions must not occur."""
        flat = regions.flatten(1).float().cpu()
        picks = torch.multinomial(flat, 1, generator=self.generator)[:, 0]
        side = regions.shape[-1]
        scale = image_size / side
        jitter = self._uniform(len(picks), 2)
        xy = torch.stack([picks % side, picks // side], dim=1).float() + jitter
        return (xy * scale).to(regions.device)

    def initial(self, masks: Tensor, boxes: Tensor, valid: Tensor, image_size: int) -> tuple[Prompts, Tensor]:
        """First prompts of a batch and the ground-truth mask each one targets.

        ``masks`` (B, K, h, w) bool, ``boxes`` (B, K, 4) XYXY input pixels, ``valid`` (B, K). The
        step's prompts are all boxes or all points (``box_fraction`` is the chance of boxes).
        """
        images, picks = [], []
        for b in range(len(masks)):
            usable = torch.nonzero(valid[b].cpu())[:, 0]
            chosen = usable[torch.randperm(len(usable), generator=self.generator)[: self.prompts_per_image]]
            images.append(torch.full((len(chosen),), b, dtype=torch.long))
            picks.append(chosen)
        image_index, mask_index = torch.cat(images).to(masks.device), torch.cat(picks).to(masks.device)
        gt = masks[image_index, mask_index]
        n = len(image_index)
        if float(self._uniform(1)) < self.box_fraction:
            box = boxes[image_index, mask_index].float()
            side = (box[:, 2:] - box[:, :2]).repeat(1, 2)
            noise = torch.randn(n, 4, generator=self.generator).to(box.device) * self.box_noise * side
            noisy = (box + noise.clamp(-self.max_box_noise, self.max_box_noise)).clamp(0, image_size)
            return Prompts(image_index, boxes=noisy), gt
        points = self.sample_points(gt, image_size)
        labels = torch.ones(n, 1, dtype=torch.int, device=masks.device)
        return Prompts(image_index, points=points[:, None], labels=labels), gt

    def add_click(
        self, prompts: Prompts, gt: Tensor, current: Tensor, reference: Tensor | None, image_size: int
    ) -> Prompts:
        """Append one click per prompt.

        ``gt`` (N, h, w) are the targeted masks, ``current`` (N, h, w) the prediction being
        corrected (student in ``disagreement`` mode) and ``reference`` the teacher's prediction
        (``disagreement`` only). Prompts whose region is empty get a positive click inside the GT.
        """
        if self.mode == "disagreement":
            positive = reference & ~current
            region = positive | (~reference & current)
        else:
            positive = gt & ~current
            region = positive
        empty = ~region.flatten(1).any(1)
        region = torch.where(empty[:, None, None], gt, region)
        positive = torch.where(empty[:, None, None], gt, positive)
        points = self.sample_points(region, image_size)
        side = gt.shape[-1]
        cell = (points * side / image_size).long().clamp(0, side - 1)
        labels = positive[torch.arange(len(points), device=gt.device), cell[:, 1], cell[:, 0]].int()
        if prompts.points is None:
            new_points, new_labels = points[:, None], labels[:, None]
        else:
            new_points = torch.cat([prompts.points, points[:, None]], dim=1)
            new_labels = torch.cat([prompts.labels, labels[:, None]], dim=1)
        return Prompts(prompts.image_index, prompts.boxes, new_points, new_labels)
