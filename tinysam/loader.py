"""The one way to get a model for inference: an architecture name and a checkpoint.

``load_model(arch, checkpoint)`` takes an official SAM / TinySAM / MobileSAM ``.pth``, one of our
``.safetensors`` files, a quantized model folder written by ``quantize.py``, or ``"random"``
(seeded random weights, for tests and timing). It sits above :mod:`tinysam.models` and
:mod:`tinysam.quant`, so that neither needs the other. Training builds its float models with
:func:`tinysam.models.build.build_student` / ``build_teacher`` / ``build_model`` (the configs'
``_target_``); for inference those older names do what ``load_model`` does without quantized folders.
"""

from __future__ import annotations

from pathlib import Path

import torch
from segment_anything.modeling import Sam

from tinysam.models.build import build_student, build_teacher
from tinysam.models.registry import SAM_TEACHERS, STUDENTS, TOY_TEACHERS, unknown_architecture
from tinysam.quant.artifact import is_quantized_dir, load_quantized

RANDOM = "random"  # checkpoint="random": seeded random weights (seed 0), never mistaken for a trained model


def load_model(arch: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu") -> Sam:
    """Architecture ``arch`` with ``checkpoint`` loaded, frozen, in eval mode on ``device``.

    Args:
        arch: a registered architecture: ``tinyvit_5m``, ``tinyvit_toy``, ``vit_h``, ``vit_l``,
            ``vit_b`` or ``vit_toy``.
        checkpoint: an official ``.pth``, our ``.safetensors``, a quantized model folder (its
            fake-quant model; ``arch`` must match it), ``"random"`` (seeded weights, seed 0, the global
            random state untouched) or ``None`` (the architecture's own random initialisation).
        device: where the model is put.
    """
    if checkpoint is not None and str(checkpoint) != RANDOM and is_quantized_dir(checkpoint):
        model, info = load_quantized(checkpoint)
        if info["arch"] != arch:
            raise ValueError(f"{checkpoint} holds a quantized {info['arch']}, not {arch}; pass model={info['arch']}")
        return model.to(device)
    if arch not in STUDENTS and arch not in SAM_TEACHERS and arch not in TOY_TEACHERS:
        raise unknown_architecture(arch, {*STUDENTS, *SAM_TEACHERS, *TOY_TEACHERS})
    build = build_student if arch in STUDENTS else build_teacher
    if checkpoint is not None and str(checkpoint) == RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build(arch)
    else:
        model = build(arch, checkpoint)
    return model.eval().requires_grad_(False).to(device)
