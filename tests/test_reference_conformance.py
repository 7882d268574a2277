"""Our tinyvit_5m, loaded with the seeded official weights, reproduces the official outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from tinysam import Predictor

# The bounds the docs state (Checkpoints page), measured 1.05e-5 / 9.5e-7 / 1.3e-7 on x86 CPUs: twice that
# leaves room for another CPU's summation order and nothing more.
EMBEDDING_BOUND, LOGITS_BOUND, IOU_BOUND = 2e-5, 2e-6, 1e-6


@pytest.fixture(scope="module")
def reference_run(reference_dir, photos_dir, reference_student):
    """Run every reference prompt on every reference image; collect ours next to the official outputs."""
    outputs = load_file(reference_dir / "tinysam_vit_t_seed0_outputs.safetensors")
    prompts = json.loads((reference_dir / "tinysam_vit_t_seed0_prompts.json").read_text())["prompts"]
    predictor = Predictor(reference_student)
    embeddings, decoded = {}, {}
    for image in dict.fromkeys(p["image"] for p in prompts):
        predictor.set_image(photos_dir / image)
        group = [p for p in prompts if p["image"] == image]
        index = group[0]["index"]
        assert predictor.original_size == tuple(group[0]["original_size"])
        embeddings[index] = (predictor.features[0].numpy(), outputs[f"img{index}.embedding"].numpy())
        for p in group:
            kwargs = {}
            if p["points"] is not None:
                kwargs.update(point_coords=np.array(p["points"]), point_labels=np.array(p["labels"]))
            if p["box_xyxy"] is not None:
                kwargs["boxes"] = np.array(p["box_xyxy"])
            masks, iou, low_res = predictor.predict(**kwargs, multimask_output=True)
            key = f"img{index}.{p['kind']}"
            decoded[key] = (
                masks,
                iou,
                low_res,
                outputs[f"{key}.iou"].numpy(),
                outputs[f"{key}.low_res_logits"].numpy(),
            )
    return embeddings, decoded


def test_every_reference_prompt_is_covered(reference_run):
    embeddings, decoded = reference_run
    assert len(embeddings) == 2
    assert len(decoded) == 8


def test_embeddings_match_official(reference_run):
    for ours, official in reference_run[0].values():
        assert ours.shape == official.shape == (256, 64, 64)
        assert np.abs(ours - official).max() <= EMBEDDING_BOUND


def test_logits_and_iou_match_official(reference_run):
    for key, (masks, iou, low_res, official_iou, official_logits) in reference_run[1].items():
        assert low_res.shape == official_logits.shape == (3, 256, 256), key
        assert np.abs(low_res - official_logits).max() <= LOGITS_BOUND, key
        assert np.abs(iou - official_iou).max() <= IOU_BOUND, key
        assert masks.dtype == np.bool_ and masks.shape[0] == 3
