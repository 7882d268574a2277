"""The distillation LightningModule: student vs frozen teacher, online hard prompts, full-stage losses."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as L
import torch
from segment_anything.modeling import Sam
from torch import Tensor

from tinysam.distill.decoding import DecoderOutputs, Prompts, decode
from tinysam.distill.losses import DistillLoss, mask_iou
from tinysam.distill.prompts import HardPromptSampler
from tinysam.distill.visualize import prompt_grid

VAL_KINDS = ("box", "point")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class DistillModule(L.LightningModule):
    """Trains ``student`` to match ``teacher`` (and/or the ground truth) on prompts from SA-1B masks.

    Args:
        student: the model being trained (a ``Sam``).
        teacher: frozen ``Sam`` whose decoder runs online on cached embeddings; ``None`` for
            ground-truth-only training (the toy teacher's recipe, fine-tuning on user masks).
        loss: the weighted loss terms.
        sampler: the online hard prompt sampler (checkpointed with the run).
        lr, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW with warm-up and cosine decay.
        train_encoder, train_decoder: which parts of the student learn (encoder-only, decoder-only, both).
        init_decoder_from_teacher: start the student's prompt encoder and mask decoder from the teacher's.
        image_log_every: steps between TensorBoard image grids of student vs teacher masks (0: never).
    """

    def __init__(
        self,
        student: Sam,
        teacher: Sam | None,
        loss: DistillLoss,
        sampler: HardPromptSampler,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.01,
        train_encoder: bool = True,
        train_decoder: bool = True,
        init_decoder_from_teacher: bool = True,
        image_log_every: int = 200,
    ) -> None:
        super().__init__()
        if loss.needs_teacher and teacher is None:
            raise ValueError("the distill loss has teacher terms (embedding/tokens/output) but teacher=null")
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not a submodule: kept out of checkpoints, DDP and the optimizer
        self.loss = loss
        self.sampler = sampler
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.train_encoder, self.train_decoder = train_encoder, train_decoder
        self.image_log_every = image_log_every
        self.image_size = int(student.image_encoder.img_size)
        self.read = {"images": 0, "masks": 0}  # what training batches held since this process started
        if teacher is not None and init_decoder_from_teacher:
            student.prompt_encoder.load_state_dict(teacher.prompt_encoder.state_dict())
            student.mask_decoder.load_state_dict(teacher.mask_decoder.state_dict())
        student.image_encoder.requires_grad_(train_encoder)
        student.prompt_encoder.requires_grad_(train_decoder)
        student.mask_decoder.requires_grad_(train_decoder)

    # ----------------------------------------------------------------- helpers
    def _teacher(self) -> Sam | None:
        if self.teacher is not None and self.teacher.device != self.device:
            self.teacher.to(self.device)
        return self.teacher

    def train(self, mode: bool = True) -> DistillModule:
        super().train(mode)
        if not self.train_encoder:
            self.student.image_encoder.eval()  # frozen BatchNorm statistics
        return self

    def _student_embedding(self, images: Tensor) -> Tensor:
        if self.train_encoder:
            return self.student.image_encoder(images)
        with torch.no_grad():
            return self.student.image_encoder(images)

    def _hard_rounds(self, prompts: Prompts, gt: Tensor, student_emb: Tensor, teacher_emb: Tensor | None) -> Prompts:
        """Add the sampler's clicks, each from the current prediction's errors (no gradient)."""
        teacher = self._teacher()
        for _ in range(self.sampler.rounds()):
            reference = None
            with torch.no_grad():
                if self.sampler.mode == "disagreement" and teacher is not None:
                    current = decode(self.student, student_emb, prompts).best() > 0
                    reference = decode(teacher, teacher_emb, prompts).best() > 0
                elif teacher is not None:
                    current = decode(teacher, teacher_emb, prompts).best() > 0
                else:
                    current = decode(self.student, student_emb, prompts).best() > 0
            prompts = self.sampler.add_click(prompts, gt, current, reference, self.image_size)
        return prompts

    def _check_finite(self, terms: dict[str, Tensor]) -> None:
        for name, value in terms.items():
            if not torch.isfinite(value).all():
                raise FloatingPointError(
                    f"non-finite loss at step {self.global_step}: term '{name}' = {value.item()}; lower the learning "
                    "rate, check the data, or resume from the last checkpoint"
                )

    # ---------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        if "image" not in batch:  # every sample of the batch was skipped
            return None
        images, masks, boxes, valid = batch["image"], batch["masks"], batch["boxes"], batch["valid"]
        self.read["images"] += len(images)
        self.read["masks"] += int(valid.sum())
        teacher_emb = batch.get("teacher_embedding")
        student_emb = self._student_embedding(images)
        prompts, gt = self.sampler.initial(masks, boxes, valid, self.image_size)
        if self.sampler.max_rounds > 0:
            prompts = self._hard_rounds(prompts, gt, student_emb.detach(), teacher_emb)

        teacher_out = None
        teacher = self._teacher()
        if teacher is not None:
            with torch.no_grad():
                teacher_out = decode(teacher, teacher_emb, prompts)
        student_out = decode(self.student, student_emb, prompts)
        terms = self.loss(student_emb, teacher_emb, student_out, teacher_out, gt)
        self._check_finite(terms)

        n = len(images)
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value, prog_bar=name == "total", batch_size=n, sync_dist=False)
        self._log_agreement("train", student_out, teacher_out, gt)
        if self.image_log_every and self.global_step % self.image_log_every == 0 and self.global_rank == 0:
            self._log_images(images[0], prompts, student_out, teacher_out)
        return terms["total"]

    def _log_agreement(self, stage: str, student: DecoderOutputs, teacher: DecoderOutputs | None, gt: Tensor) -> None:
        with torch.no_grad():
            s = student.best()[:, None]
            self.log(f"{stage}/miou_gt", mask_iou(s, gt).mean(), batch_size=len(gt), sync_dist=stage != "train")
            if teacher is not None:
                t = teacher.best() > 0
                self.log(f"{stage}/miou_teacher", mask_iou(s, t).mean(), batch_size=len(gt), sync_dist=stage != "train")

    def _log_images(
        self, image: Tensor, prompts: Prompts, student: DecoderOutputs, teacher: DecoderOutputs | None
    ) -> None:
        """The first image's prompts with student (left) and teacher (right) masks, to TensorBoard."""
        experiment = getattr(self.logger, "experiment", None)
        if not hasattr(experiment, "add_image"):
            return
        first = prompts.image_index == 0
        shown = Prompts(
            prompts.image_index[first],
            None if prompts.boxes is None else prompts.boxes[first],
            None if prompts.points is None else prompts.points[first],
            None if prompts.labels is None else prompts.labels[first],
        )
        student_masks = student.best()[first] > 0
        teacher_masks = None if teacher is None else teacher.best()[first] > 0
        grid = prompt_grid(image, self.student.pixel_mean, self.student.pixel_std, shown, student_masks, teacher_masks)
        experiment.add_image("train/student_vs_teacher", grid, self.global_step)

    # -------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "image" not in batch:
            return
        images, masks, boxes, points, valid = (
            batch["image"],
            batch["masks"],
            batch["boxes"],
            batch["points"],
            batch["valid"],
        )
        teacher_emb = batch.get("teacher_embedding")
        student_emb = self.student.image_encoder(images)
        teacher = self._teacher()
        image_index, mask_index = torch.nonzero(valid, as_tuple=True)
        gt = masks[image_index, mask_index]
        ones = torch.ones(len(gt), 1, dtype=torch.int, device=self.device)
        for kind in VAL_KINDS:
            if kind == "box":
                prompts = Prompts(image_index, boxes=boxes[image_index, mask_index])
            else:
                prompts = Prompts(image_index, points=points[image_index, mask_index][:, None], labels=ones)
            s = decode(self.student, student_emb, prompts).best()[:, None]
            self.log(f"val/{kind}_miou_gt", mask_iou(s, gt).mean(), batch_size=len(gt), sync_dist=True)
            if teacher is not None and teacher_emb is not None:
                t = decode(teacher, teacher_emb, prompts).best()
                self.log(f"val/{kind}_miou_teacher", mask_iou(s, t > 0).mean(), batch_size=len(gt), sync_dist=True)
                self.log(
                    f"val/teacher_{kind}_miou_gt", mask_iou(t[:, None], gt).mean(), batch_size=len(gt), sync_dist=True
                )

    def on_train_epoch_end(self) -> None:
        self._end_data_pass("train")

    def on_validation_epoch_end(self) -> None:
        self._end_data_pass("val")

    def _end_data_pass(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "end_pass"):
            datamodule.end_pass(stage)

    # -------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.warmup_steps, total, self.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["prompt_sampler"] = self.sampler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "prompt_sampler" in checkpoint:
            self.sampler.load_state_dict(checkpoint["prompt_sampler"])
