"""Predictor: image inputs, batched decoding, clipping and prompt validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tinysam import Predictor, PromptError
from tinysam.data.transforms import ImageError, load_image


@pytest.fixture()
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(200, 300, 3), dtype=np.uint8)
    img[50:150, 80:220] = (230, 40, 40)  # a flat object so masks are not pure noise
    return img


@pytest.fixture()
def predictor(toy_student, image) -> Predictor:
    p = Predictor(toy_student)
    p.set_image(image)
    return p


def _features(model, image) -> torch.Tensor:
    p = Predictor(model)
    p.set_image(image)
    return p.features


def test_image_formats_give_the_same_embedding(toy_student, image):
    reference = _features(toy_student, image)
    alpha = np.concatenate([image, np.full(image.shape[:2] + (1,), 77, np.uint8)], axis=2)
    assert torch.equal(_features(toy_student, alpha), reference)
    assert torch.equal(_features(toy_student, image.astype(np.uint16) * 257), reference)
    assert torch.equal(_features(toy_student, image.astype(np.float32) / 255.0), reference)
    grey = image[..., 0]
    assert torch.equal(_features(toy_student, grey), _features(toy_student, np.stack([grey] * 3, axis=2)))
    assert reference.shape == (1, 128, 16, 16)


def test_path_input_applies_exif_orientation(tmp_path, toy_student, image):
    plain, rotated = tmp_path / "plain.jpg", tmp_path / "rotated.jpg"
    Image.fromarray(image).save(plain, quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(image).save(rotated, quality=95, exif=exif)
    upright = load_image(rotated)
    assert upright.shape == (300, 200, 3)
    assert np.array_equal(upright, np.rot90(load_image(plain), k=-1))
    p = Predictor(toy_student)
    p.set_image(rotated)
    assert p.original_size == (300, 200)
    assert torch.equal(p.features, _features(toy_student, np.ascontiguousarray(upright)))


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((10, 10, 5), np.uint8), "HxW, HxWx3 or HxWx4"),
        (np.full((10, 10, 3), 2.0, np.float32), r"\[0, 1\]"),
        (np.full((10, 10, 3), np.nan, np.float32), "NaN"),
        (np.zeros((10, 10, 3), np.int32), "unsupported dtype"),
        (np.zeros((0, 10, 3), np.uint8), "zero size"),
    ],
)
def test_bad_images_are_refused(toy_student, bad, match):
    with pytest.raises(ImageError, match=match):
        Predictor(toy_student).set_image(bad)


def test_batched_boxes_equal_one_at_a_time(predictor):
    boxes = np.array([[80, 50, 220, 150], [0, 0, 299, 199], [10, 20, 60, 90], [150, 100, 290, 190], [5, 5, 15, 15]])
    masks, iou, low_res = predictor.predict(boxes=boxes)
    assert masks.shape == (5, 3, 200, 300) and iou.shape == (5, 3) and low_res.shape == (5, 3, 64, 64)
    logits, _, _ = predictor.predict(boxes=boxes, return_logits=True)
    for i, box in enumerate(boxes):
        m, s, lr = predictor.predict(boxes=box)
        assert m.shape == (3, 200, 300)
        assert np.abs(lr - low_res[i]).max() <= 1e-4
        assert np.abs(s - iou[i]).max() <= 1e-4
        flipped = m != masks[i]
        assert np.all(np.abs(logits[i][flipped]) <= 1e-3), "only pixels on the threshold may flip"


def test_batched_points_equal_one_at_a_time(predictor):
    coords = np.array([[[100, 100], [30, 30]], [[150, 60], [250, 180]], [[10, 190], [290, 5]]], dtype=np.float32)
    labels = np.array([[1, 0], [1, 1], [1, 0]])
    _, iou, low_res = predictor.predict(point_coords=coords, point_labels=labels)
    for i in range(3):
        _, s, lr = predictor.predict(point_coords=coords[i], point_labels=labels[i])
        assert np.abs(lr - low_res[i]).max() <= 1e-4 and np.abs(s - iou[i]).max() <= 1e-4


def test_points_broadcast_against_boxes(predictor):
    boxes = np.array([[80, 50, 220, 150], [10, 20, 60, 90]])
    point = np.array([[100.0, 100.0]])
    _, _, low_res = predictor.predict(point_coords=point, point_labels=np.array([1]), boxes=boxes)
    _, _, second = predictor.predict(point_coords=point, point_labels=np.array([1]), boxes=boxes[1])
    assert low_res.shape[0] == 2 and np.abs(low_res[1] - second).max() <= 1e-4


def test_boxes_partly_outside_are_clipped(predictor):
    outside = predictor.predict(boxes=np.array([-50.0, -20.0, 100.0, 400.0]))[2]
    clipped = predictor.predict(boxes=np.array([0.0, 0.0, 100.0, 200.0]))[2]
    assert np.array_equal(outside, clipped)


def test_single_mask_output_logits_and_mask_input(predictor):
    masks, iou, low_res = predictor.predict(
        boxes=np.array([80, 50, 220, 150]), multimask_output=False, return_logits=True
    )
    assert masks.shape == (1, 200, 300) and masks.dtype == np.float32 and iou.shape == (1,)
    click = {"point_coords": np.array([[150, 100]]), "point_labels": np.array([1]), "multimask_output": False}
    refined, _, refined_low = predictor.predict(mask_input=low_res, **click)
    assert refined.shape == (1, 200, 300) and refined.dtype == np.bool_
    # the mask input reaches the decoder: the same click without it, or with another mask, decodes differently
    _, _, plain_low = predictor.predict(**click)
    _, _, other_low = predictor.predict(mask_input=-low_res, **click)
    assert np.abs(refined_low - plain_low).max() > 1e-3 and np.abs(refined_low - other_low).max() > 1e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"boxes": np.array([10.0, np.nan, 50, 50])}, "NaN"),
        ({"boxes": np.array([50.0, 10, 20, 60])}, "x1 > x0"),
        ({"boxes": np.array([[10.0, 10, 50]])}, "4 values"),
        ({"boxes": np.zeros((2, 2, 4))}, r"shape \(4\) or \(N, 4\)"),
        ({"boxes": np.array([400.0, 300, 500, 350])}, "outside the 300x200 image"),
        ({"point_coords": np.array([[10.0, 10]]), "point_labels": np.array([1, 0])}, "point_labels must have shape"),
        ({"point_coords": np.array([[10.0, 10]])}, "given together"),
        ({"point_coords": np.array([[10.0, 10]]), "point_labels": np.array([5])}, "foreground"),
        ({"point_coords": np.array([[np.inf, 10]]), "point_labels": np.array([1])}, "NaN or inf"),
        ({"point_coords": np.array([10.0, 10, 3]), "point_labels": np.array([1])}, "XY pairs|shape"),
        ({"mask_input": np.zeros((1, 32, 32))}, r"\(1, 64, 64\)"),
        ({}, "at least one"),
        (
            {
                "boxes": np.zeros((2, 4)) + [0, 0, 5, 5],
                "point_coords": np.zeros((3, 1, 2)),
                "point_labels": np.ones((3, 1)),
            },
            "disagree",
        ),
    ],
)
def test_invalid_prompts_raise_clear_errors(predictor, kwargs, match):
    with pytest.raises(PromptError, match=match) as info:
        predictor.predict(**kwargs)
    assert "\n" not in str(info.value)


def test_predict_before_set_image(toy_student):
    with pytest.raises(RuntimeError, match="set_image"):
        Predictor(toy_student).predict(boxes=np.array([0, 0, 10, 10]))


def test_n_boxes_take_one_decoder_call(predictor):
    calls = []
    handle = predictor.model.mask_decoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        predictor.predict(boxes=np.array([[0, 0, 50, 50]] * 40) + np.arange(40)[:, None])
    finally:
        handle.remove()
    assert len(calls) == 1
