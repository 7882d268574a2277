"""The toy world: SA-1B schema, exact masks, determinism, COCO files, command line."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tinysam.data.toyworld import KINDS, STUFF, ToyWorldConfig, generate, generate_image, image_rng, parse_config

SA1B_ANNOTATION_FIELDS = {
    "id": int,
    "segmentation": dict,
    "bbox": list,
    "area": int,
    "predicted_iou": float,
    "stability_score": float,
    "point_coords": list,
    "crop_box": list,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return generate(ToyWorldConfig(out=str(tmp_path_factory.mktemp("toy") / "world"), n_train=6, n_val=4, seed=3))


def test_sa1b_schema_and_pycocotools_round_trip(world):
    records = sorted((world / "train").glob("sa_*.json"))
    assert len(records) == 6 and len(list((world / "train").glob("sa_*.jpg"))) == 6
    for path in records:
        record = json.loads(path.read_text())
        assert set(record) == {"image", "annotations"}
        image = record["image"]
        assert set(image) == {"image_id", "file_name", "height", "width"}
        assert image["file_name"] == path.with_suffix(".jpg").name and path.stem == f"sa_{image['image_id']}"
        assert 1 <= len(record["annotations"]) <= 12
        for ann in record["annotations"]:
            assert set(ann) == set(SA1B_ANNOTATION_FIELDS)
            for key, kind in SA1B_ANNOTATION_FIELDS.items():
                assert isinstance(ann[key], kind), key
            rle = ann["segmentation"]
            assert rle["size"] == [image["height"], image["width"]] and isinstance(rle["counts"], str)
            mask = mask_utils.decode(dict(rle, counts=rle["counts"].encode()))
            assert mask.sum() == ann["area"] == mask_utils.area(dict(rle, counts=rle["counts"].encode()))
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            ((px, py),) = ann["point_coords"]
            assert mask[int(py), int(px)] == 1, "point_coords lies inside its mask"
            assert ann["crop_box"] == [0, 0, image["width"], image["height"]]


def test_masks_are_disjoint_and_follow_painted_edges():
    cfg = ToyWorldConfig(image_size=128)
    inside_steps, edge_steps = [], []
    for index in range(8):
        toy = generate_image(image_rng(0, "train", index), cfg)
        assert 1 <= len(toy.instances) <= cfg.max_objects  # objects hidden by occlusion are dropped
        stack = np.stack([inst.mask for inst in toy.instances])
        assert stack.sum(0).max() == 1, "occlusion resolved: every pixel belongs to at most one mask"
        assert all(inst.kind in KINDS for inst in toy.instances)
        img = toy.image.astype(np.float32)
        for mask in stack:
            # horizontal neighbours: both inside the mask vs crossing its edge
            left, right = mask[:, :-1], mask[:, 1:]
            step = np.abs(img[:, 1:] - img[:, :-1]).sum(-1)
            inside_steps.append(step[left & right].mean())
            edge_steps.append(step[left ^ right].mean())
    assert np.mean(edge_steps) > 4 * np.mean(inside_steps)


def test_world_has_every_kind_and_small_objects(world):
    coco = COCO(str(world / "train" / "instances.json"))
    kinds = {coco.cats[a["category_id"]]["name"] for a in coco.anns.values()}
    assert kinds == set(KINDS)
    areas = np.array([a["area"] for a in coco.anns.values()]) / 256**2
    assert areas.min() < 0.005 and areas.max() > 0.05


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = generate(ToyWorldConfig(out=str(tmp_path / "a"), n_train=3, n_val=2, seed=7))
    b = generate(ToyWorldConfig(out=str(tmp_path / "b"), n_train=3, n_val=2, seed=7))
    c = generate(ToyWorldConfig(out=str(tmp_path / "c"), n_train=3, n_val=2, seed=8))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 1 + 2 * 2 + 2 * (3 + 2)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "train" / "sa_1.jpg").read_bytes() != (c / "train" / "sa_1.jpg").read_bytes()


def test_existing_world_is_reused_and_other_config_regenerated(tmp_path):
    out = tmp_path / "w"
    generate(ToyWorldConfig(out=str(out), n_train=2, n_val=1))
    stamp = (out / "train" / "sa_1.jpg").stat().st_mtime_ns
    generate(ToyWorldConfig(out=str(out), n_train=2, n_val=1))
    assert (out / "train" / "sa_1.jpg").stat().st_mtime_ns == stamp
    generate(ToyWorldConfig(out=str(out), n_train=3, n_val=1))
    assert len(list((out / "train").glob("*.jpg"))) == 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a toy world"):
        generate(ToyWorldConfig(out=str(tmp_path / "other"), n_train=1, n_val=1))


def test_ground_truth_scores_ap_one_against_itself(world):
    coco = COCO(str(world / "val" / "instances.json"))
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"], "score": 1.0}
        for a in coco.anns.values()
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(results), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_detections_are_jittered_with_misses_and_false_positives(tmp_path):
    world = generate(ToyWorldConfig(out=str(tmp_path / "w"), n_train=1, n_val=30, seed=1))
    coco = COCO(str(world / "val" / "instances.json"))
    detections = json.loads((world / "val" / "detections.json").read_text())
    assert {"image_id", "category_id", "bbox", "score"} == set(detections[0])
    n_gt = len(coco.anns)
    high = [d for d in detections if d["score"] >= 0.5]
    low = [d for d in detections if d["score"] < 0.5]
    assert 0.75 * n_gt < len(high) < 0.97 * n_gt, "about 10% of objects are missed"
    assert len(low) > 10, "scored false positives"
    assert all(d["bbox"][2] > 0 and d["bbox"][3] > 0 for d in detections)


def test_command_line(tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "tinysam.data.toyworld", f"out={out}", "n_train=2", "n_val=1", "image_size=64"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert len(list((out / "train").glob("*.jpg"))) == 2 and (out / "val" / "instances.json").is_file()
    with pytest.raises(ValueError, match=r"unknown keys \['n_trian'\]; usage: .*n_train=.*image_size="):
        parse_config(["n_trian=3"])


def test_stuff_regions_annotate_the_whole_background(tmp_path):
    world = generate(ToyWorldConfig(out=str(tmp_path / "w"), n_train=1, n_val=6, seed=2, stuff_regions=4))
    coco = COCO(str(world / "val" / "instances.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [*KINDS, STUFF]
    stuff_id = len(KINDS) + 1
    regions_per_image = []
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        stack = np.stack([coco.annToMask(a) for a in anns])
        assert stack.sum(0).min() == stack.sum(0).max() == 1, "objects and stuff tile the image exactly"
        regions_per_image.append(sum(a["category_id"] == stuff_id for a in anns))
    assert min(regions_per_image) >= 1 and max(regions_per_image) > 1 and max(regions_per_image) <= 4
    # each region has its own texture, so the border between two regions is an edge in the image
    toy = next(
        toy
        for toy in (generate_image(image_rng(2, "val", i), ToyWorldConfig(stuff_regions=4)) for i in range(6))
        if sum(inst.kind == STUFF for inst in toy.instances) > 1
    )
    label = np.zeros(toy.image.shape[:2], dtype=int)
    for k, inst in enumerate(toy.instances):
        label[inst.mask] = k + 1 if inst.kind == STUFF else -1
    left, right = label[:, :-1], label[:, 1:]
    step = np.abs(toy.image[:, 1:].astype(np.float32) - toy.image[:, :-1]).sum(-1)
    both_stuff = (left > 0) & (right > 0)
    assert step[both_stuff & (left != right)].mean() > 3 * step[both_stuff & (left == right)].mean()
