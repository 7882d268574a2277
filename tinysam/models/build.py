"""Build registered architectures with their weights: students, frozen teachers, inference models.

The architectures themselves are in :mod:`tinysam.models.registry`; checkpoints are read by
:mod:`tinysam.models.checkpoint`, quantized model folders by :mod:`tinysam.quant.artifact`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from segment_anything.modeling import Sam

from tinysam.models.checkpoint import load_checkpoint
from tinysam.models.registry import (
    SAM_TEACHERS,
    STUDENTS,
    TOY_TEACHERS,
    build_student_arch,
    build_teacher_arch,
    unknown_architecture,
)
from tinysam.quant.artifact import is_quantized_dir, load_quantized


def build_student(
    name: str = "tinyvit_5m",
    checkpoint: str | Path | None = None,
    image_size: int | None = None,
    drop_path_rate: float = 0.0,
) -> Sam:
    """Build a TinyViT student ``Sam``; load ``checkpoint`` strictly when given.

    ``image_size`` defaults to the architecture's (1024 for ``tinyvit_5m``); the
    image embedding is ``image_size / 16`` on a side.
    """
    model = build_student_arch(name, image_size, drop_path_rate)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def build_teacher(name: str = "vit_h", checkpoint: str | Path | None = None, image_size: int | None = None) -> Sam:
    """Build a frozen SAM teacher in eval mode; load ``checkpoint`` strictly when given.

    ``name`` is ``vit_h``, ``vit_l``, ``vit_b`` (the ``segment_anything`` model
    registry's architectures) or ``vit_toy``.
    """
    model = build_teacher_arch(name, image_size)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    model.eval()
    model.requires_grad_(False)
    return model


def build_model(
    name: str, checkpoint: str | Path | None = None, image_size: int | None = None, drop_path_rate: float = 0.0
) -> Sam:
    """Build any registered architecture (student or teacher) as a trainable model.

    Used when a ViT is itself trained, as the toy teacher is by ``experiment=toy_teacher``.
    """
    if name in STUDENTS:
        model = build_student_arch(name, image_size, drop_path_rate)
    else:
        model = build_teacher_arch(name, image_size)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.train()


def load_model(name: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu") -> Sam:
    """Any registered architecture with ``checkpoint`` loaded, frozen, in eval mode on ``device``.

    The inference entry points (evaluation, segment-everything, quantization) use this;
    ``checkpoint`` may be an official ``.pth``, one of our safetensors files, or a quantized
    model directory written by ``quantize.py`` (its fake-quant model; ``name`` must match it).
    """
    if checkpoint is not None and is_quantized_dir(checkpoint):
        model, info = load_quantized(checkpoint)
        if info["arch"] != name:
            raise ValueError(f"{checkpoint} holds a quantized {info['arch']}, not {name}; pass model={info['arch']}")
        return model.to(device)
    if name not in STUDENTS and name not in SAM_TEACHERS and name not in TOY_TEACHERS:
        raise unknown_architecture(name, {*STUDENTS, *SAM_TEACHERS, *TOY_TEACHERS})
    model = build_student(name, checkpoint) if name in STUDENTS else build_teacher(name, checkpoint)
    return model.eval().requires_grad_(False).to(device)
