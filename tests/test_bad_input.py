"""Bad input as a new user hits it: one line naming the file or field and the fix, a non-zero exit, nothing lost.

Cases that came through an entry point are run through it, in a subprocess.
"""

from __future__ import annotations

import json
import pickle
import shutil
import signal
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import REPO, fails_in_one_line, run_python, run_script, run_script_ok, small_train_run
from PIL import Image

from tinysam import CheckpointError, build_student, load_checkpoint
from tinysam.data.toyworld import ToyWorldConfig, generate
from tinysam.distill.callbacks import StepProgressBar
from tinysam.distill.train import resolve_ckpt_path
from tinysam.models.checkpoint import read_state_dict


def _text(path: Path) -> None:
    path.write_text("my notes about SAM\n")


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _foreign_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "not a checkpoint")


def _foreign_pickle(path: Path) -> None:  # a plain dict of arrays pickled by another framework
    path.write_bytes(pickle.dumps({"image_encoder.patch_embed.weight": np.zeros((3, 3), np.float32)}))


def _json(path: Path) -> None:
    path.write_text(json.dumps({"model": "tinysam"}))


@pytest.mark.parametrize(
    "name, make",
    [
        ("notes.pth", _text),
        ("noise.pth", _random_bytes),
        ("archive.pth", _foreign_zip),
        ("numpy.pkl", _foreign_pickle),
        ("weights.json", _json),
        ("noise.safetensors", _random_bytes),
        ("notes.safetensors", _text),
    ],
)
def test_a_file_that_is_not_a_checkpoint_is_one_checkpoint_error(tmp_path, name, make):
    path = tmp_path / name
    make(path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(build_student("tinyvit_toy"), path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert "re-download" in message or "state_dict" in message


def test_a_directory_is_named_as_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder, not a weights file"):
        read_state_dict(tmp_path)


def test_a_legacy_pickle_of_tensors_loads_and_is_then_checked_against_the_architecture(tmp_path):
    """A plain dict of tensors in torch's pre-1.6 format reads fine; the wrong architecture is named."""
    path = tmp_path / "old.pth"
    torch.save({"weight": torch.zeros(2, 2)}, path, _use_new_zipfile_serialization=False)
    assert set(read_state_dict(path)) == {"weight"}
    with pytest.raises(CheckpointError, match="does not fit architecture 'tinyvit_toy'"):
        load_checkpoint(build_student("tinyvit_toy"), path)


@pytest.mark.parametrize("script", ["evaluate.py", "quantize.py"])
def test_scripts_name_a_text_file_passed_as_checkpoint(tmp_path, script):
    _text(tmp_path / "notes.pth")
    fails_in_one_line(
        [str(REPO / script), "model=tinyvit_toy", f"checkpoint={tmp_path / 'notes.pth'}", f"hydra.run.dir={tmp_path}"],
        tmp_path,
        "CheckpointError",
        "notes.pth",
        "not a PyTorch checkpoint",
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["-m", "tinysam.export", "checkpoint=missing.pth", "model=tinyvit_toy", "out=onnx"], ["missing.pth", "fetch"]),
        (
            ["-m", "tinysam.export", "model=tinyvit_toy", "out=onnx"],
            ["checkpoint", "missing", "checkpoint=PATH|random"],
        ),
        (["-m", "tinysam.data.toyworld", "out=blocker/world", "n_train=1", "n_val=0"], ["blocker", "writable"]),
        (["-m", "tinysam.data.embedding_store", "verify", "no_store"], ["no_store", "precompute"]),
    ],
    ids=["export-missing-checkpoint", "export-no-checkpoint", "toyworld-out-under-a-file", "verify-missing-store"],
)
def test_module_entry_points_give_one_line(tmp_path, args, expected):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    fails_in_one_line(args, tmp_path, *expected)
    assert not (tmp_path / "onnx").exists(), "a failed export leaves no folder behind"


def test_export_of_random_weights_must_be_asked_for_and_is_said(tmp_path):
    world = generate(ToyWorldConfig(out=str(tmp_path / "w"), n_train=0, n_val=1))
    code, out = run_python(
        ["-m", "tinysam.export", "checkpoint=random", "model=tinyvit_toy", "out=onnx", f"images={world / 'val'}"],
        tmp_path,
    )
    assert code == 0, out[-3000:]
    assert "exporting randomly initialised tinyvit_toy weights" in out
    assert json.loads((tmp_path / "onnx" / "export.json").read_text())["checkpoint"] == "random"


def test_a_wrong_type_in_an_override_names_the_field(tmp_path):
    fails_in_one_line(
        [str(REPO / "train.py"), "trainer.max_steps=abc", f"paths.root_dir={tmp_path}"],
        tmp_path,
        "override trainer.max_steps=abc",
        "takes a number (int; the config has 500)",
    )


def test_resuming_a_run_that_never_wrote_a_checkpoint_names_the_folder(tmp_path):
    folder = tmp_path / "outputs" / "train" / "never_ran" / "checkpoints"
    fails_in_one_line(
        [str(REPO / "train.py"), "ckpt_path=last", "run_name=never_ran", f"paths.root_dir={tmp_path}"],
        tmp_path,
        f"ckpt_path=last: no checkpoint in {folder}",
        "ckpt_path=auto",
    )
    assert not (tmp_path / "data").exists(), "it fails before any work"


def test_ckpt_path_auto_resumes_or_starts(tmp_path):
    assert resolve_ckpt_path("auto", tmp_path) is None
    (tmp_path / "last.ckpt").write_bytes(b"")
    assert resolve_ckpt_path("auto", tmp_path) == resolve_ckpt_path("last", tmp_path) == str(tmp_path / "last.ckpt")
    assert resolve_ckpt_path(None, tmp_path) is None
    with pytest.raises(FileNotFoundError, match="ckpt_path=nope.ckpt: no such file"):
        resolve_ckpt_path("nope.ckpt", tmp_path)


def test_sigterm_saves_a_checkpoint_exits_non_zero_and_resumes(tmp_path):
    overrides = small_train_run(tmp_path, steps=12, every=100) + ["callbacks.step_log.every_n_steps=1"]
    proc = run_script("train.py", overrides, cwd=tmp_path)
    lines = []
    for line in proc.stdout:  # StepLog writes a line per step: stdout is a pipe here
        lines.append(line)
        if "step 2/12" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode not in (0, None), out[-3000:]
    last_line = out.strip().splitlines()[-1]
    assert "stopped by SIGTERM at step" in last_line and "ckpt_path=last" in last_line, out[-3000:]
    ckpt_dir = tmp_path / "outputs" / "train" / "toy_distill" / "checkpoints"
    assert (ckpt_dir / "last.ckpt").is_file() and not (ckpt_dir / "student.safetensors").exists()
    resumed = run_script_ok("train.py", overrides + ["ckpt_path=last"], cwd=tmp_path)
    assert "resuming data at epoch" in resumed, resumed[-3000:]
    results = json.loads((tmp_path / "outputs" / "train" / "toy_distill" / "results.json").read_text())
    assert results["global_step"] == 12


def test_a_run_logs_each_line_once_without_advertisements(tmp_path):
    """Output to a pipe: step lines with ETA, clean-pass summaries once, no held-out table explained, outputs named."""
    overrides = small_train_run(tmp_path, steps=8, every=100) + ["callbacks.step_log.every_n_steps=4"]
    out = run_script_ok("train.py", overrides, cwd=tmp_path)
    logged = [line for line in out.splitlines() if line.startswith("[")]  # Hydra's log format: [time][logger][level]
    messages = [line.split(" - ", 1)[-1] for line in logged]
    # each record once: Lightning's own console handler used to print every line a second time
    assert not [a for a, b in zip(messages, messages[1:]) if a == b]
    assert not [line for line in out.splitlines() if line.startswith("INFO:")], "a second handler printed lines"
    assert "Tip:" not in out and "litlogger" not in out
    assert messages.count("train data: 16 samples, none skipped") == 1  # two epochs, said once
    assert any("step 4/8, loss" in m and "ETA" in m for m in messages) and any("step 8/8" in m for m in messages)
    assert "no held-out mIoU: data.val_dirs is empty; pass data.val_dirs=[DIR]" in out
    assert f"outputs in {tmp_path / 'outputs' / 'train' / 'toy_distill'}" in out and "results.json" in out


def test_progress_bar_counts_steps_not_epochs():
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_steps=500, max_epochs=-1, num_training_batches=8)
    assert bar.total_train_batches == 500 and bar._get_train_description(60).strip() == "Step"
    bar._trainer = SimpleNamespace(max_steps=-1, max_epochs=-1, num_training_batches=8)
    assert bar.total_train_batches == 8 and bar._get_train_description(60).strip() == "Epoch 60"


@pytest.fixture(scope="module")
def val_world(tmp_path_factory) -> Path:
    return generate(ToyWorldConfig(out=str(tmp_path_factory.mktemp("world") / "w"), n_train=0, n_val=3)) / "val"


def _dets(world: Path, transform) -> list[dict]:
    instances = json.loads((world / "instances.json").read_text())
    return [transform(dict(a, score=0.9)) for a in instances["annotations"]]


@pytest.mark.parametrize(
    "transform, reason",
    [
        (lambda d: dict(d, bbox=[float("nan")] * 4), "bbox has NaN or inf"),
        (lambda d: dict(d, image_id=d["image_id"] + 1000), "image id does not exist"),
    ],
    ids=["all-nan", "all-unknown-ids"],
)
def test_every_detection_dropped_fails_naming_the_reasons(tmp_path, val_world, transform, reason):
    dets = _dets(val_world, transform)
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    fails_in_one_line(
        [
            str(REPO / "evaluate.py"),
            f"dataset.images={val_world}",
            f"dataset.annotations={val_world / 'instances.json'}",
            f"dataset.detections={tmp_path / 'dets.json'}",
            "dataset.toyworld=null",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
        f"every one of the {len(dets)} detections",
        f"{len(dets)} {reason}",
        "image_id",
    )


def test_a_large_dropped_share_warns_before_the_table(tmp_path, val_world, toy_student, capsys):
    from tinysam.data.layouts import CocoLayout
    from tinysam.eval.coco_instances import evaluate

    dets = _dets(val_world, lambda d: d)
    dets[0]["bbox"] = [float("nan")] * 4
    dets[1]["image_id"] += 1000
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    layout = CocoLayout(str(val_world), str(val_world / "instances.json"), str(tmp_path / "dets.json"))
    evaluate(toy_student, tmp_path / "out", layout)
    out = capsys.readouterr().out
    warning = f"warning: 2 of {len(dets)} detections were not scored (1 bbox has NaN or inf, 1 image id does not exist)"
    assert warning in out and out.index(warning) < out.index("| AP |")
    assert f"wrote {tmp_path / 'out' / 'segm_results.json'}" in out


def test_everything_refuses_annotations_of_other_images_and_counts_partial_cover(tmp_path, val_world):
    mine = tmp_path / "mine"
    mine.mkdir()
    Image.fromarray(np.full((64, 80, 3), 90, np.uint8)).save(mine / "holiday.jpg")
    base = [
        str(REPO / "evaluate.py"),
        "task=everything",
        "dataset.toyworld=null",
        "task.generator.points_per_side=4",
        f"annotations={val_world / 'instances.json'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    fails_in_one_line([*base, f"images={mine}"], tmp_path, "names none of the 1 images", "annotations=null")
    shutil.copy(next(val_world.glob("*.jpg")), mine)
    code, out = run_python([*base, f"images={mine}"], tmp_path)
    assert code == 0, out[-3000:]
    assert "cover 1 of 2 images: only those are scored" in out and "class-agnostic mask AR (%) on 1 annotated" in out


def test_more_bad_inputs_of_my_own_round(tmp_path):
    """A few of the cases from the issue note's own round, at the level where they are decided."""
    from tinysam.data.sa1b import find_pairs
    from tinysam.distill.datamodule import DistillDataModule
    from tinysam.io import check_writable
    from tinysam.quant.artifact import load_quantized
    from tinysam.quant.run import calibration_images

    jsons = tmp_path / "jsons"
    jsons.mkdir()
    (jsons / "sa_1.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"holds no image with its JSON \(1 .json files, 0 images\)"):
        find_pairs(jsons)
    with pytest.raises(ValueError, match="calibration.count=0: calibrate on at least 1 image"):
        calibration_images(jsons, 0)
    with pytest.raises(ValueError, match="data.batch_size=0"):
        DistillDataModule("toy", [], [], 256, batch_size=0)
    (tmp_path / "quantized").mkdir()
    (tmp_path / "quantized" / "quantization.json").write_text(
        json.dumps({"arch": "tinyvit_toy", "weight_bits": 8, "act_bits": 8})
    )
    with pytest.raises(CheckpointError, match="lacks model.safetensors; re-run python quantize.py"):
        load_quantized(tmp_path / "quantized")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(PermissionError, match="not writable"):
        check_writable(tmp_path / "a_file" / "out")


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            [str(REPO / "train.py"), "student.checkpoint=missing.safetensors"],
            ["CheckpointError", "missing.safetensors"],
        ),
        (["-m", "tinysam.data.toyworld", "out=w", "n_train=-1"], ["n_train, n_val, stuff_regions >= 0"]),
    ],
    ids=["error-inside-hydra-instantiate", "toyworld-negative-count"],
)
def test_errors_raised_while_composing_are_one_line_too(tmp_path, args, expected):
    fails_in_one_line([*args, f"paths.root_dir={tmp_path}"] if args[0].endswith(".py") else args, tmp_path, *expected)
