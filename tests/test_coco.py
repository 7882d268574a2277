"""COCO instances and detections readers: bad entries are dropped and counted, never silently."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tinysam.data.coco import CocoFormatError, load_coco_instances, load_detections
from tinysam.data.toyworld import ToyWorldConfig, generate


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    return generate(ToyWorldConfig(out=str(tmp_path_factory.mktemp("toy") / "w"), n_train=1, n_val=5, seed=2)) / "val"


def test_toy_instances_and_detections_load(val):
    coco, dropped = load_coco_instances(val / "instances.json")
    assert not dropped and len(coco.imgs) == 5 and len(coco.cats) == 5
    dets = load_detections(val / "detections.json", coco)
    raw = json.loads((val / "detections.json").read_text())
    assert len(dets) == len(raw) and not dets.dropped
    for image_dets in dets.by_image.values():
        assert np.all(np.diff(image_dets.scores) <= 0), "sorted by score"
        assert np.all(image_dets.boxes_xyxy[:, 2] > image_dets.boxes_xyxy[:, 0])
    first = raw[0]
    row = dets.by_image[first["image_id"]]
    x, y, w, h = first["bbox"]
    assert any(np.allclose(b, [x, y, x + w, y + h]) for b in row.boxes_xyxy), "XYWH converted to XYXY"


def test_bad_detections_are_counted(tmp_path, val):
    coco, _ = load_coco_instances(val / "instances.json")
    image_id = next(iter(coco.imgs))
    good = {"image_id": image_id, "category_id": 1, "bbox": [1, 2, 30, 40], "score": 0.9}
    bad = [
        dict(good, bbox=[float("nan"), 2, 30, 40]),
        dict(good, bbox=[1, 2, 0, 40]),
        dict(good, bbox=[1, 2, 30, -4]),
        dict(good, image_id=999_999),
        dict(good, bbox=[1, 2, 3]),
        {k: v for k, v in good.items() if k != "score"},
        "not a detection",
    ]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps([good, *bad]))
    dets = load_detections(path, coco)
    assert len(dets) == 1 and sum(dets.dropped.values()) == len(bad)
    assert dets.dropped["bbox has NaN or inf"] == 1
    assert dets.dropped["bbox has zero or negative size"] == 2
    assert dets.dropped["image id does not exist"] == 1


def test_empty_detection_file_is_valid(tmp_path, val):
    coco, _ = load_coco_instances(val / "instances.json")
    (tmp_path / "empty.json").write_text("[]")
    dets = load_detections(tmp_path / "empty.json", coco)
    assert len(dets) == 0 and not dets.by_image and not dets.dropped


def test_bad_annotations_are_counted(tmp_path, val):
    data = json.loads((val / "instances.json").read_text())
    n = len(data["annotations"])
    data["annotations"][0]["bbox"] = [0, 0, 0, 5]
    data["annotations"][1]["image_id"] = 123456789
    data["annotations"][2]["category_id"] = 99
    (tmp_path / "inst.json").write_text(json.dumps(data))
    coco, dropped = load_coco_instances(tmp_path / "inst.json")
    assert len(coco.anns) == n - 3
    assert dropped == {
        "bbox has zero or negative size": 1,
        "image id does not exist": 1,
        "category id does not exist": 1,
    }


@pytest.mark.parametrize("content, match", [("{", "not valid JSON"), ('{"images": []}', "'annotations' is missing")])
def test_unusable_instances_file(tmp_path, content, match):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(CocoFormatError, match=match):
        load_coco_instances(tmp_path / "bad.json")


def test_detections_must_be_a_list(tmp_path, val):
    coco, _ = load_coco_instances(val / "instances.json")
    (tmp_path / "d.json").write_text('{"annotations": []}')
    with pytest.raises(CocoFormatError, match="JSON list"):
        load_detections(tmp_path / "d.json", coco)
    with pytest.raises(CocoFormatError, match="does not exist"):
        load_detections(tmp_path / "missing.json", coco)
