"""Architecture checks: official keys and shapes, parameter counts, toy variants, teachers."""

from __future__ import annotations

import pytest
import torch

from tinysam import build_student, build_teacher
from tinysam.models.registry import architecture_builders


def test_student_state_dict_matches_official_keys_and_shapes(reference_state_dict_spec):
    state = build_student("tinyvit_5m").state_dict()
    assert list(state) == list(reference_state_dict_spec)  # same keys, same order
    for key, spec in reference_state_dict_spec.items():
        assert list(state[key].shape) == spec["shape"], key
        assert str(state[key].dtype) == spec["dtype"], key


def test_student_parameter_counts():
    model = build_student("tinyvit_5m")
    total = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for p in model.image_encoder.parameters())
    assert round(total / 1e6, 2) == 10.13
    assert round(encoder / 1e6, 2) == 6.07


@torch.inference_mode()
def test_student_embedding_shape_at_1024():
    model = build_student("tinyvit_5m").eval()
    assert model.image_encoder(torch.zeros(1, 3, 1024, 1024)).shape == (1, 256, 64, 64)


@pytest.mark.parametrize("size", [256, 512, 320])
@torch.inference_mode()
def test_student_other_image_sizes(size):
    model = build_student("tinyvit_5m", image_size=size).eval()
    assert model.image_encoder(torch.zeros(1, 3, size, size)).shape == (1, 256, size // 16, size // 16)
    assert model.prompt_encoder.image_embedding_size == (size // 16, size // 16)


@torch.inference_mode()
def test_toy_variants_shapes():
    student = build_student("tinyvit_toy").eval()
    teacher = build_teacher("vit_toy")
    x = torch.zeros(2, 3, 256, 256)
    assert student.image_encoder(x).shape == teacher.image_encoder(x).shape == (2, 128, 16, 16)
    assert sum(p.numel() for p in student.image_encoder.parameters()) < sum(
        p.numel() for p in teacher.image_encoder.parameters()
    )
    sparse, dense = student.prompt_encoder(points=None, boxes=torch.tensor([[10.0, 10, 100, 100]]), masks=None)
    low_res, iou = student.mask_decoder(
        image_embeddings=student.image_encoder(x[:1]),
        image_pe=student.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
    )
    assert low_res.shape == (1, 3, 64, 64) and iou.shape == (1, 3)


def test_teacher_is_frozen_and_in_eval_mode():
    teacher = build_teacher("vit_toy")
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_sam_teachers_come_from_segment_anything_registry():
    """ViT-H/L/B signatures (built on the meta device) have SAM's published sizes."""
    builders = architecture_builders()
    expected_millions = {"vit_h": 641.1, "vit_l": 312.3, "vit_b": 93.7}
    with torch.device("meta"):
        for name, millions in expected_millions.items():
            model = builders[name]()
            assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions, name
            assert model.image_encoder.img_size == 1024


def test_real_teacher_builds_frozen():
    teacher = build_teacher("vit_b")
    assert teacher.arch == "vit_b" and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_unknown_architecture_and_bad_size():
    with pytest.raises(KeyError, match="tinyvit_5m"):
        build_student("tinyvit_50m")
    with pytest.raises(KeyError, match="vit_h"):
        build_teacher("vit_x")
    with pytest.raises(ValueError, match="multiple of 16"):
        build_student("tinyvit_5m", image_size=1000)
    with pytest.raises(ValueError, match="1024 px only"):
        build_teacher("vit_b", image_size=512)


def test_load_model_names_every_architecture_when_unknown():
    from tinysam.loader import load_model

    with pytest.raises(KeyError, match="tinyvit_5m, tinyvit_toy, vit_b, vit_h, vit_l, vit_toy"):
        load_model("vit_t")
