"""Every inference and training path on one device, checked against the CPU where it can differ.

The device is ``TINYSAM_TEST_DEVICE`` (default ``cpu``): the suite runs these on the CPU, and
``python bench/gpu_check.py`` runs them with ``TINYSAM_TEST_DEVICE=cuda`` on a GPU machine. On the CPU
the comparisons are exact by construction; what they check there is that each path runs end to end.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers import run_script_ok, small_train_run

from tinysam import DenseMaskGenerator, Predictor, load_model
from tinysam.assets import asset_path
from tinysam.data.layouts import CocoLayout
from tinysam.data.toyworld import ToyWorldConfig, generate, generate_image, image_rng
from tinysam.eval.coco_instances import evaluate

DEVICE = os.environ.get("TINYSAM_TEST_DEVICE", "cpu")


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return generate_image(image_rng(0, "val", 1), ToyWorldConfig(out="unused", stuff_regions=4)).image


def test_the_device_is_there():
    assert torch.device(DEVICE).type == "cpu" or torch.cuda.is_available(), f"{DEVICE} asked for, none visible"


@pytest.mark.parametrize("backend", ["eager", "factored"])
def test_predictor_on_the_device_matches_the_cpu(image, backend):
    boxes = np.array([[20, 30, 120, 160], [100, 40, 240, 200]])
    out = {}
    for device in ("cpu", DEVICE):
        predictor = Predictor(load_model("tinyvit_toy", asset_path("toy_student.safetensors"), device), backend)
        predictor.set_image(image)
        out[device] = predictor.predict(boxes=boxes)
    (m_cpu, iou_cpu, low_cpu), (m_dev, iou_dev, low_dev) = out["cpu"], out[DEVICE]
    assert np.abs(low_cpu - low_dev).max() < 1e-2 and np.abs(iou_cpu - iou_dev).max() < 1e-3
    assert (
        min(mask_iou(a, b) for a, b in zip(m_cpu.reshape(-1, *m_cpu.shape[-2:]), m_dev.reshape(-1, *m_dev.shape[-2:])))
        > 0.98
    )


def test_everything_on_the_device_matches_the_cpu(image):
    masks = {}
    for device in ("cpu", DEVICE):
        model = load_model("vit_toy", asset_path("toy_teacher_stuff.safetensors"), device)
        generator = DenseMaskGenerator(model, points_per_side=16, pred_iou_thresh=0.7, stability_score_thresh=0.85)
        masks[device] = [r["segmentation"] for r in generator.generate(image)]
    assert masks["cpu"], "the toy model keeps masks at the toy thresholds"
    for a in masks["cpu"]:
        assert max(mask_iou(a, b) for b in masks[DEVICE]) >= 0.95


def test_evaluation_on_the_device_matches_the_cpu(tmp_path):
    world = generate(ToyWorldConfig(out=str(tmp_path / "w"), n_train=0, n_val=4, seed=0)) / "val"
    dataset = CocoLayout(str(world), str(world / "instances.json"), str(world / "detections.json"))
    ap = {}
    for device in ("cpu", DEVICE):
        model = load_model("vit_toy", asset_path("toy_teacher.safetensors"), device)
        ap[device] = evaluate(model, tmp_path / device, dataset)["segm"]["AP"]
    assert ap["cpu"] > 5.0 and abs(ap["cpu"] - ap[DEVICE]) < 1.0, ap


def test_bf16_mixed_training_on_the_device_resumes(tmp_path):
    trainer = ["trainer=cpu"] if DEVICE == "cpu" else ["trainer=gpu"]
    overrides = [*small_train_run(tmp_path, steps=2, every=1), *trainer, "trainer.precision=bf16-mixed"]
    run_script_ok("train.py", overrides, tmp_path)
    out = run_script_ok("train.py", [*overrides, "trainer.max_steps=3", "ckpt_path=last"], tmp_path)
    results = json.loads((tmp_path / "outputs" / "train" / "toy_distill" / "results.json").read_text())
    assert results["global_step"] == 3 and "resuming data at epoch" in out, out[-2000:]
