"""Zero-shot instance segmentation from boxes: plumbing, protocol choices and robustness."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from helpers import run_script_ok
from PIL import Image

from tinysam import Predictor
from tinysam.data.coco import CocoFormatError, load_coco_instances, load_detections
from tinysam.data.layouts import CocoLayout
from tinysam.data.toyworld import ToyWorldConfig, generate
from tinysam.eval.coco_instances import BoxSegmenter, evaluate, is_lvis, score_coco, segment_detections, select_best


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate(ToyWorldConfig(out=str(tmp_path_factory.mktemp("toy") / "w"), n_train=1, n_val=4, seed=3))


def gt_detections(coco) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in coco.dataset["annotations"]
    ]


class Oracle:
    """Returns the ground-truth mask of the annotation whose box is the prompt."""

    def __init__(self, coco):
        self.by_box = {
            tuple(np.round([x, y, x + w, y + h], 3)): coco.annToMask(a).astype(bool)
            for a in coco.dataset["annotations"]
            for x, y, w, h in [a["bbox"]]
        }

    def set_image(self, rgb):
        pass

    def __call__(self, boxes):
        return np.stack([self.by_box[tuple(np.round(b, 3))] for b in boxes])


def test_ground_truth_boxes_and_oracle_masks_score_ap_100(world, tmp_path):
    coco, _ = load_coco_instances(world / "val" / "instances.json")
    path = tmp_path / "gt_dets.json"
    path.write_text(json.dumps(gt_detections(coco)))
    seg = segment_detections(coco, load_detections(path, coco), world / "val", Oracle(coco))
    assert not seg.skipped and len(seg.results) == len(coco.dataset["annotations"])
    assert score_coco(coco, seg.results)["AP"] == 100.0
    # one wrong mask per image lowers it: the score is not a constant
    for r in seg.results[::5]:
        r["segmentation"] = seg.results[(seg.results.index(r) + 1) % len(seg.results)]["segmentation"]
    assert score_coco(coco, seg.results)["AP"] < 100.0


def test_select_best_takes_the_argmax_iou():
    low_res = torch.arange(2 * 3, dtype=torch.float32).view(2, 3, 1, 1).expand(2, 3, 4, 4)
    iou = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 0.7]])
    masks, best = select_best(low_res, iou)
    assert masks.shape == (2, 1, 4, 4)
    assert masks[:, 0, 0, 0].tolist() == [1.0, 3.0] and best.tolist() == pytest.approx([0.9, 0.8])


def test_batched_boxes_equal_one_box_per_call(world, toy_student):
    coco, _ = load_coco_instances(world / "val" / "instances.json")
    image_id = next(iter(coco.imgs))
    rgb = np.asarray(Image.open(world / "val" / coco.imgs[image_id]["file_name"]).convert("RGB"))
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in coco.imgToAnns[image_id])])
    batched, single = (
        BoxSegmenter(Predictor(toy_student), batch_size=64),
        BoxSegmenter(Predictor(toy_student), batch_size=1),
    )
    batched.set_image(rgb)
    single.set_image(rgb)
    a, b = batched(boxes), single(boxes)
    assert a.shape == (len(boxes), *rgb.shape[:2])
    assert (a != b).mean() < 1e-4


def test_robustness_cases_are_counted_not_fatal(world, tmp_path, toy_student):
    """Missing image, NaN box, zero-size box, box outside the image, grayscale image, unknown image id."""
    images = tmp_path / "images"
    shutil.copytree(world / "val", images)
    coco, _ = load_coco_instances(images / "instances.json")
    ids = sorted(coco.imgs)
    (images / coco.imgs[ids[0]]["file_name"]).unlink()
    grey = images / coco.imgs[ids[1]]["file_name"]
    Image.open(grey).convert("L").save(grey)
    dets = gt_detections(coco)
    n_missing = sum(d["image_id"] == ids[0] for d in dets)
    dets += [
        {"image_id": ids[2], "category_id": 1, "bbox": [float("nan"), 0, 5, 5], "score": 0.5},
        {"image_id": ids[2], "category_id": 1, "bbox": [3, 3, 0, 5], "score": 0.5},
        {"image_id": ids[2], "category_id": 1, "bbox": [900, 900, 20, 20], "score": 0.5},
        {"image_id": 123456, "category_id": 1, "bbox": [3, 3, 5, 5], "score": 0.5},
    ]
    (images / "dets.json").write_text(json.dumps(dets))
    dataset = CocoLayout(
        images=str(images), annotations=str(images / "instances.json"), detections=str(images / "dets.json")
    )
    report = evaluate(toy_student, tmp_path / "out", dataset, batch_size=8)
    counts = report["counts"]
    assert counts["skipped_detections"] == {"image file missing": n_missing, "box outside its image": 1}
    assert counts["dropped_detections"] == {
        "bbox has NaN or inf": 1,
        "bbox has zero or negative size": 1,
        "image id does not exist": 1,
    }
    accounted = (
        counts["segmented"] + sum(counts["skipped_detections"].values()) + sum(counts["dropped_detections"].values())
    )
    assert accounted == counts["detections_read"] == len(dets)
    results = json.loads((tmp_path / "out" / "segm_results.json").read_text())
    assert len(results) == counts["segmented"] and any(r["image_id"] == ids[1] for r in results)
    coco.loadRes(results)  # the written file is valid COCO results


def test_empty_detections_file(world, tmp_path, toy_student):
    (tmp_path / "empty.json").write_text("[]")
    dataset = CocoLayout(
        images=str(world / "val"),
        annotations=str(world / "val" / "instances.json"),
        detections=str(tmp_path / "empty.json"),
    )
    report = evaluate(toy_student, tmp_path / "out", dataset)
    assert report["segm"]["AP"] == 0.0 and report["counts"]["segmented"] == 0
    assert json.loads((tmp_path / "out" / "segm_results.json").read_text()) == []


def test_lvis_annotations_are_recognised(world, tmp_path, monkeypatch):
    data = json.loads((world / "val" / "instances.json").read_text())
    assert not is_lvis(world / "val" / "instances.json")
    for c in data["categories"]:
        c["frequency"] = "f"
    (tmp_path / "lvis.json").write_text(json.dumps(data))
    assert is_lvis(tmp_path / "lvis.json")
    from tinysam.eval.coco_instances import score_lvis

    monkeypatch.setitem(sys.modules, "lvis", None)  # whether or not lvis is installed: importing it now fails
    with pytest.raises(CocoFormatError, match="lvis.json is an LVIS file; .*pip install lvis"):
        score_lvis(tmp_path / "lvis.json", [{"image_id": 1}])


def test_evaluate_script_default_prints_the_table(tmp_path):
    out = run_script_ok("evaluate.py", ["output_dir=" + str(tmp_path / "eval")], cwd=tmp_path)
    assert "| AP | AP50 | AP75 | APs | APm | APl |" in out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert metrics["segm"]["AP"] > 5.0, "the shipped toy teacher segments its own world"
