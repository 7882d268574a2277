"""Build registered architectures with their float weights: students, frozen teachers, trainable models.

The training configs instantiate these (``_target_``). For inference, :func:`tinysam.load_model` is
the one way in: it also opens quantized model folders. The architectures themselves are in
:mod:`tinysam.models.registry`; checkpoints are read by :mod:`tinysam.models.checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

from segment_anything.modeling import Sam

from tinysam.models.checkpoint import load_checkpoint
from tinysam.models.registry import (
    STUDENTS,
    build_student_arch,
    build_teacher_arch,
)


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
