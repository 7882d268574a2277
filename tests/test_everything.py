"""Segment everything: which points each round prompts, borders, records, determinism, annotation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from tinysam import DenseMaskGenerator, HierarchicalMaskGenerator, build_teacher
from tinysam.assets import asset_path
from tinysam.data.toyworld import ToyWorldConfig, generate
from tinysam.everything.annotate import annotate
from tinysam.everything.base import grid_points, pixel_of

H, W = 96, 160  # not square, on purpose


class Scripted:
    """Stands in for the decoder: every point gets the same three masks with the given logit maps."""

    def __init__(self, logit_map: torch.Tensor, iou: float = 0.99):
        self.logit_map, self.iou, self.calls = logit_map, iou, []

    def __call__(self, points: np.ndarray):
        self.calls.append(points.copy())
        n = len(points)
        return self.logit_map.expand(n, 3, *self.logit_map.shape[-2:]).clone(), torch.full((n, 3), self.iou)


def left_half_map() -> torch.Tensor:
    logits = torch.full((H, W), -20.0)
    logits[:, : W // 2] = 20.0
    return logits


@pytest.fixture()
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)


def test_round_two_prompts_exactly_the_points_outside_confident_pixels(toy_student, image):
    gen = HierarchicalMaskGenerator(toy_student, points_per_side=16, points_per_batch=50)
    gen._logits = Scripted(left_half_map())
    records = gen.generate(image)
    calls = gen._logits.calls
    sparse = grid_points(4, (H, W))
    np.testing.assert_allclose(np.concatenate(calls[:1]), sparse)  # 16 points fit one batch
    round_two = np.concatenate(calls[1:])
    dense = grid_points(16, (H, W))
    np.testing.assert_allclose(round_two, dense[dense[:, 0] >= W // 2])
    assert gen.prompts_per_round == [16, len(round_two)] and len(round_two) == 16 * 8
    assert len(records) == 1, "identical masks collapse to one under NMS"
    assert records[0]["bbox"] == [0, 0, W // 2 - 1, H - 1] and records[0]["area"] == H * W // 2


def test_nothing_confident_means_the_whole_dense_grid_and_an_empty_result(toy_student, image):
    gen = HierarchicalMaskGenerator(toy_student, points_per_side=8)
    gen._logits = Scripted(torch.full((H, W), -20.0))
    assert gen.generate(image) == []
    assert gen.prompts_per_round == [4, 64]
    low_iou = HierarchicalMaskGenerator(toy_student, points_per_side=8)
    low_iou._logits = Scripted(left_half_map(), iou=0.5)  # below pred_iou_thresh: not kept, not confident
    assert low_iou.generate(image) == [] and low_iou.prompts_per_round == [4, 64]


def test_everything_confident_skips_round_two(toy_student, image):
    gen = HierarchicalMaskGenerator(toy_student, points_per_side=8)
    gen._logits = Scripted(torch.full((H, W), 20.0))
    assert len(gen.generate(image)) == 1 and gen.prompts_per_round == [4]


def test_dense_prompts_the_full_grid_once(toy_student, image):
    gen = DenseMaskGenerator(toy_student, points_per_side=8, points_per_batch=10)
    gen._logits = Scripted(left_half_map())
    assert len(gen.generate(image)) == 1 and gen.prompts_per_round == [64]
    np.testing.assert_allclose(np.concatenate(gen._logits.calls), grid_points(8, (H, W)))


def test_grid_points_never_index_outside_the_image():
    for size in [(1, 1), (3, 500), (500, 3), (17, 23)]:
        rows, cols = pixel_of(grid_points(32, size), size)
        assert rows.min() >= 0 and rows.max() < size[0] and cols.min() >= 0 and cols.max() < size[1]
    edge = np.array([[0.0, 0.0], [23.0, 17.0], [22.999, 16.999], [-0.5, 30.0]])
    rows, cols = pixel_of(edge, (17, 23))
    assert rows.tolist() == [0, 16, 16, 16] and cols.tolist() == [0, 22, 22, 0]


@pytest.mark.parametrize("size", [(40, 300), (300, 40), (33, 33)])
def test_real_model_records_validate_at_any_aspect_ratio(size):
    model = build_teacher("vit_toy", asset_path("toy_teacher.safetensors"))
    rgb = np.random.default_rng(1).integers(0, 255, (*size, 3), dtype=np.uint8)
    rgb[size[0] // 4 : size[0] // 2, size[1] // 4 : size[1] // 2] = (250, 20, 20)  # something to segment
    kwargs = dict(points_per_side=8, pred_iou_thresh=0.5, stability_score_thresh=0.5)
    binary = HierarchicalMaskGenerator(model, **kwargs).generate(rgb)
    again = HierarchicalMaskGenerator(model, **kwargs).generate(rgb)
    assert len(binary) > 0
    assert len(again) == len(binary) and all(
        (a["segmentation"] == b["segmentation"]).all() for a, b in zip(binary, again)
    )
    coco = HierarchicalMaskGenerator(model, output_mode="coco_rle", **kwargs).generate(rgb)
    for b, c in zip(binary, coco):
        assert set(b) == {
            "segmentation",
            "area",
            "bbox",
            "predicted_iou",
            "point_coords",
            "stability_score",
            "crop_box",
        }
        mask = b["segmentation"]
        assert mask.dtype == bool and mask.shape == size and mask.sum() == b["area"]
        ys, xs = np.nonzero(mask)
        assert b["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        ((x, y),) = b["point_coords"]
        assert 0 <= x < size[1] and 0 <= y < size[0]
        assert b["predicted_iou"] >= 0.5 and b["stability_score"] >= 0.5 and b["crop_box"] == [0, 0, size[1], size[0]]
        assert (mask_utils.decode(c["segmentation"]).astype(bool) == mask).all()
    with pytest.raises(ValueError, match="output_mode"):
        DenseMaskGenerator(model, output_mode="png")


def test_annotate_folder_writes_sa1b_json_skips_bad_images_and_scores_ar(tmp_path):
    world = generate(ToyWorldConfig(out=str(tmp_path / "w"), n_train=1, n_val=3, seed=5))
    (world / "val" / "broken.jpg").write_bytes(b"not a jpeg")
    model = build_teacher("vit_toy", asset_path("toy_teacher.safetensors"))
    report = annotate(
        model,
        tmp_path / "run",
        images=str(world / "val"),
        out=str(tmp_path / "masks"),
        mode="hierarchical",
        overlays=True,
        annotations=str(world / "val" / "instances.json"),
        generator=dict(points_per_side=8, pred_iou_thresh=0.6, stability_score_thresh=0.8),
    )
    assert report["skipped"] == {"unreadable image": 1} and report["images"] == 3 and report["scored_images"] == 3
    written = sorted(p.name for p in (tmp_path / "masks").glob("*.json"))
    assert len(written) == 3 and len(list((tmp_path / "masks").glob("*_overlay.png"))) == 3
    record = json.loads((tmp_path / "masks" / written[0]).read_text())
    assert set(record) == {"image", "annotations"} and record["image"]["width"] == 256
    for ann in record["annotations"]:
        assert mask_utils.area(ann["segmentation"]) == ann["area"]
    assert report["masks"] > 0 and 0 < report["proposals"]["AR@100"] <= 100
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["proposals"] == report["proposals"]
