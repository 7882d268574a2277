"""Prompt mIoU: deterministic clicks from error regions, batched prompting, both dataset layouts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tinysam import Predictor, build_teacher, load_model
from tinysam.assets import asset_path
from tinysam.data.layouts import CocoLayout, Sa1bLayout
from tinysam.data.toyworld import ToyWorldConfig, generate
from tinysam.eval.prompt_miou import evaluate, interior_point, mask_boxes, next_click


def test_interior_point_is_deep_inside():
    rect = np.zeros((50, 80), dtype=bool)
    rect[10:31, 20:61] = True
    assert interior_point(rect) == (40, 20)
    ring = np.zeros((101, 101), dtype=bool)
    yy, xx = np.mgrid[:101, :101]
    r = np.hypot(yy - 50, xx - 50)
    ring[(r > 20) & (r < 40)] = True
    x, y = interior_point(ring)
    assert ring[y, x] and 25 < np.hypot(y - 50, x - 50) < 35, "in the ring's middle, not its empty centre"


def test_interior_point_of_thin_and_large_regions():
    line = np.zeros((10, 1000), dtype=bool)
    line[4, 3:997] = True  # one pixel wide and long: subsampling would miss it
    x, y = interior_point(line)
    assert line[y, x]
    big = np.zeros((2000, 2000), dtype=bool)
    big[100:1900, 300:1500] = True
    x, y = interior_point(big)
    assert abs(x - 900) <= 16 and abs(y - 1000) <= 16
    with pytest.raises(ValueError, match="empty"):
        interior_point(np.zeros((4, 4), dtype=bool))


def test_next_click_lands_in_the_error_with_the_right_label():
    gt = np.zeros((64, 64), dtype=bool)
    gt[10:50, 10:50] = True
    missed = gt.copy()
    missed[10:50, 30:50] = False  # right half missed -> positive click there
    x, y, label = next_click(missed, gt)
    assert label == 1 and gt[y, x] and not missed[y, x]
    spilled = gt.copy()
    spilled[50:64, :] = True  # spill below -> negative click there
    x, y, label = next_click(spilled, gt)
    assert label == 0 and spilled[y, x] and not gt[y, x]
    assert next_click(gt, gt)[2] == -1


def test_mask_boxes_cover_whole_pixels():
    m = np.zeros((1, 20, 30), dtype=bool)
    m[0, 5:9, 7:12] = True
    assert mask_boxes(m).tolist() == [[7, 5, 12, 9]]


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return generate(ToyWorldConfig(out=str(tmp_path_factory.mktemp("toy") / "w"), n_train=1, n_val=3, seed=4)) / "val"


def test_prompt_miou_against_a_different_teacher(val, tmp_path):
    """Student vs teacher is each object's IoU between the two models' best masks for the same GT box,
    recomputed here with two Predictors; a teacher that differs gives less than 1."""
    student = load_model("tinyvit_toy", asset_path("toy_student.safetensors"))
    dataset = CocoLayout(images=str(val), annotations=str(val / "instances.json"))
    report = evaluate(
        student,
        tmp_path,
        dataset,
        clicks=1,
        teacher_model="vit_toy",
        teacher_checkpoint=asset_path("toy_teacher.safetensors"),
    )
    ours, theirs = Predictor(student), Predictor(load_model("vit_toy", asset_path("toy_teacher.safetensors")))
    expected = []
    for _, rgb, gt in dataset.instances(Counter()):
        boxes = mask_boxes(gt)
        best = []
        for predictor in (ours, theirs):
            predictor.set_image(rgb)
            masks, scores, _ = predictor.predict(boxes=boxes, multimask_output=True)
            best.append(masks[np.arange(len(masks)), scores.argmax(1)])
        inter, union = (best[0] & best[1]).sum((1, 2)), (best[0] | best[1]).sum((1, 2))
        expected += list(np.where(union > 0, inter / np.maximum(union, 1), 1.0))
    assert report["objects"]["all"] == len(expected)
    assert report["miou"]["box"]["teacher"]["all"] == pytest.approx(float(np.mean(expected)), abs=1e-4)
    assert 0.2 < report["miou"]["box"]["teacher"]["all"] < 0.95, "the two models differ, and agree on much"
    assert report["miou"]["box"]["teacher"]["all"] != report["miou"]["box"]["gt"]["all"]


def test_prompt_miou_against_itself_as_teacher(val, tmp_path):
    """The same model as teacher gives IoU 1 on every prompt; vs GT it is a real, lower number."""
    teacher = build_teacher("vit_toy", asset_path("toy_teacher.safetensors"))
    dataset = CocoLayout(images=str(val), annotations=str(val / "instances.json"))
    report = evaluate(
        teacher,
        tmp_path,
        dataset,
        clicks=2,
        teacher_model="vit_toy",
        teacher_checkpoint=str(asset_path("toy_teacher.safetensors")),
    )
    miou = report["miou"]
    assert set(miou) == {"box", "1_click", "2_clicks"}
    for kind in miou.values():
        assert kind["teacher"]["all"] == 1.0
        assert 0.2 < kind["gt"]["all"] < 1.0
    objects = report["objects"]
    assert objects["all"] == objects["small"] + objects["medium"] + objects["large"] > 0
    assert (tmp_path / "metrics.json").is_file()
    # the SA-1B layout of the same images holds the same objects
    same = evaluate(teacher, tmp_path / "sa1b", Sa1bLayout(images=str(val)), clicks=1)
    assert same["objects"] == objects
    assert same["miou"]["box"]["gt"]["all"] == pytest.approx(miou["box"]["gt"]["all"], abs=1e-4)


def test_iou_of_two_empty_masks_is_one():
    from tinysam.eval.prompt_miou import iou

    empty = np.zeros((2, 4, 4), dtype=bool)
    full = np.ones((2, 4, 4), dtype=bool)
    assert iou(empty, empty).tolist() == [1.0, 1.0] and iou(empty, full).tolist() == [0.0, 0.0]
