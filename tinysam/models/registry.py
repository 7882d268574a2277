"""Registry of student and teacher architectures, all built as randomly initialised ``segment_anything`` ``Sam``.

Students use our :class:`~tinysam.models.tiny_vit.TinyViT` image encoder; teachers are
SAM's own ViT encoders. Every model reuses SAM's ``PromptEncoder``, ``MaskDecoder``
and ``TwoWayTransformer``. Toy variants are the same classes at small widths and a
256 px input (16x16 embedding), for tests and the synthetic toy world. Loading weights
is :mod:`tinysam.models.build`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from tinysam.models.tiny_vit import TinyViT

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
ENCODER_STRIDE = 16


@dataclass(frozen=True)
class DecoderSpec:
    """Prompt encoder and mask decoder widths (SAM's are the defaults)."""

    prompt_dim: int = 256
    transformer_depth: int = 2
    transformer_mlp_dim: int = 2048
    transformer_heads: int = 8
    iou_head_hidden_dim: int = 256


@dataclass(frozen=True)
class TinyViTSpec:
    """A TinyViT student architecture."""

    image_size: int
    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    window_sizes: tuple[int, int, int, int]
    decoder: DecoderSpec = field(default_factory=DecoderSpec)
    num_classes: int = 1000


@dataclass(frozen=True)
class ViTSpec:
    """A SAM ViT teacher architecture (``ImageEncoderViT`` hyper-parameters)."""

    image_size: int
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    decoder: DecoderSpec = field(default_factory=DecoderSpec)


TOY_DECODER = DecoderSpec(
    prompt_dim=128, transformer_depth=2, transformer_mlp_dim=512, transformer_heads=4, iou_head_hidden_dim=128
)

STUDENTS: dict[str, TinyViTSpec] = {
    # TinySAM / MobileSAM "vit_t": 5.7 M-parameter TinyViT, 10.13 M with the SAM decoder.
    "tinyvit_5m": TinyViTSpec(1024, (64, 128, 160, 320), (2, 2, 6, 2), (2, 4, 5, 10), (7, 7, 14, 7)),
    "tinyvit_toy": TinyViTSpec(
        256, (32, 64, 96, 128), (1, 1, 2, 1), (1, 2, 3, 4), (7, 7, 8, 8), decoder=TOY_DECODER, num_classes=10
    ),
}

# SAM's released teachers come from segment_anything's own registry, at 1024 px.
SAM_TEACHERS = ("vit_h", "vit_l", "vit_b")
TOY_TEACHERS: dict[str, ViTSpec] = {
    "vit_toy": ViTSpec(256, 192, 6, 6, (2, 5), window_size=8, decoder=TOY_DECODER),
}


def _assemble(image_encoder: nn.Module, image_size: int, decoder: DecoderSpec, arch: str) -> Sam:
    embedding_side = image_size // ENCODER_STRIDE
    sam = Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=decoder.prompt_dim,
            image_embedding_size=(embedding_side, embedding_side),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=decoder.transformer_depth,
                embedding_dim=decoder.prompt_dim,
                mlp_dim=decoder.transformer_mlp_dim,
                num_heads=decoder.transformer_heads,
            ),
            transformer_dim=decoder.prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=decoder.iou_head_hidden_dim,
        ),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    sam.arch = arch  # read back by save_checkpoint for the metadata
    return sam


class ArchitectureError(ValueError, KeyError):
    """An architecture name the registry does not know (a ``KeyError`` of the registry, a user's ``ValueError``)."""

    def __str__(self) -> str:
        return str(self.args[0])


def unknown_architecture(name: str, registry: Iterable[str]) -> ArchitectureError:
    return ArchitectureError(f"unknown architecture {name!r}; known: {', '.join(sorted(registry))}")


def _resolve_size(spec_size: int, image_size: int | None) -> int:
    size = spec_size if image_size is None else int(image_size)
    if size <= 0 or size % ENCODER_STRIDE:
        raise ValueError(f"image_size={size} must be a positive multiple of {ENCODER_STRIDE}")
    return size


def build_student_arch(name: str, image_size: int | None = None, drop_path_rate: float = 0.0) -> Sam:
    """Randomly initialised student ``Sam`` of a registered TinyViT architecture."""
    if name not in STUDENTS:
        raise unknown_architecture(name, STUDENTS)
    spec = STUDENTS[name]
    size = _resolve_size(spec.image_size, image_size)
    encoder = TinyViT(
        img_size=size,
        embed_dims=spec.embed_dims,
        depths=spec.depths,
        num_heads=spec.num_heads,
        window_sizes=spec.window_sizes,
        out_chans=spec.decoder.prompt_dim,
        drop_path_rate=drop_path_rate,
        num_classes=spec.num_classes,
    )
    return _assemble(encoder, size, spec.decoder, name)


def build_teacher_arch(name: str, image_size: int | None = None) -> Sam:
    """Randomly initialised SAM of a registered ViT architecture."""
    if name in SAM_TEACHERS:
        if image_size not in (None, 1024):
            raise ValueError(f"teacher {name!r} is built at 1024 px only, got image_size={image_size}")
        model = sam_model_registry[name](checkpoint=None)
        model.arch = name
        return model
    if name not in TOY_TEACHERS:
        raise unknown_architecture(name, {**dict.fromkeys(SAM_TEACHERS), **TOY_TEACHERS})
    spec = TOY_TEACHERS[name]
    size = _resolve_size(spec.image_size, image_size)
    encoder = ImageEncoderViT(
        img_size=size,
        patch_size=ENCODER_STRIDE,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=spec.global_attn_indexes,
        window_size=spec.window_size,
        out_chans=spec.decoder.prompt_dim,
    )
    return _assemble(encoder, size, spec.decoder, name)


def architecture_builders() -> dict[str, Callable[[], Sam]]:
    """Every registered architecture by name, each as a zero-argument builder."""
    builders: dict[str, Callable[[], Sam]] = {n: partial(build_student_arch, n) for n in STUDENTS}
    builders.update({n: partial(build_teacher_arch, n) for n in (*SAM_TEACHERS, *TOY_TEACHERS)})
    return builders
