"""Grounded-SAM with tinysam models, fully offline: a tiny random Grounding DINO built from its config.

The detector is saved with ``save_pretrained`` and loaded back through the path users take
(``GroundingDino(folder)``, ``local_files_only``); a real Grounding DINO folder takes the same code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers  # the dev install brings the grounded extra
from helpers import REPO, fails_in_one_line, hiding_env, run_python
from PIL import Image
from pycocotools.coco import COCO

from tinysam import GroundedSegmenter, GroundingDino, Predictor
from tinysam.data.sa1b import SA1BDataset
from tinysam.data.toyworld import ToyWorldConfig, generate
from tinysam.grounded.detector import DetectorError, chunk_captions, clean_phrase
from tinysam.grounded.segmenter import class_wise_nms

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "dog", "cat", "frisbee", "person", "car", "red", "ball"]


@pytest.fixture(scope="session")
def detector_dir(tmp_path_factory) -> Path:
    """A tiny, randomly initialised Grounding DINO (Swin + BERT from small configs) saved as users save one."""
    folder = tmp_path_factory.mktemp("grounding-dino-tiny-random")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"))
    swin = transformers.SwinConfig(
        image_size=224,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=7,
        out_features=["stage2", "stage3", "stage4"],
    )
    bert = transformers.BertConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    config = transformers.GroundingDinoConfig(
        backbone_config=swin,
        text_config=bert,
        d_model=32,
        num_queries=20,
        encoder_layers=1,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        max_text_len=10,
    )
    torch.manual_seed(0)
    transformers.GroundingDinoForObjectDetection(config).save_pretrained(folder)
    image_processor = transformers.GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 160})
    transformers.GroundingDinoProcessor(image_processor, tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> np.ndarray:
    world = generate(ToyWorldConfig(out=str(tmp_path_factory.mktemp("w") / "w"), n_train=0, n_val=2))
    return np.asarray(Image.open(sorted((world / "val").glob("*.jpg"))[0]).convert("RGB"))


def direct(folder: Path, rgb: np.ndarray, caption: str, box: float, text: float) -> dict:
    """transformers' model and processor run directly, as their documentation shows."""
    processor = transformers.GroundingDinoProcessor.from_pretrained(folder)
    model = transformers.GroundingDinoForObjectDetection.from_pretrained(folder).eval()
    inputs = processor(images=Image.fromarray(rgb), text=caption, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    return processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=box, text_threshold=text, target_sizes=[rgb.shape[:2]]
    )[0]


def test_boxes_phrases_and_scores_are_those_of_transformers(detector_dir, photo):
    detector = GroundingDino(detector_dir, box_threshold=0.35, text_threshold=0.25)
    ours = detector.detect(photo, "Dog. Cat.")
    theirs = direct(detector_dir, photo, "dog. cat.", 0.35, 0.25)
    specials = detector.processor.tokenizer.all_special_tokens
    phrases = [clean_phrase(t, specials) for t in theirs["text_labels"]]
    named = np.array([bool(p) for p in phrases])
    assert 0 < len(ours) == named.sum() and not named.all()  # random weights: some boxes name only "." or [SEP]
    np.testing.assert_allclose(ours.boxes, theirs["boxes"].numpy()[named], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(ours.scores, theirs["scores"].numpy()[named], rtol=1e-6)
    assert ours.phrases == [p for p in phrases if p] and set(ours.phrases) <= {"dog", "cat", "dog cat"}


def test_masks_are_the_predictors_for_those_boxes(detector_dir, photo, toy_student):
    segmenter = GroundedSegmenter(GroundingDino(detector_dir), toy_student, nms_threshold=1.0)
    records = segmenter.segment(photo, ["dog", "cat"])
    boxes = segmenter.boxes(photo, ["dog", "cat"])
    assert len(records) == len(boxes) > 0
    predictor = Predictor(toy_student)
    predictor.set_image(photo)
    masks, iou, _ = predictor.predict(boxes=boxes.boxes, multimask_output=True)
    best = iou.argmax(1)
    for i, record in enumerate(records):
        assert np.array_equal(record["segmentation"], masks[i, best[i]])
        assert record["predicted_iou"] == pytest.approx(float(iou[i, best[i]]))
        assert record["phrase"] == boxes.phrases[i] and record["bbox_xyxy"] == pytest.approx(boxes.boxes[i].tolist())


def test_a_class_list_is_chunked_to_the_token_limit_and_merged(detector_dir, photo):
    detector = GroundingDino(detector_dir)
    names = ["dog", "cat", "frisbee", "person", "car", "red ball"]
    chunks = chunk_captions(names, detector.count_tokens, detector.max_tokens)
    assert len(chunks) > 1 and all(detector.count_tokens(c) <= detector.max_tokens for c in chunks)
    assert " ".join(chunks).replace(" .", "").split() == " ".join(names).split()
    merged = detector.detect(photo, names)
    parts = [detector.detect(photo, c) for c in chunks]
    assert len(merged) == sum(len(p) for p in parts)
    # a list that fits in one caption is exactly that caption
    short = detector.detect(photo, ["dog", "cat"])
    caption = detector.detect(photo, "dog . cat .")
    assert np.array_equal(short.boxes, caption.boxes) and short.phrases == caption.phrases


def test_no_detection_gives_an_empty_list(detector_dir, photo, toy_student):
    segmenter = GroundedSegmenter(GroundingDino(detector_dir, box_threshold=1.0), toy_student)
    assert segmenter.segment(photo, "dog.") == []


def test_class_wise_nms_keeps_boxes_of_other_phrases(detector_dir):
    from tinysam.grounded.detector import TextDetections

    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10]], np.float32)
    dets = TextDetections(boxes, np.array([0.9, 0.8, 0.7], np.float32), ["dog", "dog", "cat"])
    kept = class_wise_nms(dets, 0.5)
    assert kept.phrases == ["dog", "cat"] and kept.scores.tolist() == pytest.approx([0.9, 0.7])


@pytest.mark.parametrize(
    "kwargs, text, match",
    [
        ({}, "   ", "text is empty"),
        ({}, ["dog", " "], "empty class name"),
        ({"box_threshold": 1.5}, "dog.", r"box_threshold=1.5 must lie in \[0, 1\]"),
        ({"text_threshold": -0.1}, "dog.", r"text_threshold=-0.1 must lie in \[0, 1\]"),
    ],
)
def test_bad_prompts_and_thresholds_are_one_line(detector_dir, photo, kwargs, text, match):
    with pytest.raises(DetectorError, match=match):
        GroundingDino(detector_dir, **kwargs).detect(photo, text)


def test_a_folder_of_another_model_type_or_none_is_named(tmp_path):
    with pytest.raises(DetectorError, match="holds no config.json.*grounding-dino-tiny.*never downloads"):
        GroundingDino(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(DetectorError, match="holds a 'bert' model, not 'grounding-dino'"):
        GroundingDino(tmp_path)


def test_cli_labels_a_folder_as_coco_and_sa1b(detector_dir, tmp_path):
    world = generate(ToyWorldConfig(out=str(tmp_path / "w"), n_train=0, n_val=2))
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((world / "val").glob("*.jpg")):
        (images / path.name).write_bytes(path.read_bytes())
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "labels"
    code, log = run_python(
        [
            str(REPO / "evaluate.py"),
            "task=grounded",
            "detector=grounding_dino",
            f"detector.folder={detector_dir}",
            f"images={images}",
            "text=dog. cat.",
            f"out={out}",
            "model=tinyvit_toy",
            f"checkpoint={REPO / 'tinysam' / 'assets' / 'toy_student.safetensors'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert code == 0, log[-3000:]
    assert "skipped {'unreadable image': 1}" in log
    coco = COCO(str(out / "instances.json"))
    assert len(coco.imgs) == 2 and len(coco.anns) > 0 and coco.cats
    assert {c["name"] for c in coco.cats.values()} <= {"dog", "cat", "dog cat"}
    assert all((out / f"{Path(i['file_name']).stem}_overlay.png").is_file() for i in coco.imgs.values())
    samples = SA1BDataset([str(out)], 256)
    assert len(samples) == 2 and samples.load(0, 0)["boxes"].shape[-1] == 4


def test_the_cli_says_which_extra_or_detector_is_missing(tmp_path):
    fails_in_one_line(
        [str(REPO / "evaluate.py"), "task=grounded", "text=dog.", f"hydra.run.dir={tmp_path}"],
        tmp_path,
        "task=grounded needs a detector: add detector=grounding_dino",
    )
    fails_in_one_line(
        [
            str(REPO / "evaluate.py"),
            "task=grounded",
            "detector=grounding_dino",
            f"detector.folder={tmp_path / 'x'}",
            "text=dog.",
            f"hydra.run.dir={tmp_path}",
        ],
        tmp_path,
        "DetectorError",
        "holds no config.json",
    )

    code, out = run_python(
        [
            str(REPO / "evaluate.py"),
            "task=grounded",
            "detector=grounding_dino",
            "text=dog.",
            f"hydra.run.dir={tmp_path}",
        ],
        tmp_path,
        env=hiding_env(tmp_path, ["transformers"]),
    )
    assert code != 0 and "Traceback" not in out
    assert (
        out.strip()
        .splitlines()[-1]
        .endswith('text prompts need Hugging Face transformers: pip install "tinysam[grounded]"')
    )


def test_text_prompted_ap_scores_masks_and_the_detectors_boxes(detector_dir, tmp_path):
    """evaluate.py task=coco_instances detector=grounding_dino: category names prompt the detector (SegInW)."""
    world = generate(ToyWorldConfig(out=str(tmp_path / "w"), n_train=0, n_val=2))
    instances = json.loads((world / "val" / "instances.json").read_text())
    words = ["dog", "cat", "car", "red ball", "person", "frisbee"]  # the tiny vocabulary's words as category names
    assert len(instances["categories"]) <= len(words)
    instances["categories"] = [dict(c, name=n) for c, n in zip(instances["categories"], words)]
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    code, log = run_python(
        [
            str(REPO / "evaluate.py"),
            "detector=grounding_dino",
            f"detector.folder={detector_dir}",
            "detector.box_threshold=0.2",
            f"dataset.images={world / 'val'}",
            f"dataset.annotations={tmp_path / 'instances.json'}",
            "dataset.detections=null",
            "dataset.toyworld=null",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert code == 0, log[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["segm"]) == set(metrics["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert metrics["protocol"]["boxes"] == "category names prompt the detector"
    assert metrics["counts"]["segmented"] > 0 and "box AP (%) of the detector alone" in log
    results = json.loads((tmp_path / "run" / "segm_results.json").read_text())
    assert {r["category_id"] for r in results} <= {c["id"] for c in instances["categories"]}


def test_phrases_map_to_categories():
    from tinysam.eval.text_detections import phrase_category

    ids = {"dog": 1, "hot dog": 2, "cat": 3}
    assert phrase_category("dog", ids) == 1 and phrase_category("hot dog", ids) == 2
    assert phrase_category("big hot dog", ids) == 2 and phrase_category("catalog", ids) is None


def test_any_model_segments_teacher_and_onnx_student(detector_dir, photo):
    """The same boxes through the shipped toy teacher (eager) and the shipped toy student, eager and on
    onnxruntime (exported on the spot)."""
    from tinysam.assets import asset_path
    from tinysam.loader import load_model

    detector = GroundingDino(detector_dir)
    toy_student = load_model("tinyvit_toy", asset_path("toy_student.safetensors"))
    teacher = GroundedSegmenter(detector, load_model("vit_toy", asset_path("toy_teacher.safetensors")))
    eager = GroundedSegmenter(detector, toy_student)
    onnx = GroundedSegmenter(detector, toy_student, backend="onnx")
    a, b, c = (s.segment(photo, "dog. cat.") for s in (teacher, eager, onnx))
    assert len(a) == len(b) == len(c) > 0
    for x, y in zip(b, c):  # onnxruntime agrees with eager to float tolerance: masks differ in a few pixels at most
        assert (x["segmentation"] != y["segmentation"]).mean() < 1e-3
